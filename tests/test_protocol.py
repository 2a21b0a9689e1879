"""`tipcap evaluate`: a tiny model and the two non-neural baselines through one protocol."""

import json
from pathlib import Path

import pytest
import torch
from conftest import COCO_SLICE, karpathy_references, pycocoevalcap_cider, run
from torch.nn.functional import normalize

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.prompts import PROMPT_TEMPLATES, default_vocabulary_path
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
    assert [p["caption"] for p in predictions] == template_captions(out, tiny_clip)
    assert all(p["caption"].startswith("a photo of a ") for p in predictions)
    expected = pycocoevalcap_cider(predictions, karpathy_references(COCO_SLICE, "val"))
    cider = json.loads((out / "metrics.json").read_text())["metrics"]["CIDEr"]
    assert expected > 0 and cider == pytest.approx(expected, abs=1e-9)


def template_captions(out: Path, clip: Path) -> list[str]:
    """The template baseline's captions recomputed from its image store: each image's (at most) two most
    probable names of the packaged vocabulary under softmax(100 · cos), of probability 0.2 or more, each name
    embedded as the renormalised mean of its prompt templates' unit embeddings."""
    encoder = ClipEncoder.load(ClipSpec(str(clip), "none"), device="cpu")
    names = [entry["name"] for entry in json.loads(default_vocabulary_path().read_text())["entities"]]
    texts = encoder.encode_texts([t.format(name) for name in names for t in PROMPT_TEMPLATES]).embeddings
    entities = normalize(
        normalize(texts.float(), dim=-1).view(len(names), len(PROMPT_TEMPLATES), -1).mean(1), dim=-1
    )
    images = EmbeddingStore.open(out / "image-store")
    probabilities = (100 * normalize(images.embeddings().float(), dim=-1) @ entities.T).softmax(dim=-1)
    top = probabilities.topk(2, dim=-1)
    words = [
        [names[i] for p, i in zip(values.tolist(), indices.tolist(), strict=True) if p >= 0.2]
        for values, indices in zip(top.values, top.indices, strict=True)
    ]
    by_id = {
        image_id: ("a photo of " + " and ".join(f"a {w}" for w in ws) + "." if ws else "a photo.")
        for image_id, ws in zip(images.ids, words, strict=True)
    }
    predicted = json.loads((out / "predictions.json").read_text())
    return [by_id[p["image_id"]] for p in predicted]


def test_evaluate_needs_one_image_source(prompt_model, tmp_path):
    _, _, model_dir = prompt_model
    result = run("evaluate", "--model", model_dir, "--data", COCO_SLICE, "--out", tmp_path / "x")
    assert result.exit_code == 1 and "give --images (an image root), --image-store, or both" in result.stderr
