"""Streaming first and second moments in float64, with Ledoit–Wolf shrinkage.

One pass over chunks of any size keeps O(d²) state: the count, Σx, Σxxᵀ, and the three sums that the
Ledoit–Wolf shrinkage intensity needs (Σ‖x‖², Σ‖x‖⁴, Σ‖x‖²x). Chunks may be merged in any order, so the
result does not depend on how the data were cut. Rows may carry weights in [0, 1] (a robust estimator's
belief that a row is clean): every sum is then weighted and the total weight W takes the place of n.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tipcap.errors import TipcapError

_JITTER_EXPONENTS = range(-10, -3)  # jitter 1e-10 … 1e-4 of the matrix's scale


@dataclass
class Covariance:
    """A covariance estimate ``[d, d]`` (float64) and how it was made."""

    matrix: torch.Tensor
    shrinkage: float | None  # None: not shrunk
    count: int


class Moments:
    """Accumulates the moments of rows ``x`` ``[n, d]`` chunk by chunk (float64)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0  # rows added
        self.weight = 0.0  # their total weight W (= count without weights)
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.sq_norms = 0.0  # Σ‖x‖²
        self.quartic = 0.0  # Σ‖x‖⁴
        self.sq_norm_weighted = torch.zeros(dim, dtype=torch.float64)  # Σ‖x‖² x

    def update(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> Moments:
        """Add the rows ``[n, d]`` (any float dtype, any device), each with its weight ``[n]`` when given,
        and return ``self``."""
        x = rows.detach().to("cpu", torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected rows of width {self.dim}, got shape {tuple(x.shape)}")
        sq = (x * x).sum(dim=1)
        self.count += x.shape[0]
        if weights is None:
            self.weight += x.shape[0]
            self.total += x.sum(dim=0)
            self.outer += x.T @ x
            weighted_sq = sq
        else:
            w = weights.detach().to("cpu", torch.float64)
            if w.shape != (x.shape[0],):
                raise ValueError(f"expected {x.shape[0]} weights, got shape {tuple(w.shape)}")
            self.weight += float(w.sum())
            self.total += w @ x
            self.outer += x.T @ (w[:, None] * x)
            weighted_sq = w * sq
        self.sq_norms += float(weighted_sq.sum())
        self.quartic += float((weighted_sq * sq).sum())
        self.sq_norm_weighted += weighted_sq @ x
        return self

    @classmethod
    def combined(cls, parts: Sequence[Moments], repeats: Sequence[int] | torch.Tensor) -> Moments:
        """The moments of the union of ``parts`` (of equal width), part i counted ``repeats[i]`` times:
        a bootstrap resample of parts in O(d²) memory."""
        out = cls(parts[0].dim)
        for part, times in zip(parts, [int(r) for r in repeats], strict=True):
            if times == 0:
                continue
            out.count += times * part.count
            out.weight += times * part.weight
            out.total += times * part.total
            out.outer += times * part.outer
            out.sq_norms += times * part.sq_norms
            out.quartic += times * part.quartic
            out.sq_norm_weighted += times * part.sq_norm_weighted
        return out

    @property
    def mean(self) -> torch.Tensor:
        """The (weighted) mean row ``[d]``."""
        if self.weight <= 0:
            raise ValueError("no rows (of positive weight) were added")
        return self.total / self.weight

    def covariance(self, shrink: bool = True) -> Covariance:
        """The maximum-likelihood covariance (divided by n, or W), Ledoit–Wolf-shrunk towards s·I.

        Shrinkage follows Ledoit & Wolf (2004) as scikit-learn implements it: with centred rows x̃ᵢ,
        S = Σx̃x̃ᵀ/n, m = tr S/d, δ² = ‖S − mI‖²/d, β² = min(δ², Σ‖x̃x̃ᵀ − S‖²/(n²d)), and
        Σ̂ = (1 − β²/δ²) S + (β²/δ²) m I. Any n ≥ 2 rows that are not all equal, including n < d, give a
        positive-definite result; degenerate data (one row, identical rows) give zero, which
        :func:`cholesky` factors with jitter.
        """
        n, d = self.weight, self.dim
        mean = self.mean
        sample = self.outer / n - torch.outer(mean, mean)
        sample = (sample + sample.T) / 2
        if not shrink:
            return Covariance(sample, None, self.count)
        scale = float(torch.trace(sample)) / d
        distance = float(((sample - scale * torch.eye(d, dtype=torch.float64)) ** 2).sum()) / d
        # Σᵢ‖x̃ᵢ‖⁴ from the raw sums: ‖x̃‖² = a − 2b + c with a = ‖x‖², b = x·mean, c = ‖mean‖².
        c = float(mean @ mean)
        sum_b = float(self.total @ mean)
        sum_b2 = float(mean @ self.outer @ mean)
        sum_ab = float(self.sq_norm_weighted @ mean)
        quartic = self.quartic + 4 * sum_b2 + n * c * c - 4 * sum_ab + 2 * c * self.sq_norms - 4 * c * sum_b
        spread = max(quartic - n * float((sample**2).sum()), 0.0) / (n * n * d)
        shrinkage = 1.0 if distance <= 0 else min(spread, distance) / distance
        matrix = (1 - shrinkage) * sample + shrinkage * scale * torch.eye(d, dtype=torch.float64)
        return Covariance(matrix, shrinkage, self.count)


def cholesky(covariance: torch.Tensor, what: str = "the covariance") -> torch.Tensor:
    """Lower Cholesky factor of a symmetric PSD matrix ``[d, d]`` (float64), adding jitter if needed.

    A matrix that is PSD only up to rounding (or exactly singular, e.g. zero noise) gets the smallest
    diagonal jitter, growing tenfold from 1e-10 of its scale, that makes it factor; a matrix that needs
    more than 1e-4 of its scale is no covariance.

    Raises:
        TipcapError: naming ``what`` when the matrix holds NaN or infinite values or does not factor.
    """
    if not bool(torch.isfinite(covariance).all()):
        raise TipcapError(f"{what} holds NaN or infinite values; check the embeddings it comes from.")
    covariance = (covariance + covariance.T) / 2
    factor, info = torch.linalg.cholesky_ex(covariance)
    if int(info) == 0:
        return factor
    scale = max(float(torch.diagonal(covariance).abs().mean()), 1e-12)
    identity = torch.eye(covariance.shape[0], dtype=covariance.dtype)
    for exponent in _JITTER_EXPONENTS:
        factor, info = torch.linalg.cholesky_ex(covariance + 10.0**exponent * scale * identity)
        if int(info) == 0:
            return factor
    raise TipcapError(f"{what} is not positive semi-definite (no Cholesky factor even with jitter).")
