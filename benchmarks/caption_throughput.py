"""Captioning throughput: batched beam search against captioning one image at a time.

A tiny decoder is trained for a few hundred steps on real COCO captions embedded with a tiny random CLIP
(so that it writes caption-like text of realistic length); held-out caption embeddings stand in for
image embeddings (image encoding costs the same either way). Both paths call ``transformers``' generate
with the same model and settings; the captions must be identical.

Usage: python benchmarks/caption_throughput.py [--images 128] [--batch-size 64] [--beams 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from tipcap.config import EmbedConfig, load_config
from tipcap.data import read_captions
from tipcap.embed import embed_texts
from tipcap.model import TIPCap
from tipcap.store import EmbeddingStore
from tipcap.train import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "dataset_coco_sample.json.gz"
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--train-captions", type=int, default=2000)
    args = parser.parse_args()

    captions = [c.text for c in read_captions(args.corpus, split="val").captions]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "clip.json").write_text(json.dumps(TINY_CLIP))
        embed = EmbedConfig(str(tmp / "clip.json"), "none")
        for name, rows in (("train", captions[: args.train_captions]), ("test", captions[-args.images :])):
            (tmp / f"{name}.txt").write_text("\n".join(rows) + "\n")
            embed_texts(tmp / f"{name}.txt", embed, tmp / name, progress=False)
        config = load_config(ROOT / "experiments" / "tiny.yaml", [f"data.train_texts={tmp / 'train'}"])
        model = TIPCap.from_pretrained(train(config, tmp / "run", progress=False)).eval()
        embeddings = EmbeddingStore.open(tmp / "test").embeddings().float()

    def caption_batched() -> list[str]:
        out = []
        for start in range(0, len(embeddings), args.batch_size):
            out += model.decode_text_side(embeddings[start : start + args.batch_size], num_beams=args.beams)
        return out

    def caption_one_at_a_time() -> list[str]:
        return [model.decode_text_side(row[None], num_beams=args.beams)[0] for row in embeddings]

    caption_batched()  # warm-up
    start = time.perf_counter()
    batched = caption_batched()
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    single = caption_one_at_a_time()
    single_s = time.perf_counter() - start
    assert batched == single, "batched and one-at-a-time captions differ"
    words = sum(len(c.split()) for c in batched) / len(batched)
    print(f"{len(embeddings)} images, beam {args.beams}, CPU threads {torch.get_num_threads()}, "
          f"{words:.1f} words per caption; captions identical")  # fmt: skip
    print(f"one at a time          : {len(embeddings) / single_s:8.1f} images/s ({single_s:.2f} s)")
    rate = len(embeddings) / batched_s
    print(f"batched ({args.batch_size:3d} per call) : {rate:8.1f} images/s ({batched_s:.2f} s)")
    print(f"ratio                  : {single_s / batched_s:8.1f}x")
    print(f"example: {batched[0]!r}")


if __name__ == "__main__":
    main()
