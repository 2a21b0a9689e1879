"""Confidence intervals and paired comparisons of evaluations, over test images and seeds.

A grid evaluates every trained cell once per seed on the same test images, so one cell's scores of a metric
form a matrix ``X [S, N]`` (``S`` seeds, ``N`` images). Its score is the mean of ``X``.

- **Interval** (:func:`interval`): a crossed bootstrap. Each resample draws ``S`` seeds and ``N`` images
  with replacement, the same images for every seed drawn, and takes the mean of ``X`` over them. The 95%
  interval is the percentile interval of those means (``scipy.stats.bootstrap``, the seed and image
  indices as two independently resampled samples). It therefore holds both the test images' sampling
  error and the spread between seeds. With one seed, only images are resampled. With two or three seeds
  the seeds' share of the interval is a rough estimate: a bootstrap over three values sees little.
- **Paired comparison** (:func:`compare`): on the seeds both cells ran and the images both scored,
  ``D = X_A − X_B``. The difference is the mean of ``D`` with the crossed-bootstrap interval of ``D``. The
  p-value is the two-sided paired permutation test of ``scipy.stats.permutation_test`` on the images'
  seed-averaged scores (the two cells' scores of an image swapped at random): whether the cells differ on
  these images, with their decoders as trained. A cell evaluated once (``retrieval``, ``template``, which
  have no seed) is compared with every seed of the other.

Which metrics (:data:`INTERVAL_METRICS`): those whose corpus score is the mean of per-image scores.

- CIDEr: pycocoevalcap's per-image scores, whose mean is the corpus CIDEr. Their IDF comes from the
  references of the whole test set and stays fixed in a resample. This is the usual approximation: a
  resampled test set would have slightly other document frequencies.
- ROUGE-L, CLIP-S, RefCLIP-S, object F1: per-image scores, averaged.
- BLEU and METEOR are corpus statistics (n-gram counts and alignments pooled over the images before the
  ratio is taken); the mean of their sentence scores is another number. They get no interval here, and
  neither does SPICE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import bootstrap, permutation_test

from tipcap.errors import TipcapError
from tipcap.io import load_json, write_json_atomic

INTERVAL_METRICS = ("CIDEr", "ROUGE-L", "CLIP-S", "RefCLIP-S", "object_f1")
"""Metrics with per-image scores whose mean is the reported score."""
CONFIDENCE = 0.95
RESAMPLES = 2000
PERMUTATIONS = 9999
SCORES_FILE = "scores.json"
_BATCH_CELLS = 20_000_000  # resampled scores held at once (float64: 160 MB)

# One scored evaluation: metric → image id → score.
ImageScores = dict[str, dict[Any, float]]


@dataclass(frozen=True)
class Interval:
    """A mean with its ``CONFIDENCE`` interval ``[low, high]``."""

    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Half the interval's width (what ``table.md`` prints after ±)."""
        return (self.high - self.low) / 2


def interval(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The mean of ``values [S, N]`` (seeds × images) with its crossed-bootstrap interval (see the module).

    The bootstrap's generator is seeded with ``seed``: the same scores give the same interval.

    Raises:
        ValueError: ``values`` is not ``[S, N]`` with ``S >= 1`` and ``N >= 2``, or holds NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 2:
        raise ValueError(f"expected scores [seeds, images] with at least 2 images, got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("scores hold NaN or infinite values")
    seeds, images = values.shape
    image_index = np.arange(images)
    batch = max(1, _BATCH_CELLS // values.size)
    if seeds == 1:
        data: tuple[np.ndarray, ...] = (image_index,)

        def statistic(i: np.ndarray, axis: int = -1) -> np.ndarray:
            return values[0][i].mean(axis=-1)

    else:
        data = (np.arange(seeds), image_index)

        def statistic(s: np.ndarray, i: np.ndarray, axis: int = -1) -> np.ndarray:
            # s [..., S] and i [..., N] index one resample each: the mean of X[s][:, i].
            return values[s[..., :, None], i[..., None, :]].mean(axis=(-2, -1))

    result = bootstrap(
        data, statistic, n_resamples=resamples, batch=batch, vectorized=True, method="percentile",
        confidence_level=CONFIDENCE, rng=np.random.default_rng(seed),
    )  # fmt: skip
    low, high = result.confidence_interval
    return Interval(float(values.mean()), float(low), float(high))


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
    """One cell's interval over its seeds (``evaluations``: seed → scores) and the images all of them
    scored; ``None`` when the metric has no per-image scores or fewer than two images."""
    seeds = list(evaluations)
    images = common_images([evaluations[s] for s in seeds], metric)
    if len(images) < 2:
        return None
    return interval(score_matrix(evaluations, metric, seeds, images), resamples)


@dataclass(frozen=True)
class Comparison:
    """``a − b`` in one metric, paired on ``seeds`` and ``images``, with its interval and p-value."""

    a: str
    b: str
    metric: str
    difference: Interval
    p_value: float
    seeds: int
    images: int

    def describe(self) -> str:
        """One line: ``A − B = x [lo, hi]`` with the metric, p-value and the pairs it rests on."""
        d = self.difference
        return (
            f"{self.a} − {self.b} = {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] ({self.metric}, "
            f"{CONFIDENCE:.0%} interval; paired permutation p = {self.p_value:.3g}; "
            f"{self.seeds} seed{'s' if self.seeds != 1 else ''} × {self.images} images)"
        )

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes zero."""
        return self.difference.low > 0 or self.difference.high < 0


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
            f"(intervals exist for {', '.join(INTERVAL_METRICS)})."
        )
    values_a = np.array([[side(a, s)[metric][i] for i in images] for s in seeds], dtype=np.float64)
    values_b = np.array([[side(b, s)[metric][i] for i in images] for s in seeds], dtype=np.float64)
    difference = interval(values_a - values_b, resamples)
    test = permutation_test(
        (values_a.mean(axis=0), values_b.mean(axis=0)),
        lambda x, y, axis=-1: np.mean(x - y, axis=axis),
        permutation_type="samples", vectorized=True, n_resamples=permutations,
        rng=np.random.default_rng(0),
    )  # fmt: skip
    return Comparison(names[0], names[1], metric, difference, float(test.pvalue), len(seeds), len(images))


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
