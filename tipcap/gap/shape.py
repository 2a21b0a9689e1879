"""Figures of a gap's shape, one implementation for ``tipcap gap-atlas`` (atlas.py) and ``fit-gap``'s
report (report.py): the spectrum and effective rank of a covariance, the mean's share, axis concentration,
cosines of matched pairs, and the Gaussian log-likelihood of rows given their sufficient statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tipcap.gap.estimate import Pairs
from tipcap.gap.moments import cholesky


def spectrum(covariance: torch.Tensor) -> torch.Tensor:
    """The eigenvalues ``[d]`` (float64) of a symmetric covariance ``[d, d]``, largest first."""
    return torch.linalg.eigvalsh(covariance.double()).flip(0)


def effective_rank(eigenvalues: torch.Tensor) -> float:
    """The participation ratio (Σλ)²/Σλ² = (tr Σ)²/tr(Σ²) of a covariance's eigenvalues ``[d]``.

    d for an isotropic Σ, k for k equal eigenvalues and the rest zero, 0 for no noise.
    """
    positive = eigenvalues.double().clamp(min=0)
    square = float((positive * positive).sum())
    return float(positive.sum()) ** 2 / square if square > 0 else 0.0


def mean_share(mu: torch.Tensor, trace: float) -> float:
    """‖μ‖²/(‖μ‖² + tr Σ) = ‖μ‖²/E‖δ‖² for δ ~ (μ, Σ), given μ ``[d]``: the part of the gap that a shift
    removes."""
    square = float(mu.double() @ mu.double())
    return square / (square + trace) if square + trace > 0 else 0.0


def axis_concentration(values: torch.Tensor, fractions: Sequence[float]) -> list[float]:
    """The share of Σᵢ valuesᵢ held by the largest ``fraction`` of the coordinates, for each fraction.

    ``values`` ``[d]`` are non-negative per-coordinate amounts (μᵢ² for the mean, Σᵢᵢ for the variance);
    a fraction covers max(1, round(fraction·d)) coordinates. Equal values give about ``fraction`` itself.
    """
    ordered = values.double().clamp(min=0).sort(descending=True).values
    total = float(ordered.sum())
    shares = []
    for fraction in fractions:
        count = max(1, round(fraction * len(ordered)))
        shares.append(float(ordered[:count].sum()) / total if total > 0 else 0.0)
    return shares


def sample_rows(count: int, limit: int, seed: int = 0) -> torch.Tensor:
    """A seeded random subset of at most ``limit`` of ``range(count)``, sorted (int64 ``[n]``)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:limit].sort().values


def sample_pairs(pairs: Pairs, limit: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of at most ``limit`` pairs (:func:`sample_rows`), as float32 ``(v, t)``
    ``[n, d]``."""
    rows = sample_rows(len(pairs), limit, seed)
    v = pairs.images.gather(pairs.image_index[rows]).float()
    t = pairs.texts.gather(pairs.text_index[rows]).float()
    return v, t


def pair_cosines(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """cos(vₖ, tₖ) row by row, ``[n]``, for ``v`` and ``t`` ``[n, d]``."""
    return torch.nn.functional.cosine_similarity(v, t, dim=-1)


def gaussian_log_likelihood(
    count: float, total: torch.Tensor, outer: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor
) -> tuple[float, float]:
    """Σₖ log N(xₖ; mean, covariance) over rows known only by their sufficient statistics, and the rows'
    mean squared Mahalanobis distance per dimension.

    A Gaussian's log-density depends on the rows through n = ``count``, Σx = ``total`` ``[d]`` and
    Σxxᵀ = ``outer`` ``[d, d]`` alone: with M = Σ(x − m)(x − m)ᵀ, the sum is
    −½(n·d·log 2π + n·log|C| + tr(C⁻¹M)). The second value, tr(C⁻¹M)/(n·d), is the factor s that
    maximises the likelihood of the rows under N(m, s·C) (1 when C fits their spread).

    Returns:
        ``(log_likelihood, mahalanobis_per_dim)``; the covariance must be positive definite.
    """
    dim = mean.shape[-1]
    mean, total, outer = mean.double(), total.double(), outer.double()
    scatter = outer - torch.outer(mean, total) - torch.outer(total, mean) + count * torch.outer(mean, mean)
    factor = cholesky(covariance.double(), "a noise model's covariance")
    mahalanobis = float(torch.trace(torch.cholesky_solve(scatter, factor)))
    log_det = 2 * float(torch.log(torch.diagonal(factor)).sum())
    log_likelihood = -0.5 * (count * dim * math.log(2 * math.pi) + count * log_det + mahalanobis)
    return log_likelihood, mahalanobis / (count * dim)


def random_direction_concentration(dim: int, fractions: Sequence[float], draws: int = 1000) -> list[float]:
    """The mean :func:`axis_concentration` of μᵢ² for μ along a uniformly random direction in d dimensions
    (seeded Monte Carlo over ``draws`` directions): the reference for a mean on random axes, which is above
    ``fraction`` because squared Gaussian coordinates are skewed."""
    generator = torch.Generator().manual_seed(0)
    squares = torch.randn(draws, dim, generator=generator, dtype=torch.float64) ** 2
    ordered = squares.sort(dim=1, descending=True).values
    totals = ordered.sum(1)
    return [
        float((ordered[:, : max(1, round(fraction * dim))].sum(1) / totals).mean()) for fraction in fractions
    ]
