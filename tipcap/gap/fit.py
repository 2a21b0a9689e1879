"""Fitting a gap of any kind, in any data setting, from embedding stores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tipcap import provenance
from tipcap.config import CAPDEC_SIGMA2, SETTINGS, GapConfig, from_dict, to_dict
from tipcap.errors import TipcapError
from tipcap.gap.estimate import (
    GapEstimate,
    Pairs,
    estimate_few_pairs,
    estimate_text_only,
    estimate_unpaired,
    estimate_web_pairs,
)
from tipcap.gap.model import TRAIN_NOISE_KINDS, Gap
from tipcap.gap.moments import cholesky
from tipcap.gap.report import gap_report, plot_gap
from tipcap.provenance import sha256_file
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
    """Refuse stores of the wrong kind, of different CLIPs, or holding NaN or infinite values."""
    if texts.kind != "texts":
        raise TipcapError(f"--texts {texts.path}: is not a caption store (made by 'tipcap embed texts').")
    texts.check_finite(f"--texts {texts.path}")
    if images is None:
        return
    if images.kind != "images":
        raise TipcapError(f"--images {images.path}: is not an image store (made by 'tipcap embed images').")
    if images.clip != texts.clip:
        raise TipcapError(
            f"--texts {texts.path} and --images {images.path} were embedded with different CLIPs; "
            "embed both with the same --clip and --pretrained."
        )
    images.check_finite(f"--images {images.path}")


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
    return _estimate(setting, texts, images, shrink, drop_quantile, sigma2, mu_from, device)


def _estimate(
    setting: str,
    texts: EmbeddingStore,
    images: EmbeddingStore | None,
    shrink: bool,
    drop_quantile: float,
    sigma2: float,
    mu_from: Gap | None,
    device: str,
) -> GapEstimate:
    """:func:`estimate` of checked stores."""
    if setting == "text-only":
        mu = None
        if mu_from is not None:
            mu_from.check_clip(texts.clip, f"--texts {texts.path}")
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
    config: GapConfig, texts: EmbeddingStore, images: EmbeddingStore | None = None, device: str = "cpu"
) -> Gap:
    """Fit a gap of ``config.kind`` in ``config.setting`` from a caption store and (except text-only) an
    image store.

    ``none`` and ``isotropic`` need no estimate (isotropic uses σ² = ``sigma2``); ``memory`` keeps the
    caption embeddings (a seeded random subset of ``memory_size`` rows when given) as its memory; the
    Gaussian kinds take μ and Σ from the setting's estimator.
    """
    config = from_dict(GapConfig, to_dict(config), "gap")  # a config built in code is checked too
    kind, setting = config.kind, config.setting
    if config.mu_from and (setting != "text-only" or kind not in _NEEDS_ESTIMATE):
        raise TipcapError(
            f"--mu-from (gap.mu_from) imports μ for --setting text-only with a kind that uses μ "
            f"({', '.join(sorted(_NEEDS_ESTIMATE))}); {setting} {kind} would ignore it. Drop it, or change "
            "the setting or kind."
        )
    _check_stores(texts, images)
    dim = texts.dim
    info: dict[str, Any] = {"kind": kind, "texts": str(Path(texts.path).resolve())}
    if images is not None:
        info["images"] = str(Path(images.path).resolve())
    mu = torch.zeros(dim, dtype=torch.float64)
    covariance = torch.zeros(dim, dim, dtype=torch.float64)
    memory = None
    if kind in _NEEDS_ESTIMATE:
        mu_from = Gap.load(config.mu_from) if config.mu_from else None
        fitted = _estimate(
            setting, texts, images, config.shrinkage, config.drop_quantile, config.sigma2, mu_from, device
        )
        mu, covariance = fitted.mu, fitted.covariance
        info.update(fitted.info())
    else:
        info["setting"] = setting
        if kind == "isotropic":
            covariance = config.sigma2 * torch.eye(dim, dtype=torch.float64)
            info["sigma2"] = config.sigma2
        elif kind == "memory":
            rows = torch.arange(len(texts))
            if config.memory_size is not None and config.memory_size < len(texts):
                generator = torch.Generator().manual_seed(config.seed)
                rows = torch.randperm(len(texts), generator=generator)[: config.memory_size].sort().values
            memory = texts.gather(rows)
            info.update({"memory_size": len(rows), "tau": config.tau})
    if config.learnable and kind not in TRAIN_NOISE_KINDS:
        raise TipcapError(f"--learnable (gap.learnable) applies to kinds with training noise, not {kind!r}.")
    # Kinds without training noise keep the estimated factor too (mean-shift) or a zero one; a
    # degenerate estimate (one pair, identical pairs) is factored with jitter.
    source = f"--texts {texts.path}" + (f" and --images {images.path}" if images is not None else "")
    if kind in TRAIN_NOISE_KINDS or covariance.any():
        scale_tril = cholesky(covariance, f"the covariance fitted from {source}")
    else:
        scale_tril = covariance
    return Gap(
        kind,
        mu,
        scale_tril,
        renorm=config.renorm,
        clip=texts.clip,
        memory=memory,
        tau=config.tau,
        learnable=config.learnable,
        info=info,
    )


@dataclass
class GapFit:
    """A fitted gap, its report (:func:`gap_report`) and the matched pairs it was checked on."""

    gap: Gap
    report: dict[str, Any]
    pairs: Pairs | None


def fit_gap_file(
    config: GapConfig,
    texts: EmbeddingStore,
    images: EmbeddingStore | None,
    out: str | Path,
    plot: str | Path | None = None,
    device: str = "cpu",
) -> GapFit:
    """Fit a gap (:func:`fit_gap`), write it to ``out`` with its report and provenance record, and draw
    it to ``plot`` when given.

    The report's cosines are measured on the stores' matched pairs (for ``unpaired``, true pairs the
    fit did not use) where the stores share image ids.
    """
    gap = fit_gap(config, texts, images, device=device)
    pairs = join_pairs(texts, images) if images is not None else None
    pairs = pairs if pairs is not None and len(pairs) > 0 else None
    report = gap_report(gap, pairs)
    gap.info["report"] = report
    inputs = {"texts": texts.digest}
    if images is not None:
        inputs["images"] = images.digest
    if config.mu_from:
        inputs["mu_from"] = sha256_file(Path(config.mu_from))
    gap.provenance = provenance.record("gap", to_dict(config), inputs)
    gap.save(out)
    if plot is not None:
        plot_gap(gap, pairs, plot)
    return GapFit(gap, report, pairs)
