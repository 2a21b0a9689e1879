"""Gap estimation at scale: time and extra memory of the streaming estimators.

Few-pairs and web-pairs estimation over N synthetic pairs at width d (generated chunk by chunk, so the
pairs themselves never sit in memory), and the unpaired mutual-nearest-neighbour search over
``--images`` × ``--texts`` random unit vectors (held in memory as fp16, like memory-mapped stores).
Peak resident memory above the starting point is read from the OS.

Usage: python benchmarks/gap_fit.py [--pairs 1000000] [--dim 512] [--images 20000] [--texts 100000]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Iterator

import torch

from tipcap.gap import TensorRows, estimate_few_pairs, estimate_web_pairs, mutual_nearest_neighbours


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SyntheticPairs:
    """N pairs v = normalise(t + μ + L·z), t a random unit vector, regenerated identically on each pass."""

    def __init__(self, count: int, dim: int, seed: int = 0):
        self.count = count
        generator = torch.Generator().manual_seed(seed)
        self.mu = 0.05 * torch.randn(dim, generator=generator)
        self.scale_tril = torch.linalg.cholesky(0.002 * torch.eye(dim) + 1e-4 * torch.ones(dim, dim))
        self.seed = seed

    def __len__(self) -> int:
        return self.count

    def iter_chunks(self, rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + 1)
        for start in range(0, self.count, rows):
            n = min(rows, self.count - start)
            t = torch.nn.functional.normalize(torch.randn(n, len(self.mu), generator=generator), dim=-1)
            noise = torch.randn(n, len(self.mu), generator=generator) @ self.scale_tril.T
            v = torch.nn.functional.normalize(t + self.mu + noise, dim=-1)
            yield v.to(torch.float64), t.to(torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--images", type=int, default=20_000, help="Unpaired search: number of images.")
    parser.add_argument("--texts", type=int, default=100_000, help="Unpaired search: number of texts.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, device for the unpaired search: {args.device}")

    pairs = SyntheticPairs(args.pairs, args.dim)
    for name, fit in (("few-pairs", estimate_few_pairs), ("web-pairs", estimate_web_pairs)):
        start_rss, start = peak_rss_mb(), time.perf_counter()
        estimate = fit(pairs)
        seconds = time.perf_counter() - start
        extra = peak_rss_mb() - start_rss
        print(f"{name:<10} {args.pairs:,} pairs, d={args.dim}: {seconds:6.1f} s, "
              f"peak RSS +{extra:5.0f} MB, "
              f"pairs used {estimate.pairs_used:,}, "
              f"trace Sigma {float(estimate.covariance.trace()):.4f}")  # fmt: skip

    generator = torch.Generator().manual_seed(2)
    images = torch.nn.functional.normalize(
        torch.randn(args.images, args.dim, generator=generator), dim=-1
    ).half()
    texts = torch.nn.functional.normalize(
        torch.randn(args.texts, args.dim, generator=generator), dim=-1
    ).half()
    start_rss, start = peak_rss_mb(), time.perf_counter()
    image_index, _ = mutual_nearest_neighbours(
        TensorRows(images), TensorRows(texts), torch.zeros(args.dim), device=args.device
    )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    extra = peak_rss_mb() - start_rss
    print(f"unpaired   {args.images:,} x {args.texts:,} mutual-NN search: {seconds:6.1f} s, "
          f"peak RSS +{extra:6.0f} MB beyond the embeddings, {len(image_index):,} mutual pairs")  # fmt: skip


if __name__ == "__main__":
    main()
