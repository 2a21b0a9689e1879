"""The shape of a toy CLIP's modality gap, built into its towers: worlds whose gaps differ in known ways.

Each tower of an open_clip ``CLIP`` ends in a LayerNorm and a projection. The LayerNorm's output is
``λ ∘ n + b``, with ``n`` of mean 0 and norm √W over its W channels. :func:`build_modality_gap` fixes both
layers (and takes them out of training): a scale ``λ``, a bias ``b = c · 1`` along the all-ones direction
``e`` (which ``n`` is orthogonal to) and an orthogonal projection ``Q``. An embedding is then
``(g + c · u) / √(1 + c²)``: a trained content part ``g`` and a fixed modality direction ``u``, the text
tower's orthogonal to the image tower's. Three knobs of :class:`GapShape` set the gap's shape:

- ``offset`` (c), the mean's share: ‖μ‖² ≈ 2c² / (1 + c²) against a spread set by what training makes
  of the contents. At c = 1.25 (toy world 2's) the mean holds about 86% of E‖δ‖².
- ``axes``, where the mean lies. 0: a random ``Q`` spreads both modality directions over all coordinates, so
  every coordinate holds an even share of μ and of the spread. k > 0: ``Q`` is turned (two reflections that
  keep it orthogonal) so that the image tower's direction lies on the first k/2 coordinates and the text
  tower's on the next k/2, and μ on those k coordinates alone, as a real CLIP's gap is carried by a few
  coordinates (Schrodi et al., ICLR 2025).
- ``anisotropy`` (a), the residual's effective rank: the image tower's scale decays over its channels,
  ``λ_j ∝ exp(−a · j / W)`` with mean square 1, so that images' contents spread unevenly over the
  directions ``Q`` maps the channels to, and the gap's covariance concentrates on fewer of them. 0: even
  (``λ = 1``). The decaying scale also leaks a little of each content along ``e``.

The defaults (c = 1.25 in the demo, no privileged axes, even scale) build toy world 2's CLIP, byte for byte as
before the knobs existed. Non-Gaussian residuals (heavy tails, mixtures) cannot be set through these fixed
layers; :mod:`tipcap.synthgap` draws them where a known-truth gap is wanted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tipcap.errors import TipcapError


@dataclass(frozen=True)
class GapShape:
    """How :func:`build_modality_gap` shapes the gap (see the module)."""

    offset: float = 1.25
    axes: int = 0
    anisotropy: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.offset) or self.offset < 0:
            raise TipcapError(f"gap offset {self.offset}: give a finite number ≥ 0")
        if self.axes < 0 or self.axes % 2:
            raise TipcapError(f"gap axes {self.axes}: give 0 (random axes) or an even number of coordinates")
        if not math.isfinite(self.anisotropy) or self.anisotropy < 0:
            raise TipcapError(f"gap anisotropy {self.anisotropy}: give a finite number ≥ 0")


@dataclass(frozen=True)
class GapProfile:
    """A gap calibrated to a real CLIP's published figures: the shape built into the towers, and the held-out
    matched cosine at which contrastive training stops (:class:`tipcap.toy.clip.StopRule`), checked every
    ``check_every`` steps, since the toy's matched cosine rises with how well its towers agree on contents
    and passes a real CLIP's within a few dozen steps."""

    shape: GapShape
    matched_cosine: float
    check_every: int


# Each figure's source is in experiments/README.md §5.6 (the calibrated profile).
PROFILES: dict[str, GapProfile] = {
    # OpenAI CLIP ViT-B/32 on MS-COCO: ‖μ‖ 0.82 and a matched cosine of about 0.30, so the mean holds about
    # 0.82² / (2 − 2 · 0.30) = 48% of E‖δ‖². With contents nearly orthogonal between images, an offset of
    # c = 0.75 gives ‖μ‖² ≈ 2c² / (1 + c²) = 0.72. Two coordinates carry the mean, as two of 512 carry 69% of
    # ‖μ‖² in ViT-B/16's (no figure for ViT-B/32 was found).
    "vit-b-32": GapProfile(GapShape(offset=0.75, axes=2), matched_cosine=0.30, check_every=1),
}


def build_modality_gap(model: torch.nn.Module, shape: GapShape, seed: int = 0) -> None:
    """Fix the last layers of both towers of an open_clip ``CLIP`` (and take them out of training) so that
    its embeddings have the gap ``shape`` whatever training does (see the module).

    For unit contents: between two images (or two captions) the cosine is ``(g·g' + c²) / (1 + c²)``, at
    least 0.5 at c = 1 for contents that are not opposed; an image and its caption ``(g·h + cross terms) /
    (1 + c²)``, at most about 0.5 at c = 1; contrastive training, which sees only ``g·h``, works at logit
    scale ``100 / (1 + c²)``. The width of each tower must equal the embedding size, so that the projection
    is square, and be larger than ``shape.axes``.
    """
    visual = model.visual
    width = visual.ln_post.weight.numel()
    if visual.proj.shape != (width, width) or model.text_projection.shape != (width, width):
        raise TipcapError(f"a built modality gap needs towers as wide as the embedding ({width})")
    if shape.axes >= width:
        raise TipcapError(f"gap axes {shape.axes}: the embedding has {width} coordinates; give fewer")
    generator = torch.Generator().manual_seed(seed)
    image_projection, _ = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    # A reflection that swaps the all-ones direction e with a unit w orthogonal to it, so that the text
    # tower's modality direction (e·reflection·Q = w·Q) is orthogonal to the image tower's (e·Q).
    e = torch.full((width,), width**-0.5, dtype=torch.float64)
    w = torch.randn(width, generator=generator, dtype=torch.float64)
    w = w - (w @ e) * e
    w = w / w.norm()
    reflector = (e - w) / (e - w).norm()
    reflection = torch.eye(width, dtype=torch.float64) - 2 * torch.outer(reflector, reflector)
    if shape.axes:
        image_projection = image_projection @ _turn_onto_axes(
            e @ image_projection, w @ image_projection, shape.axes
        )
    image_scale = torch.ones(width, dtype=torch.float64)
    if shape.anisotropy:
        image_scale = torch.exp(-shape.anisotropy * torch.arange(width, dtype=torch.float64) / width)
        image_scale = image_scale / image_scale.square().mean().sqrt()
    for norm, projection, matrix, scale in (
        (visual.ln_post, visual.proj, image_projection, image_scale),
        (model.ln_final, model.text_projection, reflection @ image_projection, torch.ones_like(image_scale)),
    ):
        with torch.no_grad():
            norm.weight.copy_(scale.to(norm.weight.dtype))
            norm.bias.fill_(shape.offset)
            projection.copy_(matrix.to(projection.dtype))
        for parameter in (norm.weight, norm.bias, projection):
            parameter.requires_grad_(False)


def _turn_onto_axes(image_direction: torch.Tensor, text_direction: torch.Tensor, axes: int) -> torch.Tensor:
    """An orthogonal ``Z`` ``[W, W]`` taking the image tower's modality direction ``[W]`` onto the even
    vector over the first ``axes / 2`` coordinates and the text tower's (orthogonal to it) onto the even
    vector over the next ``axes / 2``: two reflections, the second fixing what the first placed."""
    width, half = len(image_direction), axes // 2
    image_target = torch.zeros(width, dtype=torch.float64)
    image_target[:half] = half**-0.5
    text_target = torch.zeros(width, dtype=torch.float64)
    text_target[half : 2 * half] = half**-0.5
    turn = torch.eye(width, dtype=torch.float64)
    for source, target in ((image_direction, image_target), (text_direction, text_target)):
        source = source @ turn
        difference = source - target
        if difference.norm() > 1e-12:
            reflector = difference / difference.norm()
            turn = turn @ (torch.eye(width, dtype=torch.float64) - 2 * torch.outer(reflector, reflector))
    return turn
