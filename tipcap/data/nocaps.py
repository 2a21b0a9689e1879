"""Preparing NoCaps validation: the official annotation file checked against its images.

NoCaps (Agrawal et al., 2019) evaluates captioning on Open Images pictures whose objects COCO's captions
name (``in-domain``), partly name (``near-domain``) or never name (``out-domain``). Its validation file,
``nocaps_val_4500_captions.json`` (nocaps.org/download), is a COCO caption annotation file whose images
also carry their domain::

    {"licenses": [], "info": {...},
     "images": [{"id": 0, "open_images_id": "0013ea2087020901", "file_name": "0013ea2087020901.jpg",
                 "domain": "near-domain", "height": 1024, "width": 732, "coco_url": "https://...", ...}],
     "annotations": [{"image_id": 0, "id": 0, "caption": "A baby is standing in front of a house."}]}

Its 4,500 images have ten captions each (648 in-domain, 2,938 near-domain, 914 out-domain). The test
split's captions are held out by the NoCaps evaluation server.

:func:`prepare_nocaps` checks every image under the image folder as ``prepare coco`` does (missing,
corrupt by decoding, a path outside the folder, repeated ids, no captions) and writes::

    report.json             counts per domain and every problem found
    dataset.json            the usable images in Karpathy's schema, split ``val``, each entry with the
                            NoCaps ``image_id``, its ``domain`` and ``open_images_id``: the ``--data`` of
                            ``tipcap evaluate``, which then reports every metric per domain as well
    references/val.json     the COCO caption annotation file of the images with captions, domains kept:
                            ``tipcap score --references``

Image ids stay NoCaps' integer ``id``, so ``predictions.json`` is in the evaluation server's format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tipcap import __version__
from tipcap.data.images import outside
from tipcap.data.prepare import SplitCounts, check_all, problem_lines
from tipcap.errors import TipcapError
from tipcap.io import load_json, write_json_atomic

DOMAINS = ("in-domain", "near-domain", "out-domain")
PUBLISHED_SIZES = {"in-domain": 648, "near-domain": 2_938, "out-domain": 914}
"""Images per domain of the published validation split."""

SPLIT = "val"
PROBLEMS = ("missing", "corrupt", "duplicate_id", "no_captions", "outside_root")
"""Problem kinds, in the order they are reported."""


@dataclass
class NocapsReport:
    """The outcome of :func:`prepare_nocaps` (written as ``report.json``)."""

    annotations: str
    images: str
    domains: dict[str, SplitCounts]
    problems: dict[str, list[dict[str, Any]]]
    outputs: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "dataset": "nocaps",
            "annotations": self.annotations,
            "images": self.images,
            "tipcap": __version__,
            "domains": {name: vars(counts) for name, counts in self.domains.items()},
            "published_sizes": PUBLISHED_SIZES,
            "problems": self.problems,
            "outputs": self.outputs,
        }

    @property
    def usable(self) -> int:
        """Images that are present, decode and have captions."""
        return sum(counts.usable for counts in self.domains.values())

    def summary(self, examples: int = 5) -> str:
        """A table of counts per domain, each problem with its first examples, and a note on comparability."""
        header = ["domain", "listed", "captions", "found", "missing", "corrupt", "usable", "published"]
        table = [header] + [
            [name, *(f"{n:,}" for n in (*vars(c).values(), PUBLISHED_SIZES[name]))]
            for name, c in self.domains.items()
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = [f"nocaps: {self.annotations} against images under {self.images}"]
        for row in table:
            lines.append("  " + "  ".join(row[0].ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                                          for i, cell in enumerate(row)))  # fmt: skip
        lines += problem_lines(self.problems, PROBLEMS, "domain", examples)
        published = sum(PUBLISHED_SIZES.values())
        if self.usable < published:
            lines.append(
                f"note: {self.usable:,} of the {published:,} published validation images are usable; "
                "scores on them are not comparable with published NoCaps figures."
            )
        return "\n".join(lines)


def _check_document(document: Any, path: Path) -> None:
    """Refuse anything but a NoCaps validation annotation file, naming the first bad field."""
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise TipcapError(f"--annotations {path}: not a COCO caption annotation file (no 'images' list).")
    if "annotations" not in document:
        raise TipcapError(
            f"--annotations {path} has no 'annotations' (the NoCaps test captions are held out by its "
            "evaluation server); pass the validation file nocaps_val_4500_captions.json."
        )
    if not isinstance(document["annotations"], list):
        raise TipcapError(f"--annotations {path}: 'annotations' is not a list.")
    for index, image in enumerate(document["images"]):
        where = f"--annotations {path}: images[{index}]"
        if not isinstance(image, dict):
            raise TipcapError(f"{where} is not a JSON object.")
        if not isinstance(image.get("id"), int) or isinstance(image["id"], bool):
            raise TipcapError(f"{where} has no integer 'id'.")
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise TipcapError(f"{where} (id {image['id']}) has no 'file_name' string.")
        where = f"{where} ({image['file_name']})"
        if "domain" not in image:
            raise TipcapError(
                f"{where} has no 'domain' field ({', '.join(DOMAINS)}); pass the official NoCaps "
                "validation file nocaps_val_4500_captions.json."
            )
        if image["domain"] not in DOMAINS:
            raise TipcapError(f"{where}: domain {image['domain']!r} is not one of {', '.join(DOMAINS)}.")
    for index, annotation in enumerate(document["annotations"]):
        where = f"--annotations {path}: annotations[{index}]"
        if not isinstance(annotation, dict):
            raise TipcapError(f"{where} is not a JSON object.")
        if not isinstance(annotation.get("image_id"), int) or isinstance(annotation["image_id"], bool):
            raise TipcapError(f"{where} has no integer 'image_id'.")
        if not isinstance(annotation.get("caption"), str):
            raise TipcapError(f"{where} has no 'caption' string.")


def prepare_nocaps(
    annotations: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> NocapsReport:
    """Check the NoCaps validation annotation file against its image folder and write what ``evaluate`` reads.

    Args:
        annotations: ``nocaps_val_4500_captions.json`` (``.gz`` accepted).
        images: the folder holding the images by their ``file_name``.
        out: output folder (see the module docstring for what it gets).
        workers: image-decoding processes (default: CPU count, at most 8; 0 decodes in this process).

    Raises:
        TipcapError: for a missing or malformed file (no domain on an image, a test file without
            captions, ...), a missing image folder, or a folder in which no listed image can be read.
    """
    annotations, root, out = Path(annotations), Path(images), Path(out)
    document = load_json(annotations)
    _check_document(document, annotations)
    if not root.is_dir():
        raise TipcapError(f"--images {root}: no such folder.")
    listed: dict[int, dict[str, Any]] = {}
    captions: dict[int, list[str]] = {}
    problems: dict[str, list[dict[str, Any]]] = {kind: [] for kind in PROBLEMS}
    counts = {domain: SplitCounts() for domain in DOMAINS}
    for annotation in document["annotations"]:
        captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
    known = {image["id"] for image in document["images"]}
    strays = sorted(set(captions) - known)
    if strays:
        raise TipcapError(
            f"--annotations {annotations}: {len(strays):,} annotations name image ids not listed in "
            f"'images' (id {strays[0]} first)."
        )
    for image in document["images"]:
        where = {"image_id": image["id"], "path": image["file_name"], "domain": image["domain"]}
        if outside(root, image["file_name"]):  # absolute, or climbing out with '..': never opened
            problems["outside_root"].append(where)
        elif image["id"] in listed:
            problems["duplicate_id"].append(where)
        else:
            listed[image["id"]] = image
            counts[image["domain"]].listed += 1
            counts[image["domain"]].captions += len(captions.get(image["id"], []))
            if not captions.get(image["id"]):
                problems["no_captions"].append(where)

    entries = list(listed.values())
    paths = [root / image["file_name"] for image in entries]
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    usable: list[dict[str, Any]] = []
    for image, result in zip(entries, check_all(paths, workers, progress), strict=True):
        where = {"image_id": image["id"], "path": image["file_name"], "domain": image["domain"]}
        domain = counts[image["domain"]]
        if result == "missing":
            domain.missing += 1
            problems["missing"].append(where)
            continue
        domain.found += 1
        if result is not None:
            domain.corrupt += 1
            problems["corrupt"].append({**where, "reason": result})
        elif captions.get(image["id"]):
            domain.usable += 1
            usable.append(image)
    if not usable:
        first = paths[0] if paths else root
        raise TipcapError(
            f"--images {root}: none of the {len(paths):,} images named by {annotations} is there and "
            f"readable (the first is expected at {first})."
        )
    report = NocapsReport(str(annotations.resolve()), str(root.resolve()), counts, problems)
    with_captions = [image for image in entries if captions.get(image["id"])]
    report.outputs = _write_outputs(document, usable, with_captions, captions, out)
    write_json_atomic(out / "report.json", report.as_dict())
    return report


def _write_outputs(
    document: dict[str, Any],
    usable: list[dict[str, Any]],
    with_captions: list[dict[str, Any]],
    captions: dict[int, list[str]],
    out: Path,
) -> dict[str, str]:
    """Write ``dataset.json`` (Karpathy's schema) and ``references/val.json`` (COCO's); return their paths."""
    dataset = {
        "dataset": "nocaps",
        "info": document.get("info", {}),
        "images": [
            {
                "image_id": image["id"],
                "filename": image["file_name"],
                "split": SPLIT,
                "domain": image["domain"],
                "open_images_id": image.get("open_images_id"),
                "sentences": [{"raw": caption} for caption in captions[image["id"]]],
            }
            for image in usable
        ],
    }
    write_json_atomic(out / "dataset.json", dataset, indent=None)
    kept = {image["id"] for image in with_captions}
    references = {
        "dataset": "nocaps",
        "info": document.get("info", {}),
        "licenses": document.get("licenses", []),
        "type": "captions",
        "images": with_captions,
        "annotations": [a for a in document["annotations"] if a["image_id"] in kept],
    }
    write_json_atomic(out / "references" / f"{SPLIT}.json", references)
    return {"dataset": "dataset.json", "references": f"references/{SPLIT}.json"}
