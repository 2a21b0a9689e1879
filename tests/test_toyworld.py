"""Toy world 1: deterministic generation, readable by every reader, object F1, web pairs; the toy CLIP."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import run
from PIL import Image
from torch.nn.functional import normalize

from tipcap.data import list_images, load_image, read_captions
from tipcap.toy.plugin import object_f1
from tipcap.toy.world1 import GENERATOR_VERSION, caption_objects


def make_world(path, seed=0):
    result = run("toyworld", "--out", path, "--version", 1, "--seed", seed, "--train", 60, "--val", 10,
                 "--test", 10)  # fmt: skip
    assert result.exit_code == 0, result.output
    return path / "toyworld.json"


def test_world_is_deterministic_and_readable(tmp_path):
    first = make_world(tmp_path / "a")
    assert first.read_bytes() == make_world(tmp_path / "b").read_bytes()
    # The images too, although this process rendered a world before (PIL's effect_noise drew the grain
    # from the process-wide C rand(), so a second world of the same seed had other pixels).
    for image in (tmp_path / "a" / "images").iterdir():
        assert image.read_bytes() == (tmp_path / "b" / "images" / image.name).read_bytes(), image.name
    assert first.read_bytes() != make_world(tmp_path / "c", seed=1).read_bytes()
    assert len(read_captions(first, split="train")) == 300 and len(read_captions(first, split="test")) == 50
    images = list_images(first, split="val")
    assert len(images) == 10 and load_image(images[0].path).size == (32, 32)
    document = json.loads(first.read_text())
    assert document["generator"] == GENERATOR_VERSION and (first.parent / "entities.json").is_file()
    for entry in document["images"]:
        assert len({s["raw"] for s in entry["sentences"]}) == 5 and 1 <= len(entry["objects"]) <= 3


def test_object_f1_scores_captions_against_the_scene(tmp_path):
    document = json.loads(make_world(tmp_path / "w").read_text())
    entries = document["images"]
    own = [object_f1(s["raw"], e["objects"]) for e in entries for s in e["sentences"]]
    assert sum(own) / len(own) == 1.0
    other = [
        object_f1(entries[(i + 7) % len(entries)]["sentences"][0]["raw"], e["objects"])
        for i, e in enumerate(entries)
    ]
    assert sum(other) / len(other) < 0.25
    assert caption_objects("Two red crosses and a small blue circle.") == {
        ("red", "cross"),
        ("blue", "circle"),
    }
    assert (
        object_f1(
            "a green square.", [{"colour": "green", "shape": "square"}, {"colour": "red", "shape": "cross"}]
        )
        == 2 / 3
    )


def test_web_pairs_hold_a_share_of_mismatched_captions(tmp_path):
    world = tmp_path / "w"
    result = run("toyworld", "--out", world, "--version", 1, "--train", 2000, "--val", 0, "--test", 0,
                 "--web-mismatch", 0.2)  # fmt: skip
    assert result.exit_code == 0, result.output
    captions = {
        e["filename"]: {s["raw"] for s in e["sentences"]}
        for e in json.loads((world / "toyworld.json").read_text())["images"]
    }
    lines = [json.loads(line) for line in (world / "web_pairs.jsonl").read_text().splitlines()]
    wrong = sum(line["caption"] not in captions[line["image"].split("/")[-1]] for line in lines) / len(lines)
    assert len(lines) == 2000 and 0.15 < wrong < 0.25
    assert len(read_captions(world / "web_pairs.jsonl")) == 2000


def test_toy_clip_trains_saves_and_loads_like_any_clip(tmp_path, tiny_clip):
    from tipcap.clip import ClipEncoder
    from tipcap.toy.clip import train_toyclip

    karpathy = make_world(tmp_path / "w")
    config = json.loads(tiny_clip.read_text())
    spec, report = train_toyclip(
        karpathy, tmp_path / "clip", steps=3, batch_size=16, config=config, progress=False
    )
    assert spec.model == str(tmp_path / "clip" / "toyclip.json") and spec.pretrained.endswith(
        "toyclip.safetensors"
    )
    encoder = ClipEncoder.load(spec, device="cpu")
    assert abs(float(encoder.model.logit_scale.detach().exp()) - 100.0) < 1e-3
    assert report.steps == 3 and report.mu_norm > 0
    entries = [e for e in json.loads(karpathy.read_text())["images"] if e["split"] == "val"]
    files = [karpathy.parent / e["filepath"] / e["filename"] for e in entries]
    images = encoder.encode_images(
        torch.stack([encoder.preprocess(Image.open(f).convert("RGB")) for f in files])
    )
    texts = encoder.encode_texts([s["raw"] for e in entries for s in e["sentences"]]).embeddings
    owner = torch.tensor([i for i, e in enumerate(entries) for _ in e["sentences"]])
    nearest = (normalize(images, dim=-1) @ normalize(texts, dim=-1).T).argmax(dim=1)
    hits = int((owner[nearest] == torch.arange(len(entries))).sum())
    assert report.recall_at_1 == pytest.approx(hits / len(entries))
    assert json.loads((tmp_path / "clip" / "toyclip_report.json").read_text())["steps"] == 3
    result = run("embed", "images", "--images", karpathy, "--split", "test", "--clip", spec.model,
                 "--pretrained", spec.pretrained, "--out", tmp_path / "store", "--workers", "0",
                 "--no-progress")  # fmt: skip
    assert result.exit_code == 0 and "wrote 10 image embeddings" in result.stdout


class ConstructedEncoder:
    """Embeds the n images of a split, in order, as the basis vectors e_i and their captions as e_i, except
    the captions of the first ``wrong`` images, as -e_i: so recall@1 is (n - wrong)/n."""

    def __init__(self, n: int, wrong: int):
        self.basis, self.wrong = torch.eye(n), wrong

    def preprocess(self, image):
        return torch.zeros(1)

    def encode_images(self, pixels):
        return self.basis[: len(pixels)]

    def encode_texts(self, captions):
        per_image = len(captions) // len(self.basis)
        signs = torch.tensor([-1.0 if i < self.wrong else 1.0 for i in range(len(self.basis))])
        return SimpleNamespace(embeddings=(signs[:, None] * self.basis).repeat_interleave(per_image, dim=0))


def test_toy_clip_measures_are_known_on_a_constructed_encoder(tmp_path):
    from tipcap.toy.clip import measure

    figures = measure(ConstructedEncoder(10, wrong=3), make_world(tmp_path / "w"), split="val")
    # δ = v − t is 2e_i for the 15 captions of the 3 wrong images, else 0: mean 0.2e_i (i < 3), so Σ has
    # 0.4 − 0.04 on those three diagonal entries and −0.04 between them.
    assert figures == pytest.approx({
        "recall_at_1": 0.7, "matched_cosine": 0.4, "within_modality_cosine": 0.0, "mu_norm": 0.2 * 3**0.5,
        "text_cosine": 0.0, "trace_sigma": 3 * 0.36, "effective_rank": 1.08**2 / (3 * 0.36**2 + 6 * 0.04**2),
    })  # fmt: skip
