"""Web-pairs estimation under known contamination: trimming against the cosine mixture.

A synthetic paired set with CLIP-like geometry: caption embeddings t = normalise(c + g) share a common
direction c (cosine between two captions about 0.5), and each image is v = normalise(t + δ) with
δ ~ N(μ*, Σ*), Σ* a spiked spectrum (8 directions hold 80% of the trace): tr Σ* = 1 (matched and random
pairs' cosines well apart, as for real CLIP) and tr Σ* = 4 (their distributions overlapping). A share p
of the pairs is then contaminated: the caption is replaced by another image's. For p = 0%, 20% and 40%
it prints the error of μ and Σ of each estimator against the few-pairs estimate on the same images with
their true captions (the clean estimate), ‖μ̂ − μ_clean‖/‖μ_clean‖ and ‖Σ̂ − Σ_clean‖_F/‖Σ_clean‖_F (no
shrinkage, so that only the contamination differs), and the share of pairs each believes mismatched
(trimming drops a fixed 10%).

Usage: python benchmarks/web_pairs_recovery.py [--pairs 20000] [--dim 128] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from tipcap.gap import Pairs, estimate_few_pairs, estimate_web_pairs, estimate_web_pairs_mixture


def synthetic_pairs(count: int, dim: int, seed: int, trace: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, t)`` ``[count, dim]`` float32 unit rows, row k of v the image of caption k (tr Σ* = trace)."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)
    t = torch.nn.functional.normalize(
        common + torch.randn(count, dim, generator=generator) / dim**0.5, dim=-1
    )
    mu = 0.8 * torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    spectrum = torch.full((dim,), 0.2 * trace / (dim - 8), dtype=torch.float64)
    spectrum[:8] = 0.8 * trace / 8
    scale = (basis * spectrum.sqrt()).float()  # Σ* = B·diag(λ)·Bᵀ
    delta = mu + torch.randn(count, dim, generator=generator) @ scale.T
    return torch.nn.functional.normalize(t + delta, dim=-1), t


def contaminate(t: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """``t`` with a seeded share of its rows replaced by other rows (never their own)."""
    generator = torch.Generator().manual_seed(seed + 1)
    count = len(t)
    rows = torch.randperm(count, generator=generator)[: round(share * count)]
    offset = torch.randint(1, count, (len(rows),), generator=generator)
    out = t.clone()
    out[rows] = t[(rows + offset) % count]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for geometry, trace in (("separable", 1.0), ("overlapping", 4.0)):
        report(geometry, *synthetic_pairs(args.pairs, args.dim, args.seed, trace), args.seed)


def report(geometry: str, v: torch.Tensor, t: torch.Tensor, seed: int) -> None:
    """Print one geometry's table."""
    clean = estimate_few_pairs(Pairs.of_tensors(v, t), shrink=False)
    cosine = torch.nn.functional.cosine_similarity
    print(
        f"{geometry}: {len(v):,} pairs, d = {v.shape[1]}: matched cos(v, t) {float(cosine(v, t).mean()):.3f} "
        f"± {float(cosine(v, t).std()):.3f}, random-pair cos {float(cosine(v, t.roll(1, 0)).mean()):.3f} "
        f"± {float(cosine(v, t.roll(1, 0)).std()):.3f}; clean ||mu|| {float(clean.mu.norm()):.3f}, "
        f"tr Sigma {float(torch.trace(clean.covariance)):.3f}"
    )
    print()
    print("| mismatched | estimator | μ error | Σ error | believed mismatched |")
    print("|---|---|---|---|---|")
    for share in (0.0, 0.2, 0.4):
        pairs = Pairs.of_tensors(v, contaminate(t, share, seed))
        estimates = {
            "none (all pairs)": (estimate_few_pairs(pairs, shrink=False), 0.0),
            "trim 10% (old)": (estimate_web_pairs(pairs, drop_quantile=0.1, shrink=False), 0.1),
        }
        mixture = estimate_web_pairs_mixture(pairs, shrink=False, seed=seed)
        estimates["mixture (new)"] = (mixture, mixture.details["mismatched_fraction"])
        for name, (estimate, believed) in estimates.items():
            mu_error = float((estimate.mu - clean.mu).norm() / clean.mu.norm())
            sigma_error = float(
                torch.linalg.matrix_norm(estimate.covariance - clean.covariance)
                / torch.linalg.matrix_norm(clean.covariance)
            )
            print(f"| {share:.0%} | {name} | {mu_error:.4f} | {sigma_error:.4f} | {believed:.3f} |")
    print()


if __name__ == "__main__":
    main()
