"""Seed-level intervals, paired comparisons and verdicts (tipcap.evaluation.stats): known answers on
synthetic scores, recomputed independently."""

import itertools
import math

import numpy as np
import pytest
from scipy.stats import ttest_1samp

from tipcap.errors import TipcapError
from tipcap.evaluation.stats import (
    compare,
    decide,
    holm,
    holm_levels,
    interval,
    sign_flip_p,
    t_bounds,
    t_interval,
    tost_p,
)

# Student's t quantiles in closed form (not scipy's): df 1 is Cauchy's, df 2 has (2q − 1)/√(2q(1 − q)).
T975_DF1 = math.tan(math.pi * (0.975 - 0.5))
T975_DF2 = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)


def scores(matrix: np.ndarray, metric: str = "CIDEr") -> dict:
    """seed → {metric: {image id: score}} from a [S, N] matrix (seeds 0..S-1, images 0..N-1)."""
    return {seed: {metric: dict(enumerate(row.tolist()))} for seed, row in enumerate(matrix)}


def test_one_seed_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """With one seed the interval is the bootstrap over images: over 200 synthetic test sets of 60 images, it
    holds the population mean in 90-99% of them (resampling nothing gives 0%; a too-wide one 100%)."""
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(200):
        sample = rng.exponential(1.0, size=(1, 60))  # skewed, like per-image CIDEr; mean 1
        found = interval(sample, resamples=999)
        hits += found.low <= 1.0 <= found.high
        assert found.low <= found.mean <= found.high and found.over == "images" and found.seed_sd is None
    assert 0.90 * 200 <= hits <= 0.99 * 200


def test_the_interval_over_seeds_is_the_t_interval_of_the_per_seed_means():
    """Three seeds whose decoders differ by a constant offset on every image: the interval is the mean of
    the three seeds' means ± t(0.975, 2)·sd/√3, whatever the images' own spread."""
    rng = np.random.default_rng(0)
    images = rng.normal(1.0, 0.3, size=200)
    offsets = np.array([-0.2, 0.0, 0.3])
    found = interval(images[None, :] + offsets[:, None])
    means = images.mean() + offsets
    sd = math.sqrt(sum((m - means.mean()) ** 2 for m in means) / 2)
    assert found.over == "seeds" and found.seeds == 3
    assert found.mean == pytest.approx(means.mean()) and found.seed_sd == pytest.approx(sd)
    assert found.half_width == pytest.approx(T975_DF2 * sd / math.sqrt(3))
    # Seeds that agree give a point interval however spread the images are: images are not resampled.
    agreeing = interval(np.stack([images, images, images]))
    assert agreeing.low == agreeing.high == pytest.approx(images.mean())


def test_constant_scores_give_a_point_interval_and_bad_input_is_refused():
    found = interval(np.full((3, 10), 0.5))
    assert (found.mean, found.low, found.high) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        interval(np.ones((2, 1)))
    with pytest.raises(ValueError):
        interval(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError):
        t_interval(np.array([1.0]))


def test_the_one_seed_interval_is_the_percentile_bootstrap_and_the_same_on_every_call():
    """Against a percentile bootstrap drawn here (numpy's own draws, 20,000 resamples): the ends agree to
    the Monte Carlo error of 2,000 resamples (0.005 here); a 90% interval's ends would lie 0.012 inside."""
    values = np.random.default_rng(3).random((1, 50))
    found = interval(values)
    draws = np.random.default_rng(7).integers(0, 50, size=(20_000, 50))
    low, high = np.quantile(values[0][draws].mean(axis=1), [0.025, 0.975])
    assert found.mean == pytest.approx(values.mean(), abs=1e-15)
    assert (found.low, found.high) == pytest.approx((low, high), abs=0.008)
    assert interval(values) == found


def test_the_seed_level_interval_covers_the_effect_95_percent_of_the_time_at_3_and_8_seeds():
    """2,000 simulated grids: per-image scores of B are an image's difficulty plus its seed's effect plus
    noise, A's the same plus δ with a seed effect of its own, so d_s = δ + (seed effects) + (noise averaged
    over images); the seeds' spread dominates, as with a large test set. The seed-level 95% interval must
    hold δ in 93-97% of the grids at 3 and at 8 seeds (the standard error of the coverage is 0.5%). With
    z = 1.96 in place of t(0.975, 2) it would hold it in about 81% at 3 seeds, and an interval over images
    alone far less.

    Measured once by hand on the same 2,000 grids at 3 seeds, the crossed bootstrap over seeds × images that
    this replaced (999 resamples) held δ in 74% of them."""
    rng = np.random.default_rng(7)
    grids, images, delta, seed_sd, image_sd = 2000, 100, 0.05, 0.1, 0.1
    for seeds in (3, 8):
        difficulty = rng.normal(1.0, 0.5, size=(grids, 1, images))
        b = (
            difficulty
            + rng.normal(0, seed_sd, size=(grids, seeds, 1))
            + rng.normal(0, image_sd, size=(grids, seeds, images))
        )
        a = difficulty + delta + rng.normal(0, seed_sd, size=(grids, seeds, 1)) + rng.normal(
            0, image_sd, size=(grids, seeds, images))  # fmt: skip
        low, high = t_bounds((a - b).mean(axis=-1))
        coverage = np.mean((low <= delta) & (delta <= high))
        assert 0.93 <= coverage <= 0.97, (seeds, coverage)
        # The vectorised bounds are what compare reports for one grid.
        found = compare(scores(a[0]), scores(b[0]), "CIDEr", permutations=99).difference
        assert (found.low, found.high) == pytest.approx((low[0], high[0]))


def test_paired_comparison_reports_each_seeds_difference_and_their_t_interval():
    """Each seed's difference is its mean over the images of A − B (image difficulty, sd 0.5, cancels); the
    interval and the t-test are over those four differences."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(1.0, 0.5, size=(1, 300))
    b = difficulty + rng.normal(0, 0.01, size=(4, 300))
    a = b + 0.05 + rng.normal(0, 0.01, size=(4, 1)) + rng.normal(0, 0.01, size=(4, 300))
    result = compare(scores(a), scores(b), "CIDEr", names=("a", "b"))
    expected = [float(np.mean(a[s] - b[s])) for s in range(4)]
    assert result.seeds == (0, 1, 2, 3) and result.images == 300
    assert result.seed_differences == pytest.approx(expected)
    test = ttest_1samp(expected, 0.0)
    assert result.p_t == pytest.approx(test.pvalue)
    low, high = test.confidence_interval(0.95)
    assert (result.difference.low, result.difference.high) == pytest.approx((low, high))
    assert result.difference.mean == pytest.approx(0.05, abs=0.015) and result.difference.excludes_zero
    assert result.p_sign_flip is None  # 4 seeds: the smallest sign-flip p is 2/16
    text = result.describe()
    assert text.startswith("a − b (CIDEr; 4 seeds × 300 images")
    assert f"seed 0 {expected[0]:+.4f}, seed 1 {expected[1]:+.4f}" in text
    assert "smallest two-sided value is 2/2^4 = 0.125" in text and "p_images_fixed_decoders = " in text


def test_identical_cells_do_not_differ():
    values = np.random.default_rng(2).random((3, 40))
    result = compare(scores(values), scores(values), "CIDEr")
    assert (result.difference.low, result.difference.high) == (0.0, 0.0)
    assert result.p_t == 1.0 and result.p_images_fixed_decoders == 1.0
    assert decide([result])[0].verdict == "undecided"


def test_one_seed_gives_an_image_level_interval_and_no_verdict():
    rng = np.random.default_rng(5)
    b = rng.random((1, 80))
    a = b + 0.5  # a large difference, but seen on one seed only
    result = compare(scores(a), scores(b), "CIDEr")
    assert result.difference.over == "images" and result.difference.excludes_zero
    assert result.p_t is None and result.p_sign_flip is None
    (decision,) = decide([result], margin=0.05)
    assert decision.verdict == "undecided (one seed)" and decision.p_holm is None
    assert "bootstrap interval over images of one seed" in result.describe()


def test_pairs_on_common_seeds_and_images_and_with_a_seedless_baseline():
    rng = np.random.default_rng(4)
    a = scores(rng.random((3, 30)))
    b = scores(rng.random((2, 30)))
    del b[1]["CIDEr"][7]  # image 7 unscored in one of b's evaluations
    result = compare(a, b, "CIDEr")
    assert (result.seeds, result.images) == ((0, 1), 29)  # b has no seed 2; image 7 left out
    b[1]["CIDEr"][7] = 0.0
    assert compare(a, b, "CIDEr").images == 30
    baseline = {None: scores(rng.random((1, 30)))[0]}  # retrieval: evaluated once, no seed
    paired = compare(a, baseline, "CIDEr")
    assert paired.seeds == (0, 1, 2)
    expected = [np.mean([a[s]["CIDEr"][i] - baseline[None]["CIDEr"][i] for i in range(30)]) for s in range(3)]
    assert paired.seed_differences == pytest.approx(expected)
    with pytest.raises(TipcapError, match="share no seed"):
        compare({5: a[0]}, b, "CIDEr", names=("x", "y"))
    with pytest.raises(TipcapError, match="per-image BLEU-4"):
        compare(a, b, "BLEU-4")


def exact_sign_flip_p(differences: np.ndarray) -> float:
    """The share of all 2^S sign patterns whose mean is at least as far from 0 as the observed one."""
    observed = abs(differences.mean())
    patterns = list(itertools.product((1, -1), repeat=len(differences)))
    return sum(abs(np.mean(np.array(p) * differences)) >= observed * (1 - 1e-12) for p in patterns) / len(
        patterns
    )


def test_the_sign_flip_p_is_the_exact_enumeration_at_six_seeds():
    rng = np.random.default_rng(11)
    differences = rng.normal(0.2, 0.4, size=6)
    expected = exact_sign_flip_p(differences)
    assert 2 / 64 < expected < 1  # neither extreme: a sign pattern count that a bug would change
    assert sign_flip_p(differences) == pytest.approx(expected, abs=1e-12)
    assert sign_flip_p(np.array([0.1, 0.3, 0.2, 0.5, 0.4, 0.25])) == pytest.approx(2 / 64)
    # Five seeds could not reach 0.05 (2/32 = 0.0625): not reported.
    assert sign_flip_p(differences[:5]) is None
    # compare gives it from six seeds' differences.
    b = rng.random((6, 20))
    a = b + differences[:, None]
    assert compare(scores(a), scores(b), "CIDEr").p_sign_flip == pytest.approx(expected, abs=1e-12)


def test_tost_is_the_larger_one_sided_p_and_reads_the_90_percent_interval():
    differences = np.array([0.01, -0.02, 0.015, 0.0, 0.005])
    lower = ttest_1samp(differences, -0.05, alternative="greater").pvalue
    upper = ttest_1samp(differences, 0.05, alternative="less").pvalue
    assert tost_p(differences, 0.05) == pytest.approx(max(lower, upper))
    low, high = t_interval(differences, 0.90).low, t_interval(differences, 0.90).high
    for margin in (0.01, 0.05):  # the 90% interval reaches past ±0.01 but lies inside ±0.05
        inside = -margin < low and high < margin
        assert (tost_p(differences, margin) <= 0.05) == inside
    assert low < -0.01 and -0.05 < low and high < 0.05  # noqa: SIM300


def test_holm_adjusts_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Sorted: 0.005 (×4), 0.01 (×3), 0.03 (×2), 0.04 (×1), each at least the one before.
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.3, 0.9]) == pytest.approx([0.6, 0.9])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1, and never below an earlier step
    # Step levels: 0.05/4 and 0.05/3 reject; 0.03 > 0.05/2 stops Holm, and the last keeps that level.
    assert holm_levels(p) == pytest.approx([0.05 / 3, 0.05 / 2, 0.05 / 2, 0.05 / 4])


def test_a_family_reads_resolved_equivalent_and_undecided_after_holm():
    """Four comparisons over four seeds, at α = 0.05 with a margin of 0.05: one clearly resolved (A < B), one
    resolved alone but not after Holm, one equivalent within the margin, one undecided."""
    differences = {
        "clear": [-1.0, -1.1, -0.9, -1.05],
        "uncorrected": [0.10, 0.16, 0.04, 0.12],  # t = 4.2, df 3: p ≈ 0.025 < 0.05, but 3p > 0.05
        "equivalent": [0.001, -0.002, 0.0015, 0.0],
        "undecided": [0.3, -0.2, 0.1, -0.15],
    }
    rng = np.random.default_rng(3)
    comparisons = []
    for name, d in differences.items():
        b = rng.random((4, 25))
        comparisons.append(compare(scores(b + np.array(d)[:, None]), scores(b), "CIDEr", names=(name, "b"),
                                   permutations=99))  # fmt: skip
    decisions = decide(comparisons, margin=0.05, family="chain")

    p_t = [ttest_1samp(d, 0.0).pvalue for d in differences.values()]
    assert p_t[0] < p_t[1] < p_t[2] < p_t[3] and 0.02 < p_t[1] < 0.05  # the order the hand Holm assumes
    running, expected_holm = 0.0, []
    for rank, p in enumerate(p_t):
        running = max(running, min(1.0, (4 - rank) * p))
        expected_holm.append(running)
    assert [d.p_holm for d in decisions] == pytest.approx(expected_holm)
    assert expected_holm[0] <= 0.05 < expected_holm[1]
    tost = [max(ttest_1samp(d, -0.05, alternative="greater").pvalue,
                ttest_1samp(d, 0.05, alternative="less").pvalue) for d in differences.values()]  # fmt: skip
    assert [d.p_tost for d in decisions] == pytest.approx(tost)
    order = sorted(range(4), key=lambda i: tost[i])
    assert order[0] == 2 and 4 * tost[2] <= 0.05  # the equivalent one passes even at the first Holm step
    assert decisions[2].p_tost_holm == pytest.approx(4 * tost[2])

    verdicts = [d.verdict for d in decisions]
    assert verdicts == ["resolved (A < B)", "undecided", "equivalent within ±0.05", "undecided"]
    alone = decide([comparisons[1]], margin=0.05)[0]
    assert alone.verdict == "resolved (A > B)" and alone.p_holm == pytest.approx(p_t[1])
    # The adjusted intervals: the first at 1 − 0.05/4 excludes 0; Holm stops at the second step (0.05/3),
    # whose level the rest keep, so the second's adjusted interval holds 0 though its 95% one does not.
    clear = ttest_1samp(differences["clear"], 0.0).confidence_interval(1 - 0.05 / 4)
    assert (decisions[0].adjusted.low, decisions[0].adjusted.high) == pytest.approx((clear.low, clear.high))
    assert decisions[0].adjusted.high < 0
    assert [d.adjusted.confidence for d in decisions[1:]] == pytest.approx([1 - 0.05 / 3] * 3)
    assert decisions[1].adjusted.low < 0 < comparisons[1].difference.low


def test_resolved_comes_with_an_adjusted_interval_that_excludes_zero():
    """Over random families, a comparison is resolved exactly when its family-adjusted interval excludes 0."""
    rng = np.random.default_rng(9)
    for _ in range(40):
        comparisons = []
        for effect in rng.normal(0, 0.4, size=5):
            b = rng.random((3, 10))
            comparisons.append(compare(scores(b + effect + rng.normal(0, 0.1, size=(3, 1))), scores(b),
                                       "CIDEr", permutations=9))  # fmt: skip
        for decision in decide(comparisons, family="f"):
            assert decision.resolved == decision.adjusted.excludes_zero
