"""`tipcap demo`: the toy world and CLIP cached by the code that makes them, and the quick demo end to end."""

import csv
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from conftest import assert_toy_row_recomputed, recounted_claim_accuracy, run

import tipcap.demo
from tipcap.cli import main
from tipcap.clip import ClipSpec


@pytest.mark.parametrize(
    ("version", "module", "writer"), [(1, "world1", "write_toyworld"), (2, "world2", "write_world")]
)
def test_demo_cache_is_keyed_by_the_code_that_fills_it(tmp_path, monkeypatch, version, module, writer):
    """A world or CLIP made by another version of the generator or the trainer is not reused; the two
    worlds never share a cache entry."""
    made = []

    def fake_world(out, **kwargs):
        made.append("world")
        Path(out).mkdir(parents=True)
        (Path(out) / "toyworld.json").write_text("{}")

    def fake_clip(karpathy, out, **kwargs):
        made.append("clip")
        Path(out).mkdir(parents=True)
        (Path(out) / "toyclip.safetensors").write_bytes(b"")
        report = SimpleNamespace(steps=1, seconds=0.0, stop_reason="steps", recall_at_1=0.0,
                                 matched_cosine=0.0, within_modality_cosine=0.0,
                                 claim_accuracy=None)  # fmt: skip
        return None, report

    monkeypatch.setattr(f"tipcap.toy.{module}.{writer}", fake_world)
    monkeypatch.setattr("tipcap.toy.clip.train_toyclip", fake_clip)
    first = tipcap.demo.demo_world(tmp_path, quick=True, version=version)
    assert tipcap.demo.demo_world(tmp_path, quick=True, version=version) == first and made == [
        "world",
        "clip",
    ]
    monkeypatch.setattr("tipcap.toy.clip.TRAINING_VERSION", -1)
    retrained = tipcap.demo.demo_world(tmp_path, quick=True, version=version)
    assert retrained[0] == first[0] and retrained[1] != first[1] and made[2:] == ["clip"]
    monkeypatch.setattr(f"tipcap.toy.{module}.GENERATOR_VERSION", -1)
    regenerated = tipcap.demo.demo_world(tmp_path, quick=True, version=version)
    assert regenerated[0] != first[0] and made[3:] == ["world", "clip"]
    other = 3 - version
    monkeypatch.setattr("tipcap.toy.world1.write_toyworld", fake_world)
    monkeypatch.setattr("tipcap.toy.world2.write_world", fake_world)
    assert tipcap.demo.demo_world(tmp_path, quick=True, version=other)[0] not in (first[0], regenerated[0])


def test_cache_defaults_to_xdg_cache_home(tmp_path, monkeypatch):
    """--cache defaults to $XDG_CACHE_HOME/tipcap, else (unset, empty or relative, which the XDG spec says
    to ignore) to ~/.cache/tipcap; read when the command runs, not when the module is imported."""
    caches = []

    def fake_demo(out, cache, **kwargs):
        caches.append(Path(cache))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "table.md").write_text("")
        (Path(out) / "results.csv").write_text("cell,CIDEr\n")

    monkeypatch.setattr("tipcap.demo.run_demo", fake_demo)
    home = tmp_path / "home"
    for xdg in (str(tmp_path / "xdg"), None, "", "relative"):
        env = {"XDG_CACHE_HOME": xdg, "HOME": str(home)}
        result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "out")], env=env)
        assert result.exit_code == 0, result.output
    assert caches == [tmp_path / "xdg" / "tipcap", *[home / ".cache" / "tipcap"] * 3]


def test_demo_prints_the_digest_and_keeps_one_arithmetic_per_folder(tmp_path, monkeypatch):
    """The last line gives results.csv's SHA-256 and says whether another machine should print it (not here:
    torch was loaded before the command could pin it); a folder holding cells of one arithmetic refuses
    cells of the other, naming --out and the flag that matches it."""
    from tipcap.errors import TipcapError

    def fake_world(*args, **kwargs):
        raise TipcapError("stopped before the world")

    def fake_demo(out, cache, **kwargs):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "table.md").write_text("| table |\n")
        (Path(out) / "results.csv").write_text("cell,CIDEr\nnone,0.5\n")

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr("tipcap.demo.run_demo", fake_demo)
        result = CliRunner().invoke(main, ["demo", "--out", str(out), "--cache", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256(b"cell,CIDEr\nnone,0.5\n").hexdigest()[:16]
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"results.csv digest {digest}: CPU arithmetic not pinned (torch")
    assert "depend on this CPU" in last

    monkeypatch.setattr("tipcap.demo.demo_world", fake_world)
    native = tmp_path / "native"
    first = run("demo", "--out", native, "--cache", tmp_path / "c", "--unpinned")
    assert "stopped before the world" in first.output
    assert json.loads((native / "arithmetic.json").read_text()) == {"mode": "native"}
    monkeypatch.setattr("tipcap.demo.arithmetic_mode", lambda: "pinned")
    refused = run("demo", "--out", native, "--cache", tmp_path / "c")
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert f"--out {native}" in refused.output and "with --unpinned" in refused.output


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """The reduced demo of world 1 from an empty cache: world, CLIP, five methods; a rerun reuses
    everything."""
    out = tmp_path / "demo"
    result = run(
        "demo", "--quick", "--version", 1, "--out", out, "--cache", tmp_path / "cache", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["cell"], r["eval_prompt"]) for r in rows] == [
        ("supervised", "none"), ("none", "none"), ("isotropic", "none"), ("gaussian-few-pairs", "none"),
        ("gaussian-few-pairs-prompts", "none"), ("gaussian-few-pairs-prompts", "oracle"),
        ("gaussian-few-pairs-prompts", "auto"), ("gaussian-few-pairs-prompts", "wrong"),
    ]  # fmt: skip
    karpathy = next((tmp_path / "cache").glob("toyworld-*/toyworld.json"))
    for row in rows:
        assert_toy_row_recomputed(out, row, karpathy)  # object F1, CHAIR, CLIP-S from the files written
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
    again = run(
        "demo", "--quick", "--version", 1, "--out", out, "--cache", tmp_path / "cache", "--no-progress"
    )
    assert again.exit_code == 0 and again.stdout == result.stdout
    assert "toy world: reused" in again.stderr and "toy CLIP: reused" in again.stderr
    assert ": building (not built yet)" in result.stderr and "building" not in again.stderr


@pytest.mark.slow
def test_quick_demo_of_world_2_separates_the_methods(quick_demo):
    """The default demo (world 2, --quick) from an empty cache, as a user runs it (pinned CPU arithmetic, so
    its digits are every x86-64 machine's with the same package versions). Each stage is timed; four methods,
    the prompt-trained one (its module trained alone on the Gaussian decoder, frozen) also with CLIP's
    guesses and with the scene's objects as prompt words; and the separations the world is built for, with
    margins under what seed 0 gives (pinned; seeds 0-5 in experiments/README §5.3): gaussian − none +0.646
    CIDEr, CLIP R@1 0.94, matched cosine 0.38 against 0.62 between images, claim accuracy 0.72; without words
    the prompt-trained decoder writes the Gaussian's captions word for word; with the scene's objects as
    guided prompt words, adherence 0.92 and object F1 0.95 against 0.29 without."""
    out, cache, result = quick_demo
    assert result.returncode == 0, result.stderr
    stages = ("toy world: generated in", "toy CLIP: 500 steps of the image tower alone and 150 contrastive "
              "steps in", "grid: finished in")  # fmt: skip
    for stage in stages:
        assert stage in result.stderr, result.stderr
    digest = hashlib.sha256((out / "results.csv").read_bytes()).hexdigest()[:16]
    assert (
        result.stdout.strip()
        .splitlines()[-1]
        .startswith(f"results.csv digest {digest}: CPU arithmetic pinned (tipcap.portable)")
    )
    assert json.loads((out / "arithmetic.json").read_text()) == {"mode": "pinned"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    prompted = "gaussian-few-pairs-prompts"
    assert [(r["cell"], r["eval_prompt"]) for r in rows] == [
        ("none", "none"), ("gaussian-few-pairs", "none"), (prompted, "none"), (prompted, "auto"),
        (prompted, "oracle"), ("retrieval", "none"),
    ]  # fmt: skip
    scores = {(r["cell"], r["eval_prompt"]): r for r in rows}
    cider = {key: float(row["CIDEr"]) for key, row in scores.items()}
    f1 = {key: float(row["object_f1"]) for key, row in scores.items()}
    bridged, oracle = ("gaussian-few-pairs", "none"), (prompted, "oracle")
    assert cider[bridged] - cider[("none", "none")] >= 0.3, cider
    # The module trained alone on the frozen Gaussian decoder: without words, the very same captions.
    evaluations = out / "eval"
    assert (evaluations / f"{prompted}-seed0-none" / "predictions.json").read_bytes() == (
        evaluations / "gaussian-few-pairs-seed0-none" / "predictions.json"
    ).read_bytes()
    # The scene's objects as prompt words: named, bound colour to shape, and a better caption.
    assert float(scores[oracle]["Adherence"]) >= 0.85, scores[oracle]
    assert f1[oracle] - f1[bridged] >= 0.3 and cider[oracle] - cider[bridged] >= 0.5, (f1, cider)
    karpathy = next(cache.glob("toyworld2-*/toyworld.json"))
    for row in rows:
        assert 0.5 <= float(row["CIDEr"]) < 10, row
        assert_toy_row_recomputed(out, row, karpathy)  # object and claim F1s, CHAIR, CLIP-S from the files
    assert f"| {prompted} | oracle | 1 |" in result.stdout and "colour F1" in result.stdout
    report = json.loads(next(cache.glob("toyworld2-*/clip-*/toyclip_report.json")).read_text())
    assert report["recall_at_1"] >= 0.85 and report["claim_accuracy"] >= 0.6, report
    assert report["matched_cosine"] + 0.15 < report["within_modality_cosine"], report


def test_toyworld_clip_trains_the_demo_s_clip(tmp_path, monkeypatch, tiny_clip):
    """`tipcap toyworld --clip` trains the CLIP the demo would (its scale, here a tiny one) into OUT/clip."""
    from tipcap.demo import DemoScale
    from tipcap.toy.clip import StopRule
    from tipcap.toy.gap_shapes import GapShape

    config = json.loads(tiny_clip.read_text())
    config["vision_cfg"].update(image_size=48, patch_size=16, pool_type="avg", final_ln_after_pool=True)
    stop = StopRule(every=10, held_out=8)
    scale = DemoScale(40, 8, 4, 3, 8, config, "toyworld2.yaml", stop, GapShape(1.0), 2, True, 2, 1.0)
    scales = []
    monkeypatch.setattr(tipcap.demo, "demo_scale", lambda quick, version=1: scales.append(version) or scale)
    out = tmp_path / "world"
    result = run("toyworld", "--out", out, "--version", 2, "--train", 40, "--val", 8, "--test", 4, "--clip")
    assert result.exit_code == 0, result.output
    assert scales == [2] and (out / "clip" / "toyclip.safetensors").is_file()
    report = json.loads((out / "clip" / "toyclip_report.json").read_text())
    spec = ClipSpec(str(out / "clip" / "toyclip.json"), str(out / "clip" / "toyclip.safetensors"))
    assert report["steps"] == 3 and report["claim_accuracy"] == recounted_claim_accuracy(
        out / "toyworld.json", spec
    )
    assert "claim accuracy" in result.output
    # Both stages are announced, each with its own progress bar; the CLIP starts from random weights, which
    # is no mistake when it is trained.
    assert (
        "toy CLIP: training 2 steps of the image tower alone, then up to 3 contrastive steps" in result.output
    )
    assert "toy CLIP: 2 steps of the image tower alone and 3 contrastive steps in" in result.output
    assert "random weights" not in result.output


def test_toyworld_clip_without_a_val_split_says_so(tmp_path):
    """The CLIP's report reads the val split: a world without one gets one line naming --val."""
    out = tmp_path / "world"
    result = run("toyworld", "--out", out, "--version", 2, "--train", 20, "--val", 0, "--test", 2, "--clip")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "--val" in result.output and "val split" in result.output
    assert not (out / "clip" / "toyclip.safetensors").exists()
