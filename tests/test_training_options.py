"""Training options through `tipcap.training.loop.train`: gradient accumulation, a frozen language model, a
learnable gap, bf16 on the CPU and the transformer projector."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributions import MultivariateNormal, kl_divergence

from tipcap.config import GapConfig, load_config
from tipcap.gap import fit_gap
from tipcap.model import TIPCap
from tipcap.projectors import TransformerProjector
from tipcap.store import EmbeddingStore
from tipcap.training.loop import train

TINY = Path(__file__).parent.parent / "experiments" / "tiny.yaml"
ONE_STEP = ["train.max_steps=1", "train.warmup_steps=0", "train.schedule=constant", "train.lr=1e-3",
            "train.log_every=1"]  # fmt: skip


def run_training(texts: Path, out: Path, *overrides: str) -> Path:
    """Train the tiny decoder on ``texts`` with ``overrides``; return the run directory."""
    train(load_config(TINY, [f"data.train_texts={texts}", *ONE_STEP, *overrides]), out, progress=False)
    return out


def train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def test_accumulating_two_half_batches_equals_one_full_batch(coco_texts, tmp_path):
    # The 120 captions sorted by length: the two half batches hold the 60 shortest and the 60 longest.
    assert len(EmbeddingStore.open(coco_texts)) == 120
    whole = run_training(coco_texts, tmp_path / "whole", "train.batch_size=120")
    halves = run_training(coco_texts, tmp_path / "halves", "train.batch_size=60", "train.accumulate=2")
    assert train_losses(halves) == pytest.approx(train_losses(whole), rel=1e-5)
    expected, accumulated = weights(whole), weights(halves)
    assert accumulated.keys() == expected.keys()
    for name, tensor in expected.items():
        # One AdamW step from zero moments moves each weight by about ±lr: a wrongly weighted half batch
        # flips the sign of some updates (a difference of 2e-3), rounding does not.
        assert (accumulated[name] - tensor).abs().max() < 1e-4, name


def test_a_frozen_language_model_keeps_its_initial_weights(coco_texts, tmp_path):
    initial = weights(run_training(coco_texts, tmp_path / "initial", "train.lr=0"))
    frozen = weights(run_training(coco_texts, tmp_path / "frozen", "model.freeze_language_model=true",
                                  "train.max_steps=3"))  # fmt: skip
    trained = weights(run_training(coco_texts, tmp_path / "trained", "train.max_steps=3"))
    language_model = [name for name in initial if name.startswith("language_model.")]
    projector = [name for name in initial if name.startswith("projector.")]
    assert language_model and projector
    assert all(torch.equal(frozen[name], initial[name]) for name in language_model)
    assert all(not torch.equal(frozen[name], initial[name]) for name in projector)
    assert any(not torch.equal(trained[name], initial[name]) for name in language_model)


def test_a_learnable_gap_moves_and_its_kl_to_the_prior_is_in_the_loss(coco_texts, tmp_path):
    config = GapConfig(kind="isotropic", setting="text-only", sigma2=0.01, learnable=True)
    gap = fit_gap(config, EmbeddingStore.open(coco_texts))
    with torch.no_grad():
        gap.mu.add_(0.02 * torch.randn(gap.dim, generator=torch.Generator().manual_seed(0)))
        gap.log_diag.sub_(0.1)
    gap.save(tmp_path / "gap.safetensors")
    start_mu, start_scale_tril = gap.mu.detach().clone(), gap.scale_tril.detach().clone()
    kl = float(
        kl_divergence(
            MultivariateNormal(start_mu.double(), scale_tril=start_scale_tril.double()),
            MultivariateNormal(gap.prior_mu.double(), scale_tril=gap.prior_scale_tril.double()),
        )
    )
    assert kl > 0.5

    overrides = [f"data.gap={tmp_path / 'gap.safetensors'}"]
    without_kl = run_training(coco_texts, tmp_path / "without", *overrides, "train.kl_weight=0")
    with_kl = run_training(
        coco_texts, tmp_path / "with", *overrides, "train.kl_weight=0.5", "train.max_steps=5"
    )
    # The first step's language-model loss is the same in both runs: the difference is the weighted KL.
    assert train_losses(with_kl)[0] - train_losses(without_kl)[0] == pytest.approx(0.5 * kl, abs=1e-4)

    trained = TIPCap.from_pretrained(with_kl / "model").gap
    assert trained.learnable
    assert torch.equal(trained.prior_mu, gap.prior_mu)
    assert (trained.mu - start_mu).abs().max() > 1e-4
    assert (trained.scale_tril - start_scale_tril).abs().max() > 1e-4


def test_bf16_trains_on_the_cpu(coco_texts, tmp_path):
    fp32 = run_training(coco_texts, tmp_path / "fp32", "train.max_steps=3")
    bf16 = run_training(coco_texts, tmp_path / "bf16", "train.max_steps=3", "train.precision=bf16")
    exact, rounded = train_losses(fp32), train_losses(bf16)
    assert len(rounded) == 3 and all(math.isfinite(loss) for loss in rounded)
    assert rounded != exact
    # bf16 matmuls under fp32 weights move each loss by under 1e-4 relative here (7e-5 at most); weights
    # kept or updated in bf16 would drift further.
    assert rounded == pytest.approx(exact, rel=1e-3)
    assert all(tensor.dtype == torch.float32 for tensor in weights(bf16).values())


def test_transformer_projector_trains_saves_and_loads(coco_texts, tmp_path):
    run = run_training(coco_texts, tmp_path / "run", "model.projector=transformer",
                       "model.projector_layers=2", "train.max_steps=40", "train.log_every=10")  # fmt: skip
    losses = train_losses(run)
    assert len(losses) == 4 and losses[-1] < losses[0] - 1.0, losses
    model = TIPCap.from_pretrained(run / "model")
    assert isinstance(model.projector, TransformerProjector) and len(model.projector.encoder.layers) == 2
    embeddings = EmbeddingStore.open(coco_texts).gather(torch.arange(2)).float()
    with torch.no_grad():
        prefix = model.prefix(embeddings)
    assert prefix.shape == (2, 4, 128)
    assert (prefix[0] - prefix[1]).abs().max() > 1e-3


def test_prompt_noise_scale_reaches_the_rows_with_prompt_words_only(coco_texts, tmp_path, monkeypatch):
    seen: list[tuple[list[float], list[bool]]] = []
    original_inputs, original_forward = TIPCap.training_inputs, TIPCap.forward
    scales: list[torch.Tensor | None] = []

    def training_inputs(self, embeddings, generator=None, noise_scale=None):
        scales.append(noise_scale)
        return original_inputs(self, embeddings, generator, noise_scale)

    def forward(self, text_side, ids, mask, prompts=None, pack_length=None):
        scale = scales.pop()
        seen.append((scale.tolist(), [bool(words) for words in prompts]))
        return original_forward(self, text_side, ids, mask, prompts, pack_length)

    monkeypatch.setattr(TIPCap, "training_inputs", training_inputs)
    monkeypatch.setattr(TIPCap, "forward", forward)
    config = GapConfig(kind="isotropic", setting="text-only", sigma2=0.01)
    gap_file = tmp_path / "gap.safetensors"
    fit_gap(config, EmbeddingStore.open(coco_texts)).save(gap_file)
    run_training(coco_texts, tmp_path / "run", "model.prompt=hard", f"data.gap={gap_file}",
                 "train.prompt_noise_scale=2.5", "train.max_steps=2", "train.batch_size=32")  # fmt: skip
    assert len(seen) == 2
    for row_scales, has_words in seen:
        assert any(has_words) and not all(has_words)
        assert row_scales == [2.5 if words else 1.0 for words in has_words]
