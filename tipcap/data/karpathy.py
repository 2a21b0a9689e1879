"""Karpathy split files (``dataset_coco.json``, ``dataset_flickr30k.json``), validated entry by entry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tipcap.errors import TipcapError
from tipcap.io import load_json

ImageId = int | str

SPLITS = ("train", "val", "test", "restval")
# Karpathy's ``restval`` images are training images held back from the original val2014 set.
_SPLIT_MEMBERS = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}, "restval": {"restval"}}


@dataclass(frozen=True)
class KarpathyImage:
    """One image entry of a Karpathy split file."""

    image_id: ImageId
    relative_path: str
    split: str | None
    captions: tuple[str, ...]


def image_id_of(entry: dict[str, Any]) -> ImageId:
    """An explicit ``image_id``, else COCO's ``cocoid``, else the file name's stem (an int when all digits).

    Flickr30k file names are numeric (``1000092795.jpg``), so both data sets get integer ids that
    COCO-format result files accept. ``image_id`` is written by ``prepare nocaps``, whose file names are
    hexadecimal Open Images ids while its results files use the annotation file's integer ``id``.
    """
    if "image_id" in entry:
        return entry["image_id"]
    if "cocoid" in entry:
        return entry["cocoid"]
    stem = Path(entry["filename"]).stem
    return int(stem) if stem.isdigit() else stem


def split_matches(split: str | None, wanted: str | None) -> bool:
    """Whether an entry of ``split`` belongs to the requested split (``None`` wants everything)."""
    return wanted is None or split in _SPLIT_MEMBERS[wanted]


def check_split(wanted: str | None) -> None:
    """Refuse split names that are not Karpathy's."""
    if wanted is not None and wanted not in _SPLIT_MEMBERS:
        raise TipcapError(f"split {wanted!r} is not a Karpathy split; use one of {', '.join(SPLITS)}.")


def is_karpathy(document: Any) -> bool:
    """A Karpathy file is a JSON object with an ``images`` list."""
    return isinstance(document, dict) and isinstance(document.get("images"), list)


def parse_karpathy(document: dict[str, Any], path: Path, split: str | None = None) -> list[KarpathyImage]:
    """Validate and convert the entries of a parsed Karpathy file, keeping those of ``split``.

    Raises:
        TipcapError: naming the entry and the field when a required field is missing or mistyped.
    """
    check_split(split)
    images = []
    for index, entry in enumerate(document["images"]):
        where = f"{path}: images[{index}]"
        if not isinstance(entry, dict):
            raise TipcapError(f"{where} is not a JSON object.")
        if not isinstance(entry.get("filename"), str):
            raise TipcapError(f"{where} has no 'filename' string field.")
        if "cocoid" in entry and not isinstance(entry["cocoid"], int):
            raise TipcapError(f"{where}: 'cocoid' is not an integer.")
        image_id = entry.get("image_id", 0)
        if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
            raise TipcapError(f"{where}: 'image_id' is neither an integer nor a string.")
        where = f"{where} ({entry['filename']})"
        entry_split = entry.get("split")
        if split is not None and entry_split is None:
            raise TipcapError(f"{where} has no 'split' field, so --split {split} cannot be applied.")
        if not split_matches(entry_split, split):
            continue
        if "sentences" not in entry:
            raise TipcapError(f"{where} has no 'sentences' field.")
        if not isinstance(entry["sentences"], list):
            raise TipcapError(f"{where}: 'sentences' is not a list.")
        captions = []
        for number, sentence in enumerate(entry["sentences"]):
            if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                raise TipcapError(f"{where}: sentences[{number}] has no 'raw' string field.")
            captions.append(sentence["raw"])
        relative_path = str(Path(entry.get("filepath", "")) / entry["filename"])
        images.append(KarpathyImage(image_id_of(entry), relative_path, entry_split, tuple(captions)))
    return images


def read_karpathy(path: Path, split: str | None = None) -> list[KarpathyImage]:
    """Read a Karpathy split file (``.json`` or ``.json.gz``) and keep the images of ``split``."""
    document = load_json(path)
    if not is_karpathy(document):
        raise TipcapError(f"{path}: not a Karpathy split file (expected an object with an 'images' list).")
    return parse_karpathy(document, path, split)
