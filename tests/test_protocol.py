"""`tipcap evaluate`: a tiny model and the two non-neural baselines through one protocol."""

import json

import pytest
import torch
from conftest import COCO_SLICE, karpathy_references, pycocoevalcap_cider, run
from torch.nn.functional import normalize

from tipcap.store import EmbeddingStore

# Every test here reads the prompt_model fixture, a decoder trained for 800 steps.
pytestmark = pytest.mark.slow

FAST_METRICS = ("--metrics", "bleu,rouge,cider")


def test_evaluate_a_model_writes_the_three_files(prompt_model, coco_images, tmp_path):
    _, _, model_dir = prompt_model
    out = tmp_path / "eval"
    result = run("evaluate", "--model", model_dir, "--data", COCO_SLICE, "--images", coco_images,
                 "--split", "val", "--out", out, "--beams", "3", *FAST_METRICS)  # fmt: skip
    assert result.exit_code == 0, result.output
    predictions = json.loads((out / "predictions.json").read_text())
    val_ids = [i["cocoid"] for i in json.loads(COCO_SLICE.read_text())["images"] if i["split"] == "val"]
    assert sorted(p["image_id"] for p in predictions) == sorted(val_ids)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"BLEU-4", "ROUGE-L", "CIDEr"} <= metrics["metrics"].keys()
    assert metrics["method"] == "model" and metrics["model"]["config"]["prompt"] == "pim"
    assert metrics["command"] and "tipcap" in metrics["versions"]
    per_image = json.loads((out / "per_image.json").read_text())
    assert len(per_image) == 12 and all(len(row["references"]) >= 5 for row in per_image)
    assert abs(sum(row["CIDEr"] for row in per_image) / 12 - metrics["metrics"]["CIDEr"]) < 1e-9
    # ROUGE-L too is the mean of its per-image scores (what evaluation.stats resamples).
    assert abs(sum(row["ROUGE-L"] for row in per_image) / 12 - metrics["metrics"]["ROUGE-L"]) < 1e-9
    assert "CIDEr" in result.stdout

    again = tmp_path / "again"
    result = run("evaluate", "--model", model_dir, "--data", COCO_SLICE, "--image-store", out / "image-store",
                 "--split", "val", "--out", again, "--beams", "3", *FAST_METRICS)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((again / "predictions.json").read_text()) == predictions


def test_retrieval_and_template_baselines(prompt_model, coco_images, tmp_path, tiny_clip):
    store = tmp_path / "texts"
    result = run("embed", "texts", "--corpus", COCO_SLICE, "--split", "train", "--clip", tiny_clip,
                 "--pretrained", "none", "--out", store, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "retrieval"
    result = run("evaluate", "--method", "retrieval", "--texts", store, "--data", COCO_SLICE,
                 "--images", coco_images, "--split", "val", "--out", out, *FAST_METRICS)  # fmt: skip
    assert result.exit_code == 0, result.output
    predictions = json.loads((out / "predictions.json").read_text())
    texts, images = EmbeddingStore.open(store), EmbeddingStore.open(out / "image-store")
    row_of = {image_id: row for row, image_id in enumerate(images.ids)}
    queries = images.gather(torch.tensor([row_of[p["image_id"]] for p in predictions])).float()
    cosine = normalize(queries, dim=-1) @ normalize(texts.embeddings().float(), dim=-1).T
    nearest = [texts.captions()[row] for row in cosine.argmax(dim=1).tolist()]
    assert len(predictions) == 12 and [p["caption"] for p in predictions] == nearest

    out = tmp_path / "template"
    result = run("evaluate", "--method", "template", "--texts", store, "--data", COCO_SLICE,
                 "--images", coco_images, "--split", "val", "--out", out, *FAST_METRICS)  # fmt: skip
    assert result.exit_code == 0, result.output
    predictions = json.loads((out / "predictions.json").read_text())
    assert all(p["caption"].startswith("a photo of a ") for p in predictions)
    expected = pycocoevalcap_cider(predictions, karpathy_references(COCO_SLICE, "val"))
    cider = json.loads((out / "metrics.json").read_text())["metrics"]["CIDEr"]
    assert expected > 0 and cider == pytest.approx(expected, abs=1e-9)


def test_evaluate_needs_one_image_source(prompt_model, tmp_path):
    _, _, model_dir = prompt_model
    result = run("evaluate", "--model", model_dir, "--data", COCO_SLICE, "--out", tmp_path / "x")
    assert result.exit_code == 1 and "give --images (an image root), --image-store, or both" in result.stderr
