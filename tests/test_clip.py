"""The open_clip wrapper: loading, length-trimmed text encoding, truncation, offline failures."""

import json
from types import SimpleNamespace

import endpoints
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.data import ImageError, read_captions
from tipcap.errors import TipcapError


@pytest.fixture(scope="module")
def encoder(tiny_clip) -> ClipEncoder:
    return ClipEncoder.load(ClipSpec(str(tiny_clip), "none"), device="cpu")


@pytest.fixture(scope="module")
def captions() -> list[str]:
    from conftest import COCO_SLICE

    texts = [c.text for c in read_captions(COCO_SLICE).captions]
    return [*texts, "a dog.", "Two " + "very " * 30 + "large elephants walking through the tall grass."]


def test_random_weights_are_seeded(tiny_clip, encoder, captions):
    again = ClipEncoder.load(ClipSpec(str(tiny_clip), "none", init_seed=0), device="cpu")
    other = ClipEncoder.load(ClipSpec(str(tiny_clip), "none", init_seed=1), device="cpu")
    reference = encoder.encode_texts(captions[:8]).embeddings
    assert torch.equal(again.encode_texts(captions[:8]).embeddings, reference)
    assert not torch.allclose(other.encode_texts(captions[:8]).embeddings, reference)


def test_trimmed_encoding_equals_open_clip_encode_text(encoder, captions):
    tokens, _ = encoder.tokenize(captions)
    assert int(encoder.token_lengths(tokens).max()) < 50 < encoder.context_length
    with torch.inference_mode():
        full = torch.nn.functional.normalize(encoder.model.encode_text(tokens), dim=-1)
    trimmed = encoder.encode_texts(captions, batch_size=16).embeddings
    assert trimmed.shape == (len(captions), encoder.dim)
    assert (trimmed - full).abs().max().item() <= 1e-5
    untrimmed = encoder.encode_texts(captions, batch_size=16, trim=False).embeddings
    assert (untrimmed - full).abs().max().item() <= 1e-5
    # Different arithmetic rounds differently: bit-equal results would mean trimming never ran.
    assert not torch.equal(trimmed, untrimmed)


def test_encode_texts_keeps_input_order_and_unit_length(encoder, captions):
    batched = encoder.encode_texts(captions, batch_size=7).embeddings
    one_by_one = torch.cat([encoder.encode_texts([c]).embeddings for c in captions[:10]])
    assert torch.allclose(batched[:10], one_by_one, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(captions)), atol=1e-5)


def test_truncated_captions_are_counted(encoder):
    fits_exactly = "a " * 75  # start + 75 words + end = 77 tokens
    too_long = "a " * 76
    result = encoder.encode_texts(["a cat.", fits_exactly, too_long, too_long])
    assert result.truncated == 2
    assert torch.isfinite(result.embeddings).all()


def test_encode_images(encoder):
    images = [Image.new("RGB", (50, 40), (200, 10, 10)), Image.new("RGB", (20, 60), (10, 10, 200))]
    pixels = torch.stack([encoder.preprocess(image) for image in images])
    features = encoder.encode_images(pixels)
    assert features.shape == (2, encoder.dim)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(features[0], features[1])


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((21, 1), "thin: 21×1 pixels, more than 20 times as wide as it is high; CLIP sees only the centre"),
        ((1, 21), "thin: 1×21 pixels, more than 20 times as high as it is wide; CLIP sees only the centre"),
        ((3000, 1), "thin: 3000×1 pixels, more than 20 times as wide"),
        ((89_000_000, 1), "thin: 89000000×1 pixels, more than 20 times as wide"),
        ((0, 0), "thin: 0×0 pixels, an empty image"),
    ],
)
def test_thin_images_are_refused_before_any_resize(encoder, monkeypatch, size, message):
    resized = []
    monkeypatch.setattr(encoder.preprocess, "transform", resized.append)
    # Only the size is read, so a stand-in will do: an 89,000,000 × 1 image is never allocated.
    with pytest.raises(ImageError) as info:
        encoder.preprocess(SimpleNamespace(size=size), "thin")
    assert str(info.value).startswith(message) and resized == []


def test_images_up_to_twenty_to_one_are_cropped_to_clips_input(encoder):
    for size in ((20, 1), (1, 20), (640, 32), (1, 1)):
        assert encoder.preprocess(Image.new("RGB", size, (200, 10, 10))).shape == (3, 32, 32)


def test_a_clip_of_large_input_refuses_what_its_resize_would_make_too_large(tmp_path):
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 1024, "layers": 1, "width": 32, "patch_size": 256, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "wide.json").write_text(json.dumps(config))
    large = ClipEncoder.load(ClipSpec(str(tmp_path / "wide.json"), "none"), device="cpu")
    large.preprocess.check(Image.new("L", (800, 100)), "fits")  # scaled to 8,192 × 1,024: 2**23 pixels
    with pytest.raises(ImageError) as info:
        large.preprocess.check(Image.new("L", (801, 100)), "long.png")
    assert str(info.value) == (
        "long.png: 801×100 pixels, which this CLIP's preprocessing would scale to 8,202×1,024 before "
        "cropping, over 8,388,608 pixels; crop it closer to a square first"
    )


def test_local_weights_file(tmp_path, tiny_clip, encoder, captions):
    weights = tmp_path / "weights.safetensors"
    state = {k: v.contiguous() for k, v in encoder.model.state_dict().items()}
    save_file(state, weights)
    spec = ClipSpec(str(tiny_clip), str(weights), init_seed=123)
    identity = spec.identity()
    assert identity["pretrained"] == "weights.safetensors" and len(identity["weights_sha256"]) == 64
    loaded = ClipEncoder.load(spec, device="cpu")
    assert torch.equal(
        loaded.encode_texts(captions[:5]).embeddings, encoder.encode_texts(captions[:5]).embeddings
    )


def test_weights_that_do_not_fit_the_model(tmp_path, other_clip, encoder):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, weights)
    with pytest.raises(TipcapError, match=r"could not load weights into other-clip"):
        ClipEncoder.load(ClipSpec(str(other_clip), str(weights)), device="cpu")


def test_identity_follows_config_and_weights(tmp_path, tiny_clip, other_clip):
    assert ClipSpec(str(tiny_clip)).identity() != ClipSpec(str(other_clip)).identity()
    assert ClipSpec("ViT-B-32", "openai").identity() == {"model": "ViT-B-32", "pretrained": "openai"}
    config = tmp_path / "edited.json"
    document = json.loads(tiny_clip.read_text())
    config.write_text(json.dumps(document))
    first = ClipSpec(str(config)).identity()
    document["text_cfg"]["layers"] = 3
    config.write_text(json.dumps(document))
    assert ClipSpec(str(config)).identity() != first


@pytest.mark.parametrize(
    ("model", "pretrained", "message"),
    [
        ("ViT-B-99", "none", "not an open_clip model name"),
        ("ViT-B-32", "no-such-tag", "neither a file nor a pretrained tag of ViT-B-32"),
        ("missing.json", "none", "no such model-config file"),
    ],
)
def test_bad_model_or_tag(model, pretrained, message):
    with pytest.raises(TipcapError, match=message):
        ClipEncoder.load(ClipSpec(model, pretrained), device="cpu")


def test_config_that_is_not_an_open_clip_config(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(TipcapError, match="missing vision_cfg, text_cfg"):
        ClipEncoder.load(ClipSpec(str(config), "none"))


def test_uncached_tag_offline_fails_with_one_message():
    with pytest.raises(TipcapError) as raised:
        ClipEncoder.load(ClipSpec("ViT-B-32", "openai"), device="cpu")
    message = str(raised.value)
    assert "ViT-B-32" in message and "'openai'" in message and "--pretrained /path/to/" in message
    assert "\n" not in message


def test_uncached_tag_with_unreachable_hub(monkeypatch):
    """Without HF_HUB_OFFLINE the hub is probed once, briefly, instead of retried for minutes."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: pytest.fail("tried to download"))
    with endpoints.closed() as url:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        with pytest.raises(TipcapError, match=rf"{url} \(HF_ENDPOINT\) cannot be reached"):
            ClipEncoder.load(ClipSpec("ViT-B-32", "laion2b_s34b_b79k"), device="cpu")
