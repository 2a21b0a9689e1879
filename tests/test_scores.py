"""CLIP-S and RefCLIP-S: the formulas against hand computations on a tiny CLIP; the scorer in `evaluate`."""

import json
import logging
import math

import numpy as np
import open_clip
import pytest
import torch
from conftest import COCO_SLICE, karpathy_references, run
from PIL import Image
from safetensors.torch import save_file
from torch.nn.functional import normalize

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.evaluation import clip_scores

FAST_METRICS = ("--metrics", "bleu,rouge,cider")


@pytest.fixture(scope="module")
def scorer_files(tmp_path_factory, tiny_clip):
    """A tiny CLIP as a scorer would be given: its model-config JSON and a safetensors weights file."""
    folder = tmp_path_factory.mktemp("scorer")
    config = folder / "scorer-clip.json"
    config.write_text(tiny_clip.read_text())
    encoder = ClipEncoder.load(ClipSpec(str(config), "none", init_seed=7), device="cpu")
    weights = folder / "scorer-clip.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, weights)
    return config, weights


def open_clip_model(config, weights):
    """The scorer built by open_clip alone (no tipcap code), for the hand computations."""
    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms(config.stem, pretrained=str(weights))
    return model.eval(), preprocess, open_clip.get_tokenizer(config.stem)


def hand_scores(model, preprocess, tokenizer, image_paths, captions, references):
    """CLIP-S and RefCLIP-S per the paper: numpy over open_clip's embeddings."""
    with torch.no_grad():
        images = model.encode_image(
            torch.stack([preprocess(Image.open(p).convert("RGB")) for p in image_paths])
        )
        texts = model.encode_text(tokenizer([f"A photo depicts {c}" for c in captions]))
        refs = [model.encode_text(tokenizer([f"A photo depicts {r}" for r in group])) for group in references]
    unit = lambda x: x.numpy() / np.linalg.norm(x.numpy(), axis=-1, keepdims=True)  # noqa: E731
    v, c = unit(images), unit(texts)
    clip_s = 2.5 * np.maximum((v * c).sum(-1), 0)
    best = np.maximum(np.array([(unit(r) @ c[i]).max() for i, r in enumerate(refs)]), 0)
    ref_clip_s = np.where(clip_s + best > 0, 2 * clip_s * best / np.maximum(clip_s + best, 1e-12), 0.0)
    return clip_s, ref_clip_s


def test_clip_s_is_two_and_a_half_times_the_positive_cosine():
    texts = normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    other = normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    orthogonal = normalize(other - (other * texts).sum(-1, keepdim=True) * texts, dim=-1)
    angle = math.pi / 3
    images = torch.stack([texts[0], math.cos(angle) * texts[1] + math.sin(angle) * orthogonal[1], -texts[2]])
    # Scaled embeddings: CLIP-S reads the angle only.
    assert clip_scores.clip_s(3.0 * images, texts).tolist() == pytest.approx([2.5, 1.25, 0.0], abs=1e-5)


def test_ref_clip_s_is_the_harmonic_mean_and_zero_without_agreement():
    captions = torch.eye(3)
    references = [torch.eye(3)[[0, 1]], torch.tensor([[0.6, 0.8, 0.0]]), -torch.eye(3)[[2]]]
    image_scores = torch.tensor([1.0, 0.5, 0.0])
    # best cosines: 1 (a reference equals the caption), 0.8, max(-1, 0) = 0
    expected = [2 * 1.0 * 1.0 / 2.0, 2 * 0.5 * 0.8 / 1.3, 0.0]
    assert clip_scores.ref_clip_s(image_scores, captions, references).tolist() == pytest.approx(expected)


def test_scores_of_images_and_captions_equal_a_hand_computation(scorer_files, image_folder):
    config, weights = scorer_files
    encoder = ClipEncoder.load(ClipSpec(str(config), str(weights)), device="cpu")
    paths = [image_folder / f"img_00{i}.jpg" for i in (5, 4, 1)]
    captions = ["a dog on the grass.", "a red bus in the street.", "two cats asleep on a sofa."]
    references = [["a brown dog.", "a dog running on a lawn."], ["a bus."], ["cats.", "a sofa.", "a cat."]]
    images = encoder.encode_images(
        torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])
    )
    scores = clip_scores.score(encoder, images, captions, references)
    clip_s, ref_clip_s = hand_scores(*open_clip_model(config, weights), paths, captions, references)
    assert clip_s.max() > 0 and clip_s.min() < 2.5 and (ref_clip_s > 0).any()
    assert scores.clip_s.tolist() == pytest.approx(clip_s.tolist(), abs=1e-5)
    assert scores.ref_clip_s.tolist() == pytest.approx(ref_clip_s.tolist(), abs=1e-5)


@pytest.fixture
def protocol_log(caplog, monkeypatch):
    """Records of the ``tipcap.evaluation.evaluate`` logger, whatever the CLI did to the ``tipcap``
    logger before."""
    logger = logging.getLogger("tipcap.evaluation.evaluate")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def image_paths_of(root, image_ids):
    paths = {
        i["cocoid"]: root / i["filepath"] / i["filename"]
        for i in json.loads(COCO_SLICE.read_text())["images"]
    }
    return [paths[image_id] for image_id in image_ids]


def test_evaluate_scores_with_a_scorer_of_its_own(coco_texts, coco_images, scorer_files, tmp_path):
    """The template baseline reads the tiny random CLIP of the caption store; CLIP-S comes from another
    CLIP, given as config and weights files, which embeds the images itself; metrics.json names it."""
    config, weights = scorer_files
    out = tmp_path / "eval"
    result = run("evaluate", "--method", "template", "--texts", coco_texts, "--data", COCO_SLICE,
                 "--images", coco_images, "--split", "val", "--out", out, "--score-clip", config,
                 "--score-pretrained", weights, *FAST_METRICS)  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scorer"]["clip"] == {
        "model": str(config.resolve()),
        "pretrained": str(weights.resolve()),
        "init_seed": 0,
    }
    assert metrics["scorer"]["prefix"] == "A photo depicts" and metrics["scorer"]["w"] == 2.5
    assert (out / "score-image-store" / "meta.json").is_file()
    per_image = json.loads((out / "per_image.json").read_text())
    references = karpathy_references(COCO_SLICE, "val")
    ids = [row["image_id"] for row in per_image]
    predictions = [row["prediction"] for row in per_image]
    clip_s, ref_clip_s = hand_scores(
        *open_clip_model(config, weights), image_paths_of(coco_images, ids), predictions,
        [references[i] for i in ids],
    )  # fmt: skip
    assert [row["CLIP-S"] for row in per_image] == pytest.approx(clip_s.tolist(), abs=1e-3)  # fp16 store
    assert [row["RefCLIP-S"] for row in per_image] == pytest.approx(ref_clip_s.tolist(), abs=1e-3)
    assert metrics["metrics"]["CLIP-S"] == pytest.approx(float(np.mean(clip_s)), abs=1e-3)
    assert metrics["metrics"]["RefCLIP-S"] == pytest.approx(float(np.mean(ref_clip_s)), abs=1e-3)
    assert "CLIP-S" in result.stdout and "RefCLIP-S" in result.stdout


def test_a_scorer_without_weights_offline_is_skipped_with_one_warning(
    coco_texts, coco_images, tmp_path, protocol_log
):
    out = tmp_path / "eval"
    result = run("evaluate", "--method", "template", "--texts", coco_texts, "--data", COCO_SLICE,
                 "--images", coco_images, "--split", "val", "--out", out, *FAST_METRICS)  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["scorer"]["clip"]["model"] == "ViT-B-32"
        and metrics["scorer"]["clip"]["pretrained"] == "openai"
    )
    assert "CLIP-S" not in metrics["metrics"] and "CIDEr" in metrics["metrics"]
    reason = metrics["skipped"]["CLIP-S"]
    assert (
        "not cached" in reason
        and "--score-pretrained" in reason
        and metrics["skipped"]["RefCLIP-S"] == reason
    )
    warnings = [
        r.getMessage()
        for r in protocol_log.records
        if r.levelno >= logging.WARNING and r.name == "tipcap.evaluation.evaluate"
    ]
    assert len(warnings) == 1 and warnings[0].startswith("CLIP-S and RefCLIP-S skipped:"), warnings


def test_the_decoder_clip_as_scorer_reuses_its_image_embeddings(coco_texts, coco_images, tiny_clip, tmp_path):
    out = tmp_path / "eval"
    result = run("evaluate", "--method", "template", "--texts", coco_texts, "--data", COCO_SLICE,
                 "--images", coco_images, "--split", "val", "--out", out, "--score-clip", tiny_clip,
                 "--score-pretrained", "none", *FAST_METRICS)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (out / "score-image-store").exists()
    per_image = json.loads((out / "per_image.json").read_text())
    encoder = ClipEncoder.load(ClipSpec(str(tiny_clip), "none"), device="cpu")
    references = karpathy_references(COCO_SLICE, "val")
    ids = [row["image_id"] for row in per_image]
    pixels = torch.stack(
        [encoder.preprocess(Image.open(p).convert("RGB")) for p in image_paths_of(coco_images, ids)]
    )
    expected = clip_scores.score(
        encoder,
        encoder.encode_images(pixels),
        [row["prediction"] for row in per_image],
        [references[i] for i in ids],
    )
    assert [row["CLIP-S"] for row in per_image] == pytest.approx(expected.clip_s.tolist(), abs=1e-3)
