"""The kinds that isolate the gap's factors, CLOSE's adapter, the noise scale, and the web-pairs mixture.

Each kind's training noise is checked against its definition by sampling; the mixture estimator against
pairs with a known share of mismatched captions. Synthetic data with fixed seeds, CPU only.
"""

import pytest
import torch

from tipcap.config import CAPDEC_SIGMA2, GapConfig
from tipcap.errors import TipcapError
from tipcap.gap import (
    Gap,
    Moments,
    Pairs,
    estimate_few_pairs,
    estimate_web_pairs,
    estimate_web_pairs_mixture,
    fit_cosine_mixture,
    noise_covariance,
)
from tipcap.gap.report import gap_report
from tipcap.gap.shape import effective_rank

F64 = torch.float64
D = 12


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spiked_covariance(dim: int, seed: int) -> torch.Tensor:
    """An anisotropic, correlated Σ ``[dim, dim]``: three strong directions over a small floor."""
    a = torch.randn(dim, 3, generator=generator(seed), dtype=F64)
    return 0.01 * a @ a.T + 1e-3 * torch.eye(dim, dtype=F64)


def rel_frobenius(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(estimate - truth) / torch.linalg.matrix_norm(truth))


# Each kind's definition, written out independently of tipcap.gap.fit.noise_covariance.
def defined_noise(kind: str, sigma: torch.Tensor) -> torch.Tensor:
    identity = torch.eye(len(sigma), dtype=F64)
    return {
        "isotropic": CAPDEC_SIGMA2 * identity,
        "mean-shift-isotropic": CAPDEC_SIGMA2 * identity,
        "capdec-offset": CAPDEC_SIGMA2 * identity,
        "mean-isotropic-matched": float(sigma.trace()) / len(sigma) * identity,
        "diagonal": torch.diag(sigma.diagonal()),
        "gaussian": sigma,
        "cov-noise": sigma,
        "close": 9 * sigma + 0.12**2 * identity,
    }[kind]


NOISE_KINDS = [
    "isotropic",
    "mean-shift-isotropic",
    "capdec-offset",
    "mean-isotropic-matched",
    "diagonal",
    "gaussian",
    "close",
    "cov-noise",
]


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_noise_covariance_is_each_kinds_definition(kind):
    sigma = spiked_covariance(D, seed=1)
    assert torch.allclose(noise_covariance(kind, sigma, CAPDEC_SIGMA2), defined_noise(kind, sigma))
    if kind == "mean-isotropic-matched":  # the same total variance as Σ, with no shape
        matched = noise_covariance(kind, sigma, CAPDEC_SIGMA2)
        assert float(matched.trace()) == pytest.approx(float(sigma.trace()))
        assert effective_rank(torch.linalg.eigvalsh(matched)) == pytest.approx(D)
    for kind_without_noise in ("none", "mean-shift", "memory"):
        assert not noise_covariance(kind_without_noise, sigma, CAPDEC_SIGMA2).any()


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_sampled_training_noise_has_the_kinds_mean_and_covariance(kind):
    """sample(t) − t over many rows: mean μ for the image-side kinds (close, cov-noise, capdec-offset), 0
    for the others, and covariance the kind's definition; to_text(v) subtracts μ exactly for the text-side
    kinds."""
    n = 200_000
    sigma = spiked_covariance(D, seed=2)
    mu = 0.2 * torch.randn(D, generator=generator(3), dtype=F64)
    noise = defined_noise(kind, sigma)
    gap = Gap(kind, mu, torch.linalg.cholesky(noise), renorm=False)
    t = torch.nn.functional.normalize(torch.randn(n, D, generator=generator(4)), dim=-1)
    drawn = (gap.sample(t, generator=generator(5)) - t).double()
    image_side = kind in ("close", "cov-noise", "capdec-offset")
    expected_mean = mu if image_side else torch.zeros(D, dtype=F64)
    standard_error = (noise.diagonal() / n).sqrt()
    assert bool(((drawn.mean(0) - expected_mean).abs() < 5 * standard_error).all())
    assert rel_frobenius(torch.cov(drawn.T, correction=0), noise) < 0.02
    v = torch.randn(4, D, generator=generator(6))
    expected = v if kind in ("isotropic", "close", "cov-noise", "capdec-offset") else v - mu.float()
    assert torch.allclose(gap.to_text(v), expected, atol=1e-6)


def test_gap_report_states_the_noise_used():
    sigma = spiked_covariance(D, seed=7)
    mu = 0.3 * torch.ones(D, dtype=F64)
    diagonal = Gap("diagonal", mu, torch.linalg.cholesky(torch.diag(sigma.diagonal())))
    report = gap_report(diagonal)
    eigenvalues = sigma.diagonal()
    assert report["mu_norm"] == pytest.approx(float(mu.norm()), rel=1e-6)
    assert report["sigma_trace"] == pytest.approx(float(eigenvalues.sum()), rel=1e-5)
    participation = float(eigenvalues.sum()) ** 2 / float((eigenvalues**2).sum())
    assert report["effective_rank"] == pytest.approx(participation, rel=1e-4)
    # mean-shift adds no noise, whatever factor an older file stored.
    shift = gap_report(Gap("mean-shift", mu, torch.linalg.cholesky(sigma)))
    assert shift["sigma_trace"] == 0 and shift["effective_rank"] == 0


def test_effective_rank_is_the_participation_ratio():
    assert effective_rank(torch.ones(10)) == pytest.approx(10)
    assert effective_rank(torch.tensor([1.0, 1.0, 0.0, 0.0])) == pytest.approx(2)
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(16 / 10)
    assert effective_rank(torch.zeros(5)) == 0


# --- weighted moments ------------------------------------------------------------------------------------


def test_weighted_moments_reduce_to_the_unweighted_ones():
    x = torch.randn(500, D, generator=generator(8), dtype=F64)
    keep = torch.rand(500, generator=generator(9)) < 0.6
    plain = Moments(D).update(x[keep])
    zero_one = Moments(D).update(x[:250], keep[:250].double()).update(x[250:], keep[250:].double())
    ones = Moments(D).update(x, torch.ones(500, dtype=F64))
    assert torch.allclose(zero_one.mean, plain.mean, rtol=0, atol=1e-12)
    for shrink in (False, True):
        a, b = zero_one.covariance(shrink), plain.covariance(shrink)
        assert torch.allclose(a.matrix, b.matrix, rtol=0, atol=1e-12)
        assert torch.allclose(ones.covariance(shrink).matrix, Moments(D).update(x).covariance(shrink).matrix)
    assert zero_one.weight == pytest.approx(float(keep.sum()))


def test_weighted_moments_are_the_weighted_mean_and_covariance():
    x = torch.randn(300, 4, generator=generator(10), dtype=F64)
    w = torch.rand(300, generator=generator(11), dtype=F64)
    moments = Moments(4).update(x, w)
    mean = (w[:, None] * x).sum(0) / w.sum()
    centred = x - mean
    covariance = (w[:, None] * centred).T @ centred / w.sum()
    assert torch.allclose(moments.mean, mean) and torch.allclose(moments.covariance(False).matrix, covariance)
    with pytest.raises(ValueError, match="weights"):
        Moments(4).update(x, w[:10])


# --- the web-pairs mixture ------------------------------------------------------------------------------


def clip_like_pairs(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions t sharing a common direction and images v = normalise(t + δ), δ ~ N(μ, Σ) anisotropic."""
    g = generator(seed)
    common = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    t = torch.nn.functional.normalize(common + torch.randn(n, dim, generator=g) / dim**0.5, dim=-1)
    mu = 0.8 * torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    a = torch.randn(dim, 4, generator=g)
    delta = mu + torch.randn(n, 4, generator=g) @ (0.05 * a.T) + 0.01 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(t + delta, dim=-1), t


def contaminate(t: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    g = generator(seed)
    rows = torch.randperm(len(t), generator=g)[: round(share * len(t))]
    out = t.clone()
    out[rows] = t[(rows + torch.randint(1, len(t), (len(rows),), generator=g)) % len(t)]
    return out


@pytest.mark.parametrize("share", [0.0, 0.2, 0.4])
def test_mixture_recovers_the_clean_estimate_and_the_mismatched_share(share):
    v, t = clip_like_pairs(12_000, 32, seed=12)
    clean = estimate_few_pairs(Pairs.of_tensors(v, t), shrink=False)
    pairs = Pairs.of_tensors(v, contaminate(t, share, seed=13))
    mixture = estimate_web_pairs_mixture(pairs, shrink=False)
    trimmed = estimate_web_pairs(pairs, drop_quantile=0.1, shrink=False)
    assert mixture.details["mismatched_fraction"] == pytest.approx(share, abs=0.04)
    error = rel_frobenius(mixture.covariance, clean.covariance)
    assert error < 0.1, error
    assert error < 0.7 * rel_frobenius(trimmed.covariance, clean.covariance)
    if share > 0:
        all_pairs = estimate_few_pairs(pairs, shrink=False)
        assert error < 0.3 * rel_frobenius(all_pairs.covariance, clean.covariance)
        assert torch.allclose(mixture.mu, all_pairs.mu)  # the mean of all pairs: unbiased
    assert float((mixture.mu - clean.mu).norm() / clean.mu.norm()) < 0.01
    assert mixture.pairs_used + mixture.pairs_discarded == len(pairs)
    # Streaming: the chunking changes nothing but rounding (the null's permutation is drawn per chunk).
    chunked = estimate_web_pairs_mixture(pairs, shrink=False, chunk=5_000)
    assert chunked.details["mismatched_fraction"] == pytest.approx(
        mixture.details["mismatched_fraction"], abs=0.01
    )


def test_mixture_takes_indistinguishable_pairs_as_clean():
    """Images unrelated to their captions look like the null: no component to separate, π = 0."""
    g = generator(14)
    v = torch.nn.functional.normalize(torch.randn(3000, 16, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(3000, 16, generator=g), dim=-1)
    mixture = fit_cosine_mixture(Pairs.of_tensors(v, t))
    assert mixture.mismatched == 0
    assert torch.equal(mixture.matched_probability(torch.linspace(-1, 1, 5)), torch.ones(5, dtype=F64))


def test_gap_config_selects_the_web_estimator():
    assert GapConfig().web_estimator == "mixture"
    with pytest.raises(TipcapError, match="web_estimator"):
        from tipcap.config import from_dict

        from_dict(GapConfig, {"web_estimator": "median"}, "gap")
