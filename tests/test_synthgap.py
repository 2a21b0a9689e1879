"""The known-truth gap: synthetic image embeddings made from held-out captions, and a grid on them."""

import csv
import json

import pytest
import torch
import yaml
from conftest import COCO_SLICE, run

from tipcap.config import EmbedConfig, SyntheticGapConfig
from tipcap.data import list_images
from tipcap.data.images import subsample
from tipcap.data.karpathy import read_karpathy
from tipcap.errors import TipcapError
from tipcap.gap import Gap
from tipcap.grid.validate import load_ablation
from tipcap.store import EmbeddingStore
from tipcap.synthgap import build_synthetic_world, synthetic_image_store, synthetic_truth


def test_spiked_truth_has_the_asked_norm_trace_and_spectrum():
    config = SyntheticGapConfig(mu_norm=0.5, trace=0.4, spikes=3, spike_share=0.75, seed=2)
    mu, sigma = synthetic_truth(config, 16)
    assert float(mu.norm()) == pytest.approx(0.5)
    assert torch.allclose(sigma, sigma.T)
    eigenvalues = torch.linalg.eigvalsh(sigma).flip(0)
    assert float(eigenvalues.sum()) == pytest.approx(0.4)
    assert torch.allclose(eigenvalues[:3], torch.full((3,), 0.1, dtype=torch.float64))
    assert torch.allclose(eigenvalues[3:], torch.full((13,), 0.1 / 13, dtype=torch.float64))
    again, _ = synthetic_truth(config, 16)
    other, _ = synthetic_truth(SyntheticGapConfig(mu_norm=0.5, trace=0.4, seed=3), 16)
    assert torch.equal(mu, again) and not torch.allclose(mu / mu.norm(), other / other.norm())
    with pytest.raises(TipcapError, match="spikes"):
        synthetic_truth(SyntheticGapConfig(mu_norm=0.5, trace=0.4, spikes=16), 16)
    with pytest.raises(TipcapError, match=r"config key 'synthetic_gap\.trace' is missing"):
        synthetic_truth(SyntheticGapConfig(mu_norm=0.5), 16)


def test_truth_from_a_gap_file(tmp_path):
    sigma = torch.diag(torch.linspace(0.01, 0.1, 8, dtype=torch.float64))
    Gap("gaussian", torch.ones(8), torch.linalg.cholesky(sigma)).save(tmp_path / "truth.safetensors")
    mu, covariance = synthetic_truth(SyntheticGapConfig(truth=str(tmp_path / "truth.safetensors")), 8)
    assert torch.allclose(mu, torch.ones(8, dtype=torch.float64)) and torch.allclose(covariance, sigma)
    Gap("isotropic", torch.zeros(8), torch.eye(8)).save(tmp_path / "iso.safetensors")
    with pytest.raises(TipcapError, match="needs a gaussian gap of width 8"):
        synthetic_truth(SyntheticGapConfig(truth=str(tmp_path / "iso.safetensors")), 8)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("synthgap")
    embed = EmbedConfig(str(tiny_clip), "none")
    config = SyntheticGapConfig(mu_norm=0.6, trace=0.05, spikes=4, seed=1)
    built = build_synthetic_world(COCO_SLICE, embed, config, root / "world", progress=False)
    return {"built": built, "embed": embed, "config": config, "root": root}


def test_each_image_is_made_from_a_caption_it_is_not_scored_against(world):
    built = world["built"]
    original = {image.image_id: image.captions for image in read_karpathy(COCO_SLICE)}
    derived = {image.image_id: image.captions for image in read_karpathy(built.karpathy)}
    held = {
        image.image_id: image.captions for image in read_karpathy(built.karpathy.parent / "held_out.json")
    }
    assert set(derived) == set(held) == set(original)
    for image_id, captions in original.items():
        assert len(held[image_id]) == 1 and len(derived[image_id]) == len(captions) - 1
        assert sorted(derived[image_id] + held[image_id]) == sorted(captions)
        assert held[image_id][0] not in derived[image_id]  # never among its references
    # The split (train/val/test) of every image is kept.
    assert {i.image_id: i.split for i in read_karpathy(built.karpathy)} == {
        i.image_id: i.split for i in read_karpathy(COCO_SLICE)
    }


def test_image_embeddings_are_the_held_out_caption_plus_the_known_gap(world):
    built, config = world["built"], world["config"]
    images = EmbeddingStore.open(built.images)
    texts = EmbeddingStore.open(built.karpathy.parent / "held-out-text")
    assert images.kind == "images" and images.ids == texts.ids and images.clip == texts.clip
    v, t = images.embeddings().double(), texts.embeddings().double()
    mu, sigma = synthetic_truth(config, texts.dim)
    assert torch.allclose(built.mu, mu) and torch.allclose(built.covariance, sigma)
    # v = (t + δ)/‖t + δ‖: the scale s = ‖t + δ‖ makes s·v − t = δ; with ‖t‖ = 1 and a small Σ, s is
    # close to ‖t + μ‖, so s·v − t − μ is the draw, centred near 0 and far smaller than μ.
    scale = (t + mu).norm(dim=-1, keepdim=True)
    residual = scale * v - t - mu
    assert float(residual.mean(0).norm()) < 0.25 * float(mu.norm())
    assert float(residual.norm(dim=-1).mean()) < 2 * float(sigma.trace()) ** 0.5
    cosine = torch.nn.functional.cosine_similarity
    assert bool((cosine(v - mu.float(), t) > cosine(v, t)).all())  # subtracting μ* brings v to its caption


def test_heavy_tails_scale_each_draw_by_a_chi_square_of_the_same_generator(world, tmp_path):
    """tail_df: each row's draw is the Gaussian one times √((ν − 2)/χ²_ν), with χ²_ν from ν more normals of
    the same generator, so the covariance stays Σ* and the tails grow (excess kurtosis 6/(ν − 4))."""
    embed, config = world["embed"], world["config"]
    heavy = SyntheticGapConfig(**{**config.__dict__, "tail_df": 5})
    built = build_synthetic_world(COCO_SLICE, embed, heavy, tmp_path / "heavy", progress=False)
    texts = EmbeddingStore.open(built.karpathy.parent / "held-out-text")
    t = texts.embeddings().double()
    mu, sigma = synthetic_truth(heavy, texts.dim)
    generator = torch.Generator().manual_seed(heavy.seed * 1_000_003)  # one block: every row
    z = torch.randn(len(t), texts.dim, generator=generator, dtype=torch.float64)
    chi2 = torch.randn(len(t), 5, generator=generator, dtype=torch.float64).square().sum(-1, keepdim=True)
    draws = (z * (3 / chi2).sqrt()) @ torch.linalg.cholesky(sigma).T
    expected = torch.nn.functional.normalize(t + mu + draws)
    assert torch.allclose(EmbeddingStore.open(built.images).embeddings().double(), expected, atol=1e-3)
    gaussian = EmbeddingStore.open(world["built"].images).embeddings()
    assert not torch.allclose(EmbeddingStore.open(built.images).embeddings(), gaussian, atol=1e-3)


def test_the_world_is_reproducible_and_seeded(world, tmp_path):
    built, embed, config = world["built"], world["embed"], world["config"]
    again = build_synthetic_world(COCO_SLICE, embed, config, tmp_path / "again", progress=False)
    embeddings = EmbeddingStore.open(built.images).embeddings()
    assert torch.equal(EmbeddingStore.open(again.images).embeddings(), embeddings)
    assert again.karpathy.read_bytes() == built.karpathy.read_bytes()
    other = build_synthetic_world(
        COCO_SLICE, embed, SyntheticGapConfig(mu_norm=0.6, trace=0.05, spikes=4, seed=2), tmp_path / "other",
        progress=False,
    )  # fmt: skip
    assert other.karpathy.read_bytes() != built.karpathy.read_bytes()


def test_cut_stores_hold_the_images_embed_would_list(world):
    built, root = world["built"], world["root"]
    whole = EmbeddingStore.open(built.images)
    store = synthetic_image_store(built, built.karpathy, root / "few", split="train", limit="5", seed=0)
    expected = [ref.image_id for ref in subsample(list_images(built.karpathy, split="train"), "5", 0)]
    assert store.ids == expected and store.kind == "images"
    rows = torch.tensor([whole.ids.index(i) for i in expected])
    assert torch.equal(store.embeddings(), whole.gather(rows))


def test_grid_refuses_what_a_synthetic_world_lacks(tmp_path):
    base = {"karpathy": "k.json", "embed": {"model": "m"}, "synthetic_gap": {"mu_norm": 0.5, "trace": 0.2}}
    cases = [
        ({"cells": [{"name": "w", "kind": "gaussian", "setting": "web-pairs"}], "web_pairs": "w.jsonl"},
         "no web pairs"),
        ({"cells": [{"name": "g", "kind": "gaussian", "setting": "few-pairs"}], "eval_karpathy": "e.json"},
         "eval_karpathy"),
        ({"cells": [{"name": "g", "kind": "gaussian", "setting": "text-only"}]},
         r"config key 'cells\[0\]': gap kind 'gaussian' needs a covariance"),
        ({"cells": [{"name": "g", "kind": "gaussian", "setting": "few-pairs"}],
          "synthetic_gap": {"mu_norm": 0.5, "trace": 0}}, "synthetic_gap.trace"),
        ({"cells": [{"name": "g", "kind": "gaussian", "setting": "few-pairs"}],
          "synthetic_gap": {"trace": 0.2}}, r"config key 'synthetic_gap\.mu_norm' is missing"),
        ({"cells": [{"name": "g", "kind": "gaussian", "setting": "few-pairs"}],
          "synthetic_gap": {"mu_norm": 0.5, "trace": 0.2, "tail_df": 2}}, "synthetic_gap.tail_df"),
    ]  # fmt: skip
    for extra, message in cases:
        path = tmp_path / "grid.yaml"
        path.write_text(yaml.safe_dump({**base, **extra}))
        with pytest.raises(TipcapError, match=message):
            load_ablation(path)


@pytest.mark.slow
def test_a_grid_runs_on_a_synthetic_gap(world, tiny_clip, tmp_path):
    """Few-pairs and unpaired gaps are fitted on synthetic pairs; references never hold the held-out
    caption; the supervised decoder reads the synthetic embeddings."""
    decoder = {
        "model": {"clip_dim": 32, "tokenizer": "word-level", "prefix_length": 2,
                  "language_model_config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32,
                                            "n_positions": 64}},
        "train": {"max_steps": 4, "batch_size": 16, "warmup_steps": 1, "log_every": 2, "checkpoint_every": 4},
    }  # fmt: skip
    cells = [{"name": "supervised", "kind": "supervised"},
             {"name": "diagonal", "kind": "diagonal", "setting": "few-pairs"},
             {"name": "gaussian-unpaired", "kind": "gaussian", "setting": "unpaired"}]  # fmt: skip
    config = {"karpathy": str(COCO_SLICE), "embed": {"model": str(tiny_clip), "pretrained": "none"},
              "few_pairs": 4, "eval_split": "val", "seeds": [0, 1], "decoder": decoder, "cells": cells,
              "synthetic_gap": {"mu_norm": 0.6, "trace": 0.05, "spikes": 4, "seed": 1},
              "store_dir": str(tmp_path / "shared")}  # fmt: skip
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = run("ablate", tmp_path / "grid.yaml", "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["cell"] for row in rows] == [
        cell for cell in ("supervised", "diagonal", "gaussian-unpaired") for _ in (0, 1)
    ]
    few = Gap.load(out / "gaps" / "diagonal-few-pairs-seed0.safetensors")
    assert few.info["pairs_used"] == 4 * 4  # four images, each with its four remaining captions
    # Each seed draws its own few pairs, and the synthetic stores keep to a folder of their own in a
    # shared store_dir, where a real grid's stores of the same names live.
    (folder,) = (tmp_path / "shared").iterdir()
    assert folder.name.startswith("synthetic-")
    draws = [EmbeddingStore.open(folder / f"train-images-few-4-draw{seed}").ids for seed in (0, 1)]
    assert len(draws[0]) == len(draws[1]) == 4 and draws[0] != draws[1]
    held = {image.image_id: image.captions[0] for image in read_karpathy(out / "synthetic" / "held_out.json")}
    scored = json.loads((out / "eval" / "supervised-seed0-none" / "per_image.json").read_text())
    assert len(scored) == 12  # the slice's val images
    for entry in scored:
        assert len(entry["references"]) == 4 and held[entry["image_id"]] not in entry["references"]
