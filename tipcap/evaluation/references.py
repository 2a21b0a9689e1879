"""Reading references and predictions, and pairing them for scoring.

References are a COCO caption annotation file (``{"images", "annotations"}``) or a Karpathy split file;
predictions a COCO results file (``[{"image_id", "caption"}]``). :func:`match_predictions` pairs the two
and reports every prediction or reference it cannot score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tipcap.data.karpathy import ImageId, check_split, image_id_of, is_karpathy, parse_karpathy, split_matches
from tipcap.errors import TipcapError
from tipcap.io import load_json

REPORT_IDS = 10
"""How many image ids each problem of a matching report lists."""


def _is_image_id(value: Any) -> bool:
    """Image ids are integers or strings (``True`` is not an id, although Python counts it as an int)."""
    return isinstance(value, (int, str)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------


def load_references(path: str | Path, split: str | None = None) -> dict[ImageId, list[str]]:
    """Reference captions per image from a COCO caption annotation file or a Karpathy split file.

    See :func:`read_references`, which also returns each image's domain.
    """
    return read_references(path, split).captions


@dataclass(frozen=True)
class ReferenceSet:
    """What a references file holds: the captions per image id, each image's domain where the file gives
    one (NoCaps: ``in-domain``, ``near-domain``, ``out-domain``; else empty), and the data set's name (the
    file's ``dataset`` field, else its name without suffixes)."""

    captions: dict[ImageId, list[str]]
    domains: dict[ImageId, str]
    dataset: str


def read_references(path: str | Path, split: str | None = None) -> ReferenceSet:
    """Reference captions per image from a COCO caption annotation file or a Karpathy split file.

    The format is recognised by content: a Karpathy file's ``images`` entries carry ``sentences``; a COCO
    annotation file has an ``annotations`` list of ``{"image_id", "caption"}`` and an ``images`` list of
    ``{"id"}``. Karpathy image ids are ``cocoid``, else the numeric file-name stem (see
    :func:`tipcap.data.karpathy.image_id_of`). Images keep the order of the file; an image listed without
    captions maps to an empty list (and cannot be scored; :func:`match_predictions` reports it). Images
    carry their domain as a ``domain`` field (of a Karpathy entry, or of a COCO ``images`` entry); when
    some image has one, every image must.

    Args:
        path: the references file (``.json`` or ``.json.gz``).
        split: a Karpathy split to keep (``train`` includes ``restval``); must be ``None`` for COCO files,
            which have no splits.

    Raises:
        TipcapError: naming the file, when it is missing, not JSON, of neither format, has malformed or
            missing fields, or holds no caption at all.
    """
    path = Path(path)
    document = load_json(path)
    if is_karpathy(document) and any(isinstance(e, dict) and "sentences" in e for e in document["images"]):
        references = _karpathy_references(document, path, split)
        entries = [e for e in document["images"] if split_matches(e.get("split"), split)]
        ids = [image_id_of(entry) for entry in entries]
    elif isinstance(document, dict) and "annotations" in document:
        if split is not None:
            raise TipcapError(
                f"{path} is a COCO annotation file, which has no splits: drop --split {split}, "
                "or score against a Karpathy split file."
            )
        references = _coco_references(document, path)
        entries = document["images"]
        ids = [entry["id"] for entry in entries]
    else:
        raise TipcapError(
            f"{path}: neither a COCO caption annotation file (an object with 'images' and 'annotations') "
            "nor a Karpathy split file (an object whose 'images' entries have 'sentences')."
        )
    if not any(references.values()):
        where = f" in split {split!r}" if split is not None else ""
        raise TipcapError(f"{path}: no reference captions{where}.")
    name = document.get("dataset") or path.name.split(".")[0]
    return ReferenceSet(references, _domains(entries, ids, path), str(name))


def _domains(entries: list[dict[str, Any]], ids: list[ImageId], path: Path) -> dict[ImageId, str]:
    """Each image's ``domain`` field; empty when no entry has one, refused when only some have one."""
    found = {i: e["domain"] for e, i in zip(entries, ids, strict=True) if "domain" in e}
    if not found:
        return {}
    for entry, image_id in zip(entries, ids, strict=True):
        if not isinstance(entry.get("domain"), str):
            raise TipcapError(
                f"{path}: image {image_id!r} has no 'domain' string, while {len(found):,} images have one; "
                "give every image its domain, or none."
            )
    return found


def _karpathy_references(document: dict[str, Any], path: Path, split: str | None) -> dict[ImageId, list[str]]:
    """Captions per image id of a parsed Karpathy file, keeping ``split``."""
    check_split(split)
    references: dict[ImageId, list[str]] = {}
    for image in parse_karpathy(document, path, split):
        if image.image_id in references:
            raise TipcapError(
                f"{path}: image id {image.image_id!r} ({image.relative_path}) appears more than once."
            )
        references[image.image_id] = list(image.captions)
    return references


def _coco_references(document: dict[str, Any], path: Path) -> dict[ImageId, list[str]]:
    """Captions per image id of a parsed COCO caption annotation file."""
    images = document.get("images")
    if not isinstance(images, list):
        raise TipcapError(f"{path}: COCO annotation file without an 'images' list.")
    annotations = document["annotations"]
    if not isinstance(annotations, list):
        raise TipcapError(f"{path}: 'annotations' is not a list.")
    references: dict[ImageId, list[str]] = {}
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not _is_image_id(image.get("id")):
            raise TipcapError(f"{path}: images[{index}] has no 'id' (an integer or string).")
        references.setdefault(image["id"], [])
    for index, annotation in enumerate(annotations):
        where = f"{path}: annotations[{index}]"
        if not isinstance(annotation, dict):
            raise TipcapError(f"{where} is not a JSON object.")
        image_id = annotation.get("image_id")
        if not _is_image_id(image_id):
            raise TipcapError(f"{where} has no 'image_id' (an integer or string).")
        if not isinstance(annotation.get("caption"), str):
            raise TipcapError(f"{where} has no 'caption' string field.")
        if image_id not in references:
            raise TipcapError(f"{where}: image_id {image_id!r} is not listed in 'images'.")
        references[image_id].append(annotation["caption"])
    return references


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read a COCO results file, ``[{"image_id": ..., "caption": "..."}, ...]`` (extra keys are kept).

    Raises:
        TipcapError: naming the file (and the entry) when it is missing, not JSON, not a list, or an entry
            lacks an integer/string ``image_id`` or a string ``caption``.
    """
    path = Path(path)
    document = load_json(path)
    if not isinstance(document, list):
        raise TipcapError(
            f'{path}: not a COCO results file (expected a JSON list of {{"image_id", "caption"}} objects, '
            f"found a {type(document).__name__})."
        )
    for index, entry in enumerate(document):
        where = f"{path}: entry [{index}]"
        if not isinstance(entry, dict):
            raise TipcapError(f"{where} is not a JSON object.")
        if not _is_image_id(entry.get("image_id")):
            raise TipcapError(f"{where} has no 'image_id' (an integer or string).")
        if not isinstance(entry.get("caption"), str):
            raise TipcapError(f"{where} (image {entry['image_id']!r}) has no 'caption' string field.")
    if not document:
        raise TipcapError(f"{path}: no predictions (the list is empty).")
    return document


# --------------------------------------------------------------------------------------------------------
# Matching predictions to references
# --------------------------------------------------------------------------------------------------------


class _Problem:
    """Count of entries with one problem and the first distinct image ids concerned."""

    def __init__(self) -> None:
        self.count = 0
        self.ids: list[ImageId] = []

    def add(self, image_id: ImageId) -> None:
        self.count += 1
        if len(self.ids) < REPORT_IDS and image_id not in self.ids:
            self.ids.append(image_id)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "ids": self.ids}


def match_predictions(
    predictions: Sequence[Mapping[str, Any]], references: Mapping[ImageId, Sequence[str]]
) -> tuple[dict[ImageId, str], dict[str, Any]]:
    """Pair each prediction with its image's references, reporting all that cannot be scored.

    Returns:
        ``(matched, report)``: ``matched`` maps image id to the predicted caption, in the references'
        order (the order ``COCOEvalCap`` scores in). ``report`` holds the totals ``predictions``,
        ``reference_images`` and ``scored_images``, and for each problem a ``{"count", "ids"}`` (``ids``:
        the first :data:`REPORT_IDS` distinct image ids):

        - ``unknown_images``: predictions for images absent from the references (not scored);
        - ``duplicates``: further predictions for an image already predicted (the first one is kept);
        - ``no_reference_captions``: predictions for images listed without any caption (not scored);
        - ``unpredicted``: reference images without a prediction (not scored).
    """
    unknown, duplicates, uncaptioned, unpredicted = _Problem(), _Problem(), _Problem(), _Problem()
    found: dict[ImageId, str] = {}
    seen: set[ImageId] = set()
    for prediction in predictions:
        image_id = prediction["image_id"]
        if image_id not in references:
            unknown.add(image_id)
        elif image_id in seen:
            duplicates.add(image_id)
        else:
            seen.add(image_id)
            if references[image_id]:
                found[image_id] = prediction["caption"]
            else:
                uncaptioned.add(image_id)
    matched: dict[ImageId, str] = {}
    for image_id in references:
        if image_id in found:
            matched[image_id] = found[image_id]
        elif image_id not in seen:
            unpredicted.add(image_id)
    report = {
        "predictions": len(predictions),
        "reference_images": len(references),
        "scored_images": len(matched),
        "unknown_images": unknown.as_dict(),
        "duplicates": duplicates.as_dict(),
        "no_reference_captions": uncaptioned.as_dict(),
        "unpredicted": unpredicted.as_dict(),
    }
    return matched, report


# Per problem: how to name one entry, several entries, and what happens to them.
_PROBLEM_TEXT = {
    "unknown_images": (
        "prediction for an image not in the references",
        "predictions for images not in the references",
        "not scored",
    ),
    "duplicates": ("duplicate prediction", "duplicate predictions", "only each image's first is scored"),
    "no_reference_captions": (
        "prediction for an image without reference captions",
        "predictions for images without reference captions",
        "not scored",
    ),
    "unpredicted": (
        "reference image without a prediction",
        "reference images without a prediction",
        "not scored",
    ),
}


def format_report(report: Mapping[str, Any]) -> str:
    """The matching report for the terminal: one summary line, then one line per non-zero problem."""
    lines = [
        f"scored {report['scored_images']} images: {report['predictions']} predictions, "
        f"{report['reference_images']} reference images"
    ]
    for key, (singular, plural, consequence) in _PROBLEM_TEXT.items():
        problem = report[key]
        if problem["count"]:
            ids = ", ".join(str(i) for i in problem["ids"])
            more = ", ..." if problem["count"] > len(problem["ids"]) == REPORT_IDS else ""
            what = singular if problem["count"] == 1 else plural
            lines.append(f"  {problem['count']} {what}, {consequence} (ids: {ids}{more})")
    return "\n".join(lines)
