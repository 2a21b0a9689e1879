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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.data import load_image, read_karpathy
from tipcap.io import save_safetensors, write_json_atomic
from tipcap.progress import progress_bar

# How train_toyclip trains: bump whenever a change makes the same arguments train another CLIP, so that
# caches keyed by it (the demo's) are not reused across the change.
TRAINING_VERSION = 1
TOYCLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}


@dataclass
class ToyClipReport:
    """How the trained CLIP sees the world's validation split."""

    steps: int
    seconds: float
    recall_at_1: float  # image → its captions, among the split's images
    mu_norm: float  # ‖mean(v) − mean(t)‖
    matched_cosine: float  # mean cos(v, t) over matched pairs
    within_modality_cosine: float  # mean cos between different images (and different captions)


def _pixels(encoder: ClipEncoder, paths: list[Path]) -> torch.Tensor:
    return torch.stack([encoder.preprocess(load_image(path)) for path in paths])


def measure(encoder: ClipEncoder, karpathy: Path, split: str = "val", limit: int = 500) -> dict[str, float]:
    """Retrieval and modality-gap figures of a CLIP on a split of a Karpathy file."""
    entries = read_karpathy(karpathy, split)[:limit]
    images = encoder.encode_images(_pixels(encoder, [karpathy.parent / e.relative_path for e in entries]))
    texts = encoder.encode_texts([c for e in entries for c in e.captions]).embeddings
    owner = torch.tensor([i for i, e in enumerate(entries) for _ in e.captions])
    best = (images @ texts.T).argmax(dim=1)
    off_diagonal = ~torch.eye(len(images), dtype=torch.bool)
    return {
        "recall_at_1": float((owner[best] == torch.arange(len(images))).float().mean()),
        "mu_norm": float((images.mean(0) - texts.mean(0)).norm()),
        "matched_cosine": float((images[owner] * texts).sum(-1).mean()),
        "within_modality_cosine": float((images @ images.T)[off_diagonal].mean()),
    }


def train_toyclip(
    karpathy: str | Path,
    out: str | Path,
    steps: int = 1_200,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[ClipSpec, ToyClipReport]:
    """Train a tiny CLIP contrastively on the world's training images and captions.

    The images are mostly background, so at initialisation every image embedding is nearly the same
    (cosine 0.995) and training starts next to the collapsed solution (loss ln B). Small batches leave it
    far sooner than large ones for the same compute, and the escape is abrupt: on the 2,000-image world,
    300 steps of 64 stay collapsed (R@1 0.02) while 400 reach image→text R@1 0.38.

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
    encoder = ClipEncoder.load(ClipSpec(str(config_path), "none", seed), device="cpu", precision="fp32")
    model = encoder.model
    entries = read_karpathy(karpathy, "train")
    pixels = _pixels(encoder, [karpathy.parent / e.relative_path for e in entries])
    model.logit_scale.data.fill_(math.log(100.0))
    model.logit_scale.requires_grad_(False)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    loss_fn = open_clip.ClipLoss()
    model.train()
    start = time.perf_counter()
    for _ in progress_bar(range(steps), disable=not progress, desc="training the toy CLIP", unit="step"):
        rows = rng.sample(range(len(entries)), min(batch_size, len(entries)))
        tokens = encoder.tokenizer([rng.choice(entries[r].captions) for r in rows])
        image_features = torch.nn.functional.normalize(model.encode_image(pixels[rows]), dim=-1)
        text_features = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    weights = out / "toyclip.safetensors"
    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    spec = ClipSpec(str(config_path), str(weights))
    report = ToyClipReport(steps, seconds, **measure(ClipEncoder.load(spec, device="cpu"), karpathy))
    write_json_atomic(out / "toyclip_report.json", asdict(report))
    return spec, report
