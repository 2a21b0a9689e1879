"""Preparing a Karpathy-split data set: check the split file against its images, write what later steps read.

:func:`prepare_dataset` reads a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``), looks
for every image it names under the image root and decodes it, and writes into the output folder::

    report.json                 counts per split and every problem found (missing, corrupt, misnamed, a path
                                outside the image root, ...)
    dataset.json                the Karpathy file restricted to usable entries (image present and decodable,
                                captions present, id not repeated): the ``karpathy:`` of an ablation config
    corpus/{split}.json         the split's captions, every entry with captions (text needs no image):
                                ``tipcap embed texts --corpus``
    images/{split}.json         the split's usable images: ``tipcap embed images --images ... --image-root``
    references/{split}.json     val and test: COCO caption annotation files of the split's entries with
                                captions, read by ``tipcap score --references`` and pycocoevalcap's ``COCO``

The per-split files keep Karpathy's schema and the original entries unchanged, so that image ids (``cocoid``,
or the numeric Flickr30k file name) are the same in every store built from them; ``train`` holds Karpathy's
``train`` and ``restval`` entries. Splits without entries get no files. Every file is written to a temporary
name and renamed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tipcap import __version__
from tipcap.data.images import IMAGE_SUFFIXES, ImageError, load_image, outside
from tipcap.data.karpathy import ImageId, is_karpathy, parse_karpathy, split_matches
from tipcap.errors import TipcapError
from tipcap.io import load_json, write_json_atomic
from tipcap.progress import progress_bar

DATASETS = ("coco", "flickr30k")
SPLIT_NAMES = ("train", "val", "test")
REFERENCE_SPLITS = ("val", "test")
KARPATHY_SIZES = {
    "coco": {"train": 113_287, "val": 5_000, "test": 5_000},
    "flickr30k": {"train": 29_000, "val": 1_014, "test": 1_000},
}
"""Images per split of the published Karpathy files (COCO's train counts its 30,504 restval images)."""

_COCO_NAME = re.compile(r"COCO_(train|val)2014_(\d{12})\.jpg")
_FLICKR_NAME = re.compile(r"\d+\.jpg")
PROBLEMS = ("missing", "corrupt", "misnamed", "duplicate_id", "no_split", "no_captions", "outside_root")
"""Problem kinds, in the order they are reported."""


def problem_lines(
    problems: dict[str, list[dict[str, Any]]], kinds: tuple[str, ...], group: str, examples: int
) -> list[str]:
    """Report lines for each kind of problem found: its count, the first ``examples`` images (path, id and
    their ``group``, a split or a domain, with the reason where known), and how many more are listed in
    report.json."""
    lines = []
    for kind in kinds:
        found = problems[kind]
        if not found:
            continue
        lines.append(f"{kind.replace('_', ' ')}: {len(found):,}")
        for problem in found[:examples]:
            reason = f" ({problem['reason']})" if "reason" in problem else ""
            lines.append(f"  {problem['path']} [id {problem['image_id']}, {problem[group]}]{reason}")
        if len(found) > examples:
            lines.append(f"  ... {len(found) - examples:,} more in report.json")
    return lines


@dataclass
class SplitCounts:
    """What one split holds: entries listed, their captions, and how many of their images are usable."""

    listed: int = 0
    captions: int = 0
    found: int = 0
    missing: int = 0
    corrupt: int = 0
    usable: int = 0


@dataclass
class PrepareReport:
    """The outcome of :func:`prepare_dataset` (written as ``report.json``)."""

    dataset: str
    karpathy: str
    images: str
    splits: dict[str, SplitCounts]
    problems: dict[str, list[dict[str, Any]]]
    unlisted: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "dataset": self.dataset,
            "karpathy": self.karpathy,
            "images": self.images,
            "tipcap": __version__,
            "splits": {name: vars(counts) for name, counts in self.splits.items()},
            "karpathy_sizes": KARPATHY_SIZES[self.dataset],
            "problems": self.problems,
            "unlisted": self.unlisted,
            "outputs": self.outputs,
        }

    def summary(self, examples: int = 5) -> str:
        """A table of counts per split, each problem with its first examples, and the files written."""
        sizes = KARPATHY_SIZES[self.dataset]
        header = ["split", "listed", "captions", "found", "missing", "corrupt", "usable", "Karpathy"]
        table = [header] + [
            [name, *(f"{n:,}" for n in (*vars(c).values(), sizes[name]))] for name, c in self.splits.items()
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = [f"{self.dataset}: {self.karpathy} against images under {self.images}"]
        for row in table:
            lines.append("  " + "  ".join(row[0].ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                                          for i, cell in enumerate(row)))  # fmt: skip
        for name, c in self.splits.items():
            if c.listed < sizes[name]:
                lines.append(
                    f"  note: {name} lists {c.listed:,} images, the published split {sizes[name]:,}."
                )
        lines += problem_lines(self.problems, PROBLEMS, "split", examples)
        if self.unlisted["count"]:
            lines.append(
                f"unlisted: {self.unlisted['count']:,} image files in {', '.join(self.unlisted['folders'])} "
                f"that the split file does not name (e.g. {self.unlisted['examples'][0]})"
            )
        return "\n".join(lines)


def _split_of(entry: dict[str, Any]) -> str | None:
    """``train`` (Karpathy's train and restval), ``val`` or ``test``; ``None`` for another or no split."""
    return next((name for name in SPLIT_NAMES if split_matches(entry.get("split"), name)), None)


def _naming_problem(dataset: str, entry: dict[str, Any], image_id: ImageId) -> str | None:
    """Why an entry's file name does not follow the data set's convention, or ``None``."""
    filename, filepath = entry["filename"], entry.get("filepath", "")
    if dataset == "coco":
        match = _COCO_NAME.fullmatch(filename)
        if match is None:
            return "not named COCO_{train,val}2014_<12 digits>.jpg"
        if filepath != f"{match.group(1)}2014":
            return f"filepath {filepath!r} is not {match.group(1)}2014"
        if "cocoid" in entry and entry["cocoid"] != int(match.group(2)):
            return f"cocoid {entry['cocoid']} differs from the file name's number"
        return None
    if _FLICKR_NAME.fullmatch(filename) is None:
        return "not named <digits>.jpg"
    if filepath:
        return f"Flickr30k images lie directly under the image root, but filepath is {filepath!r}"
    return None


def check_image(path: Path) -> str | None:
    """``None`` when the file decodes as an image, ``"missing"``, or why it is corrupt."""
    if not path.is_file():
        return "missing"
    try:
        load_image(path)
    except ImageError as e:
        return str(e).removeprefix(f"{path}: ")
    return None


def check_all(paths: list[Path], workers: int, progress: bool) -> Iterator[str | None]:
    """:func:`check_image` for every path, in order, decoding in ``workers`` processes (0: in this one)."""
    bar = progress_bar(total=len(paths), unit="image", desc="checking images", disable=not progress)
    if workers == 0:
        for path in paths:
            yield check_image(path)
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for result in pool.map(check_image, paths, chunksize=64):
                yield result
                bar.update(1)
    bar.close()


def _unlisted(root: Path, listed: set[Path], folders: list[str]) -> dict[str, Any]:
    """Image files in the folders the split file uses that it does not name."""
    found: list[str] = []
    for folder in folders:
        directory = root / folder
        if not directory.is_dir():
            continue
        with os.scandir(directory) as entries:
            for item in entries:
                path = directory / item.name
                if item.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path not in listed:
                    found.append(path.relative_to(root).as_posix())
    found.sort()
    return {"folders": folders, "count": len(found), "examples": found[:10]}


def references_document(entries: list[dict[str, Any]], image_ids: list[ImageId]) -> dict[str, Any]:
    """A COCO caption annotation file (``images``, ``annotations``) of Karpathy entries."""
    images, annotations = [], []
    for entry, image_id in zip(entries, image_ids, strict=True):
        relative = str(Path(entry.get("filepath", "")) / entry["filename"])
        images.append({"id": image_id, "file_name": relative})
        for sentence in entry["sentences"]:
            annotations.append({"image_id": image_id, "id": len(annotations), "caption": sentence["raw"]})
    return {
        "info": {"description": "reference captions written by tipcap prepare"},
        "licenses": [],
        "type": "captions",
        "images": images,
        "annotations": annotations,
    }


def prepare_dataset(
    dataset: str,
    karpathy: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Check a Karpathy split file against its image tree and write the files later steps read.

    Args:
        dataset: ``coco`` (files ``filepath/filename``, e.g. ``val2014/COCO_val2014_000000391895.jpg``) or
            ``flickr30k`` (``filename`` directly under the image root).
        karpathy: the Karpathy split file (``.json`` or ``.json.gz``).
        images: the image root.
        out: output folder (see the module docstring for what it gets).
        workers: image-decoding processes (default: CPU count, at most 8; 0 decodes in this process).

    Raises:
        TipcapError: for a malformed split file, one of another data set, or an image root in which no
            listed image can be read.
    """
    if dataset not in DATASETS:
        raise TipcapError(f"data set {dataset!r}: use one of {', '.join(DATASETS)}.")
    karpathy, root, out = Path(karpathy), Path(images), Path(out)
    if not root.is_dir():
        raise TipcapError(f"--images {root}: no such folder.")
    document = load_json(karpathy)
    if not is_karpathy(document):
        raise TipcapError(f"--karpathy {karpathy}: not a Karpathy split file (no 'images' list).")
    named = document.get("dataset")
    if named == "toyworld":
        raise TipcapError(
            f"--karpathy {karpathy} is a toy world's split file, which needs no prepare step (tipcap "
            "toyworld writes every image it lists): pass it as it is to embed, evaluate or ablate, with its "
            f"folder as the image root ({karpathy.parent})."
        )
    if named is not None and named != dataset:
        command = f"`tipcap prepare {named}`" if named in DATASETS else "the prepare command of its data set"
        raise TipcapError(
            f"--karpathy {karpathy} is the {named!r} split file, not {dataset!r}; prepare it with {command}."
        )
    parsed = parse_karpathy(document, karpathy)  # validates every entry, naming the first malformed one
    raw: list[dict[str, Any]] = document["images"]

    problems: dict[str, list[dict[str, Any]]] = {kind: [] for kind in PROBLEMS}
    counts = {name: SplitCounts() for name in SPLIT_NAMES}
    seen: set[ImageId] = set()
    candidates: list[int] = []  # positions of entries whose image is checked
    for position, (entry, image) in enumerate(zip(raw, parsed, strict=True)):
        split = _split_of(entry)
        where = {"image_id": image.image_id, "path": image.relative_path, "split": entry.get("split")}
        if split is None:
            problems["no_split"].append(where)
            continue
        if outside(root, image.relative_path):  # absolute, or climbing out with '..': never opened
            problems["outside_root"].append(where)
            continue
        if image.image_id in seen:
            problems["duplicate_id"].append(where)
            continue
        seen.add(image.image_id)
        counts[split].listed += 1
        counts[split].captions += len(image.captions)
        if not image.captions:
            problems["no_captions"].append(where)
        naming = _naming_problem(dataset, entry, image.image_id)
        if naming is not None:
            problems["misnamed"].append({**where, "reason": naming})
        candidates.append(position)

    paths = [root / parsed[p].relative_path for p in candidates]
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    usable: set[int] = set()
    for position, result in zip(candidates, check_all(paths, workers, progress), strict=True):
        image, split = parsed[position], _split_of(raw[position])
        where = {"image_id": image.image_id, "path": image.relative_path, "split": raw[position].get("split")}
        if result == "missing":
            counts[split].missing += 1
            problems["missing"].append(where)
            continue
        counts[split].found += 1
        if result is not None:
            counts[split].corrupt += 1
            problems["corrupt"].append({**where, "reason": result})
        elif image.captions:
            counts[split].usable += 1
            usable.add(position)
    if not usable:
        first = paths[0] if paths else root
        raise TipcapError(
            f"--images {root}: none of the {len(paths):,} images named by {karpathy} is there and readable "
            f"(the first is expected at {first})."
        )
    folders = sorted({Path(parsed[p].relative_path).parent.as_posix() for p in candidates})
    unlisted = _unlisted(root, set(paths), folders)
    report = PrepareReport(dataset, str(karpathy.resolve()), str(root.resolve()), counts, problems, unlisted)
    report.outputs = _write_outputs(document, raw, parsed, candidates, usable, out)
    write_json_atomic(out / "report.json", report.as_dict())
    return report


def _write_outputs(
    document: dict[str, Any],
    raw: list[dict[str, Any]],
    parsed: list[Any],
    candidates: list[int],
    usable: set[int],
    out: Path,
) -> dict[str, Any]:
    """Write ``dataset.json`` and the per-split corpora, image lists and references; return their paths."""
    header = {key: value for key, value in document.items() if key != "images"}
    outputs: dict[str, Any] = {"dataset": "dataset.json", "corpus": {}, "images": {}, "references": {}}
    write_json_atomic(out / "dataset.json", {**header, "images": [raw[p] for p in candidates if p in usable]},
                      indent=None)  # fmt: skip
    for split in SPLIT_NAMES:
        in_split = [p for p in candidates if _split_of(raw[p]) == split]
        with_captions = [p for p in in_split if parsed[p].captions]
        files = {
            "corpus": [raw[p] for p in with_captions],
            "images": [raw[p] for p in in_split if p in usable],
        }
        for kind, entries in files.items():
            path = out / kind / f"{split}.json"
            if entries:
                write_json_atomic(path, {**header, "images": entries}, indent=None)
                outputs[kind][split] = path.relative_to(out).as_posix()
            else:
                path.unlink(missing_ok=True)  # a file from an earlier run would describe other data
        if split in REFERENCE_SPLITS:
            path = out / "references" / f"{split}.json"
            if with_captions:
                ids = [parsed[p].image_id for p in with_captions]
                write_json_atomic(path, references_document([raw[p] for p in with_captions], ids))
                outputs["references"][split] = path.relative_to(out).as_posix()
            else:
                path.unlink(missing_ok=True)
    return outputs
