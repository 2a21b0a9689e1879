"""The modality gap package: estimators per setting, the Gap model and its kinds, fitting from stores.

Synthetic float64 data with fixed seeds and known μ, Σ; everything offline and on the CPU.
"""

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.distributions import MultivariateNormal, kl_divergence

from tipcap import provenance
from tipcap.config import GapConfig
from tipcap.errors import TipcapError
from tipcap.gap import (
    CAPDEC_SIGMA2,
    GAP_KINDS,
    SETTINGS,
    Gap,
    Moments,
    Pairs,
    TensorRows,
    cholesky,
    estimate_few_pairs,
    estimate_gap,
    estimate_text_only,
    estimate_unpaired,
    estimate_web_pairs,
    fit_gap,
    format_report,
    gap_report,
    join_pairs,
    mutual_nearest_neighbours,
    noise_covariance,
    plot_gap,
)
from tipcap.gap.fit import random_rotation
from tipcap.gap.model import TRAIN_NOISE_KINDS
from tipcap.store import Shard, build_store

D = 64
F64 = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def correlated_covariance(dim: int, rank: int, scale: float, ridge: float, seed: int) -> torch.Tensor:
    """Σ = scale·AAᵀ/rank + ridge·I with A ``[dim, rank]`` Gaussian: strong off-diagonal structure."""
    a = torch.randn(dim, rank, generator=generator(seed), dtype=F64)
    return scale * a @ a.T / rank + ridge * torch.eye(dim, dtype=F64)


def rel_frobenius(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(estimate - truth) / torch.linalg.matrix_norm(truth))


def off_diagonal_share(matrix: torch.Tensor) -> float:
    off = matrix - torch.diag(torch.diagonal(matrix))
    return float(torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(matrix))


def gaussian_rows(n: int, mu: torch.Tensor, covariance: torch.Tensor, seed: int) -> torch.Tensor:
    z = torch.randn(n, len(mu), generator=generator(seed), dtype=F64)
    return mu + z @ torch.linalg.cholesky(covariance).T


def unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    return normalize(torch.randn(n, dim, generator=generator(seed), dtype=F64))


def assert_positive_definite(matrix: torch.Tensor) -> None:
    assert torch.isfinite(matrix).all()
    assert torch.equal(matrix, matrix.T)
    assert float(torch.linalg.eigvalsh(matrix).min()) > 0
    torch.linalg.cholesky(matrix)  # raises when not PD


# --- 1. few-pairs estimator converges -----------------------------------------------------------------


def test_few_pairs_estimate_converges_to_known_mu_and_correlated_sigma():
    sigma = correlated_covariance(D, rank=16, scale=0.01, ridge=1e-3, seed=1)
    assert off_diagonal_share(sigma) > 0.5  # the test data really is correlated
    mu = 0.1 * torch.randn(D, generator=generator(2), dtype=F64)
    errors = []
    for n in (500, 2000, 20_000):
        t = unit_rows(n, D, seed=10 + n)
        v = t + gaussian_rows(n, mu, sigma, seed=20 + n)
        fitted = estimate_few_pairs(Pairs.of_tensors(v, t))
        errors.append(rel_frobenius(fitted.covariance, sigma))
        assert fitted.setting == "few-pairs" and fitted.pairs_used == n and fitted.pairs_discarded == 0
        assert fitted.shrinkage == pytest.approx(ledoit_wolf_reference((v - t).numpy())[1], rel=1e-9)
        # ‖μ̂ − μ‖ is of the order of sqrt(tr Σ / n).
        assert float((fitted.mu - mu).norm()) < 4 * (float(torch.trace(sigma)) / n) ** 0.5
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.1, errors


def test_few_pairs_chunking_and_shrink_flag():
    sigma = correlated_covariance(D, rank=8, scale=0.01, ridge=1e-3, seed=3)
    t = unit_rows(1000, D, seed=4)
    v = t + gaussian_rows(1000, torch.zeros(D, dtype=F64), sigma, seed=5)
    pairs = Pairs.of_tensors(v, t)
    whole = estimate_few_pairs(pairs)
    chunked = estimate_few_pairs(pairs, chunk=37)
    assert torch.allclose(chunked.mu, whole.mu, rtol=0, atol=1e-14)
    assert torch.allclose(chunked.covariance, whole.covariance, rtol=0, atol=1e-14)
    raw = estimate_few_pairs(pairs, shrink=False)
    delta = (v - t).numpy()
    assert not raw.shrinkage  # not shrunk (None, or 0)
    np.testing.assert_allclose(raw.covariance.numpy(), np.cov(delta, rowvar=False, bias=True), atol=1e-14)
    empty = Pairs.of_tensors(v[:0], t[:0])
    with pytest.raises(TipcapError):
        estimate_few_pairs(empty)


# --- 2. sampling and mapping of each kind -------------------------------------------------------------


def test_gaussian_sample_noise_has_mean_zero_and_covariance_sigma():
    d, n = 16, 200_000
    sigma = correlated_covariance(d, rank=4, scale=0.02, ridge=2e-3, seed=6)
    scale_tril = torch.linalg.cholesky(sigma)
    mu = 0.3 * torch.randn(d, generator=generator(7), dtype=F64)
    gap = Gap("gaussian", mu, scale_tril, renorm=False)
    t = unit_rows(n, d, seed=8).float()
    noise = (gap.sample(t, generator=generator(9)) - t).double()
    sigma32 = gap.covariance.double()  # Σ as the float32 module holds it
    assert rel_frobenius(sigma32, sigma) < 1e-6
    standard_error = (torch.diagonal(sigma) / n).sqrt()
    assert bool((noise.mean(0).abs() < 5 * standard_error).all())  # no μ added at training
    empirical = torch.cov(noise.T, correction=0)
    assert rel_frobenius(empirical, sigma) < 0.05
    assert off_diagonal_share(empirical) > 0.5

    unit = Gap("gaussian", mu, scale_tril, renorm=True).sample(t[:100], generator=generator(9))
    assert torch.allclose(unit.norm(dim=-1), torch.ones(100), atol=1e-6)


def test_cov_noise_adds_mu_at_training():
    d, n = 16, 100_000
    sigma = correlated_covariance(d, rank=4, scale=0.02, ridge=2e-3, seed=10)
    mu = 0.3 * torch.randn(d, generator=generator(11), dtype=F64)
    gap = Gap("cov-noise", mu, torch.linalg.cholesky(sigma), renorm=False)
    t = unit_rows(n, d, seed=12).float()
    shift = (gap.sample(t, generator=generator(13)) - t).double()
    assert bool(((shift.mean(0) - mu).abs() < 5 * (torch.diagonal(sigma) / n).sqrt()).all())
    assert rel_frobenius(torch.cov(shift.T, correction=0), sigma) < 0.05


@pytest.mark.parametrize("renorm", [False, True])
def test_each_kind_maps_text_and_image_sides_as_documented(renorm):
    d = 16
    mu = 0.3 * torch.randn(d, generator=generator(14))
    scale_tril = torch.linalg.cholesky(correlated_covariance(d, 4, 0.02, 2e-3, seed=15)).float()
    t = unit_rows(8, d, seed=16).float()
    v = unit_rows(8, d, seed=17).float()
    out = normalize if renorm else (lambda x: x)
    memory = unit_rows(10, d, seed=18)
    image_side = ("cov-noise", "close", "capdec-offset")
    text_side = ("mean-shift", "mean-shift-isotropic", "mean-isotropic-matched", "norm-matched", "diagonal",
                 "rotated", "gaussian")  # fmt: skip
    expected_to_text = {"none": v, "isotropic": v} | {kind: v for kind in image_side}
    expected_to_text |= {kind: v - mu for kind in text_side}
    expected_text_side = {kind: t for kind in expected_to_text} | {kind: t + mu for kind in image_side}
    expected_text_side["memory"] = t
    for kind in GAP_KINDS:
        gap = Gap(kind, mu, scale_tril, renorm=renorm, memory=memory if kind == "memory" else None)
        if kind in expected_to_text:
            assert torch.allclose(gap.to_text(v), out(expected_to_text[kind]), atol=1e-6), kind
        assert torch.allclose(gap.text_side(t), out(expected_text_side[kind]), atol=1e-6), kind
        sampled = gap.sample(t, generator=generator(19))
        if kind in ("none", "mean-shift", "memory"):  # no training noise
            assert torch.allclose(sampled, out(t), atol=1e-6), kind
        else:
            assert not torch.allclose(sampled, out(expected_text_side[kind]), atol=1e-3), kind
        if renorm:
            assert torch.allclose(sampled.norm(dim=-1), torch.ones(len(t)), atol=1e-5), kind
            assert torch.allclose(gap.to_text(v).norm(dim=-1), torch.ones(len(v)), atol=1e-5), kind


@pytest.mark.parametrize("kind", sorted(TRAIN_NOISE_KINDS))
def test_sample_is_reproducible_with_a_seed_and_fresh_per_row(kind):
    d = 16
    gap = Gap(kind, torch.zeros(d), 0.1 * torch.eye(d), renorm=False)
    t = unit_rows(1, d, seed=20).float().expand(6, d)  # six identical rows
    first = gap.sample(t, generator=generator(21))
    again = gap.sample(t, generator=generator(21))
    other = gap.sample(t, generator=generator(22))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    differences = torch.cdist(first, first)
    assert float(differences[~torch.eye(6, dtype=torch.bool)].min()) > 1e-3  # every row got its own noise


def test_gap_constructor_rejects_bad_arguments():
    d = 8
    with pytest.raises(TipcapError, match="kind"):
        Gap("bogus", torch.zeros(d), torch.eye(d))
    with pytest.raises(TipcapError, match="memory"):
        Gap("memory", torch.zeros(d), torch.eye(d))
    with pytest.raises(TipcapError, match="memory"):
        Gap("memory", torch.zeros(d), torch.eye(d), memory=torch.randn(5, d + 1))
    with pytest.raises(TipcapError, match="positive diagonal"):
        Gap("gaussian", torch.zeros(d), torch.zeros(d, d), learnable=True)
    with pytest.raises(ValueError):
        Gap("gaussian", torch.zeros(d), torch.eye(d + 1))


# --- 3. KL divergence and the learnable gap -----------------------------------------------------------


def random_scale_tril(d: int, seed: int) -> torch.Tensor:
    g = generator(seed)
    lower = torch.tril(0.3 * torch.randn(d, d, generator=g, dtype=F64), -1)
    return lower + torch.diag(0.5 + torch.rand(d, generator=g, dtype=F64))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_kl_to_matches_torch_distributions(seed):
    d = 6 + 2 * seed
    g = generator(100 + seed)
    mu, mu0 = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    scale_tril, prior_scale_tril = random_scale_tril(d, 200 + seed), random_scale_tril(d, 300 + seed)
    gap = Gap("gaussian", mu, scale_tril)
    value = gap.kl_to(mu0, prior_scale_tril)
    assert value.dtype == torch.float32  # the module works in float32
    # The reference on the same float32-rounded parameters, computed in float64.
    reference = kl_divergence(
        MultivariateNormal(mu.float().double(), scale_tril=scale_tril.float().double()),
        MultivariateNormal(mu0, scale_tril=prior_scale_tril.float().double()),
    )
    assert float(reference) > 0.5
    assert float(value) == pytest.approx(float(reference), rel=1e-5)
    assert float(gap.kl_to(gap.mu, gap.scale_tril)) == pytest.approx(0.0, abs=1e-5)


def test_learnable_gap_gradients_prior_and_positive_diagonal():
    d = 8
    mu, scale_tril = 0.1 * torch.randn(d, generator=generator(30)), random_scale_tril(d, 31).float()
    gap = Gap("gaussian", mu, scale_tril, learnable=True)
    names = {name for name, _ in gap.named_parameters()}
    assert names == {"mu", "tril_offdiag", "log_diag"}
    assert torch.allclose(gap.scale_tril, scale_tril, atol=1e-6)
    assert float(gap.kl_to_prior().detach()) == pytest.approx(0.0, abs=1e-5)

    gap.kl_to(torch.zeros(d), 0.7 * torch.eye(d)).backward()
    for parameter in (gap.mu, gap.tril_offdiag, gap.log_diag):
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0
    # Only the strictly lower part of tril_offdiag is used.
    assert float(torch.triu(gap.tril_offdiag.grad).abs().sum()) == 0

    # Training noise is differentiable in L.
    gap.zero_grad()
    t = unit_rows(4, d, seed=32).float()
    (gap.sample(t, generator=generator(33)) ** 2).sum().backward()
    assert float(gap.log_diag.grad.abs().sum()) > 0 and float(gap.tril_offdiag.grad.abs().sum()) > 0

    with torch.no_grad():
        gap.mu.add_(0.05)
        gap.log_diag.sub_(0.2)
        gap.tril_offdiag.add_(0.05 * torch.tril(torch.ones(d, d), -1))
    assert float(gap.kl_to_prior().detach()) > 1e-3

    optimizer = torch.optim.SGD(gap.parameters(), lr=2.0)
    start = torch.diagonal(gap.scale_tril).detach().clone()
    for _ in range(5):  # push the diagonal of L down hard (a step on L itself would cross zero)
        optimizer.zero_grad()
        torch.diagonal(gap.scale_tril).sum().backward()
        optimizer.step()
    diagonal = torch.diagonal(gap.scale_tril).detach()
    assert bool((diagonal > 0).all())
    assert bool((diagonal < 0.5 * start).all())
    assert torch.isfinite(gap.kl_to_prior().detach())


def test_kl_to_prior_needs_a_learnable_gap():
    with pytest.raises(ValueError):
        Gap("gaussian", torch.zeros(4), torch.eye(4)).kl_to_prior()


# --- 4. streaming moments and Ledoit–Wolf -------------------------------------------------------------


def ledoit_wolf_reference(x: np.ndarray) -> tuple[np.ndarray, float]:
    n, d = x.shape
    centred = x - x.mean(axis=0)
    s = centred.T @ centred / n
    m = np.trace(s) / d
    delta2 = ((s - m * np.eye(d)) ** 2).sum() / d
    spread = sum(((np.outer(row, row) - s) ** 2).sum() for row in centred) / (n * n * d)
    beta2 = min(delta2, spread)
    shrinkage = beta2 / delta2
    return (1 - shrinkage) * s + shrinkage * m * np.eye(d), shrinkage


@pytest.mark.parametrize(("n", "d"), [(600, 32), (20, 48)])
def test_streaming_moments_equal_one_shot_and_the_reference(n, d):
    sigma = correlated_covariance(d, rank=6, scale=0.05, ridge=1e-3, seed=40)
    x = gaussian_rows(n, torch.linspace(-0.5, 0.5, d, dtype=F64), sigma, seed=41)
    whole = Moments(d).update(x)
    whole_cov = whole.covariance()
    assert 0 < whole_cov.shrinkage < 1 and whole_cov.count == n
    for size in (1, 7, 100):
        streamed = Moments(d)
        for chunk in x.split(size):
            streamed.update(chunk)
        streamed_cov = streamed.covariance()
        assert streamed.count == n
        assert torch.allclose(streamed.mean, whole.mean, rtol=0, atol=1e-12)
        assert torch.allclose(streamed_cov.matrix, whole_cov.matrix, rtol=0, atol=1e-12)
        assert streamed_cov.shrinkage == pytest.approx(whole_cov.shrinkage, abs=1e-12)

    reference, reference_shrinkage = ledoit_wolf_reference(x.numpy())
    assert whole_cov.shrinkage == pytest.approx(reference_shrinkage, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(whole_cov.matrix.numpy(), reference, rtol=0, atol=1e-12)
    np.testing.assert_allclose(whole.mean.numpy(), x.numpy().mean(axis=0), rtol=0, atol=1e-14)
    raw = whole.covariance(shrink=False)
    assert not raw.shrinkage  # not shrunk (None, or 0)
    np.testing.assert_allclose(raw.matrix.numpy(), np.cov(x.numpy(), rowvar=False, bias=True), atol=1e-12)


def test_moments_accepts_float32_and_rejects_wrong_width():
    x = torch.randn(50, 8, generator=generator(42))
    moments = Moments(8).update(x)
    assert moments.mean.dtype == F64
    assert torch.allclose(moments.mean, x.double().mean(0), atol=1e-12)
    with pytest.raises(ValueError):
        moments.update(torch.randn(3, 9))
    with pytest.raises(ValueError):
        _ = Moments(8).mean


# --- 5. unpaired: μ from means, Σ from mutual nearest neighbours ---------------------------------------


@pytest.fixture(scope="module")
def unpaired_data():
    n = 2000
    t = unit_rows(n, D, seed=50)
    mu = 0.5 * normalize(torch.randn(D, generator=generator(51), dtype=F64))
    sigma = correlated_covariance(D, rank=8, scale=8e-4, ridge=1e-5, seed=52)  # tr Σ ≈ 0.05
    v = t + mu + gaussian_rows(n, torch.zeros(D, dtype=F64), sigma, seed=53)
    permutation = torch.randperm(n, generator=generator(54))
    return {"t": t, "v_shuffled": v[permutation], "permutation": permutation, "mu": mu, "sigma": sigma}


def test_unpaired_estimate(unpaired_data):
    t, v, sigma = unpaired_data["t"], unpaired_data["v_shuffled"], unpaired_data["sigma"]
    fitted = estimate_unpaired(TensorRows(v), TensorRows(t))
    assert fitted.setting == "unpaired"
    assert torch.allclose(fitted.mu, v.mean(0) - t.mean(0), rtol=0, atol=1e-12)
    assert float((fitted.mu - unpaired_data["mu"]).norm()) < 4 * (float(torch.trace(sigma)) / len(t)) ** 0.5
    assert rel_frobenius(fitted.covariance, sigma) < 0.2
    assert fitted.pairs_used + fitted.pairs_discarded == len(v)
    assert fitted.pairs_used > 0.95 * len(v)
    assert fitted.details == {"images": len(v), "texts": len(t)}


def test_mutual_nearest_neighbours_recover_the_permutation_and_ignore_chunking(unpaired_data):
    t, v, permutation = unpaired_data["t"], unpaired_data["v_shuffled"], unpaired_data["permutation"]
    mu = v.mean(0) - t.mean(0)
    image_index, text_index = mutual_nearest_neighbours(TensorRows(v), TensorRows(t), mu)
    assert image_index.dtype == torch.long and len(image_index) == len(text_index) > 0.95 * len(v)
    assert len(set(image_index.tolist())) == len(image_index)
    assert len(set(text_index.tolist())) == len(text_index)
    correct = (permutation[image_index] == text_index).double().mean()
    assert float(correct) >= 0.99
    # Tiny blocks (on a subset of the images, for time) give exactly the same pairs.
    subset = TensorRows(v[:600])
    whole = mutual_nearest_neighbours(subset, TensorRows(t), mu)
    chunked = mutual_nearest_neighbours(subset, TensorRows(t), mu, image_chunk=7, text_chunk=13)
    assert len(whole[0]) > 500
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])


def test_mutual_nearest_neighbours_with_more_texts_than_images():
    # Each image has its own text plus unrelated extra texts; the pairs still point at the right text.
    t = unit_rows(300, D, seed=55)
    v = t[:100] + 0.01 * torch.randn(100, D, generator=generator(56), dtype=F64)
    image_index, text_index = mutual_nearest_neighbours(
        TensorRows(v), TensorRows(t), torch.zeros(D, dtype=F64), image_chunk=9, text_chunk=17
    )
    assert torch.equal(image_index, torch.arange(100)) and torch.equal(text_index, torch.arange(100))


# --- 6. few pairs in high dimension -------------------------------------------------------------------


def test_fewer_pairs_than_dimensions_still_give_a_positive_definite_sigma():
    d = 512
    sigma = correlated_covariance(d, rank=32, scale=0.02, ridge=1e-4, seed=60)
    t = unit_rows(50, d, seed=61)
    v = t + gaussian_rows(50, torch.zeros(d, dtype=F64), sigma, seed=62)
    fitted = estimate_few_pairs(Pairs.of_tensors(v, t))
    assert_positive_definite(fitted.covariance)
    assert fitted.shrinkage == pytest.approx(ledoit_wolf_reference((v - t).numpy())[1], rel=1e-9)
    factor = cholesky(fitted.covariance)
    assert torch.allclose(factor @ factor.T, fitted.covariance, atol=1e-12)

    single = estimate_few_pairs(Pairs.of_tensors(v[:1], t[:1]))
    assert torch.isfinite(single.mu).all() and torch.isfinite(single.covariance).all()
    assert torch.allclose(single.mu, (v[0] - t[0]), atol=1e-15)
    factor = cholesky(single.covariance)
    assert torch.isfinite(factor).all()
    assert bool((torch.diagonal(factor) > 0).all())
    assert torch.equal(factor, torch.tril(factor))


def test_cholesky_adds_jitter_to_singular_matrices_only():
    a = torch.randn(16, 4, generator=generator(63), dtype=F64)
    singular = a @ a.T  # rank 4
    factor = cholesky(singular)
    assert torch.isfinite(factor).all() and bool((torch.diagonal(factor) > 0).all())
    assert torch.allclose(factor @ factor.T, singular, atol=1e-6)
    spd = singular + torch.eye(16, dtype=F64)
    assert torch.allclose(cholesky(spd), torch.linalg.cholesky(spd), rtol=0, atol=1e-12)  # no jitter
    assert torch.isfinite(cholesky(torch.zeros(16, 16, dtype=F64))).all()


# --- 7. web pairs: dropping the least similar pairs -----------------------------------------------------


def test_web_pairs_discard_mismatched_pairs():
    n = 10_000
    sigma = correlated_covariance(D, rank=8, scale=5e-4, ridge=1e-5, seed=70)  # tr Σ ≈ 0.03
    mu = 0.8 * normalize(torch.randn(D, generator=generator(71), dtype=F64))
    t = unit_rows(n, D, seed=72)
    v = t + gaussian_rows(n, mu, sigma, seed=73)
    clean = estimate_few_pairs(Pairs.of_tensors(v, t))
    g = generator(74)
    mismatched = torch.randperm(n, generator=g)[: n // 5]
    noisy_v = v.clone()
    noisy_v[mismatched] = v[mismatched[torch.randperm(len(mismatched), generator=g)]]
    noisy_pairs = Pairs.of_tensors(noisy_v, t)
    noisy = estimate_few_pairs(noisy_pairs)
    web = estimate_web_pairs(noisy_pairs, drop_quantile=0.25)
    web_error = rel_frobenius(web.covariance, clean.covariance)
    noisy_error = rel_frobenius(noisy.covariance, clean.covariance)
    assert web_error < 0.5 * noisy_error, (web_error, noisy_error)
    assert web_error < 0.1
    assert float((web.mu - clean.mu).norm()) < 0.01
    assert web.setting == "web-pairs"
    assert web.pairs_used + web.pairs_discarded == n
    assert abs(web.pairs_discarded - 0.25 * n) <= 0.01 * n
    assert web.details["drop_quantile"] == 0.25
    # The quantile of cos(v, t) itself, to the resolution of the histogram that streams it (2 / 20000).
    cosines = torch.nn.functional.cosine_similarity(noisy_v, t, dim=-1).numpy()
    assert web.details["similarity_threshold"] == pytest.approx(np.quantile(cosines, 0.25), abs=2e-4)

    kept_all = estimate_web_pairs(noisy_pairs, drop_quantile=0.0)
    assert kept_all.pairs_discarded == 0 and kept_all.pairs_used == n
    assert torch.allclose(kept_all.covariance, noisy.covariance, rtol=0, atol=1e-14)
    chunked = estimate_web_pairs(noisy_pairs, drop_quantile=0.25, chunk=999)
    assert chunked.pairs_used == web.pairs_used
    assert torch.allclose(chunked.covariance, web.covariance, rtol=0, atol=1e-13)


@pytest.mark.parametrize("quantile", [-0.1, 1.0, 1.5])
def test_web_pairs_drop_quantile_outside_unit_interval_is_an_error(quantile):
    t = unit_rows(20, 8, seed=75)
    with pytest.raises(TipcapError, match="drop-quantile"):
        estimate_web_pairs(Pairs.of_tensors(t, t), drop_quantile=quantile)


# --- 8. text only ---------------------------------------------------------------------------------------


def test_text_only_estimate():
    fitted = estimate_text_only(D)
    assert fitted.setting == "text-only"
    assert torch.equal(fitted.mu, torch.zeros(D, dtype=F64))
    assert torch.equal(fitted.covariance, 0.016 * torch.eye(D, dtype=F64))
    assert CAPDEC_SIGMA2 == 0.016
    assert fitted.info()["mu_imported"] is False
    mu = torch.randn(D, generator=generator(80))
    imported = estimate_text_only(D, mu=mu)
    assert torch.equal(imported.mu, mu.double()) and imported.info()["mu_imported"] is True
    assert torch.equal(estimate_text_only(D, sigma2=0.5).covariance, 0.5 * torch.eye(D, dtype=F64))
    with pytest.raises(TipcapError, match="sigma2"):
        estimate_text_only(D, sigma2=0.0)


# --- 9. saving and loading ------------------------------------------------------------------------------

CLIP_A = {"model": "ViT-B-32", "pretrained": "openai"}
CLIP_B = {"model": "ViT-L-14", "pretrained": "laion2b"}


def assert_same_gap(loaded: Gap, gap: Gap) -> None:
    assert loaded.kind == gap.kind and loaded.renorm == gap.renorm and loaded.learnable == gap.learnable
    assert loaded.clip == gap.clip and loaded.info == gap.info and loaded.tau == gap.tau
    assert torch.equal(loaded.mu.detach(), gap.mu.detach())
    assert torch.allclose(loaded.scale_tril.detach(), gap.scale_tril.detach(), rtol=1e-6, atol=0)
    if gap.memory is None:
        assert loaded.memory is None
    else:
        assert torch.equal(loaded.memory, gap.memory)


@pytest.mark.parametrize("case", ["gaussian", "gaussian-learnable", "memory", "isotropic", "mean-shift"])
def test_save_load_round_trip(tmp_path, case):
    d = 16
    mu = 0.2 * torch.randn(d, generator=generator(90))
    scale_tril = random_scale_tril(d, 91).float() * 0.1
    info = {"setting": "few-pairs", "pairs_used": 123, "shrinkage": 0.25}
    kind = case.removesuffix("-learnable")
    memory = unit_rows(37, d, seed=92).float() if kind == "memory" else None
    gap = Gap(
        kind, mu, scale_tril, renorm=kind != "isotropic", clip=CLIP_A, memory=memory, tau=0.05,
        learnable=case.endswith("learnable"), info=info,
    )  # fmt: skip
    if gap.learnable:  # trained away from its prior: both are kept
        with torch.no_grad():
            gap.mu.add_(0.1)
            gap.log_diag.add_(0.3)
    path = tmp_path / "sub" / "gap.safetensors"
    gap.save(path)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = Gap.load(path)
    assert_same_gap(loaded, gap)
    v = unit_rows(5, d, seed=93).float()
    assert torch.allclose(loaded.to_text(v), gap.to_text(v), atol=1e-6)
    t = unit_rows(5, d, seed=94).float()
    assert torch.allclose(
        loaded.sample(t, generator=generator(95)), gap.sample(t, generator=generator(95)), atol=1e-5
    )
    if gap.learnable:
        assert torch.equal(loaded.prior_mu, gap.prior_mu)
        assert torch.equal(loaded.prior_scale_tril, gap.prior_scale_tril)
        assert float(loaded.kl_to_prior().detach()) == pytest.approx(
            float(gap.kl_to_prior().detach()), rel=1e-4
        )
        assert float(loaded.kl_to_prior().detach()) > 0


def test_load_rejects_files_that_are_not_gaps(tmp_path):
    with pytest.raises(TipcapError, match="no such gap file"):
        Gap.load(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"mu": torch.zeros(4), "scale_tril": torch.eye(4)}, other, metadata={"format": "something"})
    with pytest.raises(TipcapError, match="not a tipcap gap file"):
        Gap.load(other)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, plain)
    with pytest.raises(TipcapError):
        Gap.load(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(TipcapError):
        Gap.load(garbage)
    newer = tmp_path / "newer.safetensors"
    Gap("gaussian", torch.zeros(4), torch.eye(4)).save(newer)
    from safetensors import safe_open

    with safe_open(newer, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, newer, metadata=metadata | {"version": "99"})
    with pytest.raises(TipcapError, match="newer"):
        Gap.load(newer)


def test_check_clip():
    gap = Gap("gaussian", torch.zeros(4), torch.eye(4), clip=CLIP_A)
    gap.check_clip(dict(CLIP_A), "the image store")
    gap.check_clip(None, "the image store")
    with pytest.raises(TipcapError) as error:
        gap.check_clip(CLIP_B, "the image store")
    message = str(error.value)
    for part in ("ViT-B-32", "openai", "ViT-L-14", "laion2b", "the image store"):
        assert part in message
    Gap("gaussian", torch.zeros(4), torch.eye(4)).check_clip(CLIP_B, "anything")  # no identity: no check


# --- 10. memory kind ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.01, 0.1])
@pytest.mark.parametrize("renorm", [True, False])
def test_memory_to_text_is_softmax_attention_over_the_memory(tau, renorm):
    d = 32
    memory = unit_rows(50, d, seed=100).float()
    v = unit_rows(11, d, seed=101).float()
    gap = Gap("memory", torch.zeros(d), torch.zeros(d, d), memory=memory, tau=tau, renorm=renorm)
    stored = memory.half().double()  # the gap keeps its memory in float16
    weights = torch.softmax(v.double() @ stored.T / tau, dim=-1)
    expected = weights @ stored
    if renorm:
        expected = normalize(expected)
    for chunk in (65536, 3, 1, 50):
        assert torch.allclose(gap.to_text(v, chunk=chunk).double(), expected, rtol=0, atol=2e-5), chunk
    # The mapped image is a convex combination dominated by its nearest memory row at small τ.
    if tau == 0.01:
        nearest = (v @ memory.T).argmax(dim=1)
        mapped = gap.to_text(v)
        assert torch.equal((mapped @ memory.T).argmax(dim=1), nearest)


# --- 11. fitting from embedding stores --------------------------------------------------------------------

N_IMAGES = 240
CAPTIONS_PER_IMAGE = 5
MISSING_IMAGES = 10  # images 0..9 have captions but are not in the image store
EXTRA_IMAGES = 10  # image ids 1000.. are in the image store without captions


def write_store(path, kind, clip, embeddings, ids, extra_files=None, shard_size=100):
    def encode(rows: range, advance) -> Shard:
        advance(len(rows))
        return Shard(embeddings[rows.start : rows.stop], [ids[i] for i in rows])

    record = provenance.record(f"{kind[:-1]}-store", {"clip": clip}, {"rows": f"synthetic {kind}"})
    return build_store(
        path, record, len(ids), encode, shard_size=shard_size, extra_files=extra_files, progress=False
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    g = generator(110)
    centres = normalize(torch.randn(N_IMAGES, D, generator=g, dtype=F64))
    spread = 0.4 * torch.randn(N_IMAGES, CAPTIONS_PER_IMAGE, D, generator=g, dtype=F64) / D**0.5
    captions = normalize(centres[:, None, :] + spread)  # [images, 5, d]
    offset = 0.8 * normalize(torch.randn(D, generator=g, dtype=F64))
    noise = 0.05 * torch.randn(N_IMAGES, D, generator=g, dtype=F64) / D**0.5
    images = normalize(captions.mean(1) + offset + noise)
    text_ids = [i for i in range(N_IMAGES) for _ in range(CAPTIONS_PER_IMAGE)]
    texts = write_store(
        root / "texts", "texts", CLIP_A, captions.reshape(-1, D), text_ids,
        extra_files={"captions.json": [f"caption {k} of image {i}" for k, i in enumerate(text_ids)]},
    )  # fmt: skip
    # The image store: a shuffled subset of the images, plus images nobody captioned.
    kept = torch.randperm(N_IMAGES, generator=g)
    kept = kept[kept >= MISSING_IMAGES]
    extra = normalize(torch.randn(EXTRA_IMAGES, D, generator=g, dtype=F64))
    image_rows = torch.cat([images[kept], extra])
    image_ids = kept.tolist() + list(range(1000, 1000 + EXTRA_IMAGES))
    image_store = write_store(root / "images", "images", CLIP_A, image_rows, image_ids, shard_size=64)
    other_clip = write_store(root / "other", "images", CLIP_B, image_rows, image_ids)
    paired = torch.tensor(text_ids) >= MISSING_IMAGES
    expected_mu = (images[torch.tensor(text_ids)] - captions.reshape(-1, D))[paired].mean(0)
    return {
        "texts": texts,
        "images": image_store,
        "other_clip": other_clip,
        "offset": offset,
        "expected_mu": expected_mu,
        "paired": int(paired.sum()),
    }


def test_join_pairs_pairs_each_caption_with_its_own_image(stores):
    texts, images = stores["texts"], stores["images"]
    pairs = join_pairs(texts, images)
    assert len(pairs) == stores["paired"] == (N_IMAGES - MISSING_IMAGES) * CAPTIONS_PER_IMAGE
    for image_row, text_row in zip(pairs.image_index.tolist(), pairs.text_index.tolist(), strict=True):
        assert images.ids[image_row] == texts.ids[text_row]
    assert sorted(pairs.text_index.tolist()) == [i for i, k in enumerate(texts.ids) if k >= MISSING_IMAGES]
    # The gathered rows are the stored rows (across shards).
    v, t = next(pairs.iter_chunks(len(pairs)))
    assert torch.equal(v, images.embeddings()[pairs.image_index].double())
    assert torch.equal(t, texts.embeddings()[pairs.text_index].double())


def test_few_pairs_mu_from_stores_is_the_known_offset(stores):
    fitted = estimate_gap("few-pairs", stores["texts"], stores["images"])
    assert fitted.pairs_used == stores["paired"]
    assert torch.allclose(fitted.mu, stores["expected_mu"], rtol=0, atol=2e-3)  # fp16 storage
    cosine = torch.nn.functional.cosine_similarity(fitted.mu, stores["offset"], dim=0)
    assert float(cosine) > 0.95
    assert_positive_definite(fitted.covariance)


NEEDS_COVARIANCE = (
    "mean-isotropic-matched", "norm-matched", "diagonal", "rotated", "gaussian", "close", "cov-noise"
)  # fmt: skip
NEEDS_MU_FROM_IN_TEXT_ONLY = ("mean-shift", "mean-shift-isotropic", "capdec-offset")
ESTIMATED = (*NEEDS_MU_FROM_IN_TEXT_ONLY, *NEEDS_COVARIANCE)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("kind", GAP_KINDS)
def test_fit_gap_every_setting_and_kind(stores, setting, kind):
    texts, images = stores["texts"], stores["images"]
    config = GapConfig(setting=setting, kind=kind)
    if setting == "text-only" and kind in NEEDS_COVARIANCE:
        with pytest.raises(TipcapError, match=f"gap kind '{kind}' needs a covariance fitted on images"):
            fit_gap(config, texts, images)
        return
    if setting == "text-only" and kind in NEEDS_MU_FROM_IN_TEXT_ONLY:
        with pytest.raises(TipcapError, match=r"gap\.mu_from"):
            fit_gap(config, texts, images)
        return
    gap = fit_gap(config, texts, images)
    assert gap.kind == kind and gap.dim == D and gap.clip == CLIP_A and gap.renorm
    assert gap.info["setting"] == setting and gap.info["kind"] == kind
    assert torch.isfinite(gap.mu).all() and torch.isfinite(gap.scale_tril).all()
    assert torch.equal(gap.scale_tril, torch.tril(gap.scale_tril))
    if kind in ESTIMATED:
        fitted = estimate_gap(setting, texts, images)
        assert torch.allclose(gap.mu, fitted.mu.float(), atol=1e-6)
        assert float(gap.mu.norm()) > 0.3 and gap.info["pairs_used"] > 0
        assert gap.info["fitted_trace"] == pytest.approx(float(torch.trace(fitted.covariance)))
        rotation = random_rotation(D, 0) if kind == "rotated" else None
        expected = noise_covariance(kind, fitted.covariance, CAPDEC_SIGMA2, rotation=rotation)
    elif kind == "isotropic":
        assert torch.equal(gap.mu, torch.zeros(D))
        expected = CAPDEC_SIGMA2 * torch.eye(D, dtype=F64)
    else:
        assert torch.equal(gap.mu, torch.zeros(D))
        expected = torch.zeros(D, D, dtype=F64)
    if kind in TRAIN_NOISE_KINDS:
        assert bool((torch.diagonal(gap.scale_tril) > 0).all())
        assert torch.allclose(gap.covariance.double(), expected, rtol=0, atol=1e-5)
    else:
        assert not gap.scale_tril.any()
    assert gap.info["mu_norm"] == pytest.approx(float(gap.mu.norm()), rel=1e-5)
    assert gap.info["noise_trace"] == pytest.approx(float(torch.trace(expected)), rel=1e-4, abs=1e-9)
    if kind == "memory":
        assert torch.equal(gap.memory, texts.embeddings())
        assert gap.info["memory_size"] == len(texts)
    else:
        assert gap.memory is None
    v = images.embeddings()[:8].float()
    mapped = gap.to_text(v)
    assert torch.isfinite(mapped).all()
    assert torch.allclose(mapped.norm(dim=-1), torch.ones(8), atol=1e-5)


def test_gaussian_few_pairs_gap_closes_the_gap(stores, tmp_path):
    texts, images = stores["texts"], stores["images"]
    gap = fit_gap(GapConfig(setting="few-pairs", kind="gaussian"), texts, images)
    pairs = join_pairs(texts, images)
    report = gap_report(gap, pairs)
    assert report["matched_pairs"] == len(pairs)
    assert report["cosine_after"] > report["cosine_before"] + 0.1
    assert report["pairs_used"] == len(pairs) and report["setting"] == "few-pairs"
    assert report["sigma_trace"] == pytest.approx(float(torch.trace(gap.covariance)), rel=1e-4)
    assert 1 <= report["effective_rank"] <= D
    text = format_report(report)
    assert "gaussian" in text and "few-pairs" in text and "before" in text
    no_pairs = gap_report(gap)
    assert "cosine_before" not in no_pairs and "cosine_before" not in format_report(no_pairs)

    # The baseline without bridging changes nothing.
    none = gap_report(fit_gap(GapConfig(setting="few-pairs", kind="none"), texts, images), pairs)
    assert none["cosine_after"] == pytest.approx(none["cosine_before"], abs=1e-6)

    for name, plot_pairs in (("with-pairs.png", pairs), ("spectrum-only.png", None)):
        path = tmp_path / "plots" / name
        plot_gap(gap, plot_pairs, path)
        data = path.read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 10_000, name
        assert not list(path.parent.glob("*.tmp"))


def test_gap_plot_shows_the_text_points_and_names_its_reference_level(stores, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    texts, images = stores["texts"], stores["images"]
    gap = fit_gap(GapConfig(setting="few-pairs", kind="gaussian"), texts, images)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read it back
    plot_gap(gap, join_pairs(texts, images), tmp_path / "gap.png")
    pca, spectrum = figures[0].axes
    points = dict(zip(pca.get_legend_handles_labels()[1], pca.collections, strict=True))
    # The mapped images land on the text points: drawn as rings, they leave those points in sight.
    assert len(points["mapped image (decoder input)"].get_facecolors()) == 0
    assert len(points["text t"].get_facecolors()) > 0
    assert spectrum.get_legend_handles_labels()[1] == ["eigenvalues of Sigma", "CapDec's per-axis σ² = 0.016"]


def test_fit_gap_refuses_stores_of_different_clips(stores):
    for setting in ("few-pairs", "web-pairs", "unpaired"):
        with pytest.raises(TipcapError, match="different CLIPs"):
            fit_gap(GapConfig(setting=setting, kind="gaussian"), stores["texts"], stores["other_clip"])
        with pytest.raises(TipcapError, match="different CLIPs"):
            estimate_gap(setting, stores["texts"], stores["other_clip"])


def test_text_only_gap_imports_mu_from_another_gap(stores, tmp_path):
    texts, images = stores["texts"], stores["images"]
    paired = fit_gap(GapConfig(setting="few-pairs", kind="gaussian"), texts, images)
    paired.save(tmp_path / "paired.safetensors")
    text_only = fit_gap(
        GapConfig(
            setting="text-only", kind="mean-shift-isotropic", mu_from=str(tmp_path / "paired.safetensors")
        ),
        texts,
    )
    assert torch.equal(text_only.mu, paired.mu)
    assert torch.allclose(text_only.covariance, CAPDEC_SIGMA2 * torch.eye(D), atol=1e-7)
    assert text_only.info["mu_imported"] is True
    foreign = Gap("gaussian", paired.mu, paired.scale_tril, clip=CLIP_B)
    with pytest.raises(TipcapError, match="ViT-L-14"):
        foreign.save(tmp_path / "foreign.safetensors")
        fit_gap(
            GapConfig(setting="text-only", kind="mean-shift", mu_from=str(tmp_path / "foreign.safetensors")),
            texts,
        )


def test_fit_gap_options_and_errors(stores):
    texts, images = stores["texts"], stores["images"]
    subset = fit_gap(GapConfig(setting="text-only", kind="memory", memory_size=50, seed=3, tau=0.05), texts)
    again = fit_gap(GapConfig(setting="text-only", kind="memory", memory_size=50, seed=3, tau=0.05), texts)
    assert subset.memory.shape == (50, D) and subset.tau == 0.05 and subset.info["memory_size"] == 50
    assert torch.equal(subset.memory, again.memory)
    rows = {tuple(row.tolist()) for row in texts.embeddings()}
    assert all(tuple(row.tolist()) in rows for row in subset.memory)

    learnable = fit_gap(GapConfig(setting="few-pairs", kind="gaussian", learnable=True), texts, images)
    assert learnable.learnable and float(learnable.kl_to_prior().detach()) == pytest.approx(0.0, abs=1e-4)
    assert not fit_gap(GapConfig(setting="few-pairs", kind="cov-noise", renorm=False), texts, images).renorm
    raw = estimate_gap("few-pairs", texts, images, shrink=False)
    assert not raw.shrinkage  # not shrunk (None, or 0)
    for kind in ("mean-shift", "diagonal", "mean-isotropic-matched", "norm-matched", "rotated"):
        with pytest.raises(TipcapError, match="learnable"):
            fit_gap(GapConfig(setting="few-pairs", kind=kind, learnable=True), texts, images)
    with pytest.raises(TipcapError, match="kind"):
        fit_gap(GapConfig(setting="few-pairs", kind="bogus"), texts, images)
    with pytest.raises(TipcapError, match="setting"):
        fit_gap(GapConfig(setting="bogus", kind="gaussian"), texts, images)
    with pytest.raises(TipcapError, match="needs --images"):
        fit_gap(GapConfig(setting="few-pairs", kind="gaussian"), texts)
    with pytest.raises(TipcapError, match="not a caption store"):
        fit_gap(GapConfig(setting="few-pairs", kind="gaussian"), images, images)
    with pytest.raises(TipcapError, match="not an image store"):
        fit_gap(GapConfig(setting="few-pairs", kind="gaussian"), texts, texts)
    with pytest.raises(TipcapError, match=r"gap\.drop_quantile"):
        fit_gap(GapConfig(setting="web-pairs", kind="gaussian", drop_quantile=1.0), texts, images)


# --- 12. many pairs in high dimension, streamed ------------------------------------------------------


class SyntheticRows:
    """Deterministic rows ``[n, d]`` generated block by block on demand (never all held at once).

    Row i is the same whichever way it is read: block b = i // block is regenerated from its own seed.
    """

    def __init__(self, n: int, dim: int, seed: int, transform, block: int = 2500):
        self.n, self.dim, self.seed, self.transform, self.block = n, dim, seed, transform, block
        self.blocks_made = 0

    def __len__(self) -> int:
        return self.n

    def _block(self, b: int) -> torch.Tensor:
        self.blocks_made += 1
        rows = min(self.block, self.n - b * self.block)
        z = torch.randn(rows, self.dim, generator=generator(self.seed * 100_003 + b), dtype=F64)
        return self.transform(z, b * self.block)

    def iter_chunks(self, rows: int) -> Iterator[torch.Tensor]:
        for b in range(-(-self.n // self.block)):
            yield from self._block(b).split(rows)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = torch.empty(len(rows), self.dim, dtype=F64)
        for b in torch.unique(rows // self.block).tolist():
            inside = rows // self.block == b
            out[inside] = self._block(b)[rows[inside] - b * self.block]
        return out


def test_many_pairs_in_high_dimension_streamed():
    n, d = 20_000, 512
    sigma = correlated_covariance(d, rank=32, scale=0.02, ridge=1e-4, seed=120)
    factor = torch.linalg.cholesky(sigma)
    mu = 0.5 * normalize(torch.randn(d, generator=generator(121), dtype=F64))
    texts = SyntheticRows(n, d, seed=122, transform=lambda z, start: normalize(z))

    def image_rows(z: torch.Tensor, start: int) -> torch.Tensor:
        t = texts.gather(torch.arange(start, start + len(z)))
        return t + mu + z @ factor.T

    images = SyntheticRows(n, d, seed=123, transform=image_rows)
    index = torch.arange(n)
    fitted = estimate_few_pairs(Pairs(images, texts, index, index), chunk=3000)
    assert fitted.pairs_used == n
    assert torch.isfinite(fitted.mu).all()
    assert_positive_definite(fitted.covariance)
    assert 0 <= fitted.shrinkage < 1
    assert float((fitted.mu - mu).norm()) < 4 * (float(torch.trace(sigma)) / n) ** 0.5
    assert rel_frobenius(fitted.covariance, sigma) < 0.2
    factor_hat = cholesky(fitted.covariance)
    assert torch.isfinite(factor_hat).all() and bool((torch.diagonal(factor_hat) > 0).all())
    # The streamed estimate equals the one on all rows at once.
    v = torch.cat(list(images.iter_chunks(n)))
    t = torch.cat(list(texts.iter_chunks(n)))
    whole = estimate_few_pairs(Pairs.of_tensors(v, t), chunk=n)
    assert torch.allclose(fitted.mu, whole.mu, rtol=0, atol=1e-12)
    assert torch.allclose(fitted.covariance, whole.covariance, rtol=0, atol=1e-12)
    assert fitted.shrinkage == pytest.approx(whole.shrinkage, abs=1e-10)


@pytest.mark.parametrize("kind", ["none", "isotropic", "memory"])
def test_every_kind_refuses_an_unknown_setting(stores, kind):
    with pytest.raises(TipcapError, match=r"gap\.setting"):
        fit_gap(GapConfig(setting="bogus", kind=kind), stores["texts"], stores["images"])


def test_degenerate_estimate_still_gives_a_learnable_gap(tmp_path):
    texts = write_store(tmp_path / "t", "texts", CLIP_A, torch.zeros(2, 4, dtype=F64) + 0.5, [7, 7],
                        extra_files={"captions.json": ["a", "b"]})  # fmt: skip
    images = write_store(tmp_path / "i", "images", CLIP_A, torch.ones(1, 4, dtype=F64), [7])
    gap = fit_gap(GapConfig(setting="few-pairs", kind="gaussian", learnable=True), texts, images)
    assert bool((torch.diagonal(gap.scale_tril) > 0).all()) and torch.isfinite(gap.kl_to_prior())


def test_incomplete_gap_file_is_a_tipcap_error(tmp_path):
    path = tmp_path / "gap.safetensors"
    save_file({"mu": torch.zeros(4)}, path, metadata={"format": "tipcap-gap", "version": "1"})
    with pytest.raises(TipcapError, match="damaged gap file"):
        Gap.load(path)


@pytest.mark.parametrize("kind", sorted(TRAIN_NOISE_KINDS))
def test_row_scale_multiplies_each_rows_noise(kind):
    d = 16
    gap = Gap(kind, torch.full((d,), 0.05), 0.1 * torch.eye(d), renorm=False)
    t = unit_rows(3, d, seed=23).float()
    plain = gap.sample(t, generator=generator(24)) - gap.text_side(t)
    row_scale = torch.tensor([1.0, 3.0, 0.0])
    scaled = gap.sample(t, generator=generator(24), row_scale=row_scale) - gap.text_side(t)
    assert torch.allclose(scaled[0], plain[0], atol=1e-6)
    assert torch.allclose(scaled[1], 3 * plain[1], atol=1e-6)
    assert torch.allclose(scaled[2], torch.zeros(d), atol=1e-6)
    assert float(plain[1].norm()) > 0.1  # the row had noise to scale
