"""Image lists (from a folder, a Karpathy file, a caption map or JSONL pairs) and safe image loading."""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tipcap.data.captions import detect_format
from tipcap.data.karpathy import ImageId, is_karpathy, parse_karpathy
from tipcap.errors import TipcapError
from tipcap.io import iter_jsonl, load_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
"""The Pillow formats tipcap decodes. Pillow identifies a file by its bytes, not its name, and knows many
more formats (EPS through Ghostscript among them); an image file of another format is refused unread."""
FORMAT_NAMES = "PNG, JPEG, GIF, BMP, TIFF or WebP"
"""The formats of :data:`IMAGE_FORMATS`, as messages name them."""


class ImageError(TipcapError):
    """An image file that is missing, unreadable or corrupt."""


@dataclass(frozen=True)
class ImageRef:
    """An image to encode: its id (joins it with caption stores) and its file."""

    image_id: ImageId
    path: Path


@dataclass(frozen=True)
class ImageBytes:
    """An image file's bytes held in memory (a webdataset shard's member), and the name messages give it."""

    name: str
    data: bytes


def outside(root: Path, name: str) -> bool:
    """Whether ``root / name`` lies outside ``root``: ``name`` is absolute or climbs out with ``..``.

    The test is on the path as written (links inside the root are the user's own choice).
    """
    base = os.path.abspath(root)
    return os.path.commonpath([base, os.path.abspath(os.path.join(base, name))]) != base


def _under_root(root: Path, names: list[str], source: Path, allow_outside: bool) -> list[Path]:
    """``root / name`` for each name, refusing names that lead outside the root unless allowed."""
    escaping = [] if allow_outside else [name for name in names if outside(root, name)]
    if escaping:
        examples = ", ".join(escaping[:3]) + (", ..." if len(escaping) > 3 else "")
        raise TipcapError(
            f"{source}: {len(escaping):,} image path(s) lead outside the image root {root} ({examples}); "
            "fix the paths or --image-root, or pass --allow-outside."
        )
    return [root / name for name in names]


def list_images(
    source: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    allow_outside: bool = False,
) -> list[ImageRef]:
    """List the images named by ``source``.

    Args:
        source: an image folder (searched recursively; ids are paths relative to it), a Karpathy split
            file (ids as in its captions: ``cocoid`` or the numeric file stem), a ``{image: [captions]}``
            JSON or a JSONL of pairs (ids are the image paths as written there).
        image_root: folder the file's image paths are relative to (default: the file's folder).
        split: Karpathy split to keep (Karpathy files only).
        allow_outside: accept file paths that lead outside ``image_root`` (refused by default).
    """
    source = Path(source)
    if source.is_dir():
        if split is not None:
            raise TipcapError("--split applies to Karpathy split files only, not to an image folder.")
        files = sorted(
            (p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(source).as_posix(),
        )
        if not files:
            raise TipcapError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)}) found.")
        return [ImageRef(p.relative_to(source).as_posix(), p) for p in files]
    root = Path(image_root) if image_root is not None else source.parent
    kind = detect_format(source)
    if kind == "json":
        document = load_json(source)
        if is_karpathy(document):
            entries = parse_karpathy(document, source, split)
            paths = _under_root(root, [e.relative_path for e in entries], source, allow_outside)
            return [ImageRef(e.image_id, path) for e, path in zip(entries, paths, strict=True)]
        if not isinstance(document, dict):
            raise TipcapError(f"{source}: expected a Karpathy split file or an object keyed by image file.")
        names = list(document)
    elif kind == "jsonl":
        names = []
        for number, record in iter_jsonl(source):
            if not isinstance(record, dict) or "image" not in record:
                raise TipcapError(f"{source}: line {number} has no 'image' field.")
            names.append(str(record["image"]))
        names = list(dict.fromkeys(names))
    else:
        raise TipcapError(f"{source}: a text corpus names no images; pass an image folder or a JSON file.")
    if split is not None:
        raise TipcapError(f"--split applies to Karpathy split files only; {source} is not one.")
    paths = _under_root(root, names, source, allow_outside)
    return [ImageRef(name, path) for name, path in zip(names, paths, strict=True)]


def subsample(images: list[ImageRef], limit: str | None, seed: int = 0) -> list[ImageRef]:
    """Keep a seeded random subset of ``limit`` images (``"500"``) or percent (``"1%"``), in list order."""
    if limit is None:
        return images
    try:
        count = round(len(images) * float(limit[:-1]) / 100) if limit.endswith("%") else int(limit)
    except (ValueError, OverflowError):
        raise TipcapError(
            f"--limit {limit!r}: expected a number of images (500) or a percentage (1%)."
        ) from None
    if count <= 0:
        raise TipcapError(f"--limit {limit!r} keeps no images out of {len(images)}.")
    if limit.endswith("%") and float(limit[:-1]) > 100:
        raise TipcapError(f"--limit {limit!r}: a percentage is at most 100%.")
    if count >= len(images):
        return images
    keep = sorted(random.Random(seed).sample(range(len(images)), count))
    return [images[i] for i in keep]


def load_image(path: Path | ImageBytes, draft: int | None = None) -> Image.Image:
    """Decode an image file (or its bytes) fully into RGB; only the formats of :data:`IMAGE_FORMATS` are read.

    ``draft``: decode a JPEG at the smallest of its reduced DCT scales (1/2, 1/4, 1/8) that keeps both
    sides at least ``draft`` pixels (Pillow's ``Image.draft``), which skips most of the full-size decode;
    the pixels differ from a full decode's. Other formats are decoded in full.

    Raises:
        ImageError: when the file is missing, not an image of those formats, or truncated/corrupt.
    """
    name, source = (path.name, io.BytesIO(path.data)) if isinstance(path, ImageBytes) else (path, path)
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as image:
            if draft is not None:
                image.draft("RGB", (draft, draft))
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a {FORMAT_NAMES} image") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: unreadable or corrupt image ({e})") from None
