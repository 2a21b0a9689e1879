"""Captioning throughput: images from disk, one at a time against streamed batches.

A tiny decoder is trained for a few hundred steps on real COCO captions embedded with a tiny random CLIP,
so that it writes caption-like text of realistic length. Images are JPEG files of COCO's size (640×480).
Three ways to caption them, all through ``TIPCap.caption`` with the same model and beam search:

- **one at a time**: ``caption(images=[path])`` per image, decoded in this process;
- **streamed**: ``caption(images=paths)``: a DataLoader's workers decode and preprocess the next batches
  while this one is encoded by CLIP and captioned;
- **generation only** (what an earlier version of this benchmark timed): beam search from CLIP embeddings
  already computed, one at a time against batches.

The captions must be identical. Where the time goes is printed per stage (``decoding`` is the time spent
waiting for decoded images), with the machine's load average. Peak memory (RSS of the process and, apart,
of its decoding workers) is measured in fresh processes that stream ``--rss`` images each.

Usage: python benchmarks/caption_throughput.py [--images 128] [--batch-size 64] [--beams 5] [--rss 500,2000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image
from stores import DEFAULT_CORPUS, ROOT, caption_store, coco_captions

from tipcap.config import load_config
from tipcap.model import TIPCap
from tipcap.training.loop import train


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` 640×480 JPEGs: smooth colour gradients with noise, about COCO's file size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:480, 0:640]
    noise = rng.normal(0, 12, (480, 640, 3))
    paths = []
    for i in range(count):
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-0.3, 0.3, (2, 3))
        pixels = base + ys[..., None] * slope[0] + xs[..., None] * slope[1] + np.roll(noise, i, axis=1)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def stages(timings: dict[str, float], total: float) -> str:
    parts = [f"{stage} {seconds:.2f} s" for stage, seconds in timings.items()]
    return ", ".join(parts) + f", other {total - sum(timings.values()):.2f} s"


def peak_rss(model: Path, folder: Path, count: int, args: argparse.Namespace) -> tuple[float, float]:
    """Peak RSS (MiB) of a fresh process streaming ``count`` images, and of its largest worker."""
    command = [sys.executable, __file__, "--rss-child", str(count), "--model", str(model),
               "--image-dir", str(folder), "--batch-size", str(args.batch_size),
               "--beams", str(args.beams)]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    return figures["self"], figures["workers"]


def rss_child(args: argparse.Namespace) -> None:
    model = TIPCap.from_pretrained(args.model, device="cpu")
    paths = sorted(Path(args.image_dir).glob("*.jpg"))[: args.rss_child]
    model.caption(images=paths, num_beams=args.beams, batch_size=args.batch_size)
    self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"self": self_kib / 1024, "workers": workers_kib / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument(
        "--workers", type=int, default=None, help="Decoding workers (default: the library's)."
    )
    parser.add_argument("--train-captions", type=int, default=2000)
    parser.add_argument(
        "--rss", default="500,2000", help="Image counts for the peak-memory runs ('' for none)."
    )
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--image-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        rss_child(args)
        return

    rss_counts = [int(n) for n in args.rss.split(",") if n.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = caption_store(tmp / "train", coco_captions(args.corpus, args.train_captions), 32)
        config = load_config(ROOT / "experiments" / "tiny.yaml", [f"data.train_texts={store}"])
        model_dir = train(config, tmp / "run", progress=False)
        model = TIPCap.from_pretrained(model_dir, device="cpu")
        model.pipeline.clip  # noqa: B018 - loaded once, outside the timings
        paths = write_images(tmp / "images", max([args.images, *rss_counts]))
        timed_paths = paths[: args.images]
        print(f"{len(timed_paths)} images (640x480 JPEG), beam {args.beams}, batches of {args.batch_size}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip

        model.caption(images=timed_paths[: args.batch_size], num_beams=args.beams, workers=args.workers)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        streamed = model.caption(
            images=timed_paths, num_beams=args.beams, batch_size=args.batch_size, workers=args.workers,
            timings=timings,
        )  # fmt: skip
        streamed_s = time.perf_counter() - start
        single_timings: dict[str, float] = {}
        start = time.perf_counter()
        single = [
            model.caption(images=[path], num_beams=args.beams, workers=0, timings=single_timings)[0]
            for path in timed_paths
        ]
        single_s = time.perf_counter() - start
        assert [r.caption for r in streamed] == [r.caption for r in single], "captions differ"

        embeddings, _, _ = model.pipeline.embed_images(timed_paths, args.batch_size, args.workers)
        inputs = model.image_inputs(embeddings)
        start = time.perf_counter()
        batched = []
        for block in inputs.split(args.batch_size):
            batched += model.decode_text_side(block, num_beams=args.beams)
        generation_batched_s = time.perf_counter() - start
        start = time.perf_counter()
        one_by_one = [model.decode_text_side(row[None], num_beams=args.beams)[0] for row in inputs]
        generation_single_s = time.perf_counter() - start
        assert batched == one_by_one == [r.caption for r in streamed], "captions differ"

        count = len(timed_paths)
        # A batch decodes until its longest caption ends; one image at a time, until its own does.
        tokens = [len(model.tokenizer(r.caption)["input_ids"]) + 1 for r in streamed]
        longest = [max(tokens[i : i + args.batch_size]) for i in range(0, count, args.batch_size)]
        print(f"captions identical: {sum(tokens) / count:.1f} tokens on average (end of text included), "
              f"the longest of a batch {sum(longest) / len(longest):.1f} on average; "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        print(f"one at a time     : {count / single_s:8.1f} images/s ({single_s:.2f} s: "
              f"{stages(single_timings, single_s)})")  # fmt: skip
        print(f"streamed          : {count / streamed_s:8.1f} images/s ({streamed_s:.2f} s: "
              f"{stages(timings, streamed_s)})")  # fmt: skip
        print(f"ratio             : {single_s / streamed_s:8.1f}x")
        print(f"generation only   : {count / generation_single_s:8.1f} against "
              f"{count / generation_batched_s:.1f} images/s, "
              f"{generation_single_s / generation_batched_s:.1f}x")  # fmt: skip
        for n in rss_counts:
            own, workers = peak_rss(model_dir, tmp / "images", n, args)
            print(f"peak RSS, {n:5d} images streamed: {own:7.0f} MiB (largest worker {workers:.0f} MiB)")
        print(f"example: {streamed[0].caption!r}")


if __name__ == "__main__":
    main()
