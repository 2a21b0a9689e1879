"""Model parts without a test elsewhere: the transformer projector and the CLIPScore of the protocol."""

import math

import pytest
import torch
from PIL import Image
from torch.nn.functional import normalize

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.model import TransformerProjector
from tipcap.protocol import clip_score


def test_transformer_projector_maps_each_row_to_its_own_k_prefix_vectors():
    torch.manual_seed(0)
    projector = TransformerProjector(clip_dim=32, width=64, prefix_length=4, layers=2, heads=4).eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        prefix = projector(x)
        moved = x.clone()
        moved[1] += 1.0
        again = projector(moved)
    assert prefix.shape == (3, 4, 64)
    assert torch.allclose(again[[0, 2]], prefix[[0, 2]], atol=1e-6)
    assert (again[1] - prefix[1]).abs().max() > 1e-2
    assert (prefix[:, 0] - prefix[:, 1]).abs().max() > 1e-2


def test_transformer_projector_trains_its_queries_and_input_map():
    torch.manual_seed(0)
    projector = TransformerProjector(clip_dim=32, width=64, prefix_length=4, layers=1, heads=4)
    projector(torch.randn(5, 32)).square().sum().backward()
    assert projector.queries.grad.abs().max() > 0 and projector.linear.weight.grad.abs().max() > 0


@pytest.fixture(scope="module")
def encoder(tiny_clip) -> ClipEncoder:
    return ClipEncoder.load(ClipSpec(str(tiny_clip), "none"), device="cpu")


def test_clip_score_is_two_and_a_half_times_the_positive_cosine(encoder):
    captions = ["a dog on the grass.", "a red bus in the street.", "two cats asleep."]
    texts = encoder.encode_texts(captions).embeddings
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)
    other = normalize(torch.randn(3, encoder.dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    orthogonal = normalize(other - (other * texts).sum(-1, keepdim=True) * texts, dim=-1)
    angle = math.pi / 3
    images = torch.stack([texts[0], math.cos(angle) * texts[1] + math.sin(angle) * orthogonal[1], -texts[2]])
    # Scaled image embeddings: CLIPScore reads the angle only.
    scores = clip_score(encoder, 3.0 * images, captions)
    assert scores.tolist() == pytest.approx([2.5, 2.5 * 0.5, 0.0], abs=1e-5)


def test_clip_score_of_images_and_a_caption(encoder, image_folder):
    paths = [image_folder / "img_005.jpg", image_folder / "img_004.jpg"]
    images = encoder.encode_images(
        torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])
    )
    captions = ["a dog on the grass."] * 2
    texts = encoder.encode_texts(captions).embeddings
    cosine = (normalize(images, dim=-1) * normalize(texts, dim=-1)).sum(-1)
    assert cosine[0] > 0.05 and cosine[1] < 0  # one pair on each side of the clamp
    expected = [2.5 * float(cosine[0]), 0.0]
    assert clip_score(encoder, images, captions).tolist() == pytest.approx(expected, abs=1e-6)
