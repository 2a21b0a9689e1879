"""Caption stores for the benchmarks: real COCO captions embedded with a tiny random CLIP (speed does not
depend on the embeddings' values)."""

from __future__ import annotations

import json
from pathlib import Path

from tipcap.config import EmbedConfig
from tipcap.data import read_captions
from tipcap.embed import embed_texts

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "dataset_coco_sample.json.gz"


def tiny_clip(directory: Path, dim: int, image_size: int = 32) -> Path:
    """An open_clip model config of embedding width ``dim``, one vision and two text layers; its images
    are ``image_size`` pixels in 16 patches, so that its cost does not grow with their size."""
    vision = {"image_size": image_size, "layers": 1, "width": 32, "patch_size": image_size // 4,
              "head_width": 16}  # fmt: skip
    config = {
        "embed_dim": dim,
        "vision_cfg": vision,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"clip-{dim}.json"
    path.write_text(json.dumps(config))
    return path


def coco_captions(corpus: Path, count: int, split: str = "val") -> list[str]:
    """The first ``count`` captions of a Karpathy file's split."""
    return [c.text for c in read_captions(corpus, split=split).captions[:count]]


def caption_store(directory: Path, captions: list[str], dim: int, image_size: int = 32) -> Path:
    """A caption store of ``captions`` embedded by :func:`tiny_clip` at width ``dim`` (and ``image_size``)."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "captions.txt"
    corpus.write_text("\n".join(captions) + "\n")
    clip = EmbedConfig(str(tiny_clip(directory, dim, image_size)), "none")
    embed_texts(corpus, clip, directory / "store", progress=False)
    return directory / "store"
