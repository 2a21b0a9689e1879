"""Latency of `tipcap serve`: caption and re-caption requests for one image, over HTTP.

The server runs in this process (uvicorn in a thread, as ``tipcap serve`` runs it) with the models of a
demo output folder; requests go through httpx over a kept-alive connection, one at a time.

- **caption**: what dropping a new image costs: the upload (``POST /api/images``: decoding, CLIP image
  encoding) and its caption without prompt (``POST /api/caption``: the caption and CLIP's entity
  guesses). Each request sends the image with a different PNG text chunk, so the server cannot reuse an
  earlier upload.
- **re-caption**: clicking a guess: ``POST /api/caption`` with prompt words (the image's two most probable
  entities) for an image the server holds.

Prints p50 and p95 over ``--requests`` of each (after a few unmeasured warm-up requests) and the machine's
load average, since other processes share its cores.

Usage: python benchmarks/serve_latency.py [--demo runs/demo] [--method NAME] [--image PATH] [--requests 50]
       [--beams 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import torch
from PIL import Image, PngImagePlugin

from tipcap.app.server import serving
from tipcap.app.service import CaptionService, load_models
from tipcap.data.karpathy import read_karpathy

WARM_UP = 3


def demo_image(demo: Path) -> Path:
    """The first test image of the world a demo folder was run on (its grid records the Karpathy file)."""
    karpathy = Path(json.loads((demo / "grid.json").read_text())["fixed"]["karpathy"])
    return karpathy.parent / read_karpathy(karpathy, "test")[0].relative_path


def png_variant(image: Image.Image, index: int) -> bytes:
    """The image as PNG bytes that differ per ``index`` (a text chunk), with the same pixels."""
    info = PngImagePlugin.PngInfo()
    info.add_text("request", str(index))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def percentiles(seconds: list[float]) -> str:
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return (
        f"p50 {1000 * cuts[49]:6.1f} ms   p95 {1000 * cuts[94]:6.1f} ms   max {1000 * max(seconds):6.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a tipcap demo output folder")
    parser.add_argument("--method", default=None, help="the method to ask (default: the page's default)")
    parser.add_argument("--image", type=Path, default=None, help="default: the demo world's first test image")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--beams", type=int, default=3)
    args = parser.parse_args()

    image = Image.open(args.image or demo_image(args.demo)).convert("RGB")
    service = CaptionService(load_models([args.demo], device="cpu"))
    method = args.method or service.describe()["default"]
    load_before = os.getloadavg()
    upload_and_caption, recaption = [], []
    with serving(service) as url, httpx.Client(base_url=url, timeout=60) as http:

        def caption(image_id: str, prompt: list[str]) -> dict:
            payload = {"image_id": image_id, "method": method, "prompt": prompt, "beams": args.beams}
            answer = http.post("/api/caption", json=payload)
            answer.raise_for_status()
            return answer.json()

        first = None
        for index in range(WARM_UP + args.requests):
            start = time.perf_counter()
            held = http.post(
                "/api/images",
                params={"name": "image.png"},
                content=png_variant(image, index),
                headers={"Content-Type": "image/png"},
            )
            held.raise_for_status()
            first = caption(held.json()["image_id"], [])
            if index >= WARM_UP:
                upload_and_caption.append(time.perf_counter() - start)
        words = [guess["word"] for guess in first["guesses"][:2]]
        for index in range(WARM_UP + args.requests):
            start = time.perf_counter()
            answer = caption(first["image_id"], words)
            if index >= WARM_UP:
                recaption.append(time.perf_counter() - start)
    load_after = os.getloadavg()

    print(f"method {method} (prompt: {service.models[method].config.prompt}), beams {args.beams}, "
          f"image {image.width}x{image.height}, {args.requests} requests each, CPU, "
          f"{torch.get_num_threads()} torch threads on {os.cpu_count()} cores")  # fmt: skip
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"caption     (upload + caption, no prompt):  {percentiles(upload_and_caption)}")
    print(f"re-caption  (prompt {', '.join(words)}):  {percentiles(recaption)}")
    print(f"  without prompt: {first['caption']}")
    print(f"  with prompt:    {answer['caption']}")


if __name__ == "__main__":
    main()
