"""The exact fast path through CLIP's text tower: prefix tries, trimmed and shared encoding, linears."""

import json

import pytest
import torch
from conftest import COCO_SLICE, tiny_clip_config

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.data import read_captions
from tipcap.prepacked import linear_map
from tipcap.text_tower import causal_text_tower, prefix_trie, token_order

# Repeats, captions that begin another caption, and captions that part after a long common start.
SHARED_STARTS = [
    "a dog.",
    "a dog on a bed.",
    "a dog on a bed.",
    "a dog on a red bed.",
    "a man riding a wave on top of a surfboard.",
    "a man riding a horse.",
    "two dogs.",
    "a",
]


@pytest.fixture(scope="module")
def encoder(tiny_clip) -> ClipEncoder:
    return ClipEncoder.load(ClipSpec(str(tiny_clip), "none"), device="cpu")


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [*SHARED_STARTS, *(c.text for c in read_captions(COCO_SLICE).captions[:40])]


def prefixes(tokens: torch.Tensor, lengths: torch.Tensor) -> dict[tuple[int, int], tuple[int, ...]]:
    """Each row's prefix up to each position before its end, keyed by (row, position)."""
    return {
        (row, position): tuple(tokens[row, : position + 1].tolist())
        for row in range(len(tokens))
        for position in range(int(lengths[row]))
    }


def test_trie_nodes_are_the_distinct_prefixes(encoder, captions):
    tokens, _ = encoder.tokenize(captions)
    lengths = encoder.token_lengths(tokens)
    trie = prefix_trie(tokens, lengths)
    by_position = prefixes(tokens, lengths)
    assert len(trie.tokens) == len(set(by_position.values())) < int(lengths.sum())
    node_of = {}
    for (row, position), prefix in by_position.items():
        node = int(trie.paths[row, position])
        assert int(trie.tokens[node]) == int(tokens[row, position])
        assert int(trie.positions[node]) == position
        # One node per prefix, and one prefix per node.
        assert node_of.setdefault(prefix, node) == node
    assert len(set(node_of.values())) == len(node_of)
    length = trie.paths.shape[1]
    for node, first in enumerate(trie.firsts.tolist()):
        assert int(trie.paths[first // length, first % length]) == node
    assert torch.equal(trie.ends, trie.paths[torch.arange(len(tokens)), lengths - 1])


def test_trie_without_sharing_has_a_node_per_position(encoder, captions):
    tokens, _ = encoder.tokenize(captions)
    lengths = encoder.token_lengths(tokens)
    trie = prefix_trie(tokens, lengths, share=False)
    assert len(trie.tokens) == int(lengths.sum())
    valid = torch.arange(trie.paths.shape[1])[None, :] < lengths[:, None]
    assert len(set(trie.paths[valid].tolist())) == int(lengths.sum())


def test_token_order_sorts_by_length_then_tokens(encoder, captions):
    tokens, _ = encoder.tokenize(captions)
    lengths = encoder.token_lengths(tokens)
    order = token_order(tokens, lengths)
    keys = [(int(lengths[i]), tokens[i].tolist()) for i in order]
    assert keys == sorted(keys)
    assert sorted(order.tolist()) == list(range(len(captions)))


@pytest.mark.parametrize("share_prefixes", [True, False])
@pytest.mark.parametrize("batch_size", [5, 64])
def test_encoding_equals_open_clip_encode_text(encoder, captions, share_prefixes, batch_size):
    tokens, _ = encoder.tokenize(captions)
    with torch.inference_mode():
        full = torch.nn.functional.normalize(encoder.model.encode_text(tokens), dim=-1)
    fast = encoder.encode_texts(captions, batch_size=batch_size, share_prefixes=share_prefixes).embeddings
    assert (fast - full).abs().max().item() <= 1e-5


def test_repeated_captions_share_every_node(encoder):
    embeddings = encoder.encode_texts(SHARED_STARTS).embeddings
    assert SHARED_STARTS[1] == SHARED_STARTS[2] and torch.equal(embeddings[1], embeddings[2])


def test_one_block_tower(other_clip, captions):
    encoder = ClipEncoder.load(ClipSpec(str(other_clip), "none"), device="cpu")
    assert len(encoder.model.transformer.resblocks) == 1
    tokens, _ = encoder.tokenize(captions)
    with torch.inference_mode():
        full = torch.nn.functional.normalize(encoder.model.encode_text(tokens), dim=-1)
    assert (encoder.encode_texts(captions).embeddings - full).abs().max().item() <= 1e-5


def test_towers_the_fast_path_cannot_serve_run_in_full(tmp_path, captions):
    config = tiny_clip_config()
    config["text_cfg"]["pool_type"] = "last"  # pools the last of the 77 positions: padding matters
    path = tmp_path / "last-pool-clip.json"
    path.write_text(json.dumps(config))
    encoder = ClipEncoder.load(ClipSpec(str(path), "none"), device="cpu")
    assert causal_text_tower(encoder.model) is None
    tokens, _ = encoder.tokenize(captions[:6])
    with torch.inference_mode():
        full = torch.nn.functional.normalize(encoder.model.encode_text(tokens), dim=-1)
    assert torch.allclose(encoder.encode_texts(captions[:6]).embeddings, full, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)]
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_map_equals_torch_linear(dtype, tolerance, with_bias):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype) if with_bias else None
    product = linear_map(weight, bias, rows=40)
    for shape in [(40, 64), (3, 7, 64), (1, 64)]:
        inputs = torch.randn(*shape, generator=generator).to(dtype)
        expected = torch.nn.functional.linear(
            inputs.float(), weight.float(), None if bias is None else bias.float()
        )
        result = product(inputs)
        assert result.shape == (*shape[:-1], 96) and result.dtype == dtype
        assert (result.float() - expected).abs().max().item() <= tolerance * expected.abs().max().item()


def test_linear_map_without_onednn_is_torch_linear(monkeypatch):
    weight, bias, inputs = torch.randn(8, 16), torch.randn(8), torch.randn(5, 16)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    product = linear_map(weight, bias)
    assert torch.equal(product(inputs), torch.nn.functional.linear(inputs, weight, bias))
