"""`tipcap ablate`: a small grid on a tiny toy world, its result files, and finishing only missing cells."""

import csv
import json

import pytest
import yaml
from conftest import run

import tipcap.experiments
from tipcap.toyclip import train_toyclip

DECODER = {
    "model": {
        "clip_dim": 32,
        "language_model_config": {
            "model_type": "gpt2",
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 64,
            "n_positions": 64,
        },
        "tokenizer": "word-level",
        "prefix_length": 2,
        "pim_heads": 2,
        "pim_layers": 1,
    },
    "train": {
        "max_steps": 20,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup_steps": 2,
        "log_every": 10,
        "checkpoint_every": 10,
    },
}
CELLS = [
    {"name": "none", "kind": "none"},
    {"name": "supervised", "kind": "supervised"},
    {"name": "gaussian-few-pairs", "kind": "gaussian", "setting": "few-pairs"},
    {
        "name": "prompts",
        "kind": "gaussian",
        "setting": "few-pairs",
        "prompt": "pim",
        "eval_prompts": ["none", "oracle"],
    },
]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("grid")
    result = run("toyworld", "--out", root / "world", "--train", 80, "--val", 5, "--test", 12)
    assert result.exit_code == 0, result.output
    spec, _ = train_toyclip(root / "world" / "toyworld.json", root / "clip", steps=2, batch_size=16,
                            config=json.loads(tiny_clip.read_text()), progress=False)  # fmt: skip
    world = root / "world"
    config = {"few_pairs": 20, "seeds": [0], "decoder": DECODER, "cells": CELLS,
              "karpathy": str(world / "toyworld.json"), "web_pairs": str(world / "web_pairs.jsonl"),
              "vocabulary": str(world / "entities.json"), "clip_model": spec.model,
              "clip_pretrained": spec.pretrained}  # fmt: skip
    (root / "grid.yaml").write_text(yaml.safe_dump(config))
    return root


def test_grid_is_resumed_cell_by_cell(grid, monkeypatch):
    out = grid / "ablation"
    calls = {"train": 0, "evaluate": 0}
    real_train, real_evaluate = tipcap.experiments.train, tipcap.experiments.evaluate_split

    def counting_train(*args, **kwargs):
        calls["train"] += 1
        return real_train(*args, **kwargs)

    def dying_evaluate(*args, **kwargs):
        calls["evaluate"] += 1
        if calls["evaluate"] == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(tipcap.experiments, "train", counting_train)
    monkeypatch.setattr(tipcap.experiments, "evaluate_split", dying_evaluate)
    result = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress")
    assert (
        result.exit_code != 0 and calls["train"] == 3
    )  # the third cell was trained, then its evaluation died
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 2

    calls.update(train=0, evaluate=0)
    monkeypatch.setattr(tipcap.experiments, "evaluate_split", real_evaluate)
    result = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert calls["train"] == 1  # only the prompt cell was still untrained
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["cell"], r["eval_prompt"]) for r in rows] == [
        ("none", "none"), ("supervised", "none"), ("gaussian-few-pairs", "none"), ("prompts", "none"),
        ("prompts", "oracle"),
    ]  # fmt: skip
    assert all(0.0 <= float(r["object_f1"]) <= 1.0 and float(r["CIDEr"]) >= 0 for r in rows)
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| prompts | oracle | 1 |" in table
    assert (out / "cider.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "gaps" / "gaussian-few-pairs.png").is_file()


def test_bad_ablation_config_names_the_key(grid, tmp_path):
    result = run("ablate", grid / "grid.yaml", "--out", tmp_path / "x", "--set", "seedz=[1]")
    assert result.exit_code == 1 and "config key 'seedz' is unknown" in result.stderr


def test_quick_demo_end_to_end(tmp_path):
    """The reduced demo from an empty cache: world, CLIP, five methods; a rerun reuses everything."""
    out = tmp_path / "demo"
    result = run("demo", "--quick", "--out", out, "--cache", tmp_path / "cache", "--no-progress")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["cell"], r["eval_prompt"]) for r in rows] == [
        ("supervised", "none"), ("none", "none"), ("isotropic", "none"), ("gaussian-few-pairs", "none"),
        ("gaussian-few-pairs-prompts", "none"), ("gaussian-few-pairs-prompts", "oracle"),
    ]  # fmt: skip
    for row in rows:
        # Every decoder reads the image: it names the scene's objects far more often than a random
        # caption of the world does (object F1 about 0.05), and its captions match the references.
        assert 0.12 <= float(row["object_f1"]) <= 1.0, row
        assert 0.5 <= float(row["CIDEr"]) < 10 and 0.1 < float(row["BLEU-4"]) < 1, row
        assert 0.0 <= float(row["CLIPScore"]) <= 2.5
    assert "| supervised | none | 1 |" in result.stdout
    for name in ("results.csv", "table.md", "cider.png", "gap.png"):
        assert (out / name).is_file()
    report = json.loads(next((tmp_path / "cache").glob("toyworld-*/clip-*/toyclip_report.json")).read_text())
    # The toy CLIP learned the world (images retrieve their captions) and kept a modality gap.
    assert report["steps"] == 400 and report["recall_at_1"] >= 0.4
    assert report["mu_norm"] >= 0.3 and report["matched_cosine"] <= 0.9
    # A second run reuses the cached world and CLIP and every finished cell: the same table, to the digit.
    again = run("demo", "--quick", "--out", out, "--cache", tmp_path / "cache", "--no-progress")
    assert again.exit_code == 0 and again.stdout == result.stdout
