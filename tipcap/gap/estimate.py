"""Estimating the gap N(μ, Σ) in each data setting, streaming over chunks in float64.

Rows come from anything with ``len``, ``iter_chunks(rows)`` and ``gather(indices)``: an
:class:`~tipcap.store.EmbeddingStore` (memory-mapped) or a :class:`TensorRows`. Pairs are index arrays
into an image and a text source, so a store of 5 captions per image pairs each caption with its image.

=============  =====================================  ===========================================
setting        μ                                      Σ
=============  =====================================  ===========================================
few-pairs      mean of δ = v − t over the pairs        covariance of δ, Ledoit–Wolf shrinkage
web-pairs      mean of δ over all pairs (or over the   covariance of δ, each pair weighted by its
               pairs kept by ``trim``)                 probability of being matched under a
                                                       two-component mixture on cos(v, t) (or over
                                                       the pairs above a drop-quantile of
                                                       cos(v, t): ``trim``), shrunk
unpaired       mean(v) − mean(t)                       covariance of δ over mutual-nearest-neighbour
                                                       pseudo-pairs (v − μ ↔ t), shrunk
text-only      0, or imported                          σ₀²·I (σ₀² = 0.016)
=============  =====================================  ===========================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tipcap.config import CAPDEC_SIGMA2
from tipcap.errors import TipcapError
from tipcap.gap.moments import Moments

_HISTOGRAM_BINS = 20_000
_MIXTURE_BINS = 4_000  # cos(v, t) histogram for the mixture's EM: bins of width 5e-4
_MIXTURE_ITERATIONS = 1_000
_MIN_STD = 1e-4
_MAX_MISMATCHED = 0.9  # a mixture that leaves fewer than 10% of the pairs matched found no matched pairs
_NOT_FINITE = "an image or caption embedding holds NaN or infinite values; rebuild its store."


class Rows(Protocol):
    """Embedding rows that can be read in chunks and gathered by index."""

    def __len__(self) -> int: ...

    def iter_chunks(self, rows: int) -> Iterator[torch.Tensor]: ...

    def gather(self, rows: torch.Tensor) -> torch.Tensor: ...


class TensorRows:
    """In-memory rows ``[N, d]`` with the :class:`Rows` interface."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __len__(self) -> int:
        return len(self.tensor)

    def iter_chunks(self, rows: int) -> Iterator[torch.Tensor]:
        yield from self.tensor.split(rows)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return self.tensor[rows]


class PairChunks(Protocol):
    """Matched pairs that can be read in chunks of ``(v, t)`` rows, as often as needed."""

    def __len__(self) -> int: ...

    def iter_chunks(self, rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class Pairs:
    """Image–text pairs: ``images.gather(image_index[k])`` goes with ``texts.gather(text_index[k])``."""

    images: Rows
    texts: Rows
    image_index: torch.Tensor
    text_index: torch.Tensor

    def __len__(self) -> int:
        return len(self.text_index)

    def iter_chunks(self, rows: int = 16384) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(v, t)`` float64 chunks ``[n, d]`` of at most ``rows`` pairs."""
        for start in range(0, len(self), rows):
            stop = start + rows
            v = self.images.gather(self.image_index[start:stop]).to(torch.float64)
            t = self.texts.gather(self.text_index[start:stop]).to(torch.float64)
            yield v, t

    @classmethod
    def of_tensors(cls, v: torch.Tensor, t: torch.Tensor) -> Pairs:
        """Row k of ``v`` with row k of ``t``."""
        index = torch.arange(len(t))
        return cls(TensorRows(v), TensorRows(t), index, index)


@dataclass
class GapEstimate:
    """μ ``[d]`` and Σ ``[d, d]`` (float64), with what went into them."""

    setting: str
    mu: torch.Tensor
    covariance: torch.Tensor
    shrinkage: float | None = None
    pairs_used: int | None = None
    pairs_discarded: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """JSON-ready description, saved in the gap file."""
        return {
            "setting": self.setting,
            "shrinkage": self.shrinkage,
            "pairs_used": self.pairs_used,
            "pairs_discarded": self.pairs_discarded,
            **self.details,
        }


def _cosine(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(v, t, dim=-1)


def check_positive(flag: str, value: float) -> None:
    """Refuse a value that is not a finite positive number (NaN passes every comparison, so ask for it)."""
    if not (math.isfinite(value) and value > 0):
        raise TipcapError(f"{flag} {value}: must be a finite positive number.")


def _finite_chunks(pairs: PairChunks, chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The pairs' ``(v, t)`` chunks, refusing NaN or infinite rows (web-pairs would drop them unseen)."""
    for v, t in pairs.iter_chunks(chunk):
        if not bool(torch.isfinite(v).all() and torch.isfinite(t).all()):
            raise TipcapError(_NOT_FINITE)
        yield v, t


def estimate_few_pairs(pairs: PairChunks, shrink: bool = True, chunk: int = 16384) -> GapEstimate:
    """μ and Σ of δ = v − t over all pairs (Ledoit–Wolf-shrunk when ``shrink``)."""
    if len(pairs) == 0:
        raise TipcapError("few-pairs: no image–caption pairs (do the stores share image ids?).")
    moments = None
    for v, t in _finite_chunks(pairs, chunk):
        moments = (moments or Moments(v.shape[1])).update(v - t)
    covariance = moments.covariance(shrink)
    return GapEstimate("few-pairs", moments.mean, covariance.matrix, covariance.shrinkage, len(pairs), 0)


def similarity_threshold(pairs: PairChunks, drop_quantile: float, chunk: int = 16384) -> float:
    """The cos(v, t) below which a fraction ``drop_quantile`` of the pairs lies (to 1e-4, O(1) memory)."""
    histogram = torch.zeros(_HISTOGRAM_BINS, dtype=torch.float64)
    for v, t in _finite_chunks(pairs, chunk):
        histogram += torch.histc(_cosine(v, t), bins=_HISTOGRAM_BINS, min=-1.0, max=1.0)
    below = torch.cumsum(histogram, 0)
    # The first bin edge at which the cumulative count reaches the quantile.
    bin_index = int(torch.searchsorted(below, drop_quantile * float(below[-1]), right=True))
    return -1.0 + 2.0 * bin_index / _HISTOGRAM_BINS


def estimate_web_pairs(
    pairs: PairChunks, drop_quantile: float = 0.1, shrink: bool = True, chunk: int = 16384
) -> GapEstimate:
    """Like few-pairs, after discarding the pairs in the lowest ``drop_quantile`` of cos(v, t).

    Mismatched web pairs have unusually low similarity and would inflate Σ; two streaming passes
    (a similarity histogram, then the moments of the kept pairs) keep memory O(d²).
    """
    if not 0 <= drop_quantile < 1:
        raise TipcapError(f"--drop-quantile {drop_quantile}: must be in [0, 1).")
    if len(pairs) == 0:
        raise TipcapError("web-pairs: no image–caption pairs (do the stores share image ids?).")
    threshold = similarity_threshold(pairs, drop_quantile, chunk) if drop_quantile > 0 else -2.0
    moments = None
    for v, t in _finite_chunks(pairs, chunk):
        keep = _cosine(v, t) >= threshold
        moments = (moments or Moments(v.shape[1])).update((v - t)[keep])
    if moments.count == 0:
        raise TipcapError("web-pairs: every pair was discarded; lower --drop-quantile.")
    covariance = moments.covariance(shrink)
    details = {"web_estimator": "trim", "drop_quantile": drop_quantile, "similarity_threshold": threshold}
    return GapEstimate(
        "web-pairs",
        moments.mean,
        covariance.matrix,
        covariance.shrinkage,
        moments.count,
        len(pairs) - moments.count,
        details,
    )


@dataclass
class CosineMixture:
    """A two-component mixture on c = cos(v, t): mismatched pairs N(m₀, s₀²), matched pairs N(m₁, s₁²).

    ``mismatched`` is the mismatched share π. The mismatched component is not fitted to the pairs: it is
    the distribution of cos(v, t′) over the same images paired with random captions of the same data, so
    clean data give π ≈ 0 instead of a split of one bell into two.
    """

    mismatched: float
    null_mean: float
    null_std: float
    matched_mean: float
    matched_std: float

    def matched_probability(self, cosine: torch.Tensor) -> torch.Tensor:
        """P(matched | c) per pair ``[n]`` (float64); 1 everywhere when π = 0."""
        c = cosine.to(torch.float64)
        if self.mismatched <= 0:
            return torch.ones_like(c)
        log_null = _log_normal(c, self.null_mean, self.null_std) + math.log(max(self.mismatched, 1e-300))
        log_matched = _log_normal(c, self.matched_mean, self.matched_std)
        log_matched = log_matched + math.log(max(1 - self.mismatched, 1e-300))
        return torch.sigmoid(log_matched - log_null)


def _log_normal(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)


def _moments_of_histogram(histogram: torch.Tensor, centres: torch.Tensor) -> tuple[float, float]:
    total = float(histogram.sum())
    mean = float((histogram * centres).sum()) / total
    variance = float((histogram * (centres - mean) ** 2).sum()) / total
    return mean, max(math.sqrt(variance), _MIN_STD)


def fit_cosine_mixture(
    pairs: PairChunks, chunk: int = 16384, seed: int = 0, iterations: int = _MIXTURE_ITERATIONS
) -> CosineMixture:
    """Fit :class:`CosineMixture` to the pairs' cos(v, t) by EM on a histogram (one streaming pass).

    The null, cos(v, t′), pairs each chunk's images with a seeded permutation of its captions. EM then
    fits π, m₁ and s₁ with the null held fixed, on 4,000 bins over [−1, 1] (memory O(1) in the pairs).
    When the mixture does not beat a single Gaussian by BIC's margin, or its matched component is not
    more similar than the null or holds under 10% of the pairs, the pairs are taken as clean (π = 0).
    """
    generator = torch.Generator().manual_seed(seed)
    observed = torch.zeros(_MIXTURE_BINS, dtype=torch.float64)
    null = torch.zeros(_MIXTURE_BINS, dtype=torch.float64)
    for v, t in _finite_chunks(pairs, chunk):
        observed += torch.histc(_cosine(v, t), bins=_MIXTURE_BINS, min=-1.0, max=1.0)
        shuffled = t[torch.randperm(len(t), generator=generator)]
        null += torch.histc(_cosine(v, shuffled), bins=_MIXTURE_BINS, min=-1.0, max=1.0)
    centres = -1.0 + (torch.arange(_MIXTURE_BINS, dtype=torch.float64) + 0.5) * (2.0 / _MIXTURE_BINS)
    null_mean, null_std = _moments_of_histogram(null, centres)
    matched_mean, matched_std = _moments_of_histogram(observed, centres)
    single = CosineMixture(0.0, null_mean, null_std, matched_mean, matched_std)
    mixture = CosineMixture(0.5, null_mean, null_std, matched_mean, matched_std)
    total = float(observed.sum())
    for _ in range(iterations):
        matched = observed * mixture.matched_probability(centres)
        weight = float(matched.sum())
        if weight <= 0:
            break
        mean = float((matched * centres).sum()) / weight
        std = max(math.sqrt(float((matched * (centres - mean) ** 2).sum()) / weight), _MIN_STD)
        share = 1 - weight / total
        change = abs(share - mixture.mismatched) + abs(mean - mixture.matched_mean)
        mixture = CosineMixture(share, null_mean, null_std, mean, std)
        if change < 1e-10:
            break
    # Keep the mixture only where the data ask for it: its matched pairs more similar than random ones and
    # at least 10% of all, and a log-likelihood above one Gaussian's by more than BIC's price of the
    # extra parameter, ½·log n.
    gain = _log_likelihood(mixture, observed, centres) - _log_likelihood(single, observed, centres)
    implausible = mixture.matched_mean <= null_mean or mixture.mismatched > _MAX_MISMATCHED
    if implausible or gain <= 0.5 * math.log(total):
        return single
    return mixture


def _log_likelihood(mixture: CosineMixture, histogram: torch.Tensor, centres: torch.Tensor) -> float:
    """Σ over bins of count · log density of the mixture at the bin centre."""
    log_matched = _log_normal(centres, mixture.matched_mean, mixture.matched_std)
    if mixture.mismatched > 0:
        log_null = _log_normal(centres, mixture.null_mean, mixture.null_std)
        density = torch.logaddexp(
            log_matched + math.log(1 - mixture.mismatched), log_null + math.log(mixture.mismatched)
        )
    else:
        density = log_matched
    return float((histogram * density).sum())


def estimate_web_pairs_mixture(
    pairs: PairChunks, shrink: bool = True, chunk: int = 16384, seed: int = 0
) -> GapEstimate:
    """μ over all pairs; Σ over the pairs weighted by their probability of being matched
    (:func:`fit_cosine_mixture`).

    A mismatched pair holds another image's caption, so its δ = v − t′ has the same expectation
    E[v] − E[t] as a matched pair's: the mean over all pairs is unbiased, and weighting it would only add
    the weights' own bias. Its covariance is much larger, so Σ is estimated from the weighted pairs.
    Unlike trimming a fixed share, the weights adapt to the contamination: on clean pairs nearly every
    weight is 1, and a pair whose similarity lies where random pairs lie gets a weight near 0. Two
    streaming passes (histograms, then moments) keep memory O(d²).
    """
    if len(pairs) == 0:
        raise TipcapError("web-pairs: no image–caption pairs (do the stores share image ids?).")
    mixture = fit_cosine_mixture(pairs, chunk, seed)
    total, weighted = None, None
    for v, t in _finite_chunks(pairs, chunk):
        delta = v - t
        total = delta.sum(0) if total is None else total + delta.sum(0)
        weights = mixture.matched_probability(_cosine(v, t))
        weighted = (weighted or Moments(v.shape[1])).update(delta, weights)
    if weighted.weight < 2:
        raise TipcapError("web-pairs: the mixture believes almost every pair mismatched; check the pairs.")
    covariance = weighted.covariance(shrink)
    used = round(weighted.weight)
    details = {
        "web_estimator": "mixture",
        "mismatched_fraction": mixture.mismatched,
        "mixture": dataclasses.asdict(mixture),
    }
    return GapEstimate(
        "web-pairs",
        total / len(pairs),
        covariance.matrix,
        covariance.shrinkage,
        used,
        len(pairs) - used,
        details,
    )


def _mean(rows: Rows, chunk: int) -> torch.Tensor:
    total, count = None, 0
    for block in rows.iter_chunks(chunk):
        block = block.to(torch.float64)
        total = block.sum(0) if total is None else total + block.sum(0)
        count += len(block)
    if not bool(torch.isfinite(total).all()):
        raise TipcapError(_NOT_FINITE)
    return total / count


def mutual_nearest_neighbours(
    images: Rows,
    texts: Rows,
    mu: torch.Tensor,
    image_chunk: int = 2048,
    text_chunk: int = 32768,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-pairs of unpaired data: image i and text j that are each other's nearest neighbour.

    Similarity is cos(v − μ, t). The score matrix is computed block by block (``image_chunk`` ×
    ``text_chunk`` float32 at a time), keeping only each row's and column's best, so memory is
    O(N_images + N_texts) beyond one block.

    Returns:
        ``(image_index, text_index)``, int64 ``[P]`` each.
    """
    best_text = torch.zeros(len(images), dtype=torch.long)
    best_image = torch.zeros(len(texts), dtype=torch.long)
    best_image_score = torch.full((len(texts),), -torch.inf, device=device)
    shift = mu.to(device, torch.float32)
    image_start = 0
    for image_block in images.iter_chunks(image_chunk):
        queries = torch.nn.functional.normalize(image_block.to(device, torch.float32) - shift, dim=-1)
        row_best = torch.full((len(queries),), -torch.inf, device=device)
        row_arg = torch.zeros(len(queries), dtype=torch.long, device=device)
        text_start = 0
        for text_block in texts.iter_chunks(text_chunk):
            keys = torch.nn.functional.normalize(text_block.to(device, torch.float32), dim=-1)
            scores = queries @ keys.T
            value, arg = scores.max(dim=1)
            better = value > row_best
            row_best = torch.where(better, value, row_best)
            row_arg = torch.where(better, arg + text_start, row_arg)
            value, arg = scores.max(dim=0)
            columns = slice(text_start, text_start + len(keys))
            better = value > best_image_score[columns]
            best_image_score[columns] = torch.where(better, value, best_image_score[columns])
            best_image[columns] = torch.where(better.cpu(), arg.cpu() + image_start, best_image[columns])
            text_start += len(keys)
        best_text[image_start : image_start + len(queries)] = row_arg.cpu()
        image_start += len(queries)
    image_index = torch.arange(len(images))
    mutual = best_image[best_text] == image_index
    return image_index[mutual], best_text[mutual]


def estimate_unpaired(
    images: Rows,
    texts: Rows,
    shrink: bool = True,
    chunk: int = 16384,
    device: str | torch.device = "cpu",
) -> GapEstimate:
    """μ = mean(v) − mean(t); Σ from mutual-nearest-neighbour pseudo-pairs after removing μ."""
    if len(images) == 0 or len(texts) == 0:
        raise TipcapError("unpaired: needs both images and texts.")
    mu = _mean(images, chunk) - _mean(texts, chunk)
    image_index, text_index = mutual_nearest_neighbours(images, texts, mu, device=device)
    if len(image_index) == 0:
        raise TipcapError("unpaired: no mutual nearest neighbours between images and texts.")
    pseudo = Pairs(images, texts, image_index, text_index)
    moments = None
    for v, t in _finite_chunks(pseudo, chunk):
        moments = (moments or Moments(v.shape[1])).update(v - t)
    covariance = moments.covariance(shrink)
    details = {"images": len(images), "texts": len(texts)}
    return GapEstimate(
        "unpaired",
        mu,
        covariance.matrix,
        covariance.shrinkage,
        len(image_index),
        len(images) - len(image_index),
        details,
    )


def estimate_text_only(
    dim: int, sigma2: float = CAPDEC_SIGMA2, mu: torch.Tensor | None = None
) -> GapEstimate:
    """μ = 0 (or an imported μ, since the gap belongs to the CLIP model), Σ = σ₀²·I."""
    check_positive("--sigma2", sigma2)
    mean = torch.zeros(dim, dtype=torch.float64) if mu is None else mu.to(torch.float64)
    covariance = sigma2 * torch.eye(dim, dtype=torch.float64)
    return GapEstimate(
        "text-only", mean, covariance, details={"sigma2": sigma2, "mu_imported": mu is not None}
    )
