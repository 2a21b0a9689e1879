"""``tipcap reproduce``: the recipes, the check of their inputs, and a recipe run end to end at toy scale."""

import json
import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from conftest import COCO_260, TINY_GPT2, run, tiny_clip_config, write_coco_tree

from tipcap.io import load_json, write_json_atomic

RECIPES = Path(__file__).parent.parent / "experiments" / "reproduce"
TINY_DECODER = {
    "model": {
        "clip_dim": 32,
        "language_model_config": dict(TINY_GPT2),
        "tokenizer": "word-level",
        "prefix_length": 2,
        "projector": "mlp",
        "max_caption_tokens": 24,
    },
    "train": {
        "max_steps": 20,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup_steps": 2,
        "checkpoint_every": 20,
        "log_every": 20,
        "precision": "fp32",
    },
}


@pytest.fixture(scope="module")
def three_splits(tmp_path_factory) -> tuple[Path, Path]:
    """The 260-image COCO slice with Karpathy's three splits (200 train, 30 val, 30 test) and every image."""
    root = tmp_path_factory.mktemp("reproduce")
    document = load_json(COCO_260)
    val = [entry for entry in document["images"] if entry["split"] == "val"]
    for entry in val[30:]:
        entry["split"] = "test"
    write_json_atomic(root / "dataset_coco.json", document)
    write_coco_tree(root / "dataset_coco.json", root / "images", missing=[], corrupt=[])
    return root / "dataset_coco.json", root / "images"


@pytest.fixture
def no_cached_weights(tmp_path, monkeypatch):
    """An empty Hugging Face cache and home: no pretrained CLIP weights are on this machine."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_list_shows_the_recipes_with_their_published_numbers_and_sources():
    result = run("reproduce", "--list")
    assert result.exit_code == 0, result.output
    documents = {path.stem: yaml.safe_load(path.read_text()) for path in RECIPES.glob("*.yaml")}
    published = {name: d for name, d in documents.items() if d["published"]["metrics"]}
    assert len(published) >= 8
    rows = {line.split(" | ")[0].lstrip("| "): line for line in result.stdout.splitlines()[2:] if line}
    for name, document in published.items():
        metrics = ", ".join(f"{m} {v:g}" for m, v in document["published"]["metrics"].items())
        assert metrics in rows[name] and document["published"]["source"] in rows[name]
    assert f"{len(documents)} recipes, {len(published)} with published numbers." in result.stdout
    # the list: every peer's data sets, TIPCap's four settings on both, CLOSE, the cross-domain pairs
    for name in (
        "capdec-coco",
        "capdec-flickr30k",
        "decap-coco",
        "viecap-coco",
        "viecap-flickr30k",
        "viecap-nocaps",
        "close-coco",
        "viecap-coco-to-flickr30k",
        "viecap-flickr30k-to-coco",
        *(
            f"tipcap-{s}-{d}"
            for s in ("text-only", "few-pairs", "web-pairs", "unpaired")
            for d in ("coco", "flickr30k")
        ),
    ):
        assert name in documents


def test_check_names_the_missing_images_and_weights_once_each(tmp_path, no_cached_weights):
    root = tmp_path / "half"
    write_coco_tree(COCO_260, root, missing=list(range(0, 260, 2)), corrupt=[])
    result = run("reproduce", "capdec-coco", "--check", "--karpathy", COCO_260, "--images", root)
    assert result.exit_code == 1, result.output
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem:")]
    images = [line for line in problems if line.startswith(f"problem: --images {root}")]
    weights = [line for line in problems if "CLIP RN50x4 (openai)" in line]
    assert len(images) == 1 and len(weights) == 1
    assert "130 of the 260 images" in images[0] and "100 of 200 train, 30 of 60 val" in images[0]
    assert "--clip-weights FILE" in weights[0]
    assert any("lists no test images" in line for line in problems)  # the slice has no test split


def test_check_passes_with_every_image_and_a_local_weights_file(three_splits, tmp_path, no_cached_weights):
    karpathy, images = three_splits
    weights = tmp_path / "RN50x4-openai.safetensors"
    weights.write_bytes(b"weights")
    result = run(
        "reproduce",
        "capdec-coco",
        "--check",
        "--karpathy",
        karpathy,
        "--images",
        images,
        "--clip-weights",
        weights,
    )
    assert result.exit_code == 0, result.output
    assert "capdec-coco: every input is present." in result.stdout
    assert (
        "200 train, 30 val, 30 test images, not the published split's 113,287, 5,000, 5,000" in result.stdout
    )


def _toy_flags(tmp_path: Path) -> list[str]:
    clip = tmp_path / "tiny-clip.json"
    clip.write_text(json.dumps(tiny_clip_config()))
    overrides = [
        f"embed.model={clip}",
        "embed.pretrained=none",
        "seeds=[0]",
        "eval.beams=1",
        "eval.metrics=[bleu, rouge, cider]",
        f"decoder={json.dumps(TINY_DECODER)}",
    ]
    return [x for o in overrides for x in ("--set", o)]


def _verdicts(markdown: str) -> dict[str, tuple[float, float | None, str]]:
    """metric → (published, reproduced or None, verdict), read from reproduce.md's table."""
    rows = re.findall(
        r"^\| (\S+) \| ([\d.]+) \| ([\d.]+|—) \| [^|]* \| [^|]* \| [^|]* \| ([^|]+) \|$", markdown, re.M
    )
    return {m: (float(p), None if r == "—" else float(r), v.strip()) for m, p, r, v in rows}


@pytest.mark.slow
def test_a_recipe_end_to_end_marks_each_metric_against_its_tolerance(three_splits, tmp_path):
    """capdec-coco at toy scale: --plan writes the torchrun command, the run writes reproduce.md, and each
    metric's verdict follows |reproduced − published| ≤ tolerance, on both sides of it."""
    karpathy, images = three_splits
    out, flags = tmp_path / "run", _toy_flags(tmp_path)
    data = ["--karpathy", karpathy, "--images", images, "--out", out, "--no-progress"]
    planned = run("reproduce", "capdec-coco", "--plan", *data, *flags)
    assert planned.exit_code == 0, planned.output
    (command,) = (out / "grid" / "train_commands.sh").read_text().splitlines()[3:]
    assert command.startswith('torchrun --nproc_per_node "${NPROC:-1}" -m tipcap.cli train')

    result = run("reproduce", "capdec-coco", *data, *flags)
    assert result.exit_code == 0, result.output
    metrics = load_json(out / "grid" / "eval" / "capdec-seed0-none" / "metrics.json")["metrics"]
    reproduced = {m: metrics[m] * 100 for m in ("BLEU-4", "CIDEr")}
    recipe = yaml.safe_load((RECIPES / "capdec-coco.yaml").read_text())
    tolerance = recipe["tolerance"]["metrics"]
    verdicts = _verdicts((out / "reproduce.md").read_text())
    for metric, value in reproduced.items():
        published = recipe["published"]["metrics"][metric]
        expected = "pass" if abs(value - published) <= tolerance[metric] else "fail"
        assert verdicts[metric] == (published, pytest.approx(value, abs=0.005), expected)
    assert verdicts["METEOR"][2] == "fail (not scored)"  # this toy run leaves METEOR out

    # The same run judged against numbers placed just inside and just outside the tolerance.
    folder = tmp_path / "recipes"
    folder.mkdir()
    for shifts, heading in (
        ({"CIDEr": 0.8, "BLEU-4": 1.2}, "FAIL (1 of 2"),
        ({"CIDEr": 0.8, "BLEU-4": 0.5}, "PASS (2 of 2"),
    ):
        recipe["published"]["metrics"] = {
            m: round(reproduced[m] + s * tolerance[m], 2) for m, s in shifts.items()
        }
        (folder / "capdec-coco.yaml").write_text(yaml.safe_dump(recipe))
        judged = run("reproduce", "capdec-coco", "--recipes", folder, *data, *flags)
        assert judged.exit_code == 0, judged.output
        assert "training capdec-seed0: building" not in judged.stderr  # the grid's steps are reused
        text = (out / "reproduce.md").read_text()
        assert text.startswith(f"# Reproduction of capdec-coco: {heading} metrics within tolerance)")
        verdicts = _verdicts(text)
        for metric, shift in shifts.items():
            assert verdicts[metric][2] == ("pass" if shift < 1 else "fail")
    provenance = load_json(out / "reproduce.json")["provenance"]
    assert provenance["seeds"] == [0] and set(provenance["seconds"]) == {
        "prepare",
        "grid",
    }  # before the report


def test_smoke_runs_every_stage_on_a_sample(three_splits, tmp_path):
    karpathy, images = three_splits
    out = tmp_path / "run"
    result = run(
        "reproduce",
        "capdec-coco",
        "--smoke",
        "--karpathy",
        karpathy,
        "--images",
        images,
        "--out",
        out,
        "--no-progress",
        *_toy_flags(tmp_path),
    )
    assert result.exit_code == 0, result.output
    sample = load_json(out / "smoke" / "prepared" / "karpathy-sample.json")["images"]
    splits = [entry["split"] for entry in sample]
    assert (splits.count("restval"), splits.count("val"), splits.count("test")) == (8, 8, 8)  # 1% is under 8
    assert re.search(r"prepare [\d.]+ s, grid [\d.]+ s, report [\d.]+ s", result.stdout)
    assert (out / "smoke" / "reproduce.md").read_text().startswith("**Smoke run**")
    evaluated = load_json(out / "smoke" / "grid" / "eval" / "capdec-seed0-none" / "predictions.json")
    assert len(evaluated) == 8


def test_a_recipe_without_a_tolerance_for_a_published_metric_is_refused(tmp_path):
    recipe = yaml.safe_load((RECIPES / "capdec-coco.yaml").read_text())
    del recipe["tolerance"]["metrics"]["CIDEr"]
    (tmp_path / "capdec-coco.yaml").write_text(yaml.safe_dump(recipe))
    result = run("reproduce", "--list", "--recipes", tmp_path)
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: {tmp_path / 'capdec-coco.yaml'}: tolerance.metrics gives no tolerance for CIDEr."
    )
