"""The gap atlas at scale: time and peak memory of `tipcap gap-atlas` on synthetic stores on disk.

Builds a caption store of N pairs (``--captions`` per image) and its image store at width d, images
v = normalise(c + μ + n) around unit centres c, captions normalise(c + 0.2·z/√d), n a few strong random
directions over an isotropic floor; then runs the atlas on all N pairs (streamed in chunks; the stores are
read as :class:`~tipcap.store.EmbeddingStore` reads them) and writes atlas.json and atlas.png. Stores are
kept in ``--out`` and reused on the next run with the same sizes. Peak resident memory is read from the OS;
the stores' own size and the memory held after opening them are printed beside it.

Usage: python benchmarks/gap_atlas.py [--pairs 1000000] [--dim 768] [--captions 5] [--resamples 200]
       [--out /tmp/gap-atlas-benchmark]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from tipcap import provenance
from tipcap.gap.atlas import AtlasConfig, store_atlas
from tipcap.gap.atlas_report import format_atlas, write_atlas
from tipcap.store import EmbeddingStore, Shard, build_store

CLIP = {"model": "synthetic", "pretrained": "none"}
IMAGES_PER_SHARD = 20_000


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident set size now, in MB (from /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def shard(block: int, images: int, dim: int, captions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image rows ``[n, d]`` and caption rows ``[n·captions, d]`` of the images of one block, regenerated
    identically from the block's seed."""
    generator = torch.Generator().manual_seed(seed)
    mu = 0.8 * torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)
    spikes = 0.1 * torch.randn(8, dim, generator=generator) / dim**0.5 * 4
    generator = torch.Generator().manual_seed(seed + 1 + block)
    count = min(IMAGES_PER_SHARD, images - block * IMAGES_PER_SHARD)
    centres = torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=-1)
    noise = (
        0.02 * torch.randn(count, dim, generator=generator)
        + torch.randn(count, 8, generator=generator) @ spikes
    )
    v = torch.nn.functional.normalize(centres + mu + noise, dim=-1)
    spread = 0.2 * torch.randn(count, captions, dim, generator=generator) / dim**0.5
    t = torch.nn.functional.normalize(centres[:, None, :] + spread, dim=-1).reshape(-1, dim)
    return v, t


def build_stores(
    out: Path, pairs: int, dim: int, captions: int, seed: int
) -> tuple[EmbeddingStore, EmbeddingStore]:
    """The synthetic caption and image stores in ``out`` (reused when already built with these sizes)."""
    images = pairs // captions
    config = {"clip": CLIP, "pairs": pairs, "dim": dim, "captions": captions, "seed": seed}

    def encoder(kind: str):
        def encode(span: range, advance) -> Shard:
            per_row = 1 if kind == "images" else captions
            block = span.start // (IMAGES_PER_SHARD * per_row)
            v, t = shard(block, images, dim, captions, seed)
            rows = v if kind == "images" else t
            advance(len(span))
            return Shard(rows, [i // per_row for i in span])

        return encode

    stores = []
    for kind, rows, size in (
        ("texts", images * captions, IMAGES_PER_SHARD * captions),
        ("images", images, IMAGES_PER_SHARD),
    ):
        record = provenance.record(f"{kind[:-1]}-store", config, {"rows": f"synthetic {kind}"})
        stores.append(build_store(out / kind, record, rows, encoder(kind), shard_size=size, progress=False))
    return stores[0], stores[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--captions", type=int, default=5, help="Captions per image.")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gap-atlas-benchmark"))
    args = parser.parse_args()

    start = time.perf_counter()
    build_stores(args.out, args.pairs, args.dim, args.captions, args.seed)
    built = time.perf_counter() - start
    # Measure the atlas from freshly opened stores, as the command does.
    texts = EmbeddingStore.open(args.out / "texts")
    images = EmbeddingStore.open(args.out / "images")
    opened = current_rss_mb()
    store_bytes = sum(f.stat().st_size for f in args.out.rglob("*.safetensors"))
    start = time.perf_counter()
    atlas = store_atlas(texts, images, AtlasConfig(seed=args.seed, resamples=args.resamples))
    elapsed = time.perf_counter() - start
    write_atlas(atlas, args.out / "atlas")
    print(format_atlas(atlas))
    print(
        f"atlas of {len(texts):,} pairs at d = {args.dim}, {args.resamples} resamples: {elapsed:.1f} s "
        f"(stores built or reused in {built:.1f} s, {store_bytes / 2**20:.0f} MB on disk)"
    )
    print(f"RSS after opening the stores {opened:.0f} MB; peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
