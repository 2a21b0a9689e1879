"""Captioning throughput: images from disk, one at a time against streamed batches, and the ceiling.

A tiny decoder is trained for a few hundred steps on real COCO captions embedded with a tiny random CLIP
(``--image-size`` pixels, 224 as ViT-B/32's, in 16 patches), so that it writes caption-like text of
realistic length. Images are JPEG files of COCO's size (640×480). Ways to caption them, all through
``TIPCap.caption`` with the same model:

- **one at a time**, as earlier versions captioned: ``caption(images=[path])`` per image, decoded in this
  process, with ``transformers``' ``generate`` (``search="transformers"``);
- **streamed**: ``caption(images=paths)`` with the defaults (tipcap's beam search): decoding threads
  decode and preprocess the next batches while this one is encoded by CLIP and captioned (the fastest of
  ``--runs``);
- **streamed, JPEG draft** (``--jpeg-draft``): the same with ``jpeg_draft=True`` (JPEGs decoded at a
  reduced DCT scale), with the cosine of its CLIP embeddings to the reference preprocessing's;
- **beam search alone**, from CLIP embeddings already computed: one at a time (``generate``) against
  batches, tipcap's search against ``generate``'s, ``--runs`` times interleaved; and the share of
  ``generate``'s time spent in the language model's forward passes, which bounds what any search that
  runs the same passes can gain over it.

The captions must be identical. Where the time goes is printed per stage (``decoding`` is the time spent
waiting for decoded images), with the machine's load average, and the **ceiling** that the stage timings
set. Each stage's work is measured alone on one core (one thread; the fastest of ``--runs``): decoding and
preprocessing every image, CLIP and beam search on every batch. The streamed path cannot take less than that
work spread over the available cores; nor less than CLIP and beam search in a row (measured with all
threads), which run one batch at a time; and the last batch's CLIP and beam search start only once every
image is decoded and the earlier batches are captioned, so it takes at least the rest of the work spread
over the cores plus the last batch's CLIP and beam search with all threads. The ceiling is the largest of
the three, and the streamed path's share of it is printed. Peak memory (RSS) is measured in fresh processes
that stream ``--rss`` images each.

Usage: python benchmarks/caption_throughput.py [--images 128] [--batch-size 64] [--beams 5] [--runs 3]
    [--image-size 224] [--jpeg-draft] [--rss 500,2000]
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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from beam_search import ForwardClock
from PIL import Image
from stores import DEFAULT_CORPUS, ROOT, caption_store, coco_captions

from tipcap.clip_images import image_batches
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


def peak_rss(model: Path, folder: Path, count: int, args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a fresh process streaming ``count`` images."""
    command = [sys.executable, __file__, "--rss-child", str(count), "--model", str(model),
               "--image-dir", str(folder), "--batch-size", str(args.batch_size),
               "--beams", str(args.beams)]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["self"]


def rss_child(args: argparse.Namespace) -> None:
    model = TIPCap.from_pretrained(args.model, device="cpu")
    paths = sorted(Path(args.image_dir).glob("*.jpg"))[: args.rss_child]
    model.caption(images=paths, num_beams=args.beams, batch_size=args.batch_size)
    print(json.dumps({"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


@dataclass
class Work:
    """The stages' seconds for all the images, each measured alone on one core (``decode``, ``clip``,
    ``beam``), and CLIP and beam search's seconds with all threads (``clip_beam``), over ``batches``."""

    decode: float
    clip: float
    beam: float
    clip_beam: float
    batches: int
    cores: int

    def ceiling_seconds(self) -> float:
        """The least time streamed captioning can take (see the module)."""
        total = self.decode + self.clip + self.beam
        last = (self.clip + self.beam) / self.batches
        return max(
            total / self.cores, self.clip_beam, (total - last) / self.cores + self.clip_beam / self.batches
        )


def ceiling(work: Work, count: int, single_s: float, streamed_s: float) -> str:
    """The ceiling, how it is made, and the streamed path's share of it."""
    ceiling_s = work.ceiling_seconds()
    return (
        f"{count / ceiling_s:8.1f} images/s ({ceiling_s:.2f} s; on one core, decoding and preprocessing "
        f"{work.decode / count * 1000:.2f} ms per image, CLIP {work.clip:.3f} s and beam search "
        f"{work.beam:.3f} s for all; CLIP and beam search with all threads {work.clip_beam:.3f} s; "
        f"{work.batches} batches, {work.cores} cores), {single_s / ceiling_s:.1f}x one at a time; streamed "
        f"reaches {ceiling_s / streamed_s:.0%} of it"
    )


def one_core(seconds: Callable[[], float], runs: int = 1) -> float:
    """The fewest of ``runs`` calls of ``seconds()``, run with torch on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return min(seconds() for _ in range(runs))
    finally:
        torch.set_num_threads(threads)


def decode_seconds(model: TIPCap, paths: list[Path], batch_size: int, jpeg_draft: bool) -> float:
    """Seconds to decode and preprocess ``paths`` in this process (one core's work)."""
    start = time.perf_counter()
    for _ in image_batches(paths, model.pipeline.clip.preprocess, batch_size, 0, jpeg_draft):
        pass
    return time.perf_counter() - start


def clip_seconds(model: TIPCap, paths: list[Path], batch_size: int) -> float:
    """Seconds CLIP takes to encode ``paths``' pixels, decoded beforehand, in batches of ``batch_size``."""
    clip = model.pipeline.clip
    pixels = [batch[1] for batch in image_batches(paths, clip.preprocess, batch_size, 0)]
    start = time.perf_counter()
    for batch in pixels:
        clip.encode_images(batch)
    return time.perf_counter() - start


def beam_search_runs(
    model: TIPCap,
    inputs: torch.Tensor,
    args: argparse.Namespace,
    searches: tuple[str, ...] = ("tipcap", "transformers"),
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[str]]]:
    """Batched beam search from text-side inputs ``[N, d]`` by each of ``searches``, ``--runs`` times
    interleaved: per search, the seconds of every run with the seconds of its language model's forward
    passes (timed by hooks around them), and the captions."""
    seconds: dict[str, list[tuple[float, float]]] = {search: [] for search in searches}
    captions: dict[str, list[str]] = {}
    for _ in range(args.runs):
        for search in seconds:
            with ForwardClock(model.language_model, model.device) as forward:
                start = time.perf_counter()
                captions[search] = [
                    caption
                    for block in inputs.split(args.batch_size)
                    for caption in model.decode_text_side(block, num_beams=args.beams, search=search)
                ]
                seconds[search].append((time.perf_counter() - start, forward.seconds))
    return seconds, captions


def stream(
    model: TIPCap, paths: list[Path], args: argparse.Namespace, jpeg_draft: bool
) -> tuple[list, float, dict[str, float]]:
    """Streamed captioning of ``paths``, ``--runs`` times: the results, and the fastest run's seconds
    and stage timings."""
    runs = []
    for _ in range(args.runs):
        timings: dict[str, float] = {}
        start = time.perf_counter()
        results = model.caption(
            images=paths, num_beams=args.beams, batch_size=args.batch_size, workers=args.workers,
            timings=timings, jpeg_draft=jpeg_draft,
        )  # fmt: skip
        runs.append((time.perf_counter() - start, timings))
    seconds, timings = min(runs, key=lambda run: run[0])
    return results, seconds, timings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument(
        "--runs", type=int, default=3, help="Runs of streaming and of beam search alone (the fastest counts)."
    )
    parser.add_argument("--image-size", type=int, default=224, help="The tiny CLIP's input, in pixels.")
    parser.add_argument(
        "--jpeg-draft", action="store_true", help="Also stream with JPEGs decoded at a reduced DCT scale."
    )
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
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        captions = coco_captions(args.corpus, args.train_captions)
        store = caption_store(tmp / "train", captions, 32, args.image_size)
        config = load_config(ROOT / "experiments" / "tiny.yaml", [f"data.train_texts={store}"])
        model_dir = train(config, tmp / "run", progress=False)
        model = TIPCap.from_pretrained(model_dir, device="cpu")
        model.pipeline.clip  # noqa: B018 - loaded once, outside the timings
        paths = write_images(tmp / "images", max([args.images, *rss_counts]))
        timed_paths = paths[: args.images]
        count = len(timed_paths)
        print(f"{count} images (640x480 JPEG), CLIP input {args.image_size} px, beam {args.beams}, "
              f"batches of {args.batch_size}, {torch.get_num_threads()} threads, {cores} CPUs available, "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip

        model.caption(images=timed_paths[: args.batch_size], num_beams=args.beams, workers=args.workers)
        streamed, streamed_s, timings = stream(model, timed_paths, args, jpeg_draft=False)
        single_timings: dict[str, float] = {}
        start = time.perf_counter()
        single = [
            model.caption(
                images=[path], num_beams=args.beams, workers=0, timings=single_timings, search="transformers"
            )[0]
            for path in timed_paths
        ]
        single_s = time.perf_counter() - start
        assert [r.caption for r in streamed] == [r.caption for r in single], "captions differ"

        embeddings, _, _ = model.pipeline.embed_images(timed_paths, args.batch_size, args.workers)
        inputs = model.image_inputs(embeddings)
        search_s, searched = beam_search_runs(model, inputs, args)
        start = time.perf_counter()
        one_by_one = [
            model.decode_text_side(row[None], num_beams=args.beams, search="transformers")[0]
            for row in inputs
        ]
        generation_single_s = time.perf_counter() - start
        same = sum(a == b for a, b in zip(searched["tipcap"], searched["transformers"], strict=True))
        assert searched["tipcap"] == one_by_one == [r.caption for r in streamed], f"{same}/{count} identical"

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
        ours = min(search_s["tipcap"])[0]
        theirs, forward = min(search_s["transformers"])
        forward_share = forward / theirs
        print(f"beam search alone : one at a time (generate) {count / generation_single_s:.1f} images/s; "
              f"batched, generate {count / theirs:.1f}, tipcap {count / ours:.1f} images/s (best of "
              f"{args.runs}: generate {', '.join(f'{t:.3f}' for t, _ in search_s['transformers'])} s, tipcap "
              f"{', '.join(f'{t:.3f}' for t, _ in search_s['tipcap'])} s), tipcap {theirs / ours:.2f}x "
              f"generate, {generation_single_s / ours:.1f}x one at a time; captions identical "
              f"{same}/{count}")  # fmt: skip
        print(
            f"language model    : {forward_share:.0%} of generate's time is the language model's forward "
            f"passes, so a search that runs the same passes is at most {1 / forward_share:.2f}x generate"
        )

        batches = -(-count // args.batch_size)
        clip_s = clip_seconds(model, timed_paths, args.batch_size)
        work = Work(
            decode=one_core(lambda: decode_seconds(model, timed_paths, args.batch_size, False), args.runs),
            clip=one_core(lambda: clip_seconds(model, timed_paths, args.batch_size), args.runs),
            beam=one_core(lambda: min(beam_search_runs(model, inputs, args, ("tipcap",))[0]["tipcap"])[0]),
            clip_beam=clip_s + ours,
            batches=batches,
            cores=cores,
        )
        print(f"ceiling           : {ceiling(work, count, single_s, streamed_s)}")
        if args.jpeg_draft:
            jpeg_draft(model, timed_paths, embeddings, streamed, single_s, work, args)
        for n in rss_counts:
            print(
                f"peak RSS, {n:5d} images streamed: {peak_rss(model_dir, tmp / 'images', n, args):7.0f} MiB"
            )
        print(f"example: {streamed[0].caption!r}")


def jpeg_draft(
    model: TIPCap,
    paths: list[Path],
    reference: torch.Tensor,
    streamed: list,
    single_s: float,
    work: Work,
    args: argparse.Namespace,
) -> None:
    """Stream ``paths`` with JPEGs decoded at a reduced DCT scale: images/s, its ceiling (``work`` with its
    own decoding), and the cosine of its CLIP embeddings to the ``reference`` ones ``[N, d]``."""
    count = len(paths)
    drafted, streamed_s, timings = stream(model, paths, args, jpeg_draft=True)
    embeddings, _, _ = model.pipeline.embed_images(paths, args.batch_size, args.workers, jpeg_draft=True)
    cosines = torch.nn.functional.cosine_similarity(embeddings, reference)
    same = sum(a.caption == b.caption for a, b in zip(drafted, streamed, strict=True))
    work = replace(
        work, decode=one_core(lambda: decode_seconds(model, paths, args.batch_size, True), args.runs)
    )
    print(f"JPEG draft        : {count / streamed_s:8.1f} images/s ({streamed_s:.2f} s: "
          f"{stages(timings, streamed_s)}), {single_s / streamed_s:.1f}x one at a time; cosine to the "
          f"reference embeddings min {cosines.min():.5f}, mean {cosines.mean():.5f}; captions as the "
          f"reference's {same}/{count}")  # fmt: skip
    print(f"ceiling with draft: {ceiling(work, count, single_s, streamed_s)}")


if __name__ == "__main__":
    main()
