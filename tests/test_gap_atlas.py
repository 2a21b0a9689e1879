"""`tipcap gap-atlas`: the atlas's figures against gaps of known shape, recomputed here in closed form or
from the data; its agreement with `fit-gap`; the command's files and its one-line errors.

Synthetic data with fixed seeds, CPU only.
"""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tipcap import provenance
from tipcap.cli import main
from tipcap.config import CAPDEC_SIGMA2, GapConfig
from tipcap.gap import fit_gap
from tipcap.gap.atlas import KINDS, AtlasConfig, gap_atlas
from tipcap.gap.estimate import Pairs, TensorRows
from tipcap.gap.fit import CLOSE_COVARIANCE_SCALE, CLOSE_NOISE_STD, random_rotation
from tipcap.store import EmbeddingStore, Shard, build_store

F64 = torch.float64
CLIP = {"model": "ViT-B-32", "pretrained": "openai"}
QUICK = AtlasConfig(resamples=20)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_pairs(mu: torch.Tensor, covariance: torch.Tensor, count: int, seed: int) -> Pairs:
    """Pairs whose gap δ = v − t is drawn from N(μ, Σ), one caption per image."""
    g = generator(seed)
    t = torch.randn(count, len(mu), generator=g, dtype=F64)
    delta = mu + torch.randn(count, len(mu), generator=g, dtype=F64) @ torch.linalg.cholesky(covariance).T
    return Pairs.of_tensors(t + delta, t)


def expected_log_likelihood(mu, covariance, mean, noise) -> float:
    """E log N(δ; m, C) per dimension for δ ~ N(μ, Σ): −½(d·log 2π + log|C| + tr C⁻¹Σ + (μ−m)ᵀC⁻¹(μ−m))/d."""
    d = len(mu)
    inverse = torch.linalg.inv(noise)
    offset = mu - mean
    value = d * math.log(2 * math.pi) + torch.logdet(noise) + torch.trace(inverse @ covariance)
    return float(-0.5 * (value + offset @ inverse @ offset) / d)


def kind_truth(kind: str, mu: torch.Tensor, covariance: torch.Tensor, seed: int = 0) -> float:
    """The held-out log-likelihood per dimension each kind should reach, from the true μ and Σ."""
    d = len(mu)
    identity = torch.eye(d, dtype=F64)
    models = {
        "isotropic": (torch.zeros(d, dtype=F64), CAPDEC_SIGMA2 * identity),
        "mean-isotropic-matched": (mu, torch.trace(covariance) / d * identity),
        "diagonal": (mu, torch.diag(torch.diagonal(covariance))),
        "gaussian": (mu, covariance),
        "rotated": (mu, random_rotation(d, seed) @ covariance @ random_rotation(d, seed).T),
        "close": (mu, CLOSE_COVARIANCE_SCALE**2 * covariance + CLOSE_NOISE_STD**2 * identity),
    }
    return expected_log_likelihood(mu, covariance, *models[kind])


D = 6
N = 20_000
MU = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.05, 0.0], dtype=F64)


def anisotropic_covariance() -> torch.Tensor:
    a = torch.randn(D, D, generator=generator(3), dtype=F64)
    return 0.02 * a @ a.T / D + 0.001 * torch.eye(D, dtype=F64)


@pytest.fixture(scope="module")
def anisotropic():
    covariance = anisotropic_covariance()
    return covariance, gap_atlas(gaussian_pairs(MU, covariance, N, 1), QUICK)


def test_moment_figures_match_the_known_gaussian(anisotropic):
    covariance, atlas = anisotropic
    gap = atlas["gap"]
    trace = float(torch.trace(covariance))
    # Standard errors: ‖μ̂‖ within sqrt(tr Σ / n); tr Σ̂ within sqrt(2 tr Σ² / n).
    assert gap["mu_norm"]["value"] == pytest.approx(float(MU.norm()), abs=4 * math.sqrt(trace / N))
    assert gap["trace"]["value"] == pytest.approx(
        trace, abs=4 * math.sqrt(2 * float((covariance**2).sum()) / N)
    )
    truth_rank = trace**2 / float((covariance**2).sum())
    assert gap["effective_rank"]["value"] == pytest.approx(truth_rank, rel=0.03)
    share = float(MU @ MU) / (float(MU @ MU) + trace)
    assert gap["mean_share"]["value"] == pytest.approx(share, abs=0.01)
    eigenvalues = torch.linalg.eigvalsh(covariance).flip(0)
    assert atlas["gap"]["spectrum"] == pytest.approx(eigenvalues.tolist(), rel=0.06)
    for name in ("mu_norm", "trace", "effective_rank"):
        assert gap[name]["low"] < gap[name]["value"] < gap[name]["high"]
    # The jackknife half-widths track the sampling errors: tr Σ̂'s sqrt(2 tr Σ² / n), ‖μ̂‖'s
    # sqrt(μᵀΣμ / ‖μ‖² / n), each times the normal quantile.
    errors = {
        "trace": math.sqrt(2 * float((covariance**2).sum()) / N),
        "mu_norm": math.sqrt(float(MU @ covariance @ MU) / float(MU @ MU) / N),
    }
    for name, error in errors.items():
        half_width = (gap[name]["high"] - gap[name]["low"]) / 2
        assert 0.5 < half_width / (1.96 * error) < 2, name
    assert atlas["pairs"] == {
        "available": N, "drawn": N, "images": N, "groups": 40, "training": N // 2, "held_out": N // 2,
        "sample": N,
    }  # fmt: skip
    assert gap["caption_share"]["value"] is None  # one caption per image


def test_held_out_likelihoods_match_the_closed_form(anisotropic):
    covariance, atlas = anisotropic
    kinds = atlas["kinds"]
    for kind in KINDS:
        if kind == "mean-shift":
            assert kinds[kind]["held_out_log_likelihood"]["value"] is None  # a point mass: −∞
            continue
        measured = kinds[kind]["held_out_log_likelihood"]["value"]
        interval = kinds[kind]["held_out_log_likelihood"]
        assert interval["low"] < measured < interval["high"], kind
        assert measured == pytest.approx(kind_truth(kind, MU, covariance), abs=0.02), kind
    score = {k: kinds[k]["held_out_log_likelihood"]["value"] for k in KINDS if k != "mean-shift"}
    assert (
        score["gaussian"] > score["diagonal"] + 0.05
        and score["gaussian"] > score["mean-isotropic-matched"] + 0.05
    )
    assert atlas["prediction"]["kind"] == "gaussian" and atlas["prediction"]["ranking"][-1] == "mean-shift"
    assert atlas["prediction"]["ranking"][:-1] == sorted(score, key=lambda k: -score[k])
    # Σ fitted on 10,000 pairs explains unseen ones at its own scale.
    assert atlas["prediction"]["noise_scale"] == pytest.approx(1.0, abs=0.05)


def test_isotropic_gap_leaves_gaussian_and_matched_level():
    covariance = 0.004 * torch.eye(D, dtype=F64)
    atlas = gap_atlas(gaussian_pairs(MU, covariance, N, 2), QUICK)
    score = {
        k: atlas["kinds"][k]["held_out_log_likelihood"]["value"]
        for k in ("gaussian", "mean-isotropic-matched")
    }
    assert score["gaussian"] == pytest.approx(score["mean-isotropic-matched"], abs=0.005)
    truth = kind_truth("gaussian", MU, covariance)
    assert score["gaussian"] == pytest.approx(truth, abs=0.02)
    assert atlas["gap"]["effective_rank"]["value"] == pytest.approx(D, rel=0.02)


def test_axis_concentration_and_kurtosis_of_a_spiked_heavy_tailed_gap():
    d, n = 100, 8000
    g = generator(5)
    mu = torch.zeros(d, dtype=F64)
    mu[0], mu[1:5] = 0.5, 0.1  # the top 1% (one axis) holds 0.25/0.29 of ‖μ‖², the top 5% all of it
    scale = torch.full((d,), 0.01, dtype=F64)
    scale[0] = 0.3  # one axis holds 0.09/(0.09 + 99e-4) of the variance
    # Laplace along the spike (excess kurtosis 3), Gaussian elsewhere.
    spike = (
        torch.empty(n, dtype=F64).exponential_(generator=g)
        - torch.empty(n, dtype=F64).exponential_(generator=g)
    ) / math.sqrt(2)
    noise = torch.randn(n, d, generator=g, dtype=F64)
    noise[:, 0] = spike
    t = torch.randn(n, d, generator=g, dtype=F64)
    delta = mu + noise * scale
    atlas = gap_atlas(Pairs.of_tensors(t + delta, t), AtlasConfig(resamples=5))
    mean = (delta.mean(0) ** 2).sort(descending=True).values
    shares = [float(mean[:k].sum() / mean.sum()) for k in (1, 5, 10)]
    assert [x["value"] for x in atlas["concentration"]["mean"]] == pytest.approx(shares, rel=1e-9)
    assert shares[0] == pytest.approx(0.25 / 0.29, abs=0.02)
    assert atlas["concentration"]["variance"][0]["value"] == pytest.approx(0.09 / (0.09 + 99e-4), abs=0.02)
    kurtosis = [x["value"] for x in atlas["kurtosis"]]
    assert kurtosis[0] == pytest.approx(3.0, abs=0.6)
    assert all(abs(k) < 0.3 for k in kurtosis[1:])


def test_caption_share_and_cosines_of_images_with_five_captions():
    images, captions, d = 2000, 5, 8
    g = generator(7)
    v = torch.nn.functional.normalize(torch.randn(images, d, generator=g, dtype=F64), dim=-1)
    shared = 0.1 * torch.randn(images, 1, d, generator=g, dtype=F64)  # variance 0.01 per axis, per image
    own = 0.05 * torch.randn(images, captions, d, generator=g, dtype=F64)  # 0.0025 per axis, per caption
    t = (v[:, None, :] - 0.2 - shared - own).reshape(-1, d)
    index = torch.arange(images).repeat_interleave(captions)
    pairs = Pairs(TensorRows(v), TensorRows(t), index, torch.arange(images * captions))
    atlas = gap_atlas(pairs, QUICK)
    assert atlas["gap"]["caption_share"]["value"] == pytest.approx(0.01 / 0.0125, abs=0.02)
    assert atlas["pairs"]["images"] == images
    matched = torch.nn.functional.cosine_similarity(v[index], t, dim=-1).mean()
    assert atlas["cosines"]["matched"]["value"] == pytest.approx(float(matched), rel=1e-5)


def test_drawn_pairs_are_seeded_and_refused_beyond_the_stores():
    pairs = gaussian_pairs(MU, anisotropic_covariance(), 500, 4)
    first = gap_atlas(pairs, AtlasConfig(pairs=300, resamples=5, seed=3))
    again = gap_atlas(pairs, AtlasConfig(pairs=300, resamples=5, seed=3))
    other = gap_atlas(pairs, AtlasConfig(pairs=300, resamples=5, seed=4))
    assert first == again and first["pairs"]["drawn"] == 300
    assert first["gap"]["trace"] != other["gap"]["trace"]


# --- the command, on stores ------------------------------------------------------------------------------


def write_store(path, kind, rows: torch.Tensor, ids: list[int]) -> EmbeddingStore:
    def encode(span: range, advance) -> Shard:
        advance(len(span))
        return Shard(rows[span.start : span.stop], [ids[i] for i in span])

    record = provenance.record(f"{kind[:-1]}-store", {"clip": CLIP}, {"rows": f"synthetic {kind}"})
    return build_store(path, record, len(ids), encode, shard_size=70, progress=False)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """120 images with 3 captions each; an image store of other ids, for unpaired stores."""
    root = tmp_path_factory.mktemp("atlas-stores")
    g = generator(11)
    d = 16
    captions = torch.nn.functional.normalize(torch.randn(360, d, generator=g, dtype=F64), dim=-1)
    ids = [i // 3 for i in range(360)]
    offset = 0.5 * torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=F64), dim=0)
    images = torch.stack([captions[3 * i : 3 * i + 3].mean(0) for i in range(120)]) + offset
    images = torch.nn.functional.normalize(
        images + 0.05 * torch.randn(120, d, generator=g, dtype=F64), dim=-1
    )
    texts = write_store(root / "texts", "texts", captions, ids)
    image_store = write_store(root / "images", "images", images, list(range(120)))
    write_store(root / "other-images", "images", images, list(range(1000, 1120)))
    return root, texts, image_store


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_atlas_command_writes_json_and_png(stores, tmp_path):
    root, texts, images = stores
    out = tmp_path / "atlas"
    args = ("gap-atlas", "--texts", root / "texts", "--images", root / "images", "--pairs", 300,
            "--resamples", 20, "--seed", 1)  # fmt: skip
    result = run(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert "prediction:" in result.output and "effective rank" in result.output
    document = json.loads((out / "atlas.json").read_text())
    assert document["inputs"]["texts"]["digest"] == texts.digest
    assert document["inputs"]["images"]["digest"] == images.digest
    assert document["settings"]["pairs"] == 300 and document["settings"]["resamples"] == 20
    assert document["pairs"]["available"] == 360 and document["pairs"]["drawn"] == 300
    assert document["prediction"]["kind"] in KINDS and set(document["kinds"]) == set(KINDS)
    with Image.open(out / "atlas.png") as picture:
        assert picture.format == "PNG" and picture.width > 1000
    # The same settings and seed give the same bytes.
    again = run(*args, "--out", tmp_path / "again")
    assert again.exit_code == 0
    assert (tmp_path / "again" / "atlas.json").read_bytes() == (out / "atlas.json").read_bytes()


def test_atlas_agrees_with_fit_gap_on_all_pairs(stores):
    """Both fit μ and a Ledoit–Wolf Σ of all pairs: the atlas's figures are the fitted gap's."""
    _, texts, images = stores
    from tipcap.gap.atlas import store_atlas

    atlas = store_atlas(texts, images, AtlasConfig(resamples=2))
    gap = fit_gap(GapConfig(kind="gaussian", setting="few-pairs"), texts, images)
    assert atlas["gap"]["mu_norm"]["value"] == pytest.approx(gap.info["mu_norm"], rel=1e-9)
    assert atlas["gap"]["trace"]["value"] == pytest.approx(gap.info["fitted_trace"], rel=1e-9)
    assert atlas["gap"]["effective_rank"]["value"] == pytest.approx(
        gap.info["fitted_effective_rank"], rel=1e-9
    )


@pytest.mark.parametrize(
    ("images", "extra", "message"),
    [
        ("missing", (), "--images {root}/missing: no such folder"),
        ("other-images", (), "share no image ids"),
        ("images", ("--pairs", 5000), "--pairs 5,000: the stores hold only 360"),
        ("texts", (), "is not an image store"),
        ("images", ("--pairs", 0), "--pairs 0: must be a positive number"),
    ],
)
def test_atlas_user_mistakes_give_one_line(stores, tmp_path, images, extra, message):
    root, _, _ = stores
    result = run("gap-atlas", "--texts", root / "texts", "--images", root / images, "--out", tmp_path, *extra)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert message.format(root=root) in lines[0]
    assert not (tmp_path / "atlas.json").exists()


def test_random_direction_reference_of_the_mean_concentration():
    """For d = 2 the larger squared coordinate of a uniform direction holds E max(cos²θ, sin²θ) = ½ + 1/π."""
    from tipcap.gap.shape import random_direction_concentration

    assert random_direction_concentration(2, [0.5])[0] == pytest.approx(0.5 + 1 / math.pi, abs=0.015)
    assert random_direction_concentration(50, [1.0]) == [pytest.approx(1.0)]
