"""Caption corpora in every accepted format, normalised in one place.

Formats (detected from the file name and content):

- Karpathy split JSON (``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}``, ``.json[.gz]``);
- ``{image_file: [captions]}`` JSON (``.json[.gz]``);
- JSONL image–caption pairs, one ``{"image": path, "caption": str}`` per line (``.jsonl[.gz]``);
- plain text, one caption per line (``.txt[.gz]``; such captions have no image id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tipcap.data.karpathy import ImageId, is_karpathy, parse_karpathy
from tipcap.errors import TipcapError
from tipcap.io import iter_jsonl, load_json, read_lines

PeriodPolicy = Literal["keep", "strip", "add"]
PERIOD_POLICIES: tuple[str, ...] = ("keep", "strip", "add")

_WHITESPACE = re.compile(r"\s+")
_TRAILING_PERIODS = re.compile(r"[\s.]+$")


def normalize_caption(text: str, period: PeriodPolicy = "add") -> str:
    """Collapse whitespace and apply the trailing-period policy.

    ``keep`` leaves the end as written; ``strip`` removes trailing periods; ``add`` makes every caption
    end in exactly one period (unless it ends in ``!`` or ``?``), which gives the decoder one consistent
    sentence end to learn. Returns ``""`` for a caption with no words.
    """
    text = _WHITESPACE.sub(" ", text).strip()
    if period == "keep" or not text:
        return text
    text = _TRAILING_PERIODS.sub("", text)
    if period == "add" and text and text[-1] not in "!?":
        text += "."
    return text


@dataclass(frozen=True)
class Caption:
    """A caption and the id of the image it describes (``None`` for text-only corpora)."""

    image_id: ImageId | None
    text: str


@dataclass
class CaptionCorpus:
    """The normalised, non-empty captions of one file (and split), in file order."""

    path: Path
    format: str
    split: str | None
    period: str
    captions: list[Caption]
    empty_skipped: int

    def __len__(self) -> int:
        return len(self.captions)


def detect_format(path: Path) -> str:
    """``karpathy``, ``json-map``, ``jsonl`` or ``text``, from the suffix (and content for JSON)."""
    if path.is_dir():
        raise TipcapError(f"{path}: is a directory, expected a corpus file.")
    if not path.exists():
        raise TipcapError(f"{path}: no such file or folder.")
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    suffix = suffixes[-1] if suffixes else ""
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".txt", ".text", ".captions"):
        return "text"
    raise TipcapError(
        f"{path}: unknown corpus format; use a Karpathy or {{image: [captions]}} .json, "
        "a .jsonl of image-caption pairs, or a .txt with one caption per line (each optionally .gz)."
    )


def _raw_captions(path: Path, split: str | None) -> tuple[str, list[tuple[ImageId | None, str, str]]]:
    """Return the format and ``(image_id, raw caption, where)`` triples of a corpus file."""
    kind = detect_format(path)
    if kind == "json":
        document = load_json(path)
        if is_karpathy(document):
            images = parse_karpathy(document, path, split)
            return "karpathy", [
                (image.image_id, caption, f"{path}: image {image.image_id}, caption {number}")
                for image in images
                for number, caption in enumerate(image.captions)
            ]
        kind = "json-map"
    if split is not None:
        raise TipcapError(f"--split applies to Karpathy split files only; {path} is a {kind} corpus.")
    if kind == "json-map":
        return kind, _map_captions(document, path)
    if kind == "jsonl":
        return kind, _jsonl_captions(path)
    return kind, [(None, line, f"{path}: line {n}") for n, line in enumerate(read_lines(path), start=1)]


def _map_captions(document: object, path: Path) -> list[tuple[ImageId | None, str, str]]:
    if not isinstance(document, dict):
        raise TipcapError(
            f"{path}: expected a Karpathy split file or an object mapping image files to captions."
        )
    rows: list[tuple[ImageId | None, str, str]] = []
    for image, captions in document.items():
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise TipcapError(f"{path}: entry {image!r} must map to a caption or a list of captions.")
        rows.extend((image, caption, f"{path}: entry {image!r}") for caption in captions)
    return rows


def _jsonl_captions(path: Path) -> list[tuple[ImageId | None, str, str]]:
    rows: list[tuple[ImageId | None, str, str]] = []
    for number, record in iter_jsonl(path):
        for field in ("image", "caption"):
            if not isinstance(record, dict) or field not in record:
                raise TipcapError(f"{path}: line {number} has no {field!r} field.")
        if not isinstance(record["caption"], str):
            raise TipcapError(f"{path}: line {number}: 'caption' is not a string.")
        rows.append((str(record["image"]), record["caption"], f"{path}: line {number}"))
    return rows


def read_captions(
    path: str | Path,
    split: str | None = None,
    period: PeriodPolicy = "add",
    strict: bool = False,
) -> CaptionCorpus:
    """Read and normalise the captions of a corpus file.

    Args:
        path: a Karpathy JSON, ``{image: [captions]}`` JSON, JSONL pairs or text file (``.gz`` accepted).
        split: Karpathy split to keep (``train`` includes ``restval``); ``None`` keeps all.
        period: trailing-period policy, see :func:`normalize_caption`.
        strict: raise on the first empty caption instead of skipping and counting it.

    Raises:
        TipcapError: for a missing or malformed file, a missing field (naming field and entry), or,
            when ``strict``, an empty caption.
    """
    path = Path(path)
    kind, rows = _raw_captions(path, split)
    captions: list[Caption] = []
    empty = 0
    for image_id, raw, where in rows:
        text = normalize_caption(raw, period)
        if not text:
            if strict:
                raise TipcapError(f"{where} is empty (drop --strict to skip empty captions).")
            empty += 1
            continue
        captions.append(Caption(image_id, text))
    if not captions:
        raise TipcapError(f"{path}: no captions" + (f" in split {split!r}." if split else "."))
    return CaptionCorpus(path, kind, split, period, captions, empty)
