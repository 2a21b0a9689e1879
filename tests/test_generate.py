"""Captioning images with `tipcap caption` and the Captioner: corrupt files, prompts, batching."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run
from PIL import Image
from torch.nn.functional import normalize

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.generate import Captioner
from tipcap.model import TIPCap
from tipcap.store import EmbeddingStore

# Every test here reads the prompt_model fixture, a decoder trained for 800 steps.
pytestmark = pytest.mark.slow


def test_caption_folder_with_a_corrupt_image(prompt_model, image_folder):
    _, _, model_dir = prompt_model
    result = run("caption", image_folder, "--model", model_dir, "--beams", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6 and all(line.split("\t")[1].strip() for line in lines)
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "broken_000.jpg" in skipped[0] and "Traceback" not in result.output


def test_prompt_changes_the_caption(prompt_model, image_folder, tmp_path):
    _, _, model_dir = prompt_model
    plain, prompted = tmp_path / "plain.jsonl", tmp_path / "prompted.jsonl"
    assert run("caption", image_folder, "--model", model_dir, "--out", plain).exit_code == 0
    result = run("caption", image_folder, "--model", model_dir, "--prompt", "zebra", "--out", prompted)
    assert result.exit_code == 0, result.output
    before = [json.loads(line) for line in plain.read_text().splitlines()]
    after = [json.loads(line) for line in prompted.read_text().splitlines()]
    assert [r["image"] for r in before] == [r["image"] for r in after]
    assert all(r["prompt"] == ["zebra"] for r in after)
    assert sum("zebra" in r["caption"].split() for r in after) >= 5
    assert sum("zebra" in r["caption"].split() for r in before) < sum(
        "zebra" in r["caption"].split() for r in after
    )


def test_auto_prompt_records_the_three_entities_nearest_the_image(prompt_model, image_folder, tmp_path):
    _, _, model_dir = prompt_model
    out = tmp_path / "auto.jsonl"
    assert run("caption", image_folder, "--model", model_dir, "--auto-prompt", "--out", out).exit_code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    model = TIPCap.from_pretrained(model_dir)
    encoder = ClipEncoder.load(ClipSpec(**model.clip_spec), device="cpu")
    paths = sorted(image_folder.glob("img_*.jpg"))
    pixels = torch.stack([encoder.preprocess(Image.open(path).convert("RGB")) for path in paths])
    cosine = normalize(encoder.encode_images(pixels), dim=-1) @ normalize(model.entity_embeddings, dim=-1).T
    nearest = {
        path.name: [model.entity_names[i] for i in row]
        for path, row in zip(paths, cosine.topk(3).indices.tolist(), strict=True)
    }
    assert {Path(r["image"]).name: r["prompt"] for r in records} == nearest


def test_batched_captions_equal_one_at_a_time(prompt_model):
    root, _, model_dir = prompt_model
    captioner = Captioner.load(model_dir, device="cpu")
    embeddings = EmbeddingStore.open(root / "held_out").embeddings().float()[:12]
    for beams in (1, 4):
        batched = captioner.caption_embeddings(embeddings, num_beams=beams, batch_size=12)
        single = [captioner.caption_embeddings(row[None], num_beams=beams)[0] for row in embeddings]
        assert batched == single


def test_unknown_prompt_words_are_encoded_with_clip(prompt_model):
    root, _, model_dir = prompt_model
    captioner = Captioner.load(model_dir, device="cpu")
    embeddings = EmbeddingStore.open(root / "held_out").embeddings().float()[:2]
    captions = captioner.caption_embeddings(embeddings, [["unicorn"], []], num_beams=1)
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    assert torch.isfinite(captioner.model.prompt_embeddings([["unicorn"]], captioner._encode_texts)[0]).all()
