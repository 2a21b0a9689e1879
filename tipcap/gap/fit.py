"""Fitting a gap of any kind, in any data setting, from embedding stores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tipcap import provenance
from tipcap.config import CAPDEC_SIGMA2, SETTINGS, GapConfig, check_gap_kind, from_dict, to_dict
from tipcap.errors import TipcapError
from tipcap.gap.estimate import (
    GapEstimate,
    Pairs,
    estimate_few_pairs,
    estimate_text_only,
    estimate_unpaired,
    estimate_web_pairs,
    estimate_web_pairs_mixture,
)
from tipcap.gap.model import LEARNABLE_KINDS, TRAIN_NOISE_KINDS, Gap
from tipcap.gap.moments import cholesky
from tipcap.gap.report import effective_rank, gap_report, plot_gap
from tipcap.provenance import sha256_file
from tipcap.store import EmbeddingStore

CLOSE_COVARIANCE_SCALE = 3.0
"""CLOSE's ``CovNoise`` multiplies its covariance sample by 3 (a standard deviation: 9Σ in covariance)."""
CLOSE_NOISE_STD = 0.12
"""CLOSE's default isotropic noise for single-caption captioning (``DEFAULT_NOISE["s-cap"]``)."""

_NEEDS_ESTIMATE = {
    "mean-shift", "mean-isotropic", "mean-isotropic-matched", "diagonal", "gaussian", "close", "cov-noise"
}  # fmt: skip


def noise_covariance(kind: str, covariance: torch.Tensor, sigma2: float) -> torch.Tensor:
    """The training-noise covariance ``[d, d]`` (float64) a kind uses, given the setting's Σ ``[d, d]``.

    ``isotropic``/``mean-isotropic``: σ₀²I; ``mean-isotropic-matched``: (tr Σ / d)·I, the same total
    variance as Σ; ``diagonal``: diag Σ; ``gaussian``/``cov-noise``: Σ; ``close``: 9Σ + 0.12²·I; the
    other kinds: zero.
    """
    dim = covariance.shape[-1]
    identity = torch.eye(dim, dtype=torch.float64)
    covariance = covariance.to(torch.float64)
    if kind in ("isotropic", "mean-isotropic"):
        return sigma2 * identity
    if kind == "mean-isotropic-matched":
        return float(torch.trace(covariance)) / dim * identity
    if kind == "diagonal":
        return torch.diag(torch.diagonal(covariance))
    if kind in ("gaussian", "cov-noise"):
        return covariance
    if kind == "close":
        return CLOSE_COVARIANCE_SCALE**2 * covariance + CLOSE_NOISE_STD**2 * identity
    return torch.zeros(dim, dim, dtype=torch.float64)


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
    web_estimator: str = "mixture",
    drop_quantile: float = 0.1,
    sigma2: float = CAPDEC_SIGMA2,
    mu_from: Gap | None = None,
    device: str = "cpu",
) -> GapEstimate:
    """Estimate μ and Σ in ``setting`` from a caption store and (except text-only) an image store."""
    if setting not in SETTINGS:
        raise TipcapError(f"--setting {setting!r}: use one of {', '.join(SETTINGS)}.")
    _check_stores(texts, images)
    config = GapConfig(
        setting=setting, shrinkage=shrink, web_estimator=web_estimator, drop_quantile=drop_quantile,
        sigma2=sigma2,
    )  # fmt: skip
    return _estimate(setting, texts, images, config, mu_from, device)


def _estimate(
    setting: str,
    texts: EmbeddingStore,
    images: EmbeddingStore | None,
    config: GapConfig,
    mu_from: Gap | None,
    device: str,
) -> GapEstimate:
    """:func:`estimate_gap` of checked stores, with the shrinkage, web-pairs and σ₀² options of ``config``."""
    shrink, sigma2 = config.shrinkage, config.sigma2
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
    if config.web_estimator == "trim":
        return estimate_web_pairs(pairs, drop_quantile=config.drop_quantile, shrink=shrink)
    return estimate_web_pairs_mixture(pairs, shrink=shrink, seed=config.seed)


def fit_gap(
    config: GapConfig, texts: EmbeddingStore, images: EmbeddingStore | None = None, device: str = "cpu"
) -> Gap:
    """Fit a gap of ``config.kind`` in ``config.setting`` from a caption store and (except text-only) an
    image store.

    ``none`` and ``isotropic`` need no estimate (isotropic uses σ² = ``sigma2``); ``memory`` keeps the
    caption embeddings (a seeded random subset of ``memory_size`` rows when given) as its memory; the
    other kinds take μ and Σ from the setting's estimator and store the noise covariance of
    :func:`noise_covariance`, times ``noise_scale``. Kinds that need a fitted Σ are refused in text-only,
    and so are ``mean-shift`` and ``mean-isotropic`` there without ``mu_from`` (they would be ``none``
    and ``isotropic``).
    """
    config = from_dict(GapConfig, to_dict(config), "gap")  # a config built in code is checked too
    kind, setting = config.kind, config.setting
    check_gap_kind(kind, setting, config.mu_from, "gap")
    if config.mu_from and (setting != "text-only" or kind not in _NEEDS_ESTIMATE):
        raise TipcapError(
            f"--mu-from (gap.mu_from) imports μ for --setting text-only with a kind that uses μ "
            f"({', '.join(sorted(_NEEDS_ESTIMATE))}); {setting} {kind} would ignore it. Drop it, or change "
            "the setting or kind."
        )
    if config.learnable and kind not in LEARNABLE_KINDS:
        kinds = ", ".join(sorted(LEARNABLE_KINDS))
        raise TipcapError(f"--learnable (gap.learnable) applies to kinds {kinds}, not {kind!r}.")
    _check_stores(texts, images)
    dim = texts.dim
    info: dict[str, Any] = {"kind": kind, "texts": str(Path(texts.path).resolve())}
    if images is not None:
        info["images"] = str(Path(images.path).resolve())
    mu = torch.zeros(dim, dtype=torch.float64)
    fitted_covariance = torch.zeros(dim, dim, dtype=torch.float64)
    memory = None
    if kind in _NEEDS_ESTIMATE:
        mu_from = Gap.load(config.mu_from) if config.mu_from else None
        fitted = _estimate(setting, texts, images, config, mu_from, device)
        mu, fitted_covariance = fitted.mu, fitted.covariance
        info.update(fitted.info())
        if setting != "text-only":  # text-only fits no Σ: its σ₀²I is the noise, not an estimate
            info["fitted_trace"] = float(torch.trace(fitted_covariance))
            info["fitted_effective_rank"] = effective_rank(torch.linalg.eigvalsh(fitted_covariance))
    else:
        info["setting"] = setting
        if kind == "memory":
            rows = torch.arange(len(texts))
            if config.memory_size is not None and config.memory_size < len(texts):
                generator = torch.Generator().manual_seed(config.seed)
                rows = torch.randperm(len(texts), generator=generator)[: config.memory_size].sort().values
            memory = texts.gather(rows)
            info.update({"memory_size": len(rows), "tau": config.tau})
    covariance = config.noise_scale * noise_covariance(kind, fitted_covariance, config.sigma2)
    if kind in ("isotropic", "mean-isotropic"):
        info["sigma2"] = config.sigma2
    eigenvalues = torch.linalg.eigvalsh(covariance)
    info.update(
        {
            "mu_norm": float(mu.norm()),
            "noise_scale": config.noise_scale,
            "noise_trace": float(eigenvalues.sum()),
            "noise_effective_rank": effective_rank(eigenvalues),
        }
    )
    # Kinds without training noise keep a zero factor; a degenerate estimate (one pair, identical
    # pairs) is factored with jitter.
    source = f"--texts {texts.path}" + (f" and --images {images.path}" if images is not None else "")
    if kind in TRAIN_NOISE_KINDS:
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
