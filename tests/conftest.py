"""Shared fixtures: tiny CLIP configs, a slice of real COCO captions, small image folders.

Everything is offline: ``HF_HUB_OFFLINE`` is set before any Hugging Face client is imported, so a test
that reaches for the hub fails at once instead of retrying for minutes.
"""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from PIL import Image

DATA = Path(__file__).parent / "data"
COCO_SLICE = DATA / "coco_karpathy_slice.json"


def tiny_clip_config(text_width: int = 32, text_layers: int = 2, embed_dim: int = 32) -> dict:
    """An open_clip model config small enough to build in a fraction of a second."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": text_width,
            "heads": 2,
            "layers": text_layers,
        },
    }


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """Path of a tiny open_clip model-config JSON."""
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.json"
    path.write_text(json.dumps(tiny_clip_config()))
    return path


@pytest.fixture(scope="session")
def other_clip(tmp_path_factory) -> Path:
    """A second tiny config with a different text tower."""
    path = tmp_path_factory.mktemp("clip") / "other-clip.json"
    path.write_text(json.dumps(tiny_clip_config(text_width=48, text_layers=1)))
    return path


@pytest.fixture
def coco_slice() -> Path:
    """24 real COCO images' captions in Karpathy's schema (12 val, 12 restval)."""
    return COCO_SLICE


def write_images(folder: Path, count: int, corrupt: int = 0) -> list[Path]:
    """Write ``count`` small valid JPEGs and ``corrupt`` truncated ones; return all paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}.jpg"
        Image.new("RGB", (40, 30), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(path)
        paths.append(path)
    for i in range(corrupt):
        path = folder / f"broken_{i:03d}.jpg"
        good = paths[0].read_bytes()
        path.write_bytes(good[: len(good) // 3])
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A folder of six valid JPEGs and one truncated JPEG."""
    write_images(tmp_path / "images", 6, corrupt=1)
    return tmp_path / "images"
