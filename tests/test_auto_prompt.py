"""`tipcap caption --auto-prompt` and `tipcap evaluate --prompt auto` pick the same prompt words: both take
their defaults from one place, `EvalConfig` (eval.top_k, eval.threshold)."""

import json

from conftest import COCO_SLICE, run
from serving import build_model

from tipcap.config import EvalConfig


def test_caption_and_evaluate_pick_the_same_automatic_prompt_words(tmp_path, tiny_clip, coco_images):
    model = build_model(tmp_path / "hard", tiny_clip, "hard", seed=0)
    out = tmp_path / "eval"
    result = run("evaluate", "--model", model, "--data", COCO_SLICE, "--images", coco_images,
                 "--split", "val", "--out", out, "--prompt", "auto", "--beams", "1", "--metrics", "bleu",
                 "--score-clip", tiny_clip, "--score-pretrained", "none")  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluated = {row["image_id"]: row["prompt"] for row in json.loads((out / "per_image.json").read_text())}

    images = [entry for entry in json.loads(COCO_SLICE.read_text())["images"] if entry["split"] == "val"]
    paths = [coco_images / entry["filepath"] / entry["filename"] for entry in images]
    captions = tmp_path / "captions.jsonl"
    result = run("caption", *paths, "--model", model, "--auto-prompt", "--beams", "1", "--out", captions)
    assert result.exit_code == 0, result.output
    id_of = {str(path): entry["cocoid"] for path, entry in zip(paths, images, strict=True)}
    captioned = {id_of[row["image"]]: row["prompt"] for row in map(json.loads, captions.open())}

    assert captioned == evaluated and len(captioned) == 12
    # The threshold is what tells them apart from the top words alone: some image gets fewer than top_k.
    assert any(words for words in captioned.values())
    assert any(len(words) < EvalConfig.top_k for words in captioned.values())


def test_the_defaults_of_automatic_prompt_words_are_evaluations():
    import inspect

    from tipcap.pipeline import CaptionPipeline

    parameters = inspect.signature(CaptionPipeline.caption).parameters
    assert parameters["top_k"].default == EvalConfig().top_k
    assert parameters["threshold"].default == EvalConfig().threshold
