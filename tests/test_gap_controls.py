"""The controls of the Gaussian's shape (rotated, norm-matched, the tangential match), CapDec's offset
variant, the published constants carried to another width (scale_to_dim), and the former kind name.

Each property is recomputed here from its definition, by sampling or in closed form, not through the
functions that fit it. Synthetic data with fixed seeds, CPU only; the grid test plans a tiny toy world.
"""

import dataclasses
import json
import math

import pytest
import torch
import yaml
from conftest import run
from safetensors import safe_open
from safetensors.torch import save_file

from tipcap import provenance
from tipcap.config import CAPDEC_SIGMA2, GapConfig, from_dict
from tipcap.errors import TipcapError
from tipcap.gap import Gap, estimate_gap, fit_gap, format_report, gap_report, noise_covariance
from tipcap.gap.fit import random_rotation, scaled_to_dim
from tipcap.store import Shard, build_store

F64 = torch.float64
CLIP = {"model": "ViT-B-32", "pretrained": "openai"}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def spiked_covariance(dim: int, seed: int, spikes: int = 3) -> torch.Tensor:
    """An anisotropic Σ ``[dim, dim]``: a few strong directions over a small floor."""
    a = torch.randn(dim, spikes, generator=generator(seed), dtype=F64)
    return 0.02 * a @ a.T + 1e-3 * torch.eye(dim, dtype=F64)


def write_store(path, kind, rows: torch.Tensor, ids: list[int]):
    def encode(span: range, advance) -> Shard:
        advance(len(span))
        return Shard(rows[span.start : span.stop], [ids[i] for i in span])

    record = provenance.record(f"{kind[:-1]}-store", {"clip": CLIP}, {"rows": f"synthetic {kind}"})
    return build_store(path, record, len(ids), encode, shard_size=150, progress=False)


D = 16
N_IMAGES = 200


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Captions bunched around one direction c, and images v = normalise(t + μ + δ) whose δ is largest
    along c: Σ then sits where the captions are, so renormalising removes much of the Gaussian's noise."""
    root = tmp_path_factory.mktemp("control-stores")
    g = generator(40)
    common = normalize(torch.randn(D, generator=g, dtype=F64))
    centres = normalize(common + 0.5 * torch.randn(N_IMAGES, D, generator=g, dtype=F64) / D**0.5)
    captions = normalize(
        centres[:, None, :] + 0.2 * torch.randn(N_IMAGES, 5, D, generator=g, dtype=F64) / D**0.5
    )
    offset = 0.8 * normalize(torch.randn(D, generator=g, dtype=F64))
    along = 0.25 * torch.randn(N_IMAGES, 1, generator=g, dtype=F64) * common
    images = normalize(centres + offset + along + 0.03 * torch.randn(N_IMAGES, D, generator=g, dtype=F64))
    text_ids = [i for i in range(N_IMAGES) for _ in range(5)]
    texts = write_store(root / "texts", "texts", captions.reshape(-1, D), text_ids)
    image_store = write_store(root / "images", "images", images, list(range(N_IMAGES)))
    return {"texts": texts, "images": image_store}


# --- rotated ----------------------------------------------------------------------------------------------


def test_random_rotation_is_a_seeded_haar_rotation():
    rotation = random_rotation(D, seed=3)
    assert torch.allclose(rotation @ rotation.T, torch.eye(D, dtype=F64), atol=1e-12)
    assert float(torch.linalg.det(rotation)) == pytest.approx(1.0, abs=1e-10)
    assert torch.equal(rotation, random_rotation(D, seed=3))
    assert not torch.allclose(rotation, random_rotation(D, seed=4))
    # Haar: every entry has mean 0 and variance 1/d. Over 400 draws, the mean of an entry has standard
    # error 1/sqrt(400·d); a QR without the sign fix biases the diagonal by far more than 5 of them.
    d, draws = 6, 400
    stack = torch.stack([random_rotation(d, seed) for seed in range(draws)])
    assert float(stack.mean(0).abs().max()) < 5 / math.sqrt(draws * d)
    assert float((stack**2).mean(0).sub(1 / d).abs().max()) < 5 * math.sqrt(2 / d**2 / draws)


def test_rotated_noise_keeps_the_spectrum_and_moves_the_directions():
    sigma = spiked_covariance(D, seed=5)
    rotation = random_rotation(D, seed=0)
    rotated = noise_covariance("rotated", sigma, CAPDEC_SIGMA2, rotation=rotation)
    assert torch.allclose(torch.linalg.eigvalsh(rotated), torch.linalg.eigvalsh(sigma), rtol=1e-10, atol=0)
    top = torch.linalg.eigh(sigma).eigenvectors[:, -1]
    assert float((torch.linalg.eigh(rotated).eigenvectors[:, -1] @ top).abs()) < 0.9
    with pytest.raises(ValueError, match="rotation"):
        noise_covariance("rotated", sigma, CAPDEC_SIGMA2)


def test_fit_gap_rotated_is_the_gaussian_turned_by_the_seeded_rotation(stores):
    texts, images = stores["texts"], stores["images"]
    gaussian = fit_gap(GapConfig(kind="gaussian", setting="few-pairs"), texts, images)
    rotated = fit_gap(GapConfig(kind="rotated", setting="few-pairs", seed=7), texts, images)
    assert torch.equal(rotated.mu, gaussian.mu) and rotated.info["rotation_seed"] == 7
    rotation = random_rotation(D, seed=7)
    expected = rotation @ gaussian.covariance.double() @ rotation.T
    assert torch.allclose(rotated.covariance.double(), expected, rtol=0, atol=1e-6)
    v = torch.randn(4, D, generator=generator(8))
    assert torch.allclose(rotated.to_text(v), gaussian.to_text(v), atol=1e-6)


# --- norm-matched -----------------------------------------------------------------------------------------


def empirical_cdf(sample: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(sample.sort().values, at, right=True).double() / len(sample)


def test_norm_matched_noise_has_the_gaussians_norms_and_isotropic_directions():
    n, d = 100_000, 12
    sigma = spiked_covariance(d, seed=9)
    scale_tril = torch.linalg.cholesky(sigma)
    gap = Gap("norm-matched", 0.2 * torch.ones(d), scale_tril, renorm=False)
    t = normalize(torch.randn(n, d, generator=generator(10)))
    noise = (gap.sample(t, generator=generator(11)) - t).double()
    direct = (torch.randn(n, d, generator=generator(12), dtype=F64) @ scale_tril.T).norm(dim=-1)
    matched = (torch.randn(n, d, generator=generator(13), dtype=F64) * (sigma.trace() / d).sqrt()).norm(
        dim=-1
    )

    # Norms: by the DKW inequality each empirical CDF is within ε = sqrt(ln(2/α)/(2n)) of the true one with
    # probability 1 − α, so two samples of one law differ by at most 2ε (+1/n, the step at a quantile).
    epsilon = 2 * math.sqrt(math.log(2 / 1e-6) / (2 * n)) + 1 / n
    levels = torch.linspace(0.01, 0.99, 99, dtype=F64)
    quantiles = torch.quantile(noise.norm(dim=-1), levels)
    assert float((empirical_cdf(direct, quantiles) - levels).abs().max()) < epsilon
    # The same test tells the Gaussian's norms from those of isotropic noise of the same trace.
    assert float((empirical_cdf(direct, torch.quantile(matched, levels)) - levels).abs().max()) > epsilon

    # Directions: E[uuᵀ] = I/d for u uniform on the sphere; an entry of uuᵀ has variance at most
    # E[u_i⁴] = 3/(d(d + 2)), so the mean over n rows is within 5 standard errors of I/d.
    directions = normalize(noise)
    second_moment = directions.T @ directions / n
    tolerance = 5 * math.sqrt(3 / (d * (d + 2)) / n)
    assert float((second_moment - torch.eye(d, dtype=F64) / d).abs().max()) < tolerance
    gaussian_directions = normalize(torch.randn(n, d, generator=generator(14), dtype=F64) @ scale_tril.T)
    gaussian_moment = gaussian_directions.T @ gaussian_directions / n
    assert float((gaussian_moment - torch.eye(d, dtype=F64) / d).abs().max()) > tolerance

    # Its covariance is (tr Σ/d)·I, and the report says so, with the Gaussian's spread of ‖n‖².
    isotropic = float(sigma.trace()) / d * torch.eye(d, dtype=F64)
    assert torch.allclose(gap.training_noise_covariance.double(), isotropic, atol=1e-6)
    report = gap_report(gap)
    assert report["effective_rank"] == pytest.approx(d, rel=1e-5)
    assert report["sigma_trace"] == pytest.approx(float(sigma.trace()), rel=1e-5)
    assert report["noise_sq_norm_sd"] == pytest.approx(
        math.sqrt(2 * float((sigma @ sigma).trace())), rel=1e-5
    )
    assert report["noise_sq_norm_sd"] == pytest.approx(float((noise.norm(dim=-1) ** 2).std()), rel=0.05)


def test_norm_matched_is_not_learnable():
    with pytest.raises(TipcapError, match="learnable"):
        Gap("norm-matched", torch.zeros(4), torch.eye(4), learnable=True)


# --- the tangential match ---------------------------------------------------------------------------------


def tangential_sq_norm(noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """‖n − (n·t)t‖² per row, for unit t ``[n, d]``: what renormalising t + n keeps of n (to first order)."""
    along = (noise * t).sum(dim=-1, keepdim=True) * t
    return ((noise - along) ** 2).sum(dim=-1)


@pytest.mark.parametrize("noise_scale", [1.0, 0.5])
def test_tangential_match_equals_the_gaussians_tangential_noise(stores, noise_scale):
    texts, images = stores["texts"], stores["images"]
    config = GapConfig(kind="mean-isotropic-matched", setting="few-pairs", noise_scale=noise_scale)
    tangential = fit_gap(dataclasses.replace(config, match="tangential"), texts, images)
    total = fit_gap(config, texts, images)
    sigma = noise_scale * estimate_gap("few-pairs", texts, images).covariance
    t = normalize(texts.embeddings().double())
    gaussian_tangential = float((sigma.trace() - torch.einsum("ni,ij,nj->n", t, sigma, t)).mean())
    s2 = float(tangential.covariance.double().diagonal().mean())
    assert torch.allclose(tangential.covariance.double(), s2 * torch.eye(D, dtype=F64), rtol=0, atol=1e-9)
    assert s2 * (D - 1) == pytest.approx(gaussian_tangential, rel=1e-5)
    info = tangential.info
    assert info["match"] == "tangential" and total.info["match"] == "total"
    assert info["tangential_gaussian"] == pytest.approx(gaussian_tangential, rel=1e-9)
    assert info["tangential_total_match"] == pytest.approx(float(sigma.trace()) * (1 - 1 / D), rel=1e-9)
    # These stores put Σ where the captions are: the total match leaves far more tangential noise.
    assert info["tangential_total_match"] > 1.3 * info["tangential_gaussian"]
    assert float(total.covariance.double().diagonal().mean()) == pytest.approx(
        float(sigma.trace()) / D, rel=1e-5
    )
    report = gap_report(tangential)
    assert report["tangential_gaussian"] == info["tangential_gaussian"]
    assert "tangential noise" in format_report(report)

    # By sampling: the tangential noise of both gaps, averaged over the captions, agrees within 5 standard
    # errors, and the total match's does not.
    repeats = t.repeat(40, 1).float()
    gaps = {
        "gaussian": Gap("gaussian", torch.zeros(D), torch.linalg.cholesky(sigma), renorm=False),
        "tangential": Gap(tangential.kind, tangential.mu, tangential.scale_tril, renorm=False),
        "total": Gap(total.kind, total.mu, total.scale_tril, renorm=False),
    }
    draws = {}
    for name, gap in gaps.items():
        noise = (gap.sample(repeats, generator=generator(15)) - repeats).double()
        draws[name] = tangential_sq_norm(noise, repeats.double())
    error = math.sqrt(draws["gaussian"].var() / len(repeats) + draws["tangential"].var() / len(repeats))
    assert abs(float(draws["gaussian"].mean() - draws["tangential"].mean())) < 5 * error
    assert abs(float(draws["gaussian"].mean() - draws["total"].mean())) > 5 * error


def test_match_and_scale_to_dim_are_refused_where_they_do_nothing(stores):
    texts, images = stores["texts"], stores["images"]
    with pytest.raises(
        TipcapError, match=r"gap\.match tangential \(--match\) applies to kind mean-isotropic"
    ):
        fit_gap(GapConfig(kind="gaussian", setting="few-pairs", match="tangential"), texts, images)
    with pytest.raises(TipcapError, match=r"gap\.scale_to_dim \(--scale-to-dim\)"):
        fit_gap(GapConfig(kind="gaussian", setting="few-pairs", scale_to_dim=True), texts, images)
    with pytest.raises(TipcapError, match=r"config key 'gap\.match'"):
        from_dict(GapConfig, {"match": "trace"}, "gap")


# --- capdec-offset ----------------------------------------------------------------------------------------


def test_capdec_offset_trains_on_the_image_side_and_feeds_images_as_they_are():
    """CapDec's train.py with --add_modality_offset: x = t/‖t‖ + σ₀·z + offset, x/‖x‖; images unchanged."""
    mu = 0.3 * normalize(torch.randn(D, generator=generator(16)))
    gap = Gap("capdec-offset", mu, math.sqrt(CAPDEC_SIGMA2) * torch.eye(D))
    t = normalize(torch.randn(6, D, generator=generator(17)))
    z = torch.randn(t.shape, generator=generator(18))
    capdec = normalize(t / t.norm(dim=-1, keepdim=True) + math.sqrt(CAPDEC_SIGMA2) * z + mu)
    assert torch.allclose(gap.sample(t, generator=generator(18)), capdec, atol=1e-6)
    v = torch.randn(6, D, generator=generator(19))
    assert torch.allclose(gap.to_text(v), normalize(v), atol=1e-6)
    assert torch.allclose(gap.text_side(t), normalize(t + mu), atol=1e-6)


def test_fit_gap_capdec_offset(stores, tmp_path):
    texts, images = stores["texts"], stores["images"]
    gap = fit_gap(GapConfig(kind="capdec-offset", setting="few-pairs"), texts, images)
    assert torch.allclose(gap.mu.double(), estimate_gap("few-pairs", texts, images).mu, atol=1e-6)
    assert torch.allclose(gap.covariance, CAPDEC_SIGMA2 * torch.eye(D), atol=1e-7)
    with pytest.raises(TipcapError, match=r"gap kind 'capdec-offset' in the text-only setting"):
        fit_gap(GapConfig(kind="capdec-offset", setting="text-only"), texts)
    with pytest.raises(TipcapError, match="learnable"):
        fit_gap(GapConfig(kind="capdec-offset", setting="few-pairs", learnable=True), texts, images)
    gap.save(tmp_path / "paired.safetensors")
    imported = fit_gap(
        GapConfig(kind="capdec-offset", setting="text-only", mu_from=str(tmp_path / "paired.safetensors")),
        texts,
    )
    assert torch.equal(imported.mu, gap.mu)


# --- the former name --------------------------------------------------------------------------------------


def test_a_gap_file_of_the_former_mean_isotropic_kind_loads_as_mean_shift_isotropic(tmp_path):
    mu = 0.2 * torch.randn(D, generator=generator(20))
    Gap("mean-shift-isotropic", mu, 0.1 * torch.eye(D)).save(tmp_path / "new.safetensors")
    with safe_open(tmp_path / "new.safetensors", framework="pt") as f:
        metadata = f.metadata()
        names = f.keys()
        tensors = {name: f.get_tensor(name) for name in names}
    save_file(tensors, tmp_path / "old.safetensors", metadata={**metadata, "kind": "mean-isotropic"})
    old = Gap.load(tmp_path / "old.safetensors")
    assert old.kind == "mean-shift-isotropic"
    v = torch.randn(3, D, generator=generator(21))
    assert torch.allclose(old.to_text(v), normalize(v - mu), atol=1e-6)
    assert torch.equal(
        old.sample(v, generator=generator(22)),
        Gap.load(tmp_path / "new.safetensors").sample(v, generator=generator(22)),
    )
    with pytest.raises(TipcapError, match=r"config key 'gap\.kind'"):
        from_dict(GapConfig, {"kind": "mean-isotropic"}, "gap")


# --- scale_to_dim -----------------------------------------------------------------------------------------


def mean_cosine(dim: int, sigma2: float, n: int, seed: int) -> tuple[float, float]:
    """Monte Carlo mean and standard error of cos(sample(t), t) for unit t and an isotropic gap σ²I."""
    gap = Gap("isotropic", torch.zeros(dim), math.sqrt(sigma2) * torch.eye(dim))
    t = normalize(torch.randn(n, dim, generator=generator(seed)))
    cosine = (gap.sample(t, generator=generator(seed + 1)) * t).sum(dim=-1).double()
    return float(cosine.mean()), float(cosine.std()) / math.sqrt(n)


def cosine_bias(dim: int, sigma2: float) -> float:
    """E cos(t + n, t) − 1/sqrt(1 + dσ²) to second order.

    cos = (1 + u)/sqrt((1 + u)² + w) with u = n·t ~ N(0, σ²) and w = ‖n − ut‖² ~ σ²χ²(d − 1), independent;
    expanding around (0, m), m = σ²(d − 1): E cos ≈ (1 + m)^(-1/2) + ½f_uu·σ² + ½f_ww·2σ⁴(d − 1), with
    f_uu = −3m(1 + m)^(-5/2) and f_ww = ¾(1 + m)^(-5/2), which is (1 + m)^(-1/2) − ¾σ²m(1 + m)^(-5/2).
    """
    m = sigma2 * (dim - 1)
    return (1 + m) ** -0.5 - 0.75 * sigma2 * m * (1 + m) ** -2.5 - (1 + dim * sigma2) ** -0.5


def test_scale_to_dim_keeps_capdecs_expected_cosine():
    source_dim, dim, n = 640, 128, 10_000
    sigma2 = scaled_to_dim(CAPDEC_SIGMA2, source_dim, dim)
    assert sigma2 == pytest.approx(CAPDEC_SIGMA2 * 5)
    at_source, error_source = mean_cosine(source_dim, CAPDEC_SIGMA2, n, seed=30)
    at_dim, error_dim = mean_cosine(dim, sigma2, n, seed=32)
    # Sampling error (5 standard errors) plus twice the second-order distance to 1/sqrt(1 + dσ²) at each
    # width (the factor 2 covers the higher orders, which shrink faster with d).
    bias = 2 * (abs(cosine_bias(source_dim, CAPDEC_SIGMA2)) + abs(cosine_bias(dim, sigma2)))
    tolerance = 5 * math.hypot(error_source, error_dim) + bias
    assert abs(at_source - at_dim) < tolerance, (at_source, at_dim, tolerance)
    operating_point = 1 / math.sqrt(1 + source_dim * CAPDEC_SIGMA2)
    assert abs(at_source - operating_point) < 5 * error_source + 2 * abs(
        cosine_bias(source_dim, CAPDEC_SIGMA2)
    )
    # Unscaled, CapDec's σ₀² at d = 128 is another operating point altogether.
    unscaled, _ = mean_cosine(dim, CAPDEC_SIGMA2, n, seed=34)
    assert abs(unscaled - at_source) > 10 * tolerance


def test_fit_gap_scales_capdecs_and_closes_constants_to_the_width(stores, tmp_path):
    texts, images = stores["texts"], stores["images"]
    for kind, setting in (
        ("isotropic", "text-only"),
        ("mean-shift-isotropic", "few-pairs"),
        ("capdec-offset", "few-pairs"),
    ):
        gap = fit_gap(GapConfig(kind=kind, setting=setting, scale_to_dim=True), texts, images)
        assert torch.allclose(
            gap.covariance.double(), CAPDEC_SIGMA2 * 640 / D * torch.eye(D, dtype=F64), atol=1e-6
        )
        assert gap.info["sigma2"] == pytest.approx(CAPDEC_SIGMA2 * 640 / D) and gap.info["source_dim"] == 640
    unscaled = fit_gap(GapConfig(kind="isotropic", setting="text-only"), texts)
    assert torch.allclose(unscaled.covariance, CAPDEC_SIGMA2 * torch.eye(D), atol=1e-7)
    close = fit_gap(GapConfig(kind="close", setting="few-pairs", scale_to_dim=True), texts, images)
    sigma = estimate_gap("few-pairs", texts, images).covariance
    expected = 9 * sigma + 0.12**2 * 768 / D * torch.eye(D, dtype=F64)
    assert torch.allclose(close.covariance.double(), expected, rtol=0, atol=1e-6)
    text = format_report(gap_report(close))
    assert "scaled to d = 16 from 0.0144 at d = 768" in text


# --- through the grid -------------------------------------------------------------------------------------


def test_grid_cells_of_the_new_kinds_validate_and_fit(tmp_path, tiny_clip):
    from tipcap.toy.clip import train_toyclip

    result = run(
        "toyworld", "--out", tmp_path / "world", "--version", 2, "--train", 40, "--val", 4, "--test", 4
    )
    assert result.exit_code == 0, result.output
    spec, _ = train_toyclip(tmp_path / "world" / "toyworld.json", tmp_path / "clip", steps=1, batch_size=16,
                            config=json.loads(tiny_clip.read_text()), progress=False)  # fmt: skip
    cells = [
        {"name": "rotated", "kind": "rotated", "setting": "few-pairs"},
        {"name": "norm-matched", "kind": "norm-matched", "setting": "few-pairs"},
        {"name": "capdec-offset", "kind": "capdec-offset", "setting": "few-pairs",
         "set": {"gap.scale_to_dim": True}},
        {"name": "tangential", "kind": "mean-isotropic-matched", "setting": "few-pairs",
         "set": {"gap.match": "tangential"}},
        {"name": "mean-shift-isotropic", "kind": "mean-shift-isotropic", "setting": "few-pairs"},
    ]  # fmt: skip
    world = tmp_path / "world"
    decoder = {"model": {"clip_dim": 32, "tokenizer": "word-level", "prefix_length": 2,
                         "language_model_config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2,
                                                   "n_embd": 32, "n_positions": 64}},
               "train": {"max_steps": 2, "batch_size": 8, "warmup_steps": 1, "log_every": 1}}  # fmt: skip
    config = {"few_pairs": 10, "seeds": [0], "decoder": decoder, "cells": cells,
              "karpathy": str(world / "toyworld.json"),
              "embed": {"model": spec.model, "pretrained": spec.pretrained},
              "eval": {"beams": 1, "metrics": ["bleu", "cider"], "score_clip": spec.model,
                       "score_pretrained": spec.pretrained}}  # fmt: skip
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = run("ablate", tmp_path / "grid.yaml", "--out", out, "--plan", "--no-progress")
    assert result.exit_code == 0, result.output
    gaps = {path.name: Gap.load(path) for path in (out / "gaps").glob("*.safetensors")}
    kinds = {name.split("-seed")[0]: gap for name, gap in gaps.items()}
    assert kinds["rotated-few-pairs"].kind == "rotated"
    assert kinds["norm-matched-few-pairs"].kind == "norm-matched"
    assert kinds["capdec-offset"].info["scale_to_dim"] and kinds["capdec-offset"].kind == "capdec-offset"
    assert kinds["tangential"].info["match"] == "tangential"
    assert kinds["mean-shift-isotropic-few-pairs"].kind == "mean-shift-isotropic"
    # A norm-matched decoder trains (its sample rule in the training loop).
    train = run("train", "--config", out / "runs" / "norm-matched-seed0" / "train.yaml",
                "--out", tmp_path / "trained", "--no-progress")  # fmt: skip
    assert train.exit_code == 0, train.output
    bad = [{"name": "bad", "kind": "gaussian", "setting": "few-pairs", "set": {"gap.match": "tangential"}}]
    refused = run("ablate", tmp_path / "grid.yaml", "--out", tmp_path / "bad", "--plan", "--no-progress",
                  "--set", f"cells={json.dumps(bad)}")  # fmt: skip
    assert refused.exit_code == 1 and "config key 'cells[0]': gap.match tangential" in refused.stderr
    text_only = [{"name": "bad", "kind": "rotated"}]
    refused = run("ablate", tmp_path / "grid.yaml", "--out", tmp_path / "bad", "--plan", "--no-progress",
                  "--set", f"cells={json.dumps(text_only)}")  # fmt: skip
    assert refused.exit_code == 1 and "gap kind 'rotated' needs a covariance" in refused.stderr
