"""Web-scale pairs: images/s from webdataset shards against a folder, and the web-pairs fit and gap atlas on
millions of synthetic pairs (seconds and peak resident memory).

1. Reading. ``--images`` JPEGs of ``--side`` pixels (seeded noise over a gradient, so that they compress
   like photographs rather than flat colour) are written once as a folder and once as webdataset shards
   (webdataset's ShardWriter, ``--per-shard`` samples each, img2dataset's layout: ``{key}.jpg``,
   ``{key}.txt``). ``tipcap embed images`` encodes each with a tiny random CLIP of 224-pixel input (so that
   decoding and resizing, not the CLIP, set the pace) and the rate is printed for both, from the seconds
   the command reports (listing the inputs, loading the CLIP and starting the decoding workers included:
   use enough images that they do not dominate).
2. Fitting. A caption store and an image store of ``--pairs`` pairs at width ``--dim`` are built with
   :func:`gap_atlas.build_stores` (one caption per image; reused in ``--out`` on the next run), then
   ``tipcap fit-gap --setting web-pairs`` (the cosine mixture) and ``tipcap gap-atlas`` run on them in
   fresh processes under ``/usr/bin/time -v``: wall seconds and maximum resident set size are printed.

The stores take 2 · pairs · dim · 2 bytes on disk (6.3 GB for 3,000,000 pairs at d = 512).

Usage: python benchmarks/web_shards.py [--images 2000] [--side 256] [--per-shard 500] [--pairs 3000000]
       [--dim 512] [--resamples 200] [--out /tmp/web-shards-benchmark]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import webdataset
from gap_atlas import build_stores
from PIL import Image
from stores import ROOT, tiny_clip


def tipcap(*args: object) -> tuple[str, float, float]:
    """Run ``python -m tipcap.cli`` offline under ``/usr/bin/time -v``: its output, wall seconds and peak
    resident memory in MB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "tipcap.cli", *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"tipcap {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr)[1]
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)[1]) / 1024
    return result.stdout, seconds, peak


def jpeg(index: int, side: int) -> bytes:
    """A seeded ``side``-pixel JPEG: a colour gradient under noise."""
    generator = torch.Generator().manual_seed(index)
    ramp = torch.linspace(0, 1, side)
    base = torch.stack([ramp[:, None].expand(side, side), ramp[None, :].expand(side, side),
                        torch.full((side, side), (index % 7) / 7)], dim=-1)  # fmt: skip
    pixels = (base * 200 + 55 * torch.rand(side, side, 3, generator=generator)).to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_images(out: Path, count: int, side: int, per_shard: int) -> tuple[Path, str]:
    """The same ``count`` images as a folder and as shards (written once per size); the folder and the
    shards' brace pattern."""
    folder, shards = out / f"folder-{count}-{side}", out / f"shards-{count}-{side}-{per_shard}"
    last = (count - 1) // per_shard
    pattern = str(shards / f"{{00000..{last:05d}}}.tar")
    if not (shards / f"{last:05d}.tar").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shards.mkdir(parents=True, exist_ok=True)
        with webdataset.ShardWriter(str(shards / "%05d.tar"), maxcount=per_shard, verbose=0) as writer:
            for i in range(count):
                data = jpeg(i, side)
                (folder / f"{i:09d}.jpg").write_bytes(data)
                writer.write({"__key__": f"{i:09d}", "jpg": data, "txt": f"picture {i}"})
    return folder, pattern


def embed_rate(source: object, clip: Path, out: Path) -> float:
    """Images per second of ``tipcap embed images`` on ``source``, from the seconds it reports."""
    output, _, _ = tipcap("embed", "images", "--images", source, "--clip", clip, "--pretrained", "none",
                          "--out", out, "--no-progress")  # fmt: skip
    match = re.search(r"wrote ([\d,]+) image embeddings .* in ([\d.]+) s", output)
    return int(match[1].replace(",", "")) / float(match[2])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=256, help="Image side in pixels (img2dataset's 256).")
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--pairs", type=int, default=3_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/web-shards-benchmark"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    clip = tiny_clip(args.out, 32, image_size=224)
    folder, pattern = write_images(args.out, args.images, args.side, args.per_shard)
    for name, source in (("a folder", folder), ("shards", pattern)):
        store = args.out / f"store-{name.removeprefix('a ')}"
        if store.exists():  # measure a build, not a reuse
            for path in store.iterdir():
                path.unlink()
        print(f"embed images from {name}: {embed_rate(source, clip, store):.1f} images/s "
              f"({args.images:,} images of {args.side} px)")  # fmt: skip

    stores = args.out / f"pairs-{args.pairs}-{args.dim}"
    build_stores(stores, args.pairs, args.dim, 1, args.seed)
    texts, images = stores / "texts", stores / "images"
    output, seconds, peak = tipcap("fit-gap", "--setting", "web-pairs", "--texts", texts, "--images", images,
                                   "--out", args.out / "web-pairs.safetensors")  # fmt: skip
    mismatched = re.search(r"mismatch\w*[^\n]*", output)
    print(f"fit-gap --setting web-pairs on {args.pairs:,} pairs at d = {args.dim}: {seconds:.1f} s, "
          f"peak RSS {peak:.0f} MB" + (f" ({mismatched[0]})" if mismatched else ""))  # fmt: skip
    _, seconds, peak = tipcap("gap-atlas", "--texts", texts, "--images", images, "--resamples",
                              args.resamples, "--seed", args.seed, "--out", args.out / "atlas")  # fmt: skip
    print(f"gap-atlas on {args.pairs:,} pairs at d = {args.dim}: {seconds:.1f} s, peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
