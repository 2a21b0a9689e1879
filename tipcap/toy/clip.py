"""A tiny CLIP for the toy world, built from open_clip's own classes and trained with its ClipLoss.

The model is an ``open_clip.model.CLIP`` from a model-config JSON; trained weights are saved as
safetensors beside that JSON, so ``--clip toyclip.json --pretrained toyclip.safetensors`` loads it like
any other CLIP. The logit scale is held at 100: a learnable one settles near 17 on this world and closes
most of the modality gap, which would make the gap problem too easy to study.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.data import load_image, read_karpathy
from tipcap.data.karpathy import split_matches
from tipcap.errors import TipcapError
from tipcap.io import save_safetensors, write_json_atomic
from tipcap.progress import progress_bar
from tipcap.toy.gap_shapes import GapShape, build_modality_gap
from tipcap.toy.world1 import ShapeObject
from tipcap.toy.world2 import cell_labels
from tipcap.toy.world2_claims import scene_records
from tipcap.toy.world2_grammar import COLOURS, SHAPES, SIZES

# How train_toyclip trains: bump whenever a change makes the same arguments train another CLIP, so that
# caches keyed by it (the demo's) are not reused across the change.
TRAINING_VERSION = 2
TOYCLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
# World 2: 48-pixel images in 16-pixel patches, one patch per cell of the scene's 3 × 3 grid, and captions
# of up to 38 tokens. Towers as wide as the embedding, so that the modality gap can be built in
# (build_modality_gap). The image tower averages its patch tokens and then normalises (a class token has
# to gather nine cells' contents through attention, and learns to far more slowly).
TOYCLIP2_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {
        "image_size": 48,
        "patch_size": 16,
        "width": 128,
        "layers": 3,
        "head_width": 32,
        "pool_type": "avg",
        "final_ln_after_pool": True,
    },
    "text_cfg": {"context_length": 40, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}


# open_clip's initial logit scale, ln(1/0.07), where a warmed-up scale starts.
_START_SCALE = math.log(1 / 0.07)


@dataclass(frozen=True)
class StopRule:
    """When training stops before its step budget, judged every ``every`` steps on held-out pairs.

    Contrastive training at a fixed logit scale of 100 keeps the images close together at first (cosine
    0.7–0.9) and pulls each image towards its captions as it learns; trained on, the matched cosine passes
    the cosine between different images (world 1's full CLIP: 0.675 against 0.389), which real CLIPs
    never show (about 0.3 against 0.5). So training stops at the first
    check where the held-out image→text R@1 reaches ``recall_at_1`` (reason ``recall``), or where the
    matched cosine has reached the cross-image cosine, in which case the weights of the previous check are
    kept (reason ``geometry``). Otherwise it runs its steps (reason ``steps``).

    With ``matched_cosine`` (a CLIP calibrated to a real one's, :data:`tipcap.toy.gap_shapes.PROFILES`),
    training also stops at the first check where the held-out matched cosine has reached it, keeping these
    weights (reason ``matched``): the matched cosine rises with how well the towers agree on contents,
    which a built offset alone does not set.
    """

    every: int = 50
    recall_at_1: float = 0.9
    held_out: int = 200  # validation images (with all their captions) the rule reads
    matched_cosine: float | None = None

    def verdict(self, held_out: dict[str, float]) -> str | None:
        """Why to stop, given a check's :func:`figures`: ``geometry``, ``matched`` or ``recall``; None to go
        on."""
        if held_out["matched_cosine"] >= held_out["within_modality_cosine"]:
            return "geometry"
        if self.matched_cosine is not None and held_out["matched_cosine"] >= self.matched_cosine:
            return "matched"
        if held_out["recall_at_1"] >= self.recall_at_1:
            return "recall"
        return None


@dataclass
class ToyClipReport:
    """How the trained CLIP sees the world's validation split."""

    steps: int
    seconds: float
    recall_at_1: float  # image → its captions, among the split's images
    mu_norm: float  # ‖mean(v) − mean(t)‖
    matched_cosine: float  # mean cos(v, t) over matched pairs
    within_modality_cosine: float  # mean cos between different images
    text_cosine: float  # mean cos between captions of different images
    trace_sigma: float  # tr Σ, Σ the covariance of δ = v − t over matched pairs
    effective_rank: float  # (tr Σ)² / tr(Σ²): how many directions the gap's spread fills
    stop_reason: str = "steps"  # why training ended: steps, recall, geometry or matched (see StopRule)
    # World 2: share of (image, caption) pairs where the image is nearer its caption than the caption with
    # one claim (a shape, size or relation) made false; 0.5 is chance. None for world 1.
    claim_accuracy: float | None = None
    # The gap built into the towers (tipcap.toy.gap_shapes.GapShape as a dict), or None when training alone
    # made it.
    gap: dict[str, Any] | None = None
    # The StopRule training ran under (as a dict), or None when it ran all its steps unchecked.
    stop: dict[str, Any] | None = None


def _loss_with_negatives(images: torch.Tensor, texts: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric contrastive loss of unit image features ``[B, d]`` against unit text features ``[2B, d]``,
    the first B matched to the images and the last B their hard negatives: each image picks its caption
    among all 2B texts, each caption its image among the B images."""
    count = len(images)
    targets = torch.arange(count)
    image_to_text = scale * images @ texts.T  # [B, 2B]
    text_to_image = scale * texts[:count] @ images.T  # [B, B]
    cross_entropy = torch.nn.functional.cross_entropy
    return (cross_entropy(image_to_text, targets) + cross_entropy(text_to_image, targets)) / 2


class SceneHead(torch.nn.Module):
    """What a world-2 CLIP is taught to read besides matching images and captions.

    - Per cell, from the image tower's token of that cell (one 16-pixel patch per cell): its colour (8 or
      empty), shape (7 or empty) and size (2 or empty).
    - Per scene, from either tower's embedding through one shared linear map: which of the 56 (colour,
      shape) objects are there. Every caption of world 2 names all its scene's objects, so both
      modalities answer to one read-out, and an object is one direction for images and captions alike.
    """

    classes = (len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1)

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.cells = torch.nn.Linear(width, sum(self.classes))
        self.objects = torch.nn.Linear(embed_dim, len(COLOURS) * len(SHAPES))

    def loss(
        self, tokens: torch.Tensor, images: torch.Tensor, texts: torch.Tensor | None, cells: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy per cell and attribute of patch tokens ``[B, 9, W]`` (row by row), plus the
        binary cross-entropy of the objects read from unit image and (if given) caption embeddings
        ``[B, d]``, for the scenes' cell labels ``[B, 9, 3]`` (:func:`tipcap.toy.world2.cell_labels`)."""
        cross_entropy = torch.nn.functional.cross_entropy
        parts = self.cells(tokens).split(self.classes, dim=-1)
        per_cell = sum(
            cross_entropy(part.flatten(0, 1), cells[..., i].flatten()) for i, part in enumerate(parts)
        )
        present = torch.zeros(len(cells), len(COLOURS) + 1, len(SHAPES) + 1)
        present[torch.arange(len(cells))[:, None], cells[..., 0], cells[..., 1]] = 1.0
        present = present[:, 1:, 1:].flatten(1)  # [B, 56]: empty cells dropped
        # About 3 of the 56 objects are in a scene: without weighting its positives, the read-out first
        # learns to say no object at all, and leaves that slowly.
        weight = torch.full((present.shape[1],), present.shape[1] / 3.0)
        scale = images.shape[-1] ** 0.5
        binary = torch.nn.functional.binary_cross_entropy_with_logits
        read = [e for e in (images, texts) if e is not None]
        per_scene = sum(binary(self.objects(e * scale), present, pos_weight=weight) for e in read)
        return per_cell / 3 + per_scene


def _cell_labels(records: dict, entries: list, karpathy: Path) -> torch.Tensor:
    """``[N, 9, 3]`` cell labels of the training entries, from the scenes a world-2 Karpathy file records
    (:func:`tipcap.toy.world2_claims.scene_records`)."""
    if not records:
        raise TipcapError(f"{karpathy}: scene supervision needs a toy world 2 file, which records its scenes")
    return torch.tensor([cell_labels([ShapeObject(**o) for o in records[e.image_id]]) for e in entries])


def _teach_to_see(
    visual: torch.nn.Module,
    head: SceneHead,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    rng: random.Random,
    batch_size: int,
    progress: bool,
) -> None:
    """Train the image tower alone on the scene read-out (:class:`SceneHead`, images only): about 20 ms
    a step, against 140 ms for a contrastive step, most of which the text tower takes."""
    parameters = [p for p in [*visual.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.1, fused=True)
    bar = progress_bar(range(steps), disable=not progress, desc="teaching the toy CLIP to see", unit="step")
    for _ in bar:
        rows = rng.sample(range(len(pixels)), min(batch_size, len(pixels)))
        pooled, tokens = _image_tower(visual, pixels[rows])
        loss = head.loss(tokens, torch.nn.functional.normalize(pooled, dim=-1), None, labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _image_tower(visual: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tower's pooled output ``[B, d]`` (before normalising) and its patch tokens ``[B, T, W]``."""
    visual.output_tokens = True
    try:
        return visual(pixels)
    finally:
        visual.output_tokens = False


def _scene_head(model: torch.nn.Module, karpathy: Path) -> SceneHead:
    """A :class:`SceneHead` for the model, whose image tower must give one token per cell of the grid."""
    if tuple(model.visual.grid_size) != (3, 3):
        raise TipcapError(
            f"{karpathy}: reading scenes needs one patch per cell of the 3 × 3 grid (patch_size = "
            f"image_size / 3); this image tower has {model.visual.grid_size[0]} patches a side"
        )
    return SceneHead(model.visual.transformer.width, model.visual.output_dim)


def _pixels(encoder: ClipEncoder, paths: list[Path]) -> torch.Tensor:
    return torch.stack([encoder.preprocess(load_image(path)) for path in paths])


def figures(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor) -> dict[str, float]:
    """Retrieval and modality-gap figures of unit image embeddings ``[N, d]`` and caption embeddings
    ``[M, d]``, caption j belonging to image ``owner[j]`` (``[M]``)."""
    images, texts = images.double(), texts.double()
    best = (images @ texts.T).argmax(dim=1)
    off_diagonal = ~torch.eye(len(images), dtype=torch.bool)
    other_owner = owner[:, None] != owner[None, :]
    delta = images[owner] - texts
    sigma = torch.cov(delta.T, correction=0)
    return {
        "recall_at_1": float((owner[best] == torch.arange(len(images))).float().mean()),
        "mu_norm": float((images.mean(0) - texts.mean(0)).norm()),
        "matched_cosine": float((images[owner] * texts).sum(-1).mean()),
        "within_modality_cosine": float((images @ images.T)[off_diagonal].mean()),
        "text_cosine": float((texts @ texts.T)[other_owner].mean()),
        "trace_sigma": float(sigma.trace()),
        "effective_rank": float(sigma.trace() ** 2 / (sigma * sigma).sum()),
    }


def _held_out(encoder: ClipEncoder, karpathy: Path, split: str, limit: int) -> tuple:
    entries = read_karpathy(karpathy, split)[:limit]
    pixels = _pixels(encoder, [karpathy.parent / e.relative_path for e in entries])
    captions = [c for e in entries for c in e.captions]
    owner = torch.tensor([i for i, e in enumerate(entries) for _ in e.captions])
    return pixels, captions, owner


def _check(encoder: ClipEncoder, pixels: torch.Tensor, captions: list[str], owner: torch.Tensor) -> dict:
    """:func:`figures` of a model in training (switched to eval mode for the check and back).

    Captions go through open_clip's own ``encode_text`` (``trim=False``): the trimmed tower is a copy of
    the weights prepared at first use, and would go on reading the text tower as it was then.
    """
    encoder.model.eval()
    texts = encoder.encode_texts(captions, trim=False).embeddings
    result = figures(encoder.encode_images(pixels), texts, owner)
    encoder.model.train()
    return result


def measure(encoder: ClipEncoder, karpathy: Path, split: str = "val", limit: int = 500) -> dict[str, float]:
    """Retrieval and modality-gap figures (:func:`figures`) of a CLIP on a split of a Karpathy file."""
    pixels, captions, owner = _held_out(encoder, karpathy, split, limit)
    return figures(encoder.encode_images(pixels), encoder.encode_texts(captions).embeddings, owner)


def claim_accuracy(encoder: ClipEncoder, karpathy: Path, split: str = "val", limit: int = 500) -> float:
    """How often an image of a world-2 split is nearer its caption than that caption with one claim made
    false (:func:`tipcap.toy.world2_grammar.perturb`, drawn with a fixed seed): whether the CLIP reads shapes,
    sizes and places, which image→text R@1 hides when colours alone tell the images apart. 0.5 is
    chance."""
    from tipcap.toy.world2_grammar import perturb

    pixels, captions, owner = _held_out(encoder, karpathy, split, limit)
    rng = random.Random(0)
    images = encoder.encode_images(pixels)[owner]
    true = encoder.encode_texts(captions).embeddings
    false = encoder.encode_texts([perturb(caption, rng) for caption in captions]).embeddings
    return float(((images * true).sum(-1) > (images * false).sum(-1)).double().mean())


def train_toyclip(
    karpathy: str | Path,
    out: str | Path,
    steps: int = 1_200,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    stop: StopRule | None = None,
    gap: GapShape | None = None,
    scale_warmup: int = 0,
    negatives: Callable[[str, random.Random], str] | None = None,
    scene_supervision: float = 0.0,
    seeing_steps: int = 0,
    progress: bool = True,
) -> tuple[ClipSpec, ToyClipReport]:
    """Train a tiny CLIP contrastively on the world's training images and captions.

    The images are mostly background, so at initialisation every image embedding is nearly the same
    (cosine 0.995) and training starts next to the collapsed solution (loss ln B). Small batches leave it
    far sooner than large ones for the same compute, and the escape is abrupt: on the 2,000-image world,
    300 steps of 64 stay collapsed (R@1 0.02) while 400 reach image→text R@1 0.38.

    With ``stop``, training ends early by that rule, read on the world's validation split. With ``gap``,
    both towers' last layers are fixed by :func:`tipcap.toy.gap_shapes.build_modality_gap`, so that the
    modality gap has a real CLIP's geometry, in the shape ``gap`` sets, by construction. With
    ``scale_warmup``, the logit scale rises from open_clip's initial 1/0.07 to 100 (geometrically) over
    that many steps: at 100 from the start, random embeddings give logits so spread that training first
    collapses every embedding onto one, and a short run may never leave it.

    World 2 only, with one patch per cell (:class:`SceneHead`): ``seeing_steps`` first train the image
    tower alone to read each cell's colour, shape and size and the scene's objects; ``scene_supervision``
    weighs that read-out (of images and captions alike) during contrastive training. Contrastive training
    alone leaves the tower reading colours, which tell a batch's images apart: on the full world, 3,000
    steps with hard negatives reached a claim accuracy of 0.66 in about 17 minutes on 2 CPU cores; 2,000
    seeing steps and 600 contrastive ones reach 0.85 (R@1 0.97) in 3 minutes.

    Writes ``out/toyclip.json`` (the open_clip model config) and ``out/toyclip.safetensors`` (weights, to
    a temporary name and renamed), and ``out/toyclip_report.json``. Returns the spec that loads it.
    """
    import open_clip

    karpathy, out = Path(karpathy), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "toyclip.json"
    write_json_atomic(config_path, config or TOYCLIP_CONFIG)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoder = ClipEncoder.load(
        ClipSpec(str(config_path), "none", seed), device="cpu", precision="fp32", for_training=True
    )
    model = encoder.model
    splits = read_karpathy(karpathy)
    scenes = scene_records(karpathy)  # world 2's scenes; empty for world 1
    entries = [e for e in splits if split_matches(e.split, "train")]
    if not any(split_matches(e.split, "val") for e in splits):
        raise TipcapError(f"{karpathy}: the CLIP's report reads the val split, which holds no images (--val)")
    pixels = _pixels(encoder, [karpathy.parent / e.relative_path for e in entries])
    model.logit_scale.data.fill_(math.log(100.0))
    model.logit_scale.requires_grad_(False)
    if gap is not None:
        build_modality_gap(model, gap, seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    head = labels = None
    if seeing_steps or scene_supervision:
        labels = _cell_labels(scenes, entries, karpathy)
        head = _scene_head(model, karpathy)
        parameters += list(head.parameters())
    # One fused kernel over all parameters: the text tower's 49,408-token embedding, updated densely every
    # step, made the per-tensor optimizer a fifth of a contrastive step.
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.1, fused=True)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    loss_fn = open_clip.ClipLoss()
    held_out = _held_out(encoder, karpathy, "val", stop.held_out) if stop else None
    start = time.perf_counter()
    if seeing_steps:
        _teach_to_see(model.visual, head, pixels, labels, seeing_steps, lr, rng, batch_size, progress)
    kept, stop_reason, done = None, "steps", 0
    model.train()
    for step in progress_bar(range(steps), disable=not progress, desc="training the toy CLIP", unit="step"):
        if stop and step % stop.every == 0:
            stop_reason = stop.verdict(_check(encoder, *held_out)) or "steps"
            if stop_reason == "geometry" and kept is not None:
                done = kept[0]
                model.load_state_dict(kept[1])
            if stop_reason != "steps":
                break
            kept = (step, {k: v.detach().clone() for k, v in model.state_dict().items()})
        rows = rng.sample(range(len(entries)), min(batch_size, len(entries)))
        captions = [rng.choice(entries[r].captions) for r in rows]
        if negatives is not None:
            captions += [negatives(caption, rng) for caption in captions]
        pooled, tokens = _image_tower(model.visual, pixels[rows])
        image_features = torch.nn.functional.normalize(pooled, dim=-1)
        text_features = torch.nn.functional.normalize(model.encode_text(encoder.tokenizer(captions)), dim=-1)
        scale = float(model.logit_scale.exp())
        if step < scale_warmup:
            scale = math.exp(_START_SCALE + step / scale_warmup * (math.log(scale) - _START_SCALE))
        if negatives is None:
            loss = loss_fn(image_features, text_features, scale)
        else:
            loss = _loss_with_negatives(image_features, text_features, scale)
        if scene_supervision:
            scene_loss = head.loss(tokens, image_features, text_features[: len(rows)], labels[rows])
            loss = loss + scene_supervision * scene_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        done = step + 1
    seconds = time.perf_counter() - start
    model.eval()
    weights = out / "toyclip.safetensors"
    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    spec = ClipSpec(str(config_path), str(weights))
    trained = ClipEncoder.load(spec, device="cpu")
    report = ToyClipReport(
        done, seconds, **measure(trained, karpathy), stop_reason=stop_reason,
        claim_accuracy=claim_accuracy(trained, karpathy) if scenes else None,
        gap=asdict(gap) if gap is not None else None, stop=asdict(stop) if stop is not None else None,
    )  # fmt: skip
    write_json_atomic(out / "toyclip_report.json", asdict(report))
    return spec, report
