"""Intervals over test images and seeds, and paired comparisons (tipcap.stats): known answers on synthetic
scores."""

import numpy as np
import pytest

from tipcap.errors import TipcapError
from tipcap.stats import compare, interval


def scores(matrix: np.ndarray, metric: str = "CIDEr") -> dict:
    """seed → {metric: {image id: score}} from a [S, N] matrix (seeds 0..S-1, images 0..N-1)."""
    return {seed: {metric: dict(enumerate(row.tolist()))} for seed, row in enumerate(matrix)}


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """Over 200 synthetic test sets of 60 images, the one-seed interval holds the population mean in 90-99%
    of them (a bug in the resampling, e.g. resampling nothing, gives 0%; a too-wide one 100%)."""
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(200):
        sample = rng.exponential(1.0, size=(1, 60))  # skewed, like per-image CIDEr; mean 1
        found = interval(sample, resamples=999)
        hits += found.low <= 1.0 <= found.high
        assert found.low <= found.mean <= found.high
    assert 0.90 * 200 <= hits <= 0.99 * 200


def test_the_spread_between_seeds_widens_the_interval():
    """Two seeds whose decoders differ by a constant offset on every image: resampling images alone would
    see no seed spread; the crossed bootstrap must."""
    rng = np.random.default_rng(0)
    images = rng.normal(1.0, 0.3, size=200)
    agreeing = np.stack([images, images])
    offset = np.stack([images - 0.2, images + 0.2])
    narrow, wide = interval(agreeing), interval(offset)
    assert narrow.mean == pytest.approx(wide.mean)
    assert wide.half_width > narrow.half_width + 0.1
    # Every resample of seeds is {-0.2, -0.2}, {+0.2, +0.2} or mixed: the interval reaches past ±0.15.
    assert wide.low < narrow.mean - 0.15 and wide.high > narrow.mean + 0.15


def test_constant_scores_give_a_point_interval_and_bad_input_is_refused():
    found = interval(np.full((3, 10), 0.5))
    assert (found.mean, found.low, found.high) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        interval(np.ones((2, 1)))
    with pytest.raises(ValueError):
        interval(np.array([[1.0, np.nan]]))


def test_interval_is_the_same_on_every_call():
    values = np.random.default_rng(3).random((2, 50))
    assert interval(values) == interval(values)


def test_paired_comparison_resolves_a_small_difference_that_unpaired_spread_would_hide():
    """Image difficulty varies far more (sd 0.5) than the difference between the cells (0.05): pairing on
    images removes it, so the interval of A − B excludes zero and is narrow."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(1.0, 0.5, size=(1, 300))
    b = difficulty + rng.normal(0, 0.01, size=(2, 300))
    a = b + 0.05 + rng.normal(0, 0.01, size=(2, 300))
    result = compare(scores(a), scores(b), "CIDEr", names=("a", "b"))
    assert result.difference.mean == pytest.approx(0.05, abs=0.005)
    assert 0 < result.difference.low < 0.05 < result.difference.high < 0.1
    assert result.resolved and result.p_value < 0.001
    assert result.seeds == 2 and result.images == 300
    assert result.describe().startswith("a − b = +0.05")
    # Unpaired, the two cells' own intervals overlap almost entirely.
    assert interval(a).low < interval(b).high


def test_identical_cells_do_not_differ():
    values = np.random.default_rng(2).random((2, 40))
    result = compare(scores(values), scores(values), "CIDEr")
    assert (result.difference.low, result.difference.high) == (0.0, 0.0)
    assert not result.resolved and result.p_value == 1.0


def test_pairs_on_common_seeds_and_images_and_with_a_seedless_baseline():
    rng = np.random.default_rng(4)
    a = scores(rng.random((3, 30)))
    b = scores(rng.random((2, 30)))
    del b[1]["CIDEr"][7]  # image 7 unscored in one of b's evaluations
    result = compare(a, b, "CIDEr")
    assert (result.seeds, result.images) == (2, 29)  # seeds 0 and 1 (b has no seed 2), image 7 left out
    b[1]["CIDEr"][7] = 0.0
    assert compare(a, b, "CIDEr").images == 30
    baseline = {None: scores(rng.random((1, 30)))[0]}  # retrieval: evaluated once, no seed
    assert compare(a, baseline, "CIDEr").seeds == 3
    with pytest.raises(TipcapError, match="share no seed"):
        compare({5: a[0]}, b, "CIDEr", names=("x", "y"))
    with pytest.raises(TipcapError, match="per-image BLEU-4"):
        compare(a, b, "BLEU-4")
