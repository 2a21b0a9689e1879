"""Fitting a gap of any kind, in any data setting, from embedding stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tipcap.errors import TipcapError
from tipcap.gap.estimate import (
    SETTINGS,
    GapEstimate,
    Pairs,
    estimate_few_pairs,
    estimate_text_only,
    estimate_unpaired,
    estimate_web_pairs,
)
from tipcap.gap.model import CAPDEC_SIGMA2, KINDS, TRAIN_NOISE_KINDS, Gap
from tipcap.gap.moments import cholesky
from tipcap.store import EmbeddingStore

_NEEDS_ESTIMATE = {"mean-shift", "cov-noise", "gaussian"}


def join_pairs(texts: EmbeddingStore, images: EmbeddingStore) -> Pairs:
    """Every caption row whose image id is in the image store, with that image's row."""
    image_row = {image_id: row for row, image_id in enumerate(images.ids)}
    text_rows, image_rows = [], []
    for row, image_id in enumerate(texts.ids):
        if image_id in image_row:
            text_rows.append(row)
            image_rows.append(image_row[image_id])
    return Pairs(
        images, texts, torch.tensor(image_rows, dtype=torch.long), torch.tensor(text_rows, dtype=torch.long)
    )


def _check_stores(texts: EmbeddingStore, images: EmbeddingStore | None) -> None:
    if texts.key.get("kind") != "texts":
        raise TipcapError(f"--texts {texts.path}: is not a caption store (made by 'tipcap embed texts').")
    if images is None:
        return
    if images.key.get("kind") != "images":
        raise TipcapError(f"--images {images.path}: is not an image store (made by 'tipcap embed images').")
    if images.key["clip"] != texts.key["clip"]:
        raise TipcapError(
            f"--texts {texts.path} and --images {images.path} were embedded with different CLIPs; "
            "embed both with the same --clip and --pretrained."
        )


def estimate_gap(
    setting: str,
    texts: EmbeddingStore,
    images: EmbeddingStore | None = None,
    *,
    shrink: bool = True,
    drop_quantile: float = 0.1,
    sigma2: float = CAPDEC_SIGMA2,
    mu_from: Gap | None = None,
    device: str = "cpu",
) -> GapEstimate:
    """Estimate μ and Σ in ``setting`` from a caption store and (except text-only) an image store."""
    if setting not in SETTINGS:
        raise TipcapError(f"--setting {setting!r}: use one of {', '.join(SETTINGS)}.")
    _check_stores(texts, images)
    if setting == "text-only":
        mu = None
        if mu_from is not None:
            mu_from.check_clip(texts.key["clip"], f"--texts {texts.path}")
            mu = mu_from.mu.detach()
        return estimate_text_only(texts.dim, sigma2, mu)
    if images is None:
        raise TipcapError(f"--setting {setting} needs --images (an image store).")
    if setting == "unpaired":
        return estimate_unpaired(images, texts, shrink=shrink, device=device)
    pairs = join_pairs(texts, images)
    if len(pairs) == 0:
        raise TipcapError(f"--texts {texts.path} and --images {images.path} share no image ids, so no pairs.")
    if setting == "few-pairs":
        return estimate_few_pairs(pairs, shrink=shrink)
    return estimate_web_pairs(pairs, drop_quantile=drop_quantile, shrink=shrink)


def fit_gap(
    setting: str,
    texts: EmbeddingStore,
    images: EmbeddingStore | None = None,
    *,
    kind: str = "gaussian",
    renorm: bool = True,
    shrink: bool = True,
    drop_quantile: float = 0.1,
    sigma2: float = CAPDEC_SIGMA2,
    mu_from: Gap | None = None,
    learnable: bool = False,
    tau: float = 0.01,
    memory_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Gap:
    """Fit a gap of ``kind`` in ``setting``.

    ``none`` and ``isotropic`` need no estimate (isotropic uses σ² = ``sigma2``); ``memory`` keeps the
    caption embeddings (a seeded random subset of ``memory_size`` rows when given) as its memory; the
    Gaussian kinds take μ and Σ from the setting's estimator.
    """
    if kind not in KINDS:
        raise TipcapError(f"--kind {kind!r}: use one of {', '.join(KINDS)}.")
    if setting not in SETTINGS:
        raise TipcapError(f"--setting {setting!r}: use one of {', '.join(SETTINGS)}.")
    _check_stores(texts, images)
    dim = texts.dim
    info: dict[str, Any] = {"kind": kind, "texts": str(Path(texts.path).resolve())}
    if images is not None:
        info["images"] = str(Path(images.path).resolve())
    mu = torch.zeros(dim, dtype=torch.float64)
    covariance = torch.zeros(dim, dim, dtype=torch.float64)
    memory = None
    if kind in _NEEDS_ESTIMATE:
        fitted = estimate_gap(
            setting, texts, images, shrink=shrink, drop_quantile=drop_quantile, sigma2=sigma2,
            mu_from=mu_from, device=device,
        )  # fmt: skip
        mu, covariance = fitted.mu, fitted.covariance
        info.update(fitted.info())
    else:
        info["setting"] = setting
        if kind == "isotropic":
            covariance = sigma2 * torch.eye(dim, dtype=torch.float64)
            info["sigma2"] = sigma2
        elif kind == "memory":
            rows = torch.arange(len(texts))
            if memory_size is not None and memory_size < len(texts):
                generator = torch.Generator().manual_seed(seed)
                rows = torch.randperm(len(texts), generator=generator)[:memory_size].sort().values
            memory = texts.gather(rows)
            info.update({"memory_size": len(rows), "tau": tau})
    if learnable and kind not in TRAIN_NOISE_KINDS:
        raise TipcapError(f"--learnable applies to kinds with training noise, not {kind!r}.")
    # Kinds without training noise keep the estimated factor too (mean-shift) or a zero one; a
    # degenerate estimate (one pair, identical pairs) is factored with jitter.
    scale_tril = cholesky(covariance) if kind in TRAIN_NOISE_KINDS or covariance.any() else covariance
    return Gap(
        kind,
        mu,
        scale_tril,
        renorm=renorm,
        clip=texts.key["clip"],
        memory=memory,
        tau=tau,
        learnable=learnable,
        info=info,
    )
