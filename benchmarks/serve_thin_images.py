"""Peak memory of the `tipcap serve` process while it takes thin images: W × 1 and 1 × W pixels.

CLIP preprocessing scales an image's shortest side to CLIP's input before cropping its centre, so without a
bound on the shape a W × 1 image grows 224 × 224-fold for a 224-pixel CLIP: 3,000 × 1 pixels to
672,000 × 224 (450 MB as RGB), 10^6 × 1 to 150 GB. This runs ``tipcap serve`` as its own process (an
untrained decoder on a tiny random CLIP of 224-pixel input, so encoding is cheap) afresh for each image:
a square one for the baseline, then each thin one, uploaded once over HTTP. Each figure is the peak
resident set size of that server process and of the processes it waited for (``os.wait4``), loading
included. Linux (``ru_maxrss`` in KB).

Prints, per image, the answer's status (and the start of its error) and the server's peak RSS in MB.
Against code without the bound, keep ``--widths`` small (3000 took some 330 MB more than the baseline);
larger widths would exhaust the machine's memory.

Usage: python benchmarks/serve_thin_images.py [--widths 20 100 1000 10000 100000 1000000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from PIL import Image

from tipcap.clip import ClipSpec
from tipcap.config import ModelConfig
from tipcap.model import TIPCap
from tipcap.training.data import word_level_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CLIP_224 = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 32, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
WORDS = ["red circle", "blue square"]


def build_model(folder: Path) -> Path:
    """An untrained hard-prompt decoder on :data:`CLIP_224`, saved in ``folder / "model"``."""
    (folder / "clip.json").write_text(json.dumps(CLIP_224))
    tokenizer = word_level_tokenizer([f"a {word} ." for word in WORDS])
    language_model = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64,
                      "vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
    config = ModelConfig(clip_dim=32, language_model_config=language_model, prompt="hard",
                         prefix_length=2, max_caption_tokens=8)  # fmt: skip
    model = TIPCap.build(config, tokenizer, entity_names=WORDS, clip_spec=ClipSpec(str(folder / "clip.json")))
    model.save_pretrained(folder / "model")
    return folder / "model"


def png(size: tuple[int, int]) -> bytes:
    """A black greyscale PNG of ``size`` (a few hundred bytes even at 10^6 × 1)."""
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, format="PNG")
    return buffer.getvalue()


def peak_mb(model: Path, data: bytes) -> tuple[str, float]:
    """Serve ``model`` in a fresh ``tipcap serve`` process, upload ``data`` once, stop the server; the
    answer (status and the start of its error) and the peak RSS, in MB, of the server and the processes
    it waited for (its image workers, if any)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = ["-m", "tipcap.cli", "serve", "--model", str(model), "--port", "0", "--device", "cpu"]
    server = subprocess.Popen(
        [sys.executable, *command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = next(
            (found.group(1) for line in server.stdout if (found := re.search(r"at (http://\S+/)", line))),
            None,
        )
        if url is None:
            sys.exit("tipcap serve did not start")
        with httpx.Client(base_url=url, timeout=600) as http:
            answer = http.post(
                "/api/images",
                params={"name": "thin.png"},
                content=data,
                headers={"Content-Type": "image/png"},
            )
        said = f"{answer.status_code} {'' if answer.is_success else answer.text[:46]}"
    finally:
        server.terminate()
    # wait4's usage covers the process and its reaped children; ru_maxrss is in KB on Linux.
    _, status, usage = os.wait4(server.pid, 0)
    server.returncode = os.waitstatus_to_exitcode(status)
    return said, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[20, 100, 1000, 10_000, 100_000, 1_000_000])
    args = parser.parse_args()

    images = [("224 x 224 (baseline)", (224, 224))]
    for width in args.widths:
        images += [(f"{width} x 1", (width, 1)), (f"1 x {width}", (1, width))]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp))
        print(f"{'image':>22}  {'bytes':>6}  {'answer':<50}  peak RSS")
        for label, size in images:
            data = png(size)
            said, peak = peak_mb(model, data)
            print(f"{label:>22}  {len(data):>6}  {said:<50}  {peak:6.0f} MB", flush=True)


if __name__ == "__main__":
    main()
