"""CLIP-S and RefCLIP-S (Hessel et al. 2021, "CLIPScore"), computed as the paper and its reference code do.

For a caption c of an image with CLIP image embedding v and reference captions R:

    CLIP-S(c, v)       = w · max(cos(E("A photo depicts " + c), v), 0),                   w = 2.5
    RefCLIP-S(c, R, v) = H(CLIP-S(c, v), max(max_{r ∈ R} cos(E(prefix + c), E(prefix + r)), 0))

where E is the scorer CLIP's text encoder and H the harmonic mean 2ab / (a + b) (0 when both are 0). As
in the reference code, references carry the prefix too, and the text–text cosine is not multiplied by w.
The scorer is a CLIP of its own, chosen apart from the caption model's (ViT-B/32 with OpenAI's weights in
the papers), so that figures of decoders built on different CLIPs can be compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from tipcap.clip import ClipEncoder

PREFIX = "A photo depicts"
"""Put before every caption and reference, as the reference code does."""
WEIGHT = 2.5
"""w: rescales the cosines of ViT-B/32 (rarely above 0.4) to about [0, 1]."""


class ClipScores(NamedTuple):
    """Per-caption scores ``[N]`` (float32)."""

    clip_s: torch.Tensor
    ref_clip_s: torch.Tensor


def prefixed(texts: Sequence[str]) -> list[str]:
    """``"a dog."`` → ``"A photo depicts a dog."``."""
    return [f"{PREFIX} {text}" for text in texts]


def clip_s(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """CLIP-S ``[N]``, w · max(cos, 0), of image embeddings ``[N, d]`` and prefixed captions' ``[N, d]``.

    Only angles count: the inputs need not have unit length.
    """
    cosine = torch.nn.functional.cosine_similarity(images.float(), captions.float(), dim=-1)
    return WEIGHT * cosine.clamp(min=0)


def ref_clip_s(
    image_scores: torch.Tensor, captions: torch.Tensor, references: Sequence[torch.Tensor]
) -> torch.Tensor:
    """RefCLIP-S ``[N]``: the harmonic mean of CLIP-S ``[N]`` and each caption's best reference cosine.

    Args:
        image_scores: CLIP-S of each caption ``[N]``.
        captions: prefixed caption embeddings ``[N, d]``.
        references: per caption, its prefixed reference embeddings ``[R_i, d]`` (R_i >= 1).
    """
    captions = torch.nn.functional.normalize(captions.float(), dim=-1)
    best = torch.stack([
        (torch.nn.functional.normalize(refs.float(), dim=-1) @ caption).max()
        for caption, refs in zip(captions, references, strict=True)
    ]).clamp(min=0)  # fmt: skip
    total = image_scores + best
    harmonic = 2 * image_scores * best / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, harmonic, torch.zeros_like(total))


def score(
    encoder: ClipEncoder,
    images: torch.Tensor,
    captions: Sequence[str],
    references: Sequence[Sequence[str]],
) -> ClipScores:
    """CLIP-S and RefCLIP-S of one caption per image.

    Args:
        encoder: the scorer CLIP.
        images: the scorer's embeddings of the images ``[N, d]``.
        captions: one caption per image.
        references: each image's reference captions (at least one each).
    """
    caption_embeddings = encoder.encode_texts(prefixed(captions)).embeddings
    flat = [reference for group in references for reference in group]
    reference_embeddings = encoder.encode_texts(prefixed(flat)).embeddings
    groups, start = [], 0
    for group in references:
        groups.append(reference_embeddings[start : start + len(group)])
        start += len(group)
    image_scores = clip_s(images, caption_embeddings)
    return ClipScores(image_scores, ref_clip_s(image_scores, caption_embeddings, groups))
