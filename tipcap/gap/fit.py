"""Fitting a gap of any kind, in any data setting, from embedding stores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tipcap import provenance
from tipcap.config import (
    CAPDEC_DIM,
    CAPDEC_SIGMA2,
    SETTINGS,
    GapConfig,
    check_gap_config,
    from_dict,
    to_dict,
)
from tipcap.errors import TipcapError
from tipcap.gap.estimate import (
    GapEstimate,
    Pairs,
    Rows,
    estimate_few_pairs,
    estimate_text_only,
    estimate_unpaired,
    estimate_web_pairs,
    estimate_web_pairs_mixture,
)
from tipcap.gap.model import LEARNABLE_KINDS, TRAIN_NOISE_KINDS, Gap, added_noise_covariance
from tipcap.gap.moments import cholesky
from tipcap.gap.report import gap_report, plot_gap
from tipcap.gap.shape import effective_rank
from tipcap.provenance import sha256_file
from tipcap.store import EmbeddingStore

CLOSE_COVARIANCE_SCALE = 3.0
"""CLOSE's ``CovNoise`` multiplies its covariance sample by 3 (a standard deviation: 9Σ in covariance)."""
CLOSE_NOISE_STD = 0.12
"""CLOSE's default isotropic noise for single-caption captioning (``DEFAULT_NOISE["s-cap"]``)."""
CLOSE_DIM = 768
"""The width of CLOSE's default CLIP, ViT-L/14 (``--clip_model`` in ``close/experiments/train.py``)."""

_NEEDS_ESTIMATE = {
    "mean-shift", "mean-shift-isotropic", "capdec-offset", "mean-isotropic-matched", "norm-matched",
    "diagonal", "rotated", "gaussian", "close", "cov-noise",
}  # fmt: skip
_SIGMA2_KINDS = ("isotropic", "mean-shift-isotropic", "capdec-offset")


def scaled_to_dim(variance: float, source_dim: int, dim: int) -> float:
    """A per-axis noise variance set at width ``source_dim``, carried to width ``dim`` at the same
    operating point: σ² = σ₀²·d₀/d.

    For unit t and n ~ N(0, σ²I), cos(t + n, t) = (1 + n·t)/‖t + n‖ ≈ 1/sqrt(1 + dσ²) (n·t ~ N(0, σ²) and
    ‖n‖² ≈ dσ² concentrate as d grows), so keeping dσ² keeps the expected cosine between a noised and a
    clean embedding.
    """
    return variance * source_dim / dim


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    """A Haar-distributed rotation ``[dim, dim]`` (float64, determinant +1), seeded.

    Q of the QR decomposition of a Gaussian matrix, with its columns' signs fixed by R's diagonal (which
    makes Q Haar-distributed on the orthogonal group), and the first column flipped when det Q = −1.
    """
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))
    if float(torch.linalg.det(q)) < 0:
        q[:, 0] = -q[:, 0]
    return q


def unit_second_moment(rows: Rows, chunk: int = 65536) -> torch.Tensor:
    """E[ttᵀ] ``[d, d]`` (float64) over rows scaled to unit length, streamed in chunks of ``chunk`` rows."""
    total: torch.Tensor | None = None
    count = 0
    for block in rows.iter_chunks(chunk):
        t = torch.nn.functional.normalize(block.to(torch.float64), dim=-1)
        total = t.T @ t if total is None else total + t.T @ t
        count += len(t)
    if total is None:
        raise TipcapError("the caption store is empty: no second moment to match the tangential noise to.")
    return total / count


def tangential_trace(covariance: torch.Tensor, text_moment: torch.Tensor) -> float:
    """E_t[tr S − tᵀSt] = tr S − tr(S·E[ttᵀ]) for noise covariance S ``[d, d]`` and unit captions'
    second moment E[ttᵀ] ``[d, d]``: the expected squared norm of the noise tangent to t, which is what
    renormalising t + n leaves of it."""
    covariance = covariance.to(torch.float64)
    return float(torch.trace(covariance) - (covariance * text_moment.to(torch.float64)).sum())


def matched_isotropic_variance(
    covariance: torch.Tensor, match: str = "total", text_moment: torch.Tensor | None = None
) -> float:
    """The variance s² of ``mean-isotropic-matched``'s noise s²I, given Σ ``[d, d]``.

    ``total``: s² = tr Σ / d, Σ's total variance. ``tangential``: s²·(d − 1) = tr Σ − E[tᵀΣt], the
    Gaussian's tangential noise (:func:`tangential_trace`, which needs the captions' ``text_moment``);
    for unit t, isotropic noise leaves s²·(d − 1) of its s²·d tangent to t.
    """
    dim = covariance.shape[-1]
    if match == "total":
        return float(torch.trace(covariance.to(torch.float64))) / dim
    if match != "tangential" or text_moment is None:
        raise ValueError(f"match {match!r}: total, or tangential with the captions' second moment")
    return tangential_trace(covariance, text_moment) / (dim - 1)


def noise_covariance(
    kind: str,
    covariance: torch.Tensor,
    sigma2: float,
    *,
    close_variance: float = CLOSE_NOISE_STD**2,
    matched_variance: float | None = None,
    rotation: torch.Tensor | None = None,
) -> torch.Tensor:
    """The covariance ``[d, d]`` (float64) that a kind's gap file stores as LLᵀ, given the setting's Σ
    ``[d, d]``.

    ``isotropic``/``mean-shift-isotropic``/``capdec-offset``: σ₀²I (``sigma2``);
    ``mean-isotropic-matched``: s²I with s² = ``matched_variance`` (default tr Σ / d, the same total
    variance as Σ; :func:`matched_isotropic_variance`); ``diagonal``: diag Σ; ``rotated``: RΣRᵀ for the
    orthogonal ``rotation`` R ``[d, d]`` (required); ``gaussian``/``cov-noise``/``norm-matched``: Σ (for
    ``norm-matched`` the factor of its noise norms, :func:`tipcap.gap.model.added_noise_covariance`);
    ``close``: 9Σ + ``close_variance``·I (0.12²); the other kinds: zero.
    """
    dim = covariance.shape[-1]
    identity = torch.eye(dim, dtype=torch.float64)
    covariance = covariance.to(torch.float64)
    if kind in _SIGMA2_KINDS:
        return sigma2 * identity
    if kind == "mean-isotropic-matched":
        if matched_variance is None:
            matched_variance = matched_isotropic_variance(covariance)
        return matched_variance * identity
    if kind == "diagonal":
        return torch.diag(torch.diagonal(covariance))
    if kind == "rotated":
        if rotation is None:
            raise ValueError("the rotated kind needs its rotation")
        rotation = rotation.to(torch.float64)
        rotated = rotation @ covariance @ rotation.T
        return (rotated + rotated.T) / 2
    if kind in ("gaussian", "cov-noise", "norm-matched"):
        return covariance
    if kind == "close":
        return CLOSE_COVARIANCE_SCALE**2 * covariance + close_variance * identity
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


def check_stores(texts: EmbeddingStore, images: EmbeddingStore | None) -> None:
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
    check_stores(texts, images)
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
    other kinds take μ and Σ from the setting's estimator and store the covariance of
    :func:`noise_covariance`, times ``noise_scale``: ``rotated`` with the rotation of :func:`random_rotation`
    seeded by ``seed``, ``mean-isotropic-matched`` with the variance of ``match`` (``tangential`` reads the
    second moment of the caption store). With ``scale_to_dim``, ``sigma2`` (taken at CapDec's width 640)
    and CLOSE's 0.12² (at 768) are carried to the stores' width by :func:`scaled_to_dim`. Kinds that need a
    fitted Σ are refused in text-only, and so are ``mean-shift``, ``mean-shift-isotropic`` and
    ``capdec-offset`` there without ``mu_from`` (they would be ``none`` and ``isotropic``), and options
    that the kind would ignore (:func:`tipcap.config.check_gap_config`).
    """
    config = from_dict(GapConfig, to_dict(config), "gap")  # a config built in code is checked too
    kind, setting = config.kind, config.setting
    check_gap_config(config, "gap")
    if config.mu_from and (setting != "text-only" or kind not in _NEEDS_ESTIMATE):
        raise TipcapError(
            f"--mu-from (gap.mu_from) imports μ for --setting text-only with a kind that uses μ "
            f"({', '.join(sorted(_NEEDS_ESTIMATE))}); {setting} {kind} would ignore it. Drop it, or change "
            "the setting or kind."
        )
    if config.learnable and kind not in LEARNABLE_KINDS:
        kinds = ", ".join(sorted(LEARNABLE_KINDS))
        raise TipcapError(f"--learnable (gap.learnable) applies to kinds {kinds}, not {kind!r}.")
    check_stores(texts, images)
    dim = texts.dim
    info: dict[str, Any] = {"kind": kind, "texts": str(Path(texts.path).resolve())}
    if images is not None:
        info["images"] = str(Path(images.path).resolve())
    sigma2, close_variance = config.sigma2, CLOSE_NOISE_STD**2
    if config.scale_to_dim:
        sigma2 = scaled_to_dim(config.sigma2, CAPDEC_DIM, dim)
        close_variance = scaled_to_dim(close_variance, CLOSE_DIM, dim)
        source = {"close": (CLOSE_NOISE_STD**2, CLOSE_DIM)}.get(kind, (config.sigma2, CAPDEC_DIM))
        info.update({"scale_to_dim": True, "source_variance": source[0], "source_dim": source[1]})
    mu = torch.zeros(dim, dtype=torch.float64)
    fitted_covariance = torch.zeros(dim, dim, dtype=torch.float64)
    memory = None
    if kind in _NEEDS_ESTIMATE:
        mu_from = Gap.load(config.mu_from, "--mu-from") if config.mu_from else None
        estimated = dataclasses.replace(config, sigma2=sigma2)  # text-only's σ₀²I at the width used
        fitted = _estimate(setting, texts, images, estimated, mu_from, device)
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
    matched_variance = rotation = None
    if kind == "mean-isotropic-matched":
        info["match"] = config.match
        if config.match == "tangential":
            text_moment = unit_second_moment(texts)
            matched_variance = matched_isotropic_variance(fitted_covariance, "tangential", text_moment)
            # The noise the decoder keeps after renormalising: the Gaussian's, and what matching the
            # total variance would leave; this kind's equals the first.
            gaussian = tangential_trace(fitted_covariance, text_moment)
            total_match = float(torch.trace(fitted_covariance)) * (1 - 1 / dim)
            info["tangential_gaussian"] = config.noise_scale * gaussian
            info["tangential_total_match"] = config.noise_scale * total_match
    if kind == "rotated":
        rotation = random_rotation(dim, config.seed)
        info["rotation_seed"] = config.seed
    covariance = config.noise_scale * noise_covariance(
        kind,
        fitted_covariance,
        sigma2,
        close_variance=close_variance,
        matched_variance=matched_variance,
        rotation=rotation,
    )
    if kind in _SIGMA2_KINDS:
        info["sigma2"] = sigma2
    if kind == "close":
        info["close_noise_variance"] = close_variance
    eigenvalues = torch.linalg.eigvalsh(added_noise_covariance(kind, covariance))
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


def gap_record(config: GapConfig, texts: EmbeddingStore, images: EmbeddingStore | None) -> dict[str, Any]:
    """The provenance record of the gap :func:`fit_gap_file` fits from these stores (its key: the gap
    config and the stores' digests)."""
    inputs = {"texts": texts.digest}
    if images is not None:
        inputs["images"] = images.digest
    if config.mu_from:
        inputs["mu_from"] = sha256_file(Path(config.mu_from))
    return provenance.record("gap", to_dict(config), inputs)


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
    gap.provenance = gap_record(config, texts, images)
    gap.save(out)
    if plot is not None:
        plot_gap(gap, pairs, plot)
    return GapFit(gap, report, pairs)
