"""Intervals, paired comparisons and verdicts of evaluations: the seed is the unit of replication.

A grid evaluates every trained cell once per seed on the same test images, so one cell's scores of a metric
form a matrix ``X [S, N]`` (``S`` seeds, ``N`` images). Its score is the mean of ``X``.

**What is replicated.** A seed draws a new decoder (and, for few-pairs cells, a new draw of pairs); the
test set is held fixed. The images are the measurement: each seed's score is its mean over the same ``N``
test images, and the inference is over seeds. An interval therefore says where the score (or difference)
of another set of seeds would lie on these test images, not on another test set. Within a seed the
images' sampling error is averaged into its score, and reaches the interval through the seeds' spread.

- **Interval** (:func:`interval`, :func:`cell_interval`): with ``S ≥ 2`` seeds, the 95% t-interval over the
  per-seed means ``m_s = mean_i X[s, i]``: ``mean ± t(0.975, S − 1) · sd / √S``, with ``sd`` the seeds'
  standard deviation (``scipy.stats.t``). With one seed (or a baseline evaluated once, without seed) there
  is no seed-level interval; :func:`image_interval` gives the percentile bootstrap over the test images of
  that one evaluation (``scipy.stats.bootstrap``, its generator seeded), which holds the images' sampling
  error only and is labelled so (:attr:`Interval.over` is ``"images"``).
- **Paired comparison** (:func:`compare`): on the seeds both cells ran and the images both scored, each
  seed's difference ``d_s = mean_i (X_A[s, i] − X_B[s, i])``. A cell evaluated once (``retrieval``,
  ``template``: key ``None``) pairs with every seed of the other. Reported: the ``d_s``, their mean and
  standard deviation, the 95% t-interval over seeds, the two-sided one-sample t-test of ``d_s`` against 0
  (``p_t``, the p-value that Holm's correction uses), and the exact sign-flip test over seeds
  (``scipy.stats.permutation_test`` on one sample flips the signs of the ``d_s``; exact with all ``2^S``
  flips). The sign-flip p is reported only where it can reach α = 0.05: its smallest two-sided value is
  ``2 / 2^S``, so from 6 seeds on (:data:`SIGN_FLIP_MIN_SEEDS`). With one seed there is no seed-level
  test: the difference gets the image bootstrap of that seed, and the verdict is "undecided (one seed)".
  ``p_images_fixed_decoders`` is the paired permutation test over images of the seed-averaged scores (the
  two cells' scores of an image swapped at random): it asks whether these trained decoders differ on these
  images, with the decoders held fixed, not whether the methods differ; it decides nothing.
- **Verdicts** (:func:`decide`): a family of comparisons (the primary ones a grid declares) is read with
  Holm's step-down correction of the ``p_t`` at α = 0.05 (:func:`holm`). Each comparison also gets the
  family-adjusted t-interval at its Holm step's level ``1 − α/(m − k)`` (``k`` its 0-based rank by
  ``p_t``, ``m`` the family's tested comparisons); past the step where Holm stops, the level of that step,
  so that the adjusted interval excludes 0 exactly when the comparison is resolved. Where the family has an
  equivalence margin ``δ``, TOST (two one-sided t-tests over seeds against ``±δ``; its p is the larger of
  the two, and ``p ≤ α`` exactly when the 90% t-interval lies inside ``±δ``) is Holm-corrected within the
  family too. A comparison reads **resolved (A > B)** or **resolved (A < B)** when its Holm-adjusted
  ``p_t ≤ α``, else **equivalent within ±δ** when its Holm-adjusted TOST p ≤ α, else **undecided**: the
  seeds neither separate the cells nor confine their difference (which is not "no effect"). A comparison
  read alone (the secondary list, ``tipcap compare``) is a family of one: uncorrected.

Which metrics (:data:`INTERVAL_METRICS`): those whose corpus score is the mean of per-image scores.

- CIDEr: pycocoevalcap's per-image scores, whose mean is the corpus CIDEr. Their IDF comes from the
  references of the whole test set and stays fixed in a resample. This is the usual approximation: a
  resampled test set would have slightly other document frequencies.
- ROUGE-L, CLIP-S, RefCLIP-S, Adherence, Adherence-all: per-image scores, averaged.
- A world's scorers declare their own (the toy worlds' object F1; :mod:`tipcap.evaluation.registry`), which
  :func:`interval_metrics` places among these.
- BLEU and METEOR are corpus statistics (n-gram counts and alignments pooled over the images before the
  ratio is taken); the mean of their sentence scores is another number. They get no interval here, and
  neither does SPICE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.stats import bootstrap, permutation_test
from scipy.stats import t as student_t

from tipcap.errors import TipcapError
from tipcap.io import load_json, write_json_atomic

CAPTION_METRICS = ("CIDEr", "ROUGE-L", "CLIP-S", "RefCLIP-S")
"""The caption's own metrics with per-image scores."""
INTERVAL_METRICS = (*CAPTION_METRICS, "Adherence", "Adherence-all")
"""Metrics with per-image scores whose mean is the reported score: the caption's, then prompt adherence."""
CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
"""The level of every test: Holm's family-wise error rate, TOST's and a single comparison's."""
RESAMPLES = 2000
PERMUTATIONS = 9999
SIGN_FLIP_MIN_SEEDS = 6
"""The fewest seeds whose two-sided sign-flip p can reach ``ALPHA`` (its smallest value is ``2 / 2^S``)."""
_EXACT_SIGN_FLIP_SEEDS = 16  # up to 2^16 flips enumerated; beyond, PERMUTATIONS random ones
SCORES_FILE = "scores.json"
_BATCH_CELLS = 20_000_000  # resampled scores held at once (float64: 160 MB)

# One scored evaluation: metric → image id → score.
ImageScores = dict[str, dict[Any, float]]


def interval_metrics(scored: Sequence[str] = ()) -> tuple[str, ...]:
    """:data:`INTERVAL_METRICS` with a world's scorers' metrics (``scored``) after the caption's own and
    before prompt adherence, the order of a grid's interval columns."""
    return (*CAPTION_METRICS, *scored, *INTERVAL_METRICS[len(CAPTION_METRICS) :])


@dataclass(frozen=True)
class Interval:
    """A mean with its interval ``[low, high]`` at ``confidence``.

    ``seeds ≥ 2``: a t-interval over that many per-seed values, whose standard deviation is ``seed_sd``.
    ``seeds == 1``: a bootstrap interval over the test images of one evaluation (``seed_sd`` is ``None``).
    """

    mean: float
    low: float
    high: float
    seeds: int
    seed_sd: float | None
    confidence: float = CONFIDENCE

    @property
    def over(self) -> Literal["seeds", "images"]:
        """What the interval is over: the seeds, or (one evaluation) the test images."""
        return "seeds" if self.seeds >= 2 else "images"

    @property
    def half_width(self) -> float:
        """Half the interval's width (what ``table.md`` prints after ±)."""
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """Whether 0 lies outside ``[low, high]``."""
        return self.low > 0 or self.high < 0


def t_interval(per_seed: np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``per_seed [S]`` (one value per seed, ``S ≥ 2``) with its t-interval at ``confidence``:
    ``mean ± t((1 + confidence)/2, S − 1) · sd / √S``.

    Raises:
        ValueError: fewer than two values, or NaN.
    """
    values = _seed_values(per_seed)
    low, high = t_bounds(values, confidence)
    return Interval(float(values.mean()), float(low), float(high), len(values), float(values.std(ddof=1)),
                    confidence)  # fmt: skip


def t_bounds(per_seed: np.ndarray, confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)``, each ``[...]``: the t-interval at ``confidence`` of each row of ``per_seed [..., S]``
    (``S ≥ 2``), vectorised over the leading axes."""
    values = np.asarray(per_seed, dtype=np.float64)
    seeds = values.shape[-1]
    half = student_t.ppf((1 + confidence) / 2, seeds - 1) * values.std(axis=-1, ddof=1) / np.sqrt(seeds)
    mean = values.mean(axis=-1)
    return mean - half, mean + half


def _seed_values(per_seed: np.ndarray) -> np.ndarray:
    values = np.asarray(per_seed, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"expected one value per seed for at least 2 seeds, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("per-seed values hold NaN or infinite values")
    return values


def _t_statistic(per_seed: np.ndarray, null: float) -> float:
    """``(mean − null) / (sd / √S)``; ±inf (or 0 at the null) when the seeds agree exactly."""
    mean, error = per_seed.mean(), per_seed.std(ddof=1) / np.sqrt(len(per_seed))
    if error == 0:
        return 0.0 if mean == null else float(np.copysign(np.inf, mean - null))
    return float((mean - null) / error)


def t_test_p(per_seed: np.ndarray) -> float:
    """Two-sided p of the one-sample t-test of ``per_seed [S]`` (``S ≥ 2``) against 0 (df ``S − 1``)."""
    values = _seed_values(per_seed)
    return float(2 * student_t.sf(abs(_t_statistic(values, 0.0)), len(values) - 1))


def tost_p(per_seed: np.ndarray, margin: float) -> float:
    """TOST p of equivalence within ``±margin``: the larger p of the one-sided t-tests of ``per_seed [S]``
    against ``mean ≤ −margin`` and against ``mean ≥ margin``. ``p ≤ α`` exactly when the ``1 − 2α``
    t-interval lies inside ``[−margin, margin]``."""
    values = _seed_values(per_seed)
    df = len(values) - 1
    above_lower = student_t.sf(_t_statistic(values, -margin), df)
    below_upper = student_t.cdf(_t_statistic(values, margin), df)
    return float(max(above_lower, below_upper))


def sign_flip_p(per_seed: np.ndarray) -> float | None:
    """Two-sided p of the sign-flip test of ``per_seed [S]``: the share of the ``2^S`` sign flips whose mean
    is at least as far from 0 as the observed one (exact up to 16 seeds). ``None`` when it could not
    reach ``ALPHA`` (fewer than :data:`SIGN_FLIP_MIN_SEEDS` seeds)."""
    values = _seed_values(per_seed)
    if len(values) < SIGN_FLIP_MIN_SEEDS:
        return None
    exact = len(values) <= _EXACT_SIGN_FLIP_SEEDS
    test = permutation_test(
        (values,), lambda x, axis=-1: np.mean(x, axis=axis), permutation_type="samples", vectorized=True,
        n_resamples=2 ** len(values) if exact else PERMUTATIONS, rng=np.random.default_rng(0),
    )  # fmt: skip
    return float(test.pvalue)


def sign_flip_absent(seeds: int) -> str:
    """Why no sign-flip p is reported for ``seeds`` seeds."""
    smallest = 2 / 2**seeds
    return (
        f"sign-flip p not shown: with {seeds} seed{'s' if seeds != 1 else ''} its smallest two-sided value "
        f"is 2/2^{seeds} = {smallest:.3g}, above α = {ALPHA:.2g} (it can decide from {SIGN_FLIP_MIN_SEEDS} "
        "seeds)"
    )


def image_interval(scores: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The mean of one evaluation's ``scores [N]`` with the 95% percentile bootstrap interval over its test
    images (image-level: no spread between seeds in it). The generator is seeded with ``seed``.

    Raises:
        ValueError: fewer than two images, or NaN.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"expected the scores of at least 2 images, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("scores hold NaN or infinite values")
    result = bootstrap(
        (values,), lambda x, axis=-1: x.mean(axis=axis), n_resamples=resamples, vectorized=True,
        batch=max(1, _BATCH_CELLS // values.size), method="percentile", confidence_level=CONFIDENCE,
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    low, high = result.confidence_interval
    return Interval(float(values.mean()), float(low), float(high), seeds=1, seed_sd=None)


def interval(values: np.ndarray, resamples: int = RESAMPLES) -> Interval:
    """The mean of ``values [S, N]`` (seeds × images) with its 95% interval: the t-interval over the ``S``
    per-seed means (``S ≥ 2``), or the bootstrap over the images of the one seed (``S = 1``).

    Raises:
        ValueError: ``values`` is not ``[S, N]`` with ``S >= 1`` and ``N >= 2``, or holds NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 2:
        raise ValueError(f"expected scores [seeds, images] with at least 2 images, got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("scores hold NaN or infinite values")
    if values.shape[0] == 1:
        return image_interval(values[0], resamples)
    return t_interval(values.mean(axis=1))


def score_matrix(
    evaluations: Mapping[Any, ImageScores], metric: str, seeds: Sequence[Any], images: Sequence[Any]
) -> np.ndarray:
    """``[S, N]``: the metric's score of each image (in ``images`` order) per seed (in ``seeds`` order)."""
    return np.array([[evaluations[s][metric][i] for i in images] for s in seeds], dtype=np.float64)


def common_images(evaluations: Sequence[ImageScores], metric: str) -> list[Any]:
    """Image ids scored (not ``None``) in every evaluation, in the first one's order."""
    if not evaluations or any(metric not in e for e in evaluations):
        return []
    scored = [{i for i, v in e[metric].items() if v is not None} for e in evaluations[1:]]
    return [i for i, v in evaluations[0][metric].items() if v is not None and all(i in s for s in scored)]


def cell_interval(
    evaluations: Mapping[Any, ImageScores], metric: str, resamples: int = RESAMPLES
) -> Interval | None:
    """One cell's interval (``evaluations``: seed → scores) on the images all its seeds scored: over its
    seeds, or over the images of its one evaluation (:func:`interval`); ``None`` when the metric has no
    per-image scores or fewer than two images."""
    seeds = list(evaluations)
    images = common_images([evaluations[s] for s in seeds], metric)
    if len(images) < 2:
        return None
    return interval(score_matrix(evaluations, metric, seeds, images), resamples)


@dataclass(frozen=True)
class Comparison:
    """``a − b`` in one metric, paired on ``seeds`` and ``images``, with its seed-level inference.

    ``seed_differences [S]``: each paired seed's mean difference over the common images (in ``seeds``
    order; ``seeds`` is ``(None,)`` for two baselines evaluated once). ``difference``: their mean with its
    95% interval (a t-interval over seeds, or with one seed the bootstrap over images). ``p_t``: the
    two-sided one-sample t-test of the differences against 0; ``p_sign_flip``: the exact sign-flip test over
    seeds; both ``None`` where the seeds cannot give them. ``p_images_fixed_decoders``: the permutation test
    over images with the trained decoders held fixed (see the module).
    """

    a: str
    b: str
    metric: str
    seeds: tuple[Any, ...]
    seed_differences: tuple[float, ...]
    difference: Interval
    p_t: float | None
    p_sign_flip: float | None
    p_images_fixed_decoders: float
    images: int

    def t_interval(self, confidence: float) -> Interval:
        """The t-interval over seeds of the difference at ``confidence`` (at least two seeds)."""
        return t_interval(np.array(self.seed_differences), confidence)

    def describe(self) -> str:
        """Lines: ``A − B`` with its metric and pairs, the per-seed differences, the interval and the
        tests."""
        d = self.difference
        count = len(self.seeds)
        lines = [
            f"{self.a} − {self.b} ({self.metric}; {count} seed{'s' if count != 1 else ''} × {self.images} "
            "images, the test images held fixed)",
            "  per-seed differences: " + ", ".join(
                f"{'—' if s is None else f'seed {s}'} {v:+.4f}"
                for s, v in zip(self.seeds, self.seed_differences, strict=True)
            ),
        ]  # fmt: skip
        if d.over == "seeds":
            lines += [
                f"  mean {d.mean:+.4f}, seed SD {d.seed_sd:.4f}, {d.confidence:.0%} t-interval over seeds "
                f"[{d.low:+.4f}, {d.high:+.4f}] (df {count - 1}), p (t) = {self.p_t:.3g}",
                f"  sign-flip p over seeds = {self.p_sign_flip:.3g}" if self.p_sign_flip is not None
                else f"  {sign_flip_absent(count)}",
            ]  # fmt: skip
        else:
            lines.append(
                f"  mean {d.mean:+.4f}, {d.confidence:.0%} bootstrap interval over images of one seed "
                f"[{d.low:+.4f}, {d.high:+.4f}] (image-level: no seed-level inference with one seed)"
            )
        lines.append(
            f"  p_images_fixed_decoders = {self.p_images_fixed_decoders:.3g} (permutation over images, these "
            "trained decoders held fixed: whether they differ on these images, not whether the methods do)"
        )
        return "\n".join(lines)


def compare(
    a: Mapping[Any, ImageScores],
    b: Mapping[Any, ImageScores],
    metric: str,
    names: tuple[str, str] = ("A", "B"),
    resamples: int = RESAMPLES,
    permutations: int = PERMUTATIONS,
) -> Comparison:
    """Cell ``a`` minus cell ``b`` (each: seed → scores) in ``metric``, paired on seeds and images.

    Seeds pair by value. A side evaluated once without a seed (key ``None``) pairs with every seed of the
    other.

    Raises:
        TipcapError: the cells share no seed, or fewer than two images scored in the metric by both.
    """
    if list(a) == [None] or list(b) == [None]:
        seeds = [s for s in (a if list(a) != [None] else b)]
    else:
        seeds = [s for s in a if s in b]
    if not seeds:
        raise TipcapError(
            f"{names[0]} (seeds {sorted(a)}) and {names[1]} (seeds {sorted(b)}) share no seed to pair on."
        )

    def side(cell: Mapping[Any, ImageScores], seed: Any) -> ImageScores:
        return cell[None] if list(cell) == [None] else cell[seed]

    images = common_images([side(c, s) for s in seeds for c in (a, b)], metric)
    if len(images) < 2:
        raise TipcapError(
            f"{names[0]} and {names[1]}: fewer than two images with per-image {metric} scores in both "
            f"(intervals exist for {', '.join(INTERVAL_METRICS)} and a world's scorers' metrics)."
        )
    values_a = np.array([[side(a, s)[metric][i] for i in images] for s in seeds], dtype=np.float64)
    values_b = np.array([[side(b, s)[metric][i] for i in images] for s in seeds], dtype=np.float64)
    per_seed = (values_a - values_b).mean(axis=1)
    if len(seeds) >= 2:
        difference, p_t, p_sign_flip = t_interval(per_seed), t_test_p(per_seed), sign_flip_p(per_seed)
    else:
        difference, p_t, p_sign_flip = image_interval(values_a[0] - values_b[0], resamples), None, None
    test = permutation_test(
        (values_a.mean(axis=0), values_b.mean(axis=0)),
        lambda x, y, axis=-1: np.mean(x - y, axis=axis),
        permutation_type="samples", vectorized=True, n_resamples=permutations,
        rng=np.random.default_rng(0),
    )  # fmt: skip
    return Comparison(names[0], names[1], metric, tuple(seeds), tuple(per_seed.tolist()), difference, p_t,
                      p_sign_flip, float(test.pvalue), len(images))  # fmt: skip


# -- verdicts -------------------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: sorted ascending, the ``k``-th (from 0) is
    ``max_{j ≤ k} min(1, (m − j) · p_(j))``. A hypothesis is rejected at family-wise level α when its
    adjusted p ≤ α."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def holm_levels(p_values: Sequence[float], alpha: float = ALPHA) -> list[float]:
    """Each hypothesis' Holm step level, in the order given: ``alpha / (m − k)`` for rank ``k`` (from 0) by
    p-value, and past the first step that is not rejected, that step's level. A two-sided test at its level
    rejects exactly when Holm does (``p ≤`` level ⇔ adjusted p ≤ ``alpha``)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    levels = [0.0] * len(p_values)
    stopped: float | None = None
    for rank, index in enumerate(order):
        level = alpha / (len(p_values) - rank)
        if stopped is None and p_values[index] > level:
            stopped = level
        levels[index] = stopped if stopped is not None else level
    return levels


@dataclass(frozen=True)
class Decision:
    """A comparison read within its family (``family`` ``None``: alone, uncorrected).

    ``tests``: the family's comparisons with a seed-level test (``m`` of Holm). ``p_holm``: the
    Holm-adjusted ``p_t``. ``adjusted``: the t-interval at the comparison's Holm step level (see
    :func:`holm_levels`). ``margin``: the equivalence margin (``None``: no TOST); ``p_tost`` and
    ``p_tost_holm``: TOST's p and its Holm-adjusted value. The ``None`` fields are those a one-seed
    comparison cannot have.
    """

    comparison: Comparison
    family: str | None
    tests: int
    p_holm: float | None
    adjusted: Interval | None
    margin: float | None
    p_tost: float | None
    p_tost_holm: float | None

    @property
    def resolved(self) -> bool:
        """Whether the family-adjusted t-test separates the cells."""
        return self.p_holm is not None and self.p_holm <= ALPHA

    @property
    def equivalent(self) -> bool:
        """Whether the family-adjusted TOST confines the difference within ``±margin``."""
        return self.p_tost_holm is not None and self.p_tost_holm <= ALPHA

    @property
    def verdict(self) -> str:
        """``resolved (A > B)``, ``resolved (A < B)``, ``equivalent within ±m``, ``undecided`` or, without
        a seed-level test, ``undecided (one seed)``. Resolved wins over equivalent: a real difference
        smaller than the margin reads resolved, its TOST column equivalent."""
        if self.comparison.p_t is None:
            return "undecided (one seed)"
        if self.resolved:
            return "resolved (A > B)" if self.comparison.difference.mean > 0 else "resolved (A < B)"
        if self.equivalent:
            return f"equivalent within ±{self.margin:g}"
        return "undecided"


def decide(
    comparisons: Sequence[Comparison], margin: float | None = None, family: str | None = None
) -> list[Decision]:
    """Read ``comparisons`` as one family at α = :data:`ALPHA`: Holm's correction of their ``p_t`` (and, with
    ``margin``, of their TOST p), each with its family-adjusted interval. One-seed comparisons have no test
    and are left out of the family's count. A single comparison is read uncorrected (``m = 1``)."""
    tested = [i for i, c in enumerate(comparisons) if c.p_t is not None]
    p_t = [comparisons[i].p_t for i in tested]
    p_holm = dict(zip(tested, holm(p_t), strict=True))
    levels = dict(zip(tested, holm_levels(p_t), strict=True))
    p_tost: dict[int, float] = {}
    if margin is not None:
        p_tost = {i: tost_p(np.array(comparisons[i].seed_differences), margin) for i in tested}
    p_tost_holm = dict(zip(p_tost, holm(list(p_tost.values())), strict=True))
    decisions = []
    for i, c in enumerate(comparisons):
        adjusted = c.t_interval(1 - levels[i]) if i in levels else None
        decisions.append(Decision(c, family, len(tested), p_holm.get(i), adjusted, margin, p_tost.get(i),
                                  p_tost_holm.get(i)))  # fmt: skip
    return decisions


# -- files ------------------------------------------------------------------------------------------


def write_image_scores(
    path: str | Path, image_ids: Sequence[Any], scores: Mapping[str, Sequence[Any]]
) -> None:
    """Write ``scores.json``: the image ids and, per metric, their scores in that order (``None``: the
    image has no score in that metric)."""
    for metric, values in scores.items():
        if len(values) != len(image_ids):
            raise ValueError(f"{metric}: {len(values)} scores for {len(image_ids)} images")
    write_json_atomic(path, {"image_ids": list(image_ids), "scores": {m: list(v) for m, v in scores.items()}})


def read_image_scores(path: str | Path) -> ImageScores:
    """A ``scores.json`` as metric → image id → score."""
    document = load_json(Path(path))
    if not isinstance(document, dict) or "image_ids" not in document or "scores" not in document:
        raise TipcapError(f"{path}: not a scores file (expected 'image_ids' and 'scores').")
    ids = document["image_ids"]
    return {metric: dict(zip(ids, values, strict=True)) for metric, values in document["scores"].items()}
