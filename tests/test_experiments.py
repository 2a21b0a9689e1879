"""`tipcap ablate`: a small grid on a tiny toy world, its result files, and finishing only missing cells."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import grid_row_cider, karpathy_references, run

import tipcap.experiments
from tipcap.config import load_config
from tipcap.data.files import load_json
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


@pytest.mark.slow
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
    references = karpathy_references(grid / "world" / "toyworld.json", "test")
    expected = [grid_row_cider(out, r, references) for r in rows]
    assert all(0.0 <= float(r["object_f1"]) <= 1.0 for r in rows) and max(expected) > 0
    assert [float(r["CIDEr"]) for r in rows] == pytest.approx(expected, abs=1e-9)
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| prompts | oracle | 1 |" in table
    assert (out / "cider.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "gaps" / "gaussian-few-pairs.png").is_file()


def test_bad_ablation_config_names_the_key(grid, tmp_path):
    result = run("ablate", grid / "grid.yaml", "--out", tmp_path / "x", "--set", "seedz=[1]")
    assert result.exit_code == 1 and "config key 'seedz' is unknown" in result.stderr


def test_demo_cache_is_keyed_by_the_code_that_fills_it(tmp_path, monkeypatch):
    """A world or CLIP made by another version of the generator or the trainer is not reused."""
    made = []

    def fake_world(out, **kwargs):
        made.append("world")
        Path(out).mkdir(parents=True)
        (Path(out) / "toyworld.json").write_text("{}")

    def fake_clip(karpathy, out, **kwargs):
        made.append("clip")
        Path(out).mkdir(parents=True)
        (Path(out) / "toyclip.safetensors").write_bytes(b"")

    monkeypatch.setattr("tipcap.data.toyworld.write_toyworld", fake_world)
    monkeypatch.setattr("tipcap.toyclip.train_toyclip", fake_clip)
    first = tipcap.experiments.demo_world(tmp_path, quick=True)
    assert tipcap.experiments.demo_world(tmp_path, quick=True) == first and made == ["world", "clip"]
    monkeypatch.setattr("tipcap.toyclip.TRAINING_VERSION", -1)
    retrained = tipcap.experiments.demo_world(tmp_path, quick=True)
    assert retrained[0] == first[0] and retrained[1] != first[1] and made[2:] == ["clip"]
    monkeypatch.setattr("tipcap.data.toyworld.GENERATOR_VERSION", -1)
    regenerated = tipcap.experiments.demo_world(tmp_path, quick=True)
    assert regenerated[0] != first[0] and made[3:] == ["world", "clip"]


@pytest.mark.slow
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
        assert 0.0 <= float(row["object_f1"]) <= 1.0 and 0.0 <= float(row["CLIPScore"]) <= 2.5, row
        assert 0.2 <= float(row["CIDEr"]) < 10 and 0.05 < float(row["BLEU-4"]) < 1, row
    cider = {r["cell"]: float(r["CIDEr"]) for r in rows if r["eval_prompt"] == "none"}
    f1 = {r["cell"]: float(r["object_f1"]) for r in rows if r["eval_prompt"] == "none"}
    # The gap matters: the text-only decoder fed raw image embeddings falls far below the decoder trained
    # on images, in CIDEr and in the objects it names (a random caption of the world: F1 about 0.05) ...
    assert cider["supervised"] - cider["none"] >= 0.3, cider
    assert f1["supervised"] >= 0.12 and f1["supervised"] - f1["none"] >= 0.05, f1
    # ... and the Gaussian gap fitted on 50 pairs recovers at least half of the difference.
    assert cider["gaussian-few-pairs"] - cider["none"] >= 0.5 * (cider["supervised"] - cider["none"]), cider
    assert "| supervised | none | 1 |" in result.stdout
    for name in ("results.csv", "table.md", "cider.png", "gap.png"):
        assert (out / name).is_file()
    report = json.loads(next((tmp_path / "cache").glob("toyworld-*/clip-*/toyclip_report.json")).read_text())
    # The toy CLIP learned the world (images retrieve their captions) with a gap like real CLIP's: an
    # image is less similar to its own caption than to other images.
    assert report["steps"] == 400 and report["recall_at_1"] >= 0.25
    assert report["mu_norm"] >= 0.5 and report["matched_cosine"] < report["within_modality_cosine"]
    # A second run reuses the cached world and CLIP and every finished cell: the same table, to the digit.
    again = run("demo", "--quick", "--out", out, "--cache", tmp_path / "cache", "--no-progress")
    assert again.exit_code == 0 and again.stdout == result.stdout
    assert "toy world: reused" in again.stderr and "toy CLIP: reused" in again.stderr
    assert "training into" in result.stderr and "training into" not in again.stderr


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
        f"karpathy={prepared / 'dataset.json'}", f"image_root={images}", f"clip_model={tiny_clip}",
        "clip_pretrained=none", "eval_split=val", "seeds=[0]", "beams=1", "metrics=[bleu, rouge, cider]",
        f"decoder={json.dumps(COCO_DECODER)}", f"cells={json.dumps([shipped[name] for name in cells])}",
    ]  # fmt: skip


@pytest.mark.slow
def test_reduced_coco_grid_end_to_end(prepared_coco, coco_tree, tiny_clip, tmp_path):
    """The shipped COCO grid, reduced, on prepared data: a few-pairs sweep, unpaired halves, the baselines."""
    out = tmp_path / "grid"
    overrides = [*coco_overrides(prepared_coco, coco_tree[0], tiny_clip, REDUCED), "few_pairs=[10%, 50%]"]
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
    references = karpathy_references(prepared_coco / "dataset.json", "val")
    expected = [grid_row_cider(out, r, references) for r in rows]
    assert all(r["train_data"] == r["eval_data"] == "coco" for r in rows) and max(expected) > 0
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
    assert "object F1" not in table  # COCO has no object annotations: no empty column
    for plot in ("cider.png", "cider_vs_pairs.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert (
        f"wrote {out}/results.csv, {out}/table.md, {out}/cider.png, {out}/cider_vs_pairs.png" in result.stdout
    )


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
    real_train = tipcap.experiments.train
    monkeypatch.setattr(
        tipcap.experiments, "train", lambda *a, **k: calls.append(a[1]) or real_train(*a, **k)
    )
    result = run("ablate", COCO_GRID, "--out", out, "--no-progress", *flags)
    assert result.exit_code == 0, result.output
    assert [path.name for path in calls] == ["isotropic-seed0"]  # the planned model was reused
    assert "gaussian-few-pairs-seed0-none: CIDEr" in result.stderr

    # The folder remembers its grid: a changed decoder or cell would mix results, and is refused.
    changed = run("ablate", COCO_GRID, "--out", out, *flags, "--set", "decoder.train.lr=0.1")
    assert changed.exit_code == 1 and "holds results of a grid with other decoder" in changed.stderr
    redefined = [f.replace('"kind": "isotropic"', '"kind": "mean-shift"') for f in flags]
    assert redefined != flags
    redefined = run("ablate", COCO_GRID, "--out", out, *redefined)
    assert (
        redefined.exit_code == 1
        and "cell 'isotropic' was run there with another definition" in redefined.stderr
    )


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
