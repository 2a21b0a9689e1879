"""Peak memory of ``tipcap caption`` on a folder of 224-pixel images, for growing folder sizes.

A tiny random CLIP at 224 px (patch 32, so encoding is cheap) and a decoder trained for a few steps on the
COCO test slice; random 224×224 JPEGs. Each run is its own ``tipcap caption --beams 1 --out`` process under
``/usr/bin/time -v``; its "Maximum resident set size" is printed per folder size, with the ratio to the
smallest. Captioning streams the images in batches, so the peak should not grow with the folder.

Usage: python benchmarks/caption_memory.py [--counts 500 2000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "tests" / "data" / "coco_karpathy_slice.json"
CLIP_224 = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tipcap(*args: str, timed: bool = False) -> str:
    """Run ``python -m tipcap.cli`` offline; return its output (stderr included)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "tipcap.cli", *args]
    if timed:
        command = ["/usr/bin/time", "-v", *command]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"tipcap {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "clip.json").write_text(json.dumps(CLIP_224))
        tipcap(
            "embed",
            "texts",
            "--corpus",
            str(SLICE),
            "--clip",
            str(tmp / "clip.json"),
            "--pretrained",
            "none",
            "--out",
            str(tmp / "texts"),
            "--no-progress",
        )
        output = tipcap(
            "train",
            "--config",
            str(ROOT / "experiments" / "tiny.yaml"),
            "--set",
            f"data.train_texts={tmp / 'texts'}",
            "--set",
            "train.max_steps=20",
            "--out",
            str(tmp / "run"),
            "--no-progress",
        )
        model = re.search(r"wrote (\S+)", output)[1]
        rng = np.random.default_rng(0)
        folder = tmp / "images"
        folder.mkdir()
        written = 0
        peaks = {}
        for count in sorted(args.counts):
            for number in range(written, count):
                pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{number:06d}.jpg", quality=90)
            written = count
            start = time.perf_counter()
            output = tipcap(
                "caption",
                str(folder),
                "--model",
                model,
                "--out",
                str(tmp / "captions.jsonl"),
                "--beams",
                "1",
                "--batch-size",
                str(args.batch_size),
                timed=True,
            )
            seconds = time.perf_counter() - start
            peaks[count] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", output)[1]) / 1024
            lines = (tmp / "captions.jsonl").read_text().count("\n")
            print(
                f"{count:6d} images: peak RSS {peaks[count]:7.1f} MiB, {seconds:6.1f} s, {lines} captions",
                flush=True,
            )
        smallest = min(peaks)
        for count, peak in sorted(peaks.items()):
            print(f"{count:6d} images: {peak / peaks[smallest]:.2f}x the peak of {smallest}")


if __name__ == "__main__":
    main()
