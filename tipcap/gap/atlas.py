"""The gap atlas: what the modality gap δ = v − t looks like on paired stores, how well each bridge's noise
model explains unseen pairs, and which bridge its shape favours, without training (``tipcap gap-atlas``).

**Streaming.** The drawn pairs are cut into ``groups`` groups by image (every caption of an image in the
same group), and each group's moments of δ (:class:`~tipcap.gap.moments.Moments`: Σδ, Σδδᵀ and the
Ledoit–Wolf sums) are accumulated chunk by chunk, in float64: memory is O(groups · d²) whatever the number
of pairs (40 · 768² · 8 bytes ≈ 190 MB at d = 768). The first half of the groups is the training half, the
second the held-out half.

**Intervals.** The figures that are functions of the moments (‖μ‖, tr Σ, the mean's share, the effective
rank, axis concentration, the share shared by an image's captions) get delete-one-group jackknife
t-intervals. The held-out likelihoods keep the fit on the whole training half and bootstrap the held-out
groups (``resamples`` times, seeded). Figures that need each pair (cosines, kurtosis, the cosine shells)
are measured on a seeded sample of at most ``sample`` pairs and bootstrapped over its rows (percentile
intervals at ``confidence``).

**Held-out likelihood.** Each kind is a model of δ: a decoder trained on t + n, n ~ N(0, C), and fed
x = v − m at inference sees x − t = δ − m where it learnt n, so the kind explains δ as N(m, C), with m = μ
for every kind that shifts by the mean (all but ``isotropic``) and C its noise covariance
(:func:`tipcap.gap.fit.noise_covariance`; renormalisation is ignored). μ and Σ are fitted on the training
half as ``fit-gap --setting few-pairs`` fits them (Ledoit–Wolf-shrunk); the held-out half is scored per
pair and per dimension. ``mean-shift`` adds no noise: its model is a point mass, and its likelihood −∞.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats
import torch

from tipcap import provenance
from tipcap.config import CAPDEC_SIGMA2
from tipcap.errors import TipcapError
from tipcap.gap.estimate import Pairs, check_positive
from tipcap.gap.fit import check_stores, join_pairs, noise_covariance, random_rotation
from tipcap.gap.model import Gap
from tipcap.gap.moments import Moments, cholesky
from tipcap.gap.shape import (
    axis_concentration,
    effective_rank,
    gaussian_log_likelihood,
    mean_share,
    pair_cosines,
    random_direction_concentration,
    sample_rows,
    spectrum,
)
from tipcap.store import EmbeddingStore

ATLAS_FORMAT = "tipcap-gap-atlas"
KINDS = ("isotropic", "mean-shift", "mean-isotropic-matched", "diagonal", "gaussian", "rotated", "close")
"""The bridges the atlas compares: CapDec's noise, the mean alone, matched isotropic noise, the diagonal,
the Gaussian (TIPCap), its spectrum in random directions, and CLOSE's adapter."""
FRACTIONS = (0.01, 0.05, 0.10)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
PREDICTION_RULE = (
    "The predicted best kind is the one whose noise model gives the held-out pairs' gaps the highest "
    "log-likelihood per dimension; its noise scale is the factor on that kind's covariance that maximises "
    "the same held-out likelihood (the held-out mean squared Mahalanobis distance per dimension). Kinds "
    "are ranked by the same score."
)


@dataclass(frozen=True)
class AtlasConfig:
    """How ``tipcap gap-atlas`` measures (see the module docstring)."""

    pairs: int | None = None  # draw this many pairs (seeded); None: all
    seed: int = 0
    resamples: int = 200  # bootstrap resamples
    groups: int = 40  # groups of images: the bootstrap's units, half of them held out
    sample: int = 20_000  # pairs kept for the per-pair figures
    directions: int = 5  # principal directions whose kurtosis is reported
    chunk: int = 16384  # pairs per streamed chunk
    sigma2: float = CAPDEC_SIGMA2  # the isotropic kind's per-axis variance (CapDec's)
    confidence: float = 0.95

    def check(self) -> None:
        """Refuse settings that cannot be measured (the flag names are the CLI's)."""
        if self.pairs is not None and self.pairs < 1:
            raise TipcapError(f"--pairs {self.pairs}: must be a positive number of pairs.")
        if self.resamples < 1:
            raise TipcapError(f"--resamples {self.resamples}: must be at least 1.")
        check_positive("--sigma2", self.sigma2)
        for name in ("groups", "sample", "directions", "chunk"):
            if getattr(self, name) < (4 if name == "groups" else 1):
                raise TipcapError(f"atlas {name} {getattr(self, name)}: too small.")
        if not 0 < self.confidence < 1:
            raise TipcapError(f"atlas confidence {self.confidence}: must be in (0, 1).")


@dataclass
class _Group:
    """The streamed statistics of one group of images: the moments of its δ ``[n, d]``, and for the share
    shared by an image's captions, its image count, Σᵢnᵢ² and Σᵢ‖Sᵢ‖²/nᵢ (Sᵢ: the sum of image i's δ)."""

    moments: Moments
    images: int = 0
    caption_squares: float = 0.0
    image_sums: float = 0.0


def draw_pairs(pairs: Pairs, count: int | None, seed: int) -> Pairs:
    """A seeded random subset of ``count`` pairs (all of them for None).

    Raises:
        TipcapError: when ``count`` exceeds the pairs available.
    """
    if count is None:
        return pairs
    if count > len(pairs):
        raise TipcapError(
            f"--pairs {count:,}: the stores hold only {len(pairs):,} pairs; ask for at most that many."
        )
    rows = sample_rows(len(pairs), count, seed)
    return Pairs(pairs.images, pairs.texts, pairs.image_index[rows], pairs.text_index[rows])


def _image_groups(
    image_index: torch.Tensor, groups: int, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Each pair's group ``[n]``, images dealt round-robin in a seeded order, and the number of groups
    (even; at most one per image)."""
    images, inverse = torch.unique(image_index, return_inverse=True)
    count = min(groups, len(images)) // 2 * 2
    if count < 4:
        raise TipcapError(
            f"the pairs show only {len(images)} distinct images; the atlas needs at least 4 (two to fit on, "
            "two to hold out). Use more pairs (--pairs) or larger stores."
        )
    of_image = torch.empty(len(images), dtype=torch.long)
    of_image[torch.randperm(len(images), generator=generator)] = torch.arange(len(images)) % count
    return of_image[inverse], count


def _stream(pairs: Pairs, group_of_pair: torch.Tensor, count: int, chunk: int) -> list[_Group]:
    """Accumulate each group's statistics, reading its pairs in chunks of about ``chunk`` rows that end at
    an image boundary (so an image's captions are summed together)."""
    order = torch.argsort(pairs.text_index, stable=True)
    order = order[torch.argsort(pairs.image_index[order], stable=True)]
    order = order[torch.argsort(group_of_pair[order], stable=True)]
    bounds = torch.searchsorted(group_of_pair[order], torch.arange(count + 1)).tolist()
    dim = pairs.texts.gather(pairs.text_index[:1]).shape[1]
    result = []
    for g in range(count):
        rows = order[bounds[g] : bounds[g + 1]]
        image = pairs.image_index[rows]
        changes = ((image[1:] != image[:-1]).nonzero().squeeze(1) + 1).contiguous()
        group = _Group(Moments(dim))
        start = 0
        while start < len(rows):
            stop = start + chunk
            if stop < len(rows):
                after = int(torch.searchsorted(changes, torch.tensor(stop)))
                stop = int(changes[after]) if after < len(changes) else len(rows)
            block = rows[start:stop]
            v = pairs.images.gather(pairs.image_index[block]).to(torch.float64)
            t = pairs.texts.gather(pairs.text_index[block]).to(torch.float64)
            delta = v - t
            if not bool(torch.isfinite(delta).all()):
                raise TipcapError(
                    "an image or caption embedding holds NaN or infinite values; rebuild its store."
                )
            group.moments.update(delta)
            _, captions = torch.unique_consecutive(pairs.image_index[block], return_counts=True)
            owner = torch.repeat_interleave(torch.arange(len(captions)), captions)
            sums = torch.zeros(len(captions), dim, dtype=torch.float64).index_add_(0, owner, delta)
            group.images += len(captions)
            group.caption_squares += float((captions.double() ** 2).sum())
            group.image_sums += float(((sums**2).sum(1) / captions).sum())
            start = stop
        result.append(group)
    return result


def _caption_share(groups: list[_Group], repeats: torch.Tensor) -> float:
    """The share of δ's variance (its trace) shared by an image's captions: the one-way random-effects
    intraclass correlation σ²_image/(σ²_image + σ²_caption), by ANOVA (unbalanced: n₀ = (N − Σnᵢ²/N)/(g − 1));
    NaN when every image has one caption."""
    weighted = [(int(r), g) for r, g in zip(repeats.tolist(), groups, strict=True) if r]
    n = sum(w * g.moments.count for w, g in weighted)
    images = sum(w * g.images for w, g in weighted)
    if images >= n or images < 2:
        return math.nan
    total = sum(w * g.moments.total for w, g in weighted)
    squares = sum(w * g.moments.sq_norms for w, g in weighted)
    image_sums = sum(w * g.image_sums for w, g in weighted)
    caption_squares = sum(w * g.caption_squares for w, g in weighted)
    grand = float(total @ total) / n
    within = (squares - image_sums) / (n - images)
    between = (image_sums - grand) / (images - 1)
    spread = (n - caption_squares / n) / (images - 1)
    image_part = max((between - within) / spread, 0.0)
    return image_part / (image_part + within) if image_part + within > 0 else math.nan


def _figures(moments: Moments) -> dict[str, Any]:
    """The moment figures of δ: ‖μ‖, tr Σ, the mean's share, the effective rank and axis concentration,
    with Σ Ledoit–Wolf-shrunk as ``fit-gap`` fits it (its trace is the sample trace)."""
    mu = moments.mean
    covariance = moments.covariance(shrink=True).matrix
    eigenvalues = spectrum(covariance)
    trace = float(torch.trace(covariance))
    return {
        "mu": mu,
        "covariance": covariance,
        "eigenvalues": eigenvalues,
        "mu_norm": float(mu.norm()),
        "trace": trace,
        "mean_share": mean_share(mu, trace),
        "effective_rank": effective_rank(eigenvalues),
        "mean_top": axis_concentration(mu**2, FRACTIONS),
        "variance_top": axis_concentration(torch.diagonal(covariance), FRACTIONS),
    }


def kind_model(
    kind: str, mu: torch.Tensor, covariance: torch.Tensor, sigma2: float, rotation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian N(m, C) that a kind makes of δ = v − t, given μ ``[d]`` and Σ ``[d, d]``: m = 0 for
    ``isotropic`` (CapDec infers from v itself), μ otherwise; C its noise covariance ``[d, d]``."""
    mean = torch.zeros_like(mu) if kind == "isotropic" else mu
    return mean, noise_covariance(kind, covariance, sigma2, rotation=rotation)


def _held_out_by_group(
    train: Moments, held_out: list[Moments], sigma2: float, rotation: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per kind, fitted on the training half, each held-out group's log-likelihood and its sum of squared
    Mahalanobis distances ``[groups, 2]`` (float64); (−∞, NaN) for ``mean-shift``'s point mass.

    Both are sums over pairs, so any resample of the held-out groups scores as a weighted sum of these rows.
    """
    mu, covariance = train.mean, train.covariance(shrink=True).matrix
    result = {}
    for kind in KINDS:
        rows = torch.full((len(held_out), 2), math.nan, dtype=torch.float64)
        if kind == "mean-shift":
            rows[:, 0] = -math.inf
        else:
            mean, noise = kind_model(kind, mu, covariance, sigma2, rotation)
            for g, group in enumerate(held_out):
                log_likelihood, scale = gaussian_log_likelihood(
                    group.weight, group.total, group.outer, mean, noise
                )
                rows[g] = torch.tensor([log_likelihood, scale * group.weight * len(mu)], dtype=torch.float64)
        result[kind] = rows
    return result


def _held_out(
    by_group: dict[str, torch.Tensor], counts: torch.Tensor, repeats: torch.Tensor, dim: int
) -> dict[str, tuple[float, float]]:
    """Per kind, the log-likelihood per pair and dimension of the held-out groups counted ``repeats``
    times, and the maximum-likelihood scale of the kind's covariance on them (the mean squared Mahalanobis
    distance per dimension); ``counts`` ``[groups]`` are the groups' pairs."""
    weights = repeats.double()
    pairs = float(weights @ counts) * dim
    result = {}
    for kind, rows in by_group.items():
        used = weights > 0  # a group left out of the resample adds nothing, even −∞
        totals = (weights[used, None] * rows[used]).sum(0)
        result[kind] = (float(totals[0]) / pairs, float(totals[1]) / pairs)
    return result


def _interval(value: float, draws: list[float] | np.ndarray, confidence: float) -> dict[str, float | None]:
    """A point value and its percentile interval from bootstrap draws (None where not finite)."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if not math.isfinite(value) or len(draws) == 0:
        return {"value": value if math.isfinite(value) else None, "low": None, "high": None}
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return {"value": value, "low": float(low), "high": float(high)}


def _jackknife(value: float, left_out: list[float], confidence: float) -> dict[str, float | None]:
    """A point value and its jackknife t-interval from the values ``left_out`` with each group left out."""
    draws = np.asarray(left_out, dtype=np.float64)
    if not math.isfinite(value) or not np.isfinite(draws).all():
        return {"value": value if math.isfinite(value) else None, "low": None, "high": None}
    groups = len(draws)
    error = math.sqrt((groups - 1) / groups * float(((draws - draws.mean()) ** 2).sum()))
    half = float(scipy.stats.t.ppf((1 + confidence) / 2, groups - 1)) * error
    return {"value": value, "low": value - half, "high": value + half}


def _shell(cosines: torch.Tensor) -> dict[str, Any]:
    """The mean and the :data:`QUANTILES` of cosines ``[n]``."""
    return {
        "mean": float(cosines.double().mean()),
        "quantiles": torch.quantile(cosines.double(), torch.tensor(QUANTILES, dtype=torch.float64)).tolist(),
    }


def gap_atlas(pairs: Pairs, config: AtlasConfig) -> dict[str, Any]:
    """Measure the gap of matched ``pairs`` (:mod:`tipcap.gap.atlas`): the atlas document, without its
    inputs and provenance (:func:`store_atlas` adds them)."""
    config.check()
    available = len(pairs)
    pairs = draw_pairs(pairs, config.pairs, config.seed)
    groups_generator = torch.Generator().manual_seed(config.seed + 1)
    group_of_pair, count = _image_groups(pairs.image_index, config.groups, groups_generator)
    groups = _stream(pairs, group_of_pair, count, config.chunk)
    half = count // 2
    everything = [g.moments for g in groups]
    ones = torch.ones(count, dtype=torch.long)
    point = _figures(Moments.combined(everything, ones))
    dim = len(point["mu"])
    rotation = random_rotation(dim, config.seed)
    train = Moments.combined(everything[:half], ones[:half])
    by_group = _held_out_by_group(train, everything[half:], config.sigma2, rotation)
    counts = torch.tensor([m.weight for m in everything[half:]], dtype=torch.float64)
    held_out = _held_out(by_group, counts, ones[half:], dim)
    caption_share = _caption_share(groups, ones)

    scalar = ("mu_norm", "trace", "mean_share", "effective_rank")
    # Jackknifed: a bootstrap resample repeats groups, which the shrunk covariance counts as distinct pairs.
    draws: dict[str, list] = {key: [] for key in (*scalar, "mean_top", "variance_top", "caption_share")}
    for left_out in range(count):
        kept = ones - (torch.arange(count) == left_out).long()
        figures = _figures(Moments.combined(everything, kept))
        for key in (*scalar, "mean_top", "variance_top"):
            draws[key].append(figures[key])
        draws["caption_share"].append(_caption_share(groups, kept))
    kind_draws = {kind: ([], []) for kind in KINDS}
    top_counts = dict.fromkeys(KINDS, 0)
    generator = torch.Generator().manual_seed(config.seed + 2)
    held = count - half
    for _ in range(config.resamples):  # how often each held-out group is drawn
        repeats = torch.bincount(torch.randint(0, held, (held,), generator=generator), minlength=held)
        resampled = _held_out(by_group, counts, repeats, dim)
        for kind, (log_likelihood, scale) in resampled.items():
            kind_draws[kind][0].append(log_likelihood)
            kind_draws[kind][1].append(scale)
        top_counts[max(KINDS, key=lambda k: resampled[k][0])] += 1

    conf = config.confidence
    sampled = _sampled(pairs, point, rotation, config)
    kinds = {}
    for kind in KINDS:
        log_likelihood, scale = held_out[kind]
        kinds[kind] = {
            "held_out_log_likelihood": _interval(log_likelihood, kind_draws[kind][0], conf),
            "held_out_noise_scale": _interval(scale, kind_draws[kind][1], conf),
            "best_in_resamples": top_counts[kind] / config.resamples,
            **sampled["kinds"][kind],
        }
    ranking = sorted(KINDS, key=lambda k: -held_out[k][0])
    best = ranking[0]
    prediction = {
        "kind": best,
        "noise_scale": kinds[best]["held_out_noise_scale"]["value"],
        "ranking": ranking,
        "best_in_resamples": kinds[best]["best_in_resamples"],
        "rule": PREDICTION_RULE,
    }
    if best == "isotropic":
        prediction["sigma2"] = config.sigma2 * prediction["noise_scale"]
    return {
        "format": ATLAS_FORMAT,
        "settings": {**dataclasses.asdict(config), "fractions": FRACTIONS, "quantiles": QUANTILES},
        "pairs": {
            "available": available,
            "drawn": len(pairs),
            "images": sum(g.images for g in groups),
            "groups": count,
            "training": train.count,
            "held_out": int(counts.sum()),
            "sample": sampled["size"],
        },
        "dim": dim,
        "gap": {
            **{key: _jackknife(point[key], draws[key], conf) for key in scalar},
            "spectrum": point["eigenvalues"].tolist(),
            "caption_share": _jackknife(caption_share, draws["caption_share"], conf),
        },
        "concentration": {
            "fractions": FRACTIONS,
            "mean_random_direction": random_direction_concentration(dim, FRACTIONS),
            **{
                name: [
                    _jackknife(point[key][i], [d[i] for d in draws[key]], conf) for i in range(len(FRACTIONS))
                ]
                for name, key in (("mean", "mean_top"), ("variance", "variance_top"))
            },
        },
        "cosines": sampled["cosines"],
        "kurtosis": sampled["kurtosis"],
        "kinds": kinds,
        "prediction": prediction,
    }


def _sampled(
    pairs: Pairs, point: dict[str, Any], rotation: torch.Tensor, config: AtlasConfig
) -> dict[str, Any]:
    """The per-pair figures on a seeded sample of at most ``config.sample`` pairs: the cosines (matched,
    between different images, between captions of different images), the excess kurtosis of δ along Σ's
    top principal directions, and each kind's cosine shells, with bootstrap intervals over the sample."""
    rows = sample_rows(len(pairs), config.sample, config.seed + 3)
    image = pairs.image_index[rows]
    v = pairs.images.gather(image).float()
    t = pairs.texts.gather(pairs.text_index[rows]).float()
    generator = torch.Generator().manual_seed(config.seed + 4)
    partner = torch.randperm(len(rows), generator=generator)
    other = image != image[partner]
    values = {
        "matched": pair_cosines(v, t),
        "between_images": pair_cosines(v[other], v[partner][other]),
        "between_captions": pair_cosines(t[other], t[partner][other]),
    }
    _, vectors = torch.linalg.eigh(point["covariance"])
    directions = vectors.flip(1)[:, : config.directions]
    projected = (((v - t).double() - point["mu"]) @ directions).numpy()
    shells, traces = {}, {}
    mu = point["mu"]
    for kind in KINDS:
        _, noise = kind_model(kind, mu, point["covariance"], config.sigma2, rotation)
        traces[kind] = float(torch.trace(noise))
        # mean-shift adds no noise: a zero factor, as fit-gap stores it.
        scale_tril = noise if kind == "mean-shift" else cholesky(noise, f"the {kind} kind's noise covariance")
        gap = Gap(kind, mu, scale_tril)
        with torch.no_grad():
            clean = gap.text_side(t)
            shells[kind] = (
                pair_cosines(gap.sample(t, generator), clean),
                pair_cosines(gap.to_text(v), clean),
            )

    conf = config.confidence
    kurtosis = scipy.stats.kurtosis(projected, axis=0)
    cosine_draws = {name: [] for name in values}
    kurtosis_draws = []
    shell_draws = {kind: ([], []) for kind in KINDS}
    for _ in range(config.resamples):
        index = torch.randint(0, len(rows), (len(rows),), generator=generator)
        for name, cosines in values.items():
            cosine_draws[name].append(
                float(cosines[torch.randint(0, len(cosines), (len(cosines),), generator=generator)].mean())
            )
        kurtosis_draws.append(scipy.stats.kurtosis(projected[index.numpy()], axis=0))
        for kind, (training, inference) in shells.items():
            shell_draws[kind][0].append(float(training[index].mean()))
            shell_draws[kind][1].append(float(inference[index].mean()))
    kurtosis_draws = np.stack(kurtosis_draws)
    kinds = {}
    for kind, (training, inference) in shells.items():
        kinds[kind] = {
            "noise_trace": traces[kind],
            "training_cosine": {
                **_shell(training),
                "mean": _interval(float(training.double().mean()), shell_draws[kind][0], conf),
            },
            "inference_cosine": {
                **_shell(inference),
                "mean": _interval(float(inference.double().mean()), shell_draws[kind][1], conf),
            },
            "shell_distance": float(scipy.stats.ks_2samp(training.numpy(), inference.numpy()).statistic),
        }
    return {
        "size": len(rows),
        "cosines": {
            name: _interval(float(c.double().mean()), cosine_draws[name], conf) for name, c in values.items()
        },
        "kurtosis": [
            _interval(float(kurtosis[i]), kurtosis_draws[:, i], conf) for i in range(projected.shape[1])
        ],
        "kinds": kinds,
    }


def store_atlas(texts: EmbeddingStore, images: EmbeddingStore, config: AtlasConfig) -> dict[str, Any]:
    """:func:`gap_atlas` of the pairs of a caption and an image store (joined by image id), with the
    stores' paths and digests, and the provenance record of the measurement (:mod:`tipcap.provenance`).

    Raises:
        TipcapError: for stores of the wrong kind or of different CLIPs, or that share no image id.
    """
    check_stores(texts, images)
    pairs = join_pairs(texts, images)
    if len(pairs) == 0:
        raise TipcapError(
            f"--texts {texts.path} and --images {images.path} share no image ids, so no pairs; give the "
            "image store that the captions describe."
        )
    atlas = gap_atlas(pairs, config)
    inputs = {"texts": texts.digest, "images": images.digest}
    atlas["inputs"] = {
        "texts": {"path": str(texts.path), "digest": texts.digest},
        "images": {"path": str(images.path), "digest": images.digest},
    }
    atlas["provenance"] = provenance.record("gap-atlas", atlas["settings"], inputs)
    return atlas
