"""`tipcap ablate`: a small grid on a tiny toy world and reduced COCO grids, their result files, resuming."""

import csv
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_GPT2, assert_toy_row_recomputed, grid_row_cider, karpathy_references, run
from scipy.stats import ttest_1samp

import tipcap.evaluation.evaluate
import tipcap.grid.planning
import tipcap.grid.runner
from tipcap.config import load_config
from tipcap.evaluation.stats import image_interval, write_image_scores
from tipcap.gap import Gap
from tipcap.grid import Cell, Job, plot_cider_vs_pairs
from tipcap.grid.compare import grid_decisions, grid_scores, write_comparisons
from tipcap.grid.config import Family
from tipcap.grid.selection import Selection
from tipcap.io import load_json
from tipcap.toy.clip import train_toyclip
from tipcap.toy.plugin import scene_objects
from tipcap.toy.world1 import caption_objects

DECODER = {
    "model": {
        "clip_dim": 32,
        "language_model_config": dict(TINY_GPT2),
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
        "eval_prompts": ["none", "oracle", "auto", "wrong", "oracle-one", "oracle-missing"],
    },
]


def per_image(out: Path, evaluation: str) -> list[dict]:
    """A grid evaluation's per_image.json rows."""
    return load_json(out / "eval" / evaluation / "per_image.json")


def record_builds(monkeypatch) -> list[str]:
    """The names of the grid's training and evaluation calls from now on, in order (each still runs)."""
    calls: list[str] = []
    for name in ("train", "evaluate_split"):
        real = getattr(tipcap.grid.planning, name)
        monkeypatch.setattr(
            tipcap.grid.planning,
            name,
            lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k),
        )
    return calls


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("grid")
    result = run("toyworld", "--out", root / "world", "--version", 2, "--train", 80, "--val", 5, "--test", 12)
    assert result.exit_code == 0, result.output
    spec, _ = train_toyclip(root / "world" / "toyworld.json", root / "clip", steps=2, batch_size=16,
                            config=json.loads(tiny_clip.read_text()), progress=False)  # fmt: skip
    world = root / "world"
    config = {"few_pairs": 20, "seeds": [0], "decoder": DECODER, "cells": CELLS,
              "karpathy": str(world / "toyworld.json"), "web_pairs": str(world / "web_pairs.jsonl"),
              "vocabulary": str(world / "entities.json"),
              "embed": {"model": spec.model, "pretrained": spec.pretrained},
              "eval": {"beams": 1, "metrics": ["bleu", "rouge", "cider"], "score_clip": spec.model,
                       "score_pretrained": spec.pretrained}}  # fmt: skip
    (root / "grid.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.mark.slow
def test_grid_is_resumed_cell_by_cell(grid, monkeypatch):
    out = grid / "ablation"
    calls = {"train": 0, "evaluate": 0}
    real_train, real_evaluate = tipcap.grid.planning.train, tipcap.grid.planning.evaluate_split

    def counting_train(*args, **kwargs):
        calls["train"] += 1
        return real_train(*args, **kwargs)

    def dying_evaluate(*args, **kwargs):
        calls["evaluate"] += 1
        if calls["evaluate"] == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(tipcap.grid.planning, "train", counting_train)
    monkeypatch.setattr(tipcap.grid.planning, "evaluate_split", dying_evaluate)
    result = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress")
    assert (
        result.exit_code != 0 and calls["train"] == 3
    )  # the third cell was trained, then its evaluation died
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 2

    calls.update(train=0, evaluate=0)
    monkeypatch.setattr(tipcap.grid.planning, "evaluate_split", real_evaluate)
    result = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert calls["train"] == 1  # only the prompt cell was still untrained
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["cell"], r["eval_prompt"]) for r in rows] == [
        ("none", "none"), ("supervised", "none"), ("gaussian-few-pairs", "none"), ("prompts", "none"),
        ("prompts", "oracle"), ("prompts", "auto"), ("prompts", "wrong"), ("prompts", "oracle-one"),
        ("prompts", "oracle-missing"),
    ]  # fmt: skip
    references = karpathy_references(grid / "world" / "toyworld.json", "test")
    expected = [grid_row_cider(out, r, references) for r in rows]
    assert max(expected) > 0
    assert [float(r["CIDEr"]) for r in rows] == pytest.approx(expected, abs=1e-9)
    # The toy CLIP scores CLIP-S (it is the grid's CLIP: the evaluations reuse its image embeddings), and the
    # scenes give object F1 and CHAIR, and in world 2, the default, each aspect's claim F1, for every prompt
    # mode: each row's, recomputed from its captions and the scenes.
    for row in rows:
        assert_toy_row_recomputed(out, row, grid / "world" / "toyworld.json")
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + len(rows) + 2 and "| prompts | oracle | 1 |" in table  # + footnote
    assert "| CLIP-S | RefCLIP-S | CHAIR-i | CHAIR-s |" in table
    metrics = json.loads((out / "eval" / "prompts-seed0-wrong" / "metrics.json").read_text())
    assert metrics["scorer"]["clip"]["model"] == str(Path(grid / "clip" / "toyclip.json").resolve())
    assert metrics["hallucination"]["truth"] == "the scenes' objects"
    objects = scene_objects(grid / "world" / "toyworld.json")
    for mode in ("oracle", "wrong"):
        for row in json.loads((out / "eval" / f"prompts-seed0-{mode}" / "per_image.json").read_text()):
            truth = objects[row["image_id"]]
            if mode == "oracle":
                assert row["prompt"] == truth
            else:
                assert len(row["prompt"]) == len(truth) and not set(row["prompt"]) & set(truth)
            hallucinated = [o for o in row["objects_mentioned"] if o not in truth]
            assert row["objects_hallucinated"] == hallucinated
    # oracle-one: one true object; oracle-missing: one the caption without prompts (the same decoder's
    # "none" evaluation) leaves out, or none where it names them all.
    unprompted = {r["image_id"]: r["prediction"] for r in per_image(out, "prompts-seed0-none")}
    for row in per_image(out, "prompts-seed0-oracle-one"):
        assert len(row["prompt"]) == 1 and row["prompt"][0] in objects[row["image_id"]]
    for row in per_image(out, "prompts-seed0-oracle-missing"):
        named = {f"{colour} {shape}" for colour, shape in caption_objects(unprompted[row["image_id"]])}
        left_out = set(objects[row["image_id"]]) - named
        assert (len(row["prompt"]), set(row["prompt"]) <= left_out) == (min(len(left_out), 1), True)
    # Adherence: the share of a prompted image's words its caption names, as (colour, shape) pairs, averaged
    # over the prompted images; Adherence-all, the share naming every word. With wrong prompts, the share
    # of wrong words repeated. Unprompted evaluations have none.
    by_mode = {r["eval_prompt"]: r for r in rows}
    for mode in ("oracle", "wrong", "oracle-one", "oracle-missing", "auto"):
        prompted = [r for r in per_image(out, f"prompts-seed0-{mode}") if r["prompt"]]
        shares = []
        for r in prompted:
            named = {f"{colour} {shape}" for colour, shape in caption_objects(r["prediction"])}
            shares.append(sum(word in named for word in set(r["prompt"])) / len(set(r["prompt"])))
        if not prompted:
            assert by_mode[mode]["Adherence"] == "", mode
            continue
        assert float(by_mode[mode]["Adherence"]) == pytest.approx(np.mean(shares)), mode
        assert float(by_mode[mode]["Adherence-all"]) == pytest.approx(np.mean([s == 1 for s in shares])), mode
    assert by_mode["none"]["Adherence"] == "" and "| Adherence | Adherence-all |" in table
    # Only the prompted decoder is handed the entity vocabulary (the others would warn that it is unused).
    for name, prompted in (("none", False), ("prompts", True)):
        saved = yaml.safe_load((out / "runs" / f"{name}-seed0" / "config.yaml").read_text())
        assert (saved["model"]["vocabulary"] is not None) == prompted, name
    assert (out / "cider.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "gaps" / "gaussian-few-pairs-seed0.png").is_file()


@pytest.mark.slow
def test_cells_override_gap_and_evaluation_settings(grid, tmp_path):
    overrides = {"gap.renorm": False, "gap.shrinkage": False, "eval.beams": 3}
    cells = [{"name": "plain", "kind": "gaussian", "setting": "few-pairs"},
             {"name": "tuned", "kind": "gaussian", "setting": "few-pairs", "set": overrides}]  # fmt: skip
    result = run("ablate", grid / "grid.yaml", "--out", tmp_path / "out", "--no-progress",
                 "--set", f"cells={json.dumps(cells)}")  # fmt: skip
    assert result.exit_code == 0, result.output
    records = {
        name: json.loads((tmp_path / "out" / "eval" / f"{name}-seed0-none" / "provenance.json").read_text())
        for name in ("plain", "tuned")
    }
    plain, tuned = (records[name]["config"] for name in ("plain", "tuned"))
    assert plain["eval"]["beams"] == 1 and tuned["eval"]["beams"] == 3
    assert plain["context"]["gap"]["renorm"] and plain["context"]["gap"]["shrinkage"]
    assert not tuned["context"]["gap"]["renorm"] and not tuned["context"]["gap"]["shrinkage"]
    # The tuned cell fitted a gap of its own, with the values it asked for.
    gaps = {path.name for path in (tmp_path / "out" / "gaps").glob("*.safetensors")}
    assert gaps == {"gaussian-few-pairs-seed0.safetensors", "tuned-seed0.safetensors"}
    tuned_gap = Gap.load(tmp_path / "out" / "gaps" / "tuned-seed0.safetensors")
    assert not tuned_gap.renorm and tuned_gap.provenance["config"]["shrinkage"] is False
    assert not tuned_gap.info.get("shrinkage")


def test_cider_against_pairs_is_drawn_for_two_shares_of_pairs_or_more(tmp_path):
    """With one share, the few-pairs methods would be single points, which cider.png shows already."""

    def row(cell: str, few_pairs: str, fraction: str, cider: float) -> dict:
        method = cell.rsplit("-", 1)[0] if few_pairs else cell
        return {"cell": cell, "method": method, "eval_prompt": "none", "few_pairs": few_pairs,
                "paired_fraction": fraction, "setting": "few-pairs", "CIDEr": cider}  # fmt: skip

    rows = [row("gaussian-few-pairs-1pct", "1%", "0.01", 0.5), row("isotropic", "", "", 0.4)]
    path = tmp_path / "cider_vs_pairs.png"
    path.write_bytes(b"from an earlier grid in this folder")
    assert not plot_cider_vs_pairs(rows, path) and not path.exists()
    rows.append(row("gaussian-few-pairs-10pct", "10%", "0.1", 0.6))
    assert plot_cider_vs_pairs(rows, path) and path.read_bytes()[:4] == b"\x89PNG"


def test_a_cell_s_nested_override_stays_its_own(grid, tmp_path):
    """A cell that sets a key inside a section (the LM's layers) changes its own decoder, not the others'."""
    out = tmp_path / "out"
    cells = [{"name": "deep", "kind": "supervised", "set": {"model.language_model_config.n_layer": 3}},
             {"name": "plain", "kind": "supervised"}]  # fmt: skip
    result = run("ablate", grid / "grid.yaml", "--out", out, "--plan", "--no-progress",
                 "--set", f"cells={json.dumps(cells)}")  # fmt: skip
    assert result.exit_code == 0, result.output
    configs = {name: load_config(out / "runs" / f"{name}-seed0" / "train.yaml") for name in ("deep", "plain")}
    layers = {name: config.model.language_model_config["n_layer"] for name, config in configs.items()}
    assert layers == {"deep": 3, "plain": DECODER["model"]["language_model_config"]["n_layer"]}


def test_each_seed_draws_its_own_few_pairs(grid, tmp_path):
    """Seeds differ in the paired images drawn (data_seed + seed), so each seed fits its own gap."""
    out = tmp_path / "out"
    cells = [{"name": "gaussian-few-pairs", "kind": "gaussian", "setting": "few-pairs"}]
    result = run("ablate", grid / "grid.yaml", "--out", out, "--plan", "--no-progress",
                 "--set", "seeds=[0, 1]", "--set", f"cells={json.dumps(cells)}")  # fmt: skip
    assert result.exit_code == 0, result.output
    drawn = [
        set(load_json(out / "stores" / f"train-images-few-20-draw{seed}" / "ids.json")) for seed in (0, 1)
    ]
    assert len(drawn[0]) == len(drawn[1]) == 20 and drawn[0] != drawn[1]
    gaps = [Gap.load(out / "gaps" / f"gaussian-few-pairs-seed{seed}.safetensors") for seed in (0, 1)]
    assert not torch.equal(gaps[0].mu, gaps[1].mu)
    for seed in (0, 1):
        config = load_config(out / "runs" / f"gaussian-few-pairs-seed{seed}" / "train.yaml")
        assert Path(config.data.gap).name == f"gaussian-few-pairs-seed{seed}.safetensors"


def test_a_rerun_reuses_every_step_and_a_changed_gap_rebuilds_its_cell_alone(grid, tmp_path, monkeypatch):
    """Each step is reused while its provenance key is unchanged: a second run builds nothing; a cell's
    changed gap setting rebuilds that cell's gap, then its training and evaluation (their inputs changed),
    each with its reason, and nothing of the other cell."""
    out = tmp_path / "out"
    cells = [{"name": "plain", "kind": "isotropic"},
             {"name": "noisy", "kind": "isotropic", "set": {"gap.noise_scale": 0.5}}]  # fmt: skip
    flags = ["--set", f"cells={json.dumps(cells)}", "--set", "decoder.train.max_steps=4"]
    first = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress", *flags)
    assert first.exit_code == 0, first.output
    assert "gap noisy: building (not built yet)" in first.stderr
    assert "training plain-seed0: building (not built yet)" in first.stderr
    results = (out / "results.csv").read_bytes()

    calls = record_builds(monkeypatch)
    again = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress", *flags)
    assert again.exit_code == 0, again.output
    assert calls == [] and "building" not in again.stderr, again.stderr
    assert (out / "results.csv").read_bytes() == results

    changed = [flag.replace('"gap.noise_scale": 0.5', '"gap.noise_scale": 2') for flag in flags]
    rebuilt = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress", *changed)
    assert rebuilt.exit_code == 0, rebuilt.output
    lines = [line for line in rebuilt.stderr.splitlines() if "building" in line]
    assert lines[:2] == [
        "gap noisy: rebuilding (its config changed: gap.noise_scale)",
        "training noisy-seed0: rebuilding (its inputs changed: gap)",
    ], rebuilt.stderr
    assert len(lines) == 3 and lines[2].startswith(
        "evaluation noisy-seed0-none: rebuilding (its config changed: "
    )
    assert "context.gap.noise_scale" in lines[2] and "its inputs changed: model" in lines[2]
    assert calls == ["train", "evaluate_split"]
    assert Gap.load(out / "gaps" / "noisy.safetensors").info["noise_scale"] == 2


@pytest.mark.slow
def test_a_grid_folder_moved_elsewhere_is_reused(grid, tmp_path, monkeypatch):
    """A training's config names its inputs (stores, gap, the decoder it starts from) by absolute path,
    but its recorded digests say what they hold: a grid folder moved (another disk, another machine)
    rebuilds nothing, and a changed input is still found."""
    cells = [{"name": "plain", "kind": "isotropic"},
             {"name": "tuned", "kind": "isotropic", "init_from": "plain"}]  # fmt: skip
    flags = ["--set", f"cells={json.dumps(cells)}", "--set", "decoder.train.max_steps=4", "--no-progress"]
    first = run("ablate", grid / "grid.yaml", "--out", tmp_path / "here", *flags)
    assert first.exit_code == 0, first.output
    results = (tmp_path / "here" / "results.csv").read_bytes()
    shutil.move(tmp_path / "here", tmp_path / "there")

    calls = record_builds(monkeypatch)
    moved = run("ablate", grid / "grid.yaml", "--out", tmp_path / "there", *flags)
    assert moved.exit_code == 0, moved.output
    assert calls == [] and "building" not in moved.stderr, moved.stderr
    assert (tmp_path / "there" / "results.csv").read_bytes() == results

    cells[0]["set"] = {"gap.noise_scale": 0.5}
    flags[1] = f"cells={json.dumps(cells)}"
    changed = run("ablate", grid / "grid.yaml", "--out", tmp_path / "there", *flags)
    assert changed.exit_code == 0, changed.output
    lines = [line for line in changed.stderr.splitlines() if line.startswith("training")]
    assert lines == [
        "training plain-seed0: rebuilding (its inputs changed: gap)",
        "training tuned-seed0: rebuilding (its inputs changed: init_from)",
    ], changed.stderr


def test_a_folder_whose_seeds_shared_one_few_pairs_draw_is_refused(grid, tmp_path):
    """A grid folder written when every seed drew the same few pairs holds models that are not per-seed."""
    out = tmp_path / "out"
    result = run("ablate", grid / "grid.yaml", "--out", out, "--plan", "--no-progress")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "grid.json").read_text())
    del saved["fixed"]["few_pairs_draw"]
    (out / "grid.json").write_text(json.dumps(saved))
    refused = run("ablate", grid / "grid.yaml", "--out", out, "--plan", "--no-progress")
    assert refused.exit_code == 1 and "a grid with other few_pairs_draw" in refused.stderr


T975_DF2 = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # Student's t, df 2, in closed form


def expected_verdict(differences: list[float], margin: float | None = None) -> str:
    """The verdict of one comparison read alone, from its per-seed differences (scipy's t-tests)."""
    if ttest_1samp(differences, 0.0).pvalue <= 0.05:
        return "resolved (A > B)" if np.mean(differences) > 0 else "resolved (A < B)"
    if margin is not None:
        tost = max(ttest_1samp(differences, -margin, alternative="greater").pvalue,
                   ttest_1samp(differences, margin, alternative="less").pvalue)  # fmt: skip
        if tost <= 0.05:
            return f"equivalent within ±{margin:g}"
    return "undecided"


@pytest.mark.slow
def test_intervals_and_paired_comparisons(grid, tmp_path):
    """results.csv holds each row's image-level interval, table.md mean ± the half-width of the t-interval
    over seeds with their sd, comparisons.md each seed's difference and the verdict of the grid's family and
    of its secondary comparisons; tipcap compare prints the per-seed differences and the verdict."""
    out = tmp_path / "out"
    cells = [{"name": "none", "kind": "none"}, {"name": "retrieval", "kind": "retrieval"}]
    families = {"chain": {"margin": 0.05, "comparisons": [["retrieval", "none"]]}}
    result = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress", "--set", "seeds=[0, 1, 2]",
                 "--set", f"cells={json.dumps(cells)}", "--set", f"families={json.dumps(families)}",
                 "--set", "compare=[[retrieval, none, rouge-l]]")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["cell"], r["seed"]) for r in rows] == [
        ("none", "0"),
        ("none", "1"),
        ("none", "2"),
        ("retrieval", ""),
    ]
    cider = {}
    for row in rows:
        per_image = json.loads((out / "eval" / Path(row_dir(row)) / "per_image.json").read_text())
        cider[row_dir(row)] = np.array([p["CIDEr"] for p in per_image])
        one = image_interval(cider[row_dir(row)])  # a row's interval: over the images of its one seed
        assert (float(row["CIDEr_ci_low"]), float(row["CIDEr_ci_high"])) == pytest.approx((one.low, one.high))
        assert float(row["CIDEr_ci_low"]) <= float(row["CIDEr"]) <= float(row["CIDEr_ci_high"])
        assert "BLEU-4_ci_low" not in row  # a corpus statistic: no per-image scores
        assert float(row["ROUGE-L_ci_low"]) <= float(row["ROUGE-L"]) <= float(row["ROUGE-L_ci_high"])
    table = (out / "table.md").read_text()
    per_seed = [cider[f"none-seed{s}-none"].mean() for s in range(3)]
    sd = np.std(per_seed, ddof=1)
    mean = np.mean([float(r["CIDEr"]) for r in rows[:3]])
    assert f"| none | none | 3 | {mean:.3f} ± {T975_DF2 * sd / math.sqrt(3):.3f} (sd {sd:.3f}) |" in table
    retrieval = image_interval(cider["retrieval-none"])
    assert f"| retrieval | none | 1 | {float(rows[3]['CIDEr']):.3f} ± {retrieval.half_width:.3f}‡ |" in table
    assert "± is the half-width of the 95% t-interval over the seeds" in table
    assert "‡ marks a cell evaluated once" in table

    differences = [float(np.mean(cider["retrieval-none"] - cider[f"none-seed{s}-none"])) for s in range(3)]
    verdict = expected_verdict(differences, 0.05)
    markdown = (out / "comparisons.md").read_text()
    assert "## Family chain: CIDEr, Holm's correction over its 1 tested comparison at α = 0.05, " in markdown
    seeds = ", ".join(f"{d:+.4f}" for d in differences)
    family_row = next(line for line in markdown.splitlines() if line.startswith("| retrieval − none | CIDEr"))
    assert family_row.startswith(f"| retrieval − none | CIDEr | {seeds} | {np.mean(differences):+.4f} | ")
    assert family_row.endswith(f"| {verdict} |"), (family_row, verdict)
    tost = max(ttest_1samp(differences, -0.05, alternative="greater").pvalue,
               ttest_1samp(differences, 0.05, alternative="less").pvalue)  # fmt: skip
    assert (
        f"| {'equivalent' if tost <= 0.05 else 'not shown'}: p {tost:.3g}, Holm p {tost:.3g} |" in family_row
    )
    assert "## Secondary comparisons: each read alone, uncorrected" in markdown
    assert "| retrieval − none | ROUGE-L | " in markdown
    recorded = list(csv.DictReader((out / "comparisons.csv").open()))
    assert [(r["family"], r["metric"]) for r in recorded] == [("chain", "CIDEr"), ("", "ROUGE-L")]
    assert list(json.loads(recorded[0]["seed_differences"]).values()) == pytest.approx(differences)
    assert float(recorded[0]["p_t"]) == pytest.approx(ttest_1samp(differences, 0.0).pvalue)
    assert recorded[0]["verdict"] == verdict and recorded[1]["p_holm"] == ""
    # The permutation test over images, exact: all 2^12 swaps of an image's two seed-averaged scores.
    per_image_difference = cider["retrieval-none"] - np.mean(
        [cider[f"none-seed{s}-none"] for s in range(3)], 0
    )
    flips = np.array(list(itertools.product((1, -1), repeat=len(per_image_difference))))
    null = (flips * per_image_difference).mean(axis=1)
    exact = np.mean(np.abs(null) >= abs(per_image_difference.mean()) * (1 - 1e-9))
    assert float(recorded[0]["p_images_fixed_decoders"]) == pytest.approx(exact, abs=1e-12)

    printed = run("compare", "--grid-out", out, "--a", "none", "--b", "retrieval", "--margin", "0.05")
    assert printed.exit_code == 0, printed.output
    lines = printed.stdout.splitlines()
    assert lines[0].startswith("none − retrieval (CIDEr; 3 seeds × 12 images"), lines
    assert lines[1] == "  per-seed differences: " + ", ".join(
        f"seed {s} {-d:+.4f}" for s, d in enumerate(differences)
    )
    swapped = expected_verdict([-d for d in differences], 0.05)
    assert f"  verdict (a single comparison, uncorrected): {swapped}" in lines
    assert any(line.startswith("  equivalence within ±0.05 (TOST over seeds): p = ") for line in lines)
    wrong = run("compare", "--grid-out", out, "--a", "nonex", "--b", "none")
    assert (
        wrong.exit_code == 1
        and "--a 'nonex': no such evaluated cell (cells: none, retrieval)" in wrong.stderr
    )
    bleu = run("compare", "--grid-out", out, "--a", "none", "--b", "retrieval", "--metric", "bleu-4")
    assert bleu.exit_code == 1 and "--metric 'bleu-4'" in bleu.stderr


def row_dir(row: dict) -> str:
    """A results.csv row's evaluation folder name."""
    seed = f"-seed{row['seed']}" if row["seed"] else ""
    return f"{row['cell']}{seed}-{row['eval_prompt']}"


def test_object_f1_and_chair_of_a_row_match_a_hand_count(grid, tmp_path, monkeypatch):
    """A row's object F1 and CHAIR against a count made here from the scenes and captions written for them:
    per image F1 = 2 · right pairs / (pairs named + pairs in the scene), pairs being distinct
    (colour, shape); CHAIR-s the share of captions naming a pair absent from the scene, CHAIR-i the share
    of mentions (repeats included) that do."""
    document = json.loads((grid / "world" / "toyworld.json").read_text())
    scenes = [
        (entry["filename"].removesuffix(".png"), [(o["colour"], o["shape"]) for o in entry["objects"]])
        for entry in document["images"]
        if entry["split"] == "test"
    ]
    everywhere = {
        pair for entry in document["images"] for pair in ((o["colour"], o["shape"]) for o in entry["objects"])
    }
    absent = [sorted(everywhere - set(pairs))[0] for _, pairs in scenes]

    def phrase(pair: tuple[str, str]) -> str:
        return f"a {pair[0]} {pair[1]}"

    # (caption, pairs named, right pairs named, mentions, absent mentions) per test image, in file order.
    first, second, _, fourth = (pairs for _, pairs in scenes[:4])
    written = [
        (" and ".join(phrase(p) for p in dict.fromkeys(first)) + ".", len(set(first)), len(set(first)),
         len(set(first)), 0),  # every object, each once
        (f"{phrase(second[0])} and {phrase(absent[1])}.", 2, 1, 2, 1),  # one right, one absent
        (f"{phrase(absent[2])} on a plain background.", 1, 0, 1, 1),  # only an absent one
        (f"{phrase(fourth[0])} and {phrase(fourth[0])}.", 1, 1, 2, 0),  # the same pair twice
    ]  # fmt: skip
    written += [("an empty picture.", 0, 0, 0, 0)] * (len(scenes) - len(written))
    captions = [caption for caption, *_ in written]
    monkeypatch.setattr(tipcap.evaluation.evaluate, "retrieve_captions", lambda embeddings, texts: captions)
    out = tmp_path / "out"
    cells = [{"name": "retrieval", "kind": "retrieval"}]
    result = run(
        "ablate", grid / "grid.yaml", "--out", out, "--no-progress", "--set", f"cells={json.dumps(cells)}"
    )
    assert result.exit_code == 0, result.output
    assert [(p["image_id"], p["prediction"]) for p in per_image(out, "retrieval-none")] == [
        (image_id, caption) for (image_id, _), caption in zip(scenes, captions, strict=True)
    ]
    f1 = [
        2 * right / (named + len(set(pairs)))
        for (_, pairs), (_, named, right, _, _) in zip(scenes, written, strict=True)
    ]
    (row,) = csv.DictReader((out / "results.csv").open())
    assert float(row["object_f1"]) == pytest.approx(sum(f1) / len(f1), abs=1e-9)
    hallucinating = sum(1 for *_, wrong in written if wrong)
    assert float(row["CHAIR-s"]) == pytest.approx(hallucinating / len(scenes), abs=1e-9)
    assert float(row["CHAIR-i"]) == pytest.approx(sum(w[4] for w in written) / sum(w[3] for w in written))


def test_comparisons_name_cells_of_the_grid(grid, tmp_path):
    result = run("ablate", grid / "grid.yaml", "--out", tmp_path / "x", "--set", "compare=[[none, nobody]]")
    assert result.exit_code == 1 and "config key 'compare[0]': 'nobody' is not a cell" in result.stderr
    result = run(
        "ablate", grid / "grid.yaml", "--out", tmp_path / "x", "--set", "compare=[[prompts, none:oracle]]"
    )
    assert result.exit_code == 1 and "none is evaluated with prompts none only" in result.stderr


def test_families_are_checked_key_by_key(grid, tmp_path):
    """A family's mistakes are refused before anything runs, each naming its key."""
    cases = [
        ({"chain": {"comparisons": [["none", "nobody"]]}},
         "config key 'families.chain.comparisons[0]': 'nobody' is not a cell"),
        ({"chain": {"comparisons": [["none", "supervised", "rouge-l"]]}},
         "config key 'families.chain.comparisons[0]': a family's comparison is [A, B]"),
        ({"chain": {"comparisons": []}}, "config key 'families.chain.comparisons': empty"),
        ({"chain": {"metric": "bleu-4", "comparisons": [["none", "supervised"]]}},
         "config key 'families.chain.metric': 'bleu-4': paired comparisons need per-image scores"),
        ({"chain": {"margin": 0, "comparisons": [["none", "supervised"]]}},
         "config key 'families.chain.margin': input should be greater than 0"),
        ({"chain": {"margins": 0.05, "comparisons": [["none", "supervised"]]}},
         "config key 'families.chain.margins' is unknown"),
        ({"chain": {"comparisons": [["prompts", "none:oracle"]]}},
         "config key 'families.chain.comparisons[0]': none is evaluated with prompts none only"),
    ]  # fmt: skip
    for families, message in cases:
        result = run("ablate", grid / "grid.yaml", "--out", tmp_path / "x", "--plan",
                     "--set", f"families={json.dumps(families)}")  # fmt: skip
        assert result.exit_code == 1 and message in result.stderr, (families, result.output)
    assert not (tmp_path / "x").exists()


def fake_grid_out(out: Path, cells: dict[str, np.ndarray]) -> None:
    """A grid output folder as tipcap compare reads it: per cell, its per-seed CIDEr of each image (a
    [S, N] matrix; a cell of one row without seed is a baseline evaluated once)."""
    for cell, matrix in cells.items():
        seeds = [None] if cell == "retrieval" else list(range(len(matrix)))
        for seed, row in zip(seeds, matrix, strict=True):
            folder = out / "eval" / (f"{cell}-none" if seed is None else f"{cell}-seed{seed}-none")
            folder.mkdir(parents=True)
            write_image_scores(folder / "scores.json", list(range(len(row))), {"CIDEr": row.tolist()})
            (folder / "row.json").write_text(json.dumps({"cell": cell, "eval_prompt": "none", "seed": seed}))


def test_compare_prints_per_seed_differences_and_a_verdict(tmp_path):
    """tipcap compare on a grid folder: six seeds give a sign-flip p and a verdict; one seed none."""
    rng = np.random.default_rng(0)
    base = rng.random((6, 30))
    offsets = np.array([0.10, 0.12, 0.08, 0.11, 0.09, 0.13])
    cells = {"gaussian": base + offsets[:, None], "none": base, "retrieval": rng.random((1, 30)),
             "single": base[:1] + 0.3}  # fmt: skip
    fake_grid_out(tmp_path, cells)
    printed = run("compare", "--grid-out", tmp_path, "--a", "gaussian", "--b", "none")
    assert printed.exit_code == 0, printed.output
    lines = printed.stdout.splitlines()
    assert lines[0] == "gaussian − none (CIDEr; 6 seeds × 30 images, the test images held fixed)"
    assert lines[1] == "  per-seed differences: " + ", ".join(
        f"seed {s} {d:+.4f}" for s, d in enumerate(offsets)
    )
    assert "  sign-flip p over seeds = 0.0312" in lines  # every difference positive: 2 of the 64 sign flips
    assert lines[-1] == "  verdict (a single comparison, uncorrected): resolved (A > B)"
    # Within ±0.2 of each other, but the difference (about 0.11) is resolved: resolved wins, TOST says so too.
    printed = run("compare", "--grid-out", tmp_path, "--a", "none", "--b", "gaussian", "--margin", "0.2")
    assert "  verdict (a single comparison, uncorrected): resolved (A < B)" in printed.stdout
    assert printed.stdout.rstrip().endswith(": equivalent")
    # A baseline evaluated once pairs with every seed.
    printed = run("compare", "--grid-out", tmp_path, "--a", "gaussian", "--b", "retrieval")
    assert "(CIDEr; 6 seeds × 30 images" in printed.stdout
    printed = run("compare", "--grid-out", tmp_path, "--a", "single", "--b", "none", "--margin", "0.05")
    assert printed.exit_code == 0, printed.output
    assert "bootstrap interval over images of one seed" in printed.stdout
    assert "  verdict (a single comparison, uncorrected): undecided (one seed)" in printed.stdout
    assert "  equivalence within ±0.05: no test with one seed" in printed.stdout
    for margin in ("-1", "nan"):
        refused = run("compare", "--grid-out", tmp_path, "--a", "gaussian", "--b", "none", "--margin", margin)
        assert refused.exit_code == 2 and "--margin" in refused.output, refused.output


def test_comparisons_md_reads_each_family_with_holm_then_the_secondary_ones(tmp_path):
    """comparisons.md and .csv of a grid folder: a family of two read with Holm (the first at 1 − 0.05/2, the
    second at 1 − 0.05), per-seed differences, sign-flip p at six seeds, then a secondary comparison."""
    rng = np.random.default_rng(1)
    base = rng.random((6, 30))
    resolved = np.array([0.10, 0.12, 0.08, 0.11, 0.09, 0.13])
    flat = np.array([0.004, -0.003, 0.001, -0.002, 0.003, 0.0])
    fake_grid_out(tmp_path, {"gaussian": base + resolved[:, None], "diagonal": base + flat[:, None],
                             "none": base, "single": base[:1] + 0.5})  # fmt: skip
    families = {"chain": Family(comparisons=[["gaussian", "none"], ["diagonal", "none"]], margin=0.02),
                "alone": Family(comparisons=[["single", "none"]])}  # fmt: skip
    write_comparisons(grid_decisions(grid_scores(tmp_path), families, [["diagonal", "gaussian"]]), tmp_path)
    lines = (tmp_path / "comparisons.md").read_text().splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("## Family chain"))
    assert lines[heading] == ("## Family chain: CIDEr, Holm's correction over its 2 tested comparisons at "
                              "α = 0.05, equivalence within ±0.02 by TOST, Holm-corrected too")  # fmt: skip
    first, second = lines[heading + 4], lines[heading + 5]
    p_first, p_second = ttest_1samp(resolved, 0.0).pvalue, ttest_1samp(flat, 0.0).pvalue
    assert p_first < p_second  # the order Holm ranks them in
    adjusted = ttest_1samp(resolved, 0.0).confidence_interval(1 - 0.05 / 2)
    cells = [c.strip() for c in first.strip("|").split("|")]
    assert cells[:5] == ["gaussian − none", "CIDEr", ", ".join(f"{d:+.4f}" for d in resolved),
                         f"{resolved.mean():+.4f}", f"{resolved.std(ddof=1):.4f}"]  # fmt: skip
    assert cells[6] == f"[{adjusted.low:+.4f}, {adjusted.high:+.4f}] (97.5%)"
    assert (cells[7], cells[8]) == (f"{p_first:.3g}", f"{2 * p_first:.3g}")
    assert cells[9] == "0.0312" and cells[-1] == "resolved (A > B)"  # all six positive: 2/64
    cells = [c.strip() for c in second.strip("|").split("|")]
    assert cells[8] == f"{max(2 * p_first, p_second):.3g}" and cells[6].endswith("(95%)")
    assert cells[11].startswith("equivalent: p ") and cells[-1] == "equivalent within ±0.02"
    # A family whose cell ran one seed: an image-level interval and no verdict.
    heading = lines.index(
        "## Family alone: CIDEr, one seed: no seed-level test, no verdict, no equivalence margin"
    )
    cells = [c.strip() for c in lines[heading + 4].strip("|").split("|")]
    assert cells[5].endswith("(images, one seed)") and cells[-1] == "undecided (one seed)"
    secondary = lines.index("## Secondary comparisons: each read alone, uncorrected")
    cells = [c.strip() for c in lines[secondary + 4].strip("|").split("|")]
    assert cells[0] == "diagonal − gaussian" and (cells[6], cells[8]) == ("—", "—")
    assert cells[-1] == "resolved (A < B)"
    rows = list(csv.DictReader((tmp_path / "comparisons.csv").open()))
    assert [(r["family"], r["a"], r["verdict"]) for r in rows] == [
        ("chain", "gaussian", "resolved (A > B)"), ("chain", "diagonal", "equivalent within ±0.02"),
        ("alone", "single", "undecided (one seed)"), ("", "diagonal", "resolved (A < B)"),
    ]  # fmt: skip
    assert float(rows[0]["p_holm"]) == pytest.approx(2 * p_first) and rows[3]["p_holm"] == ""
    assert (rows[2]["interval_over"], rows[2]["p_t"]) == ("images", "")
    assert float(rows[0]["adjusted_level"]) == pytest.approx(0.975)


def test_a_cell_override_is_checked_before_anything_runs(grid, tmp_path):
    cells = [{"name": "bad", "kind": "gaussian", "set": {"eval.beams": 0}}]
    result = run(
        "ablate", grid / "grid.yaml", "--out", tmp_path / "out", "--set", f"cells={json.dumps(cells)}"
    )
    assert result.exit_code == 1 and "config key 'cells[0].set.eval.beams'" in result.stderr, result.output
    assert not (tmp_path / "out").exists()
    cells = [{"name": "bad", "kind": "gaussian", "set": {"embed.precision": "bf16"}}]
    result = run(
        "ablate", grid / "grid.yaml", "--out", tmp_path / "out", "--set", f"cells={json.dumps(cells)}"
    )
    assert result.exit_code == 1 and "config key 'cells[0].set.embed.precision'" in result.stderr


def test_bad_ablation_config_names_the_key(grid, tmp_path):
    result = run("ablate", grid / "grid.yaml", "--out", tmp_path / "x", "--set", "seedz=[1]")
    assert result.exit_code == 1 and "config key 'seedz' is unknown" in result.stderr


SELECTING = [{"name": "isotropic", "kind": "isotropic", "select": {"gap.noise_scale": [0.5, 4]}}]


@pytest.mark.slow
def test_a_cell_chooses_its_noise_scale_on_validation_scenes(grid, tmp_path, monkeypatch):
    """Each candidate is trained per seed and scored on val; the best mean is chosen and only it is
    evaluated on test, under the cell's name; a rerun reuses every candidate."""
    out = tmp_path / "out"
    flags = ["--set", f"cells={json.dumps(SELECTING)}", "--set", "seeds=[0, 1]",
             "--set", "decoder.train.max_steps=4"]  # fmt: skip
    result = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress", *flags)
    assert result.exit_code == 0, result.output
    labels = ["gap.noise_scale=0.5", "gap.noise_scale=4"]
    val = {
        label: {seed: load_json(out / "eval-val" / f"isotropic-{label}-seed{seed}-none" / "scores.json")
                for seed in (0, 1)}
        for label in labels
    }  # fmt: skip
    means = {label: np.mean([np.mean(s["scores"]["CIDEr"]) for s in val[label].values()]) for label in labels}
    assert all(len(s["image_ids"]) == 5 for v in val.values() for s in v.values())  # the 5 val scenes
    expected = max(labels, key=lambda label: means[label])  # the first listed wins a tie
    selection = list(csv.DictReader((out / "selection.csv").open()))
    assert len(selection) == 4 and {r["selected"] for r in selection} == {expected}
    for row in selection:
        scores = val[row["candidate"]][int(row["seed"])]["scores"]["CIDEr"]
        assert float(row["score"]) == pytest.approx(np.mean(scores))
        assert float(row["mean"]) == pytest.approx(means[row["candidate"]])
    heading = f"## isotropic: gap.noise_scale = {expected.partition('=')[2]}"
    assert heading in (out / "selection.md").read_text()

    # Only the chosen candidate was evaluated on test, in the cell's folders, with its decoders.
    assert sorted(p.name for p in (out / "eval").iterdir()) == [f"isotropic-seed{s}-none" for s in (0, 1)]
    for seed in (0, 1):
        evaluated = out / "eval" / f"isotropic-seed{seed}-none"
        assert load_json(evaluated / "provenance.json")["config"]["split"] == "test"
        model = Path(load_json(evaluated / "metrics.json")["model"]["path"])
        assert model.parent.name == f"isotropic-{expected}-seed{seed}"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["cell"], r["seed"], r["selected"]) for r in rows] == [("isotropic", s, expected) for s in "01"]
    assert "| isotropic | none | 2 |" in (out / "table.md").read_text()
    # Each candidate's decoder was trained on a gap of its own noise scale, its config saved beside it.
    for label in labels:
        config = load_config(out / "runs" / f"isotropic-{label}-seed0" / "config.yaml")
        assert Path(config.data.gap).name == f"isotropic-{label}.safetensors"
        assert Gap.load(config.data.gap).info["noise_scale"] == float(label.partition("=")[2])

    # A rerun trains and evaluates nothing.
    trained, evaluated = [], []
    real_evaluate = tipcap.grid.planning.evaluate_split
    monkeypatch.setattr(tipcap.grid.planning, "train", lambda *a, **k: trained.append(a))
    monkeypatch.setattr(tipcap.grid.planning, "evaluate_split", lambda *a, **k: evaluated.append(a))
    again = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress", *flags)
    assert again.exit_code == 0, again.output
    assert trained == evaluated == [] and list(csv.DictReader((out / "results.csv").open())) == rows

    # The choice follows the scores in the val folders: make the other candidate the best on val, and it
    # is chosen, its decoders (not retrained) evaluated on test in the cell's folders.
    other = next(label for label in labels if label != expected)
    for seed in (0, 1):
        path = out / "eval-val" / f"isotropic-{other}-seed{seed}-none" / "scores.json"
        scores = load_json(path)
        scores["scores"]["CIDEr"] = [1.0] * len(scores["image_ids"])
        path.write_text(json.dumps(scores))
    monkeypatch.setattr(
        tipcap.grid.planning,
        "evaluate_split",
        lambda *a, **k: evaluated.append(a[2]) or real_evaluate(*a, **k),
    )
    switched = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress", *flags)
    assert switched.exit_code == 0, switched.output
    assert trained == [] and [Path(path).name for path in evaluated] == [
        "isotropic-seed0-none",
        "isotropic-seed1-none",
    ]
    assert {r["selected"] for r in csv.DictReader((out / "selection.csv").open())} == {other}
    assert [r["selected"] for r in csv.DictReader((out / "results.csv").open())] == [other, other]
    for seed in (0, 1):
        model = Path(load_json(out / "eval" / f"isotropic-seed{seed}-none" / "metrics.json")["model"]["path"])
        assert model.parent.name == f"isotropic-{other}-seed{seed}"


@pytest.mark.slow
def test_select_seeds_train_the_candidates_and_the_other_seeds_the_choice(grid, tmp_path):
    """With ``select_seeds``, a plan trains the candidates on those seeds only; once they are trained, the
    next plan scores them on val and plans the chosen value alone for the other seeds."""
    out = tmp_path / "out"
    flags = ["--set", f"cells={json.dumps(SELECTING)}", "--set", "seeds=[0, 1]", "--set", "select_seeds=[0]",
             "--set", "decoder.train.max_steps=4"]  # fmt: skip
    first = run("ablate", grid / "grid.yaml", "--out", out, "--plan", "--no-progress", *flags)
    assert first.exit_code == 0 and "wrote 2 training commands" in first.stdout, first.output
    assert "isotropic: seeds 1 wait for the choice" in first.stderr
    assert "trains a decoder per seed of 0 for each gap.noise_scale in 0.5, 4" in first.stderr
    assert "; seeds 1 train the chosen value alone" in first.stderr
    labels = ["gap.noise_scale=0.5", "gap.noise_scale=4"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        f"isotropic-{label}-seed0" for label in labels
    ]
    for label in labels:
        trained = out / "runs" / f"isotropic-{label}-seed0"
        result = run("train", "--config", trained / "train.yaml", "--out", trained, "--no-progress")
        assert result.exit_code == 0, result.output

    second = run("ablate", grid / "grid.yaml", "--out", out, "--plan", "--no-progress", *flags)
    assert second.exit_code == 0 and "wrote 1 training commands" in second.stdout, second.output
    val = {label: np.mean(load_json(out / "eval-val" / f"isotropic-{label}-seed0-none" / "scores.json")
                          ["scores"]["CIDEr"]) for label in labels}  # fmt: skip
    chosen = max(labels, key=lambda label: val[label])
    assert sorted(p.name for p in (out / "runs").iterdir() if p.name.endswith("seed1")) == [
        f"isotropic-{chosen}-seed1"
    ]

    result = run("ablate", grid / "grid.yaml", "--out", out, "--no-progress", *flags)
    assert result.exit_code == 0, result.output
    selection = list(csv.DictReader((out / "selection.csv").open()))
    assert [(r["candidate"], r["seed"], r["selected"]) for r in selection] == [
        (label, "0", chosen) for label in labels
    ]
    for seed in (0, 1):
        model = Path(load_json(out / "eval" / f"isotropic-seed{seed}-none" / "metrics.json")["model"]["path"])
        assert model.parent.name == f"isotropic-{chosen}-seed{seed}"
    assert not list((out / "eval-val").glob("*seed1*"))


def test_selection_takes_the_best_mean_over_seeds_and_the_first_on_a_tie():
    jobs = [Job(Cell("x"), candidate=f"gap.noise_scale={value}") for value in (1, 2, 3)]
    best_mean = Selection(Job(Cell("x")), jobs, [{0: 0.1, 1: 0.9}, {0: 0.6, 1: 0.6}, {0: 0.7, 1: 0.2}])
    assert best_mean.chosen is jobs[1]  # not candidate 2, best on seed 0, nor 0, best on seed 1
    tie = Selection(Job(Cell("x")), jobs, [{0: 0.2}, {0: 0.5}, {0: 0.5}])
    assert tie.chosen is jobs[1]


def test_plan_shows_the_candidates_and_the_validation_split(grid, tmp_path):
    out = tmp_path / "out"
    flags = ["--set", f"cells={json.dumps([*SELECTING, {'name': 'none', 'kind': 'none'}])}"]
    result = run("ablate", grid / "grid.yaml", "--out", out, "--plan", "--no-progress", *flags)
    assert result.exit_code == 0 and "wrote 3 training commands" in result.stdout, result.output
    note = (
        "isotropic: trains a decoder per seed for each gap.noise_scale in 0.5, 4, chooses the value with "
        "the best mean CIDEr over seeds on the val split and evaluates only it on test"
    )
    assert note in result.stderr and f"# {note}." in (out / "train_commands.sh").read_text()
    for label in ("gap.noise_scale=0.5", "gap.noise_scale=4"):
        config = load_config(out / "runs" / f"isotropic-{label}-seed0" / "train.yaml")
        assert Path(config.data.gap).name == f"isotropic-{label}.safetensors"
    # A cell without select is recorded as before select existed; a changed candidate list plans the new
    # candidate (its steps have keys of their own).
    saved = load_json(out / "grid.json")
    assert "select" not in saved["cells"]["none"] and "select_split" not in saved["fixed"]
    assert saved["cells"]["isotropic"]["select"] == {"gap.noise_scale": [0.5, 4]}
    changed = [f.replace("[0.5, 4]", "[0.5, 2]") for f in flags]
    replanned = run("ablate", grid / "grid.yaml", "--out", out, "--plan", "--no-progress", *changed)
    assert replanned.exit_code == 0, replanned.output
    assert "gap isotropic-gap.noise_scale=2: building (not built yet)" in replanned.stderr
    assert (out / "runs" / "isotropic-gap.noise_scale=2-seed0" / "train.yaml").is_file()
    assert load_json(out / "grid.json")["cells"]["isotropic"]["select"] == {"gap.noise_scale": [0.5, 2]}
    # Cell keys are recorded only away from their defaults: a folder recorded when a key was written at its
    # default (decoders: null), or before it existed, holds the same cells.
    assert set(saved["cells"]["none"]) == {"name", "kind"}
    saved["cells"]["none"].update({"setting": "text-only", "decoders": None, "set": {}})
    (out / "grid.json").write_text(json.dumps(saved))
    again = run("ablate", grid / "grid.yaml", "--out", out, "--plan", "--no-progress", *flags)
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("select_split=test", "config key 'select_split': cells[0] would choose gap.noise_scale on the test"),
        ("karpathy={without_val}", "config key 'select_split': {without_val} has no val images"),
        (
            "select_split=restval",
            "config key 'select_split': cells[0] would choose gap.noise_scale on the im",
        ),
        ("select_metric=bleu-4", "config key 'select_metric': 'bleu-4' has no per-image scores"),
        ("select_seeds=[7]", "config key 'select_seeds': [7] must list distinct seeds of 'seeds' ([0])"),
    ],
)
def test_selection_on_the_test_split_or_on_no_images_is_refused(grid, tmp_path, override, message):
    without_val = tmp_path / "without_val.json"
    document = load_json(grid / "world" / "toyworld.json")
    document["images"] = [entry for entry in document["images"] if entry["split"] != "val"]
    without_val.write_text(json.dumps(document))
    out = tmp_path / "out"
    result = run("ablate", grid / "grid.yaml", "--out", out, "--set", f"cells={json.dumps(SELECTING)}",
                 "--set", override.format(without_val=without_val))  # fmt: skip
    assert result.exit_code == 1, result.output
    assert message.format(without_val=without_val) in result.stderr
    assert not out.exists()


COCO_GRID = Path(__file__).parent.parent / "experiments" / "coco" / "grid.yaml"
COCO_DECODER = {
    "model": {**DECODER["model"], "max_caption_tokens": 24},
    "train": {**DECODER["train"], "max_steps": 6, "checkpoint_every": 6, "log_every": 6},
}
REDUCED = ["supervised", "isotropic", "retrieval", "template", "hard-prompt", "gaussian-few-pairs",
           "gaussian-unpaired"]  # fmt: skip


def coco_overrides(prepared, images, tiny_clip, cells):
    """Turn the shipped COCO grid into a CPU-sized one: tiny CLIP and decoders, the val split, one seed."""
    shipped = {cell["name"]: cell for cell in yaml.safe_load(COCO_GRID.read_text())["cells"]}
    return [
        f"karpathy={prepared / 'dataset.json'}", f"image_root={images}", f"embed.model={tiny_clip}",
        "embed.pretrained=none", "eval_split=val", "seeds=[0]", "eval.beams=1",
        "eval.metrics=[bleu, rouge, cider]", "eval.threshold=null",  # a random CLIP is sure of no entity
        f"decoder={json.dumps(COCO_DECODER)}", f"cells={json.dumps([shipped[name] for name in cells])}",
        "compare=[]",  # the shipped comparisons name cells that a reduced grid leaves out
    ]  # fmt: skip


@pytest.mark.slow
def test_reduced_coco_grid_end_to_end(prepared_coco, coco_tree, tiny_clip, tmp_path):
    """The shipped COCO grid, reduced, on prepared data: a few-pairs sweep, unpaired halves, the baselines."""
    out = tmp_path / "grid"
    references = karpathy_references(prepared_coco / "dataset.json", "val")
    instances = tmp_path / "instances_val2014.json"
    instances.write_text(json.dumps({
        "images": [{"id": i} for i in references], "categories": [{"id": 1, "name": "person"}],
        "annotations": [{"id": k, "image_id": i, "category_id": 1} for k, i in enumerate(references)],
    }))  # fmt: skip
    overrides = [*coco_overrides(prepared_coco, coco_tree[0], tiny_clip, REDUCED), "few_pairs=[10%, 50%]",
                 f"instances={instances}"]  # fmt: skip
    result = run(
        "ablate", COCO_GRID, "--out", out, "--no-progress", *(x for o in overrides for x in ("--set", o))
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["cell"], r["few_pairs"], r["seed"], r["eval_prompt"]) for r in rows] == [
        ("supervised", "", "0", "none"), ("isotropic", "", "0", "none"), ("retrieval", "", "", "none"),
        ("template", "", "", "none"), ("hard-prompt", "", "0", "auto"),
        ("gaussian-few-pairs-10pct", "10%", "0", "none"), ("gaussian-few-pairs-50pct", "50%", "0", "none"),
        ("gaussian-unpaired", "", "0", "none"),
    ]  # fmt: skip
    fraction = {r["cell"]: r["paired_fraction"] for r in rows}
    assert float(fraction["supervised"]) == 1.0 and fraction["isotropic"] == ""
    assert float(fraction["gaussian-few-pairs-10pct"]) == pytest.approx(20 / 197)  # 10% of the 197 usable
    assert float(fraction["gaussian-few-pairs-50pct"]) == pytest.approx(98 / 197)
    expected = [grid_row_cider(out, r, references) for r in rows]
    assert all(r["train_data"] == r["eval_data"] == "coco" for r in rows) and max(expected) > 0
    assert all(0 <= float(r["CHAIR-s"]) <= 1 for r in rows)  # CHAIR from the instance annotations
    assert [float(r["CIDEr"]) for r in rows] == pytest.approx(expected, abs=1e-9)
    assert {r["setting"] for r in rows if r["kind"] == "supervised"} == {"all-pairs"}

    texts = set(json.loads((out / "stores" / "train-text" / "captions.json").read_text()))
    retrieved = json.loads((out / "eval" / "retrieval-none" / "predictions.json").read_text())
    assert len(retrieved) == 58 and all(p["caption"] in texts for p in retrieved)  # the usable val images
    template = json.loads((out / "eval" / "template-none" / "predictions.json").read_text())
    assert all(p["caption"].startswith("a photo") for p in template)
    prompts = json.loads((out / "eval" / "hard-prompt-seed0-auto" / "per_image.json").read_text())
    assert all(p["prompt"] for p in prompts)  # CLIP's entities were given to the hard-prompt decoder
    # Unpaired: the gap saw the captions of one half of the training images and the images of the other.
    caption_ids = set(json.loads((out / "stores" / "unpaired-text" / "ids.json").read_text()))
    image_ids = set(json.loads((out / "stores" / "unpaired-images" / "ids.json").read_text()))
    assert caption_ids and image_ids and not caption_ids & image_ids
    assert len(caption_ids | image_ids) >= 197

    table = (out / "table.md").read_text()
    assert "| gaussian-few-pairs-50pct | none | 1 |" in table and "| retrieval | none | 1 |" in table
    assert "object F1" not in table  # COCO has no scene objects: no empty column
    assert "CHAIR-s" in table and "CLIP-S" not in table  # ViT-B/32 is not on this machine: no column
    for plot in ("cider.png", "cider_vs_pairs.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert (
        f"wrote {out}/results.csv, {out}/table.md, {out}/cider.png, {out}/cider_vs_pairs.png" in result.stdout
    )


@pytest.mark.parametrize("mode", ["oracle", "wrong"])
def test_oracle_and_wrong_prompts_need_the_objects_of_the_evaluation_images(
    prepared_coco, coco_tree, tiny_clip, tmp_path, mode
):
    """COCO records no scene objects, so oracle (and wrong) prompts would be silently empty: the grid is
    refused before any store is built or decoder trained, naming the cell's key and the file."""
    cells = [
        {"name": "isotropic", "kind": "isotropic"},
        {"name": "prompts", "kind": "isotropic", "prompt": "pim", "eval_prompts": ["none", mode]},
    ]
    overrides = [*coco_overrides(prepared_coco, coco_tree[0], tiny_clip, []), f"cells={json.dumps(cells)}"]
    flags = [x for o in overrides for x in ("--set", o)]
    out = tmp_path / "grid"
    for plan in ([], ["--plan"]):
        result = run("ablate", COCO_GRID, "--out", out, "--no-progress", *plan, *flags)
        assert result.exit_code == 1, result.output
        assert "config key 'cells[1].eval_prompts'" in result.stderr
        assert str(prepared_coco / "dataset.json") in result.stderr
        assert not out.exists()


def test_plan_for_torchrun_then_reuse_the_models(prepared_coco, coco_tree, tiny_clip, tmp_path, monkeypatch):
    """--plan writes each cell's training command; a model trained by it outside the runner is reused."""
    out = tmp_path / "grid"
    overrides = [
        *coco_overrides(
            prepared_coco, coco_tree[0], tiny_clip, ["isotropic", "retrieval", "gaussian-few-pairs"]
        ),
        "few_pairs=10%",
    ]
    flags = [x for o in overrides for x in ("--set", o)]
    result = run("ablate", COCO_GRID, "--out", out, "--plan", "--no-progress", *flags)
    assert result.exit_code == 0 and "wrote 2 training commands" in result.stdout, result.output
    commands = (out / "train_commands.sh").read_text().splitlines()[3:]
    launch = 'torchrun --nproc_per_node "${NPROC:-1}" -m tipcap.cli train --config'
    assert len(commands) == 2 and all(c.startswith(launch) for c in commands)
    config_path = out / "runs" / "gaussian-few-pairs-seed0" / "train.yaml"
    assert str(config_path) in commands[1]
    config = load_config(config_path)
    assert Path(config.data.gap).is_absolute() and Path(config.data.gap).is_file()
    assert not (out / "runs" / "gaussian-few-pairs-seed0" / "model").exists()  # planned, not trained

    # The command a torchrun launch runs on each rank, here on one process.
    trained = run("train", "--config", config_path, "--out", config_path.parent, "--no-progress")
    assert trained.exit_code == 0, trained.output
    calls = []
    real_train = tipcap.grid.planning.train
    monkeypatch.setattr(
        tipcap.grid.planning, "train", lambda *a, **k: calls.append(a[1]) or real_train(*a, **k)
    )
    result = run("ablate", COCO_GRID, "--out", out, "--no-progress", *flags)
    assert result.exit_code == 0, result.output
    assert [path.name for path in calls] == ["isotropic-seed0"]  # the planned model was reused
    assert "gaussian-few-pairs-seed0-none: CIDEr" in result.stderr

    # The folder remembers its grid: a changed grid-wide decoder would mix results, and is refused; a
    # changed cell rebuilds its own steps.
    changed = run("ablate", COCO_GRID, "--out", out, *flags, "--set", "decoder.train.lr=0.1")
    assert changed.exit_code == 1 and "holds results of a grid with other decoder" in changed.stderr
    redefined = [f.replace('"kind": "isotropic"', '"kind": "none"') for f in flags]
    assert redefined != flags
    redefined = run("ablate", COCO_GRID, "--out", out, "--no-progress", *redefined)
    assert redefined.exit_code == 0, redefined.output
    assert "training isotropic-seed0: rebuilding (" in redefined.stderr


TOY_HEADER = (
    "cell,method,kind,setting,few_pairs,paired_fraction,prompt,eval_prompt,seed,train_data,eval_data,CIDEr,"
    "BLEU-4,METEOR,ROUGE-L,SPICE,CLIP-S,RefCLIP-S,CHAIR-i,CHAIR-s,Adherence,Adherence-all,object_f1,colour_f1,"
    "shape_f1,size_f1,relation_f1,CIDEr_ci_low,CIDEr_ci_high,ROUGE-L_ci_low,ROUGE-L_ci_high,CLIP-S_ci_low,"
    "CLIP-S_ci_high,RefCLIP-S_ci_low,RefCLIP-S_ci_high,object_f1_ci_low,object_f1_ci_high,Adherence_ci_low,"
    "Adherence_ci_high,Adherence-all_ci_low,Adherence-all_ci_high,selected"
)
"""The header of a toy grid's results.csv, as it has been since the toy worlds' scores were columns."""


def test_results_csv_has_the_columns_of_its_data_s_world(grid, prepared_coco, coco_tree, tiny_clip, tmp_path):
    """A toy grid keeps its world's columns (object F1 with its interval, the claims F1); a COCO grid, whose
    data records no scenes, has none of them."""
    toy = tmp_path / "toy"
    cells = [{"name": "retrieval", "kind": "retrieval"}]
    result = run(
        "ablate", grid / "grid.yaml", "--out", toy, "--no-progress", "--set", f"cells={json.dumps(cells)}"
    )
    assert result.exit_code == 0, result.output
    header, *lines = (toy / "results.csv").read_text().splitlines()
    assert header == TOY_HEADER and len(lines) == 1
    (row,) = csv.DictReader((toy / "results.csv").open())
    assert 0.0 <= float(row["object_f1"]) <= 1.0 and row["object_f1_ci_low"] and row["relation_f1"]
    assert "object F1" in (toy / "table.md").read_text()

    coco = tmp_path / "coco"
    overrides = coco_overrides(prepared_coco, coco_tree[0], tiny_clip, ["retrieval"])
    result = run(
        "ablate", COCO_GRID, "--out", coco, "--no-progress", *(x for o in overrides for x in ("--set", o))
    )
    assert result.exit_code == 0, result.output
    header = (coco / "results.csv").read_text().splitlines()[0].split(",")
    assert header == [c for c in TOY_HEADER.split(",") if "f1" not in c]
    assert "object_f1" not in load_json(coco / "eval" / "retrieval-none" / "scores.json")["scores"]


def test_cross_domain_grid(prepared_coco, coco_tree, tiny_clip, tmp_path):
    """Decoders trained on COCO captions, evaluated on images and references of another Karpathy file."""
    flickr = tmp_path / "flickr"
    flickr.mkdir()
    entries = []
    for entry in load_json(prepared_coco / "images" / "val.json")["images"][:12]:
        name = f"{entry['cocoid'] + 1_000_000}.jpg"
        shutil.copyfile(coco_tree[0] / entry["filepath"] / entry["filename"], flickr / name)
        entries.append({"filename": name, "split": "test", "sentences": entry["sentences"]})
    (flickr / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    out = tmp_path / "cross"
    overrides = [
        *coco_overrides(prepared_coco, coco_tree[0], tiny_clip, ["isotropic", "retrieval"]),
        f"eval_karpathy={flickr / 'dataset_flickr30k.json'}",
        f"eval_image_root={flickr}",
        "eval_split=test",
    ]
    result = run(
        "ablate", COCO_GRID, "--out", out, "--no-progress", *(x for o in overrides for x in ("--set", o))
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["cell"], r["train_data"], r["eval_data"]) for r in rows] == [
        ("isotropic", "coco", "flickr30k"), ("retrieval", "coco", "flickr30k"),
    ]  # fmt: skip
    predicted = {
        p["image_id"] for p in json.loads((out / "eval" / "retrieval-none" / "predictions.json").read_text())
    }
    assert predicted == {int(e["filename"][:-4]) for e in entries}
    assert (
        (out / "table.md")
        .read_text()
        .startswith("Decoders trained on coco, evaluated on the test split of flickr30k.")
    )
    assert len(json.loads((out / "stores" / "eval-test-images" / "ids.json").read_text())) == 12


def test_a_cell_evaluates_another_cell_s_decoders_under_its_own_eval_settings(grid, tmp_path):
    """``decoders`` shares the other cell's decoders: one training command for both; a cell that would
    train otherwise, or names no trained cell, is refused by name."""
    out = tmp_path / "out"
    cells = [{"name": "pim", "kind": "isotropic", "prompt": "pim", "eval_prompts": ["oracle"]},
             {"name": "pim-guided", "kind": "isotropic", "prompt": "pim", "eval_prompts": ["oracle"],
              "decoders": "pim", "set": {"eval.prompt_guidance": 4}}]  # fmt: skip
    result = run("ablate", grid / "grid.yaml", "--out", out, "--plan", "--no-progress",
                 "--set", f"cells={json.dumps(cells)}")  # fmt: skip
    assert result.exit_code == 0, result.output
    commands = [
        line for line in (out / "train_commands.sh").read_text().splitlines() if line.startswith("torch")
    ]
    assert len(commands) == 1 and "/runs/pim-seed0/train.yaml" in commands[0]
    assert not (out / "runs" / "pim-guided-seed0").exists()
    for change, message in (
        ({"set": {"eval.prompt_guidance": 4, "train.lr": 0.1}}, "would train otherwise than pim"),
        ({"decoders": "nothing"}, "'nothing' is not a cell that trains its own decoders; name one of pim"),
    ):
        refused = run("ablate", grid / "grid.yaml", "--out", tmp_path / "x", "--plan", "--no-progress",
                      "--set", f"cells={json.dumps([cells[0], {**cells[1], **change}])}")  # fmt: skip
        assert refused.exit_code == 1 and "config key 'cells[1].decoders'" in refused.output, refused.output
        assert message in refused.output and "Traceback" not in refused.output


def test_a_cell_starts_its_decoders_from_another_cell_s(grid, tmp_path):
    """``init_from``: the plan trains the base cell's decoders first and names the others as waiting; the
    second plan trains them from the base's weights; a cell naming no earlier trained cell is refused."""
    out = tmp_path / "out"
    cells = [{"name": "plain", "kind": "isotropic"},
             {"name": "tuned", "kind": "isotropic", "prompt": "pim", "init_from": "plain",
              "eval_prompts": ["none", "oracle"], "set": {"train.max_steps": 3}}]  # fmt: skip
    args = ["ablate", grid / "grid.yaml", "--out", out, "--plan", "--no-progress",
            "--set", f"cells={json.dumps(cells)}"]  # fmt: skip

    def commands() -> list[str]:
        lines = (out / "train_commands.sh").read_text().splitlines()
        return [line for line in lines if line.startswith("torchrun")]

    first = run(*args)
    assert first.exit_code == 0, first.output
    assert len(commands()) == 1 and "/runs/plain-seed0/train.yaml" in commands()[0]
    assert "tuned seed 0 waits for plain-seed0: plan again once those are trained" in first.stderr
    train_plain = commands()[0].replace('torchrun --nproc_per_node "${NPROC:-1}"', sys.executable)
    subprocess.run(train_plain, shell=True, check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    second = run(*args)
    assert second.exit_code == 0, second.output
    assert len(commands()) == 1 and "/runs/tuned-seed0/train.yaml" in commands()[0]
    planned = yaml.safe_load((out / "runs" / "tuned-seed0" / "train.yaml").read_text())
    assert planned["train"]["init_from"] == str((out / "runs" / "plain-seed0" / "model").resolve())
    for change, message in (
        ({"init_from": "nothing"}, "'nothing' is not an earlier cell that trains its own decoders"),
        ({"init_from": "tuned"}, "'tuned' is not an earlier cell"),
        ({"set": {"train.init_from": "x"}}, "give init_from (a cell) instead"),
    ):
        refused = run("ablate", grid / "grid.yaml", "--out", tmp_path / "x", "--plan", "--no-progress",
                      "--set", f"cells={json.dumps([cells[0], {**cells[1], **change}])}")  # fmt: skip
        assert refused.exit_code == 1 and "config key 'cells[1]" in refused.output, refused.output
        assert message in refused.output and "Traceback" not in refused.output
