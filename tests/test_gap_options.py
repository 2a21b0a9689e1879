"""The gap package's layout and the Gap options without a test elsewhere: renorm off."""

import importlib
import inspect

import torch

import tipcap.gap
from tipcap.gap import Gap


def test_the_estimate_submodule_is_a_module_not_a_function():
    import tipcap.gap.estimate as imported

    assert inspect.ismodule(imported) and imported.__name__ == "tipcap.gap.estimate"
    assert tipcap.gap.estimate is importlib.import_module("tipcap.gap.estimate")
    assert inspect.isfunction(tipcap.gap.estimate_gap)


def test_without_renorm_the_gap_adds_exactly_its_noise_and_offset(tmp_path):
    d = 16
    seed = torch.Generator().manual_seed(0)
    mu = 0.3 * torch.randn(d, generator=seed)
    scale_tril = torch.tril(0.1 * torch.randn(d, d, generator=seed), -1) + 0.2 * torch.eye(d)
    t = torch.nn.functional.normalize(torch.randn(8, d, generator=seed), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(8, d, generator=seed), dim=-1)
    Gap("gaussian", mu, scale_tril, renorm=False).save(tmp_path / "gap.safetensors")
    gap = Gap.load(tmp_path / "gap.safetensors")

    sampled = gap.sample(t, generator=torch.Generator().manual_seed(1))
    z = torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, t + z @ scale_tril.T)
    assert torch.equal(gap.to_text(v), v - mu)
    assert torch.equal(gap.text_side(t), t)
    assert (sampled.norm(dim=-1) - 1).abs().min() > 1e-2
    assert ((v - mu).norm(dim=-1) - 1).abs().min() > 1e-2
