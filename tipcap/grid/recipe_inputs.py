"""A recipe's inputs (:mod:`tipcap.grid.recipes`): what the command line gives (:class:`Inputs`), the check
that they are present and the expected ones (:func:`check_inputs`: one problem line each, saying what to do),
and the seeded ~1% samples of them that a smoke run prepares (:func:`sample_karpathy` and its kin)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tipcap import provenance
from tipcap.clip import ClipSpec, local_weights
from tipcap.data.karpathy import is_karpathy
from tipcap.data.prepare import KARPATHY_SIZES, SPLIT_NAMES
from tipcap.grid.recipes import Recipe
from tipcap.io import atomic_path, iter_jsonl, load_json, write_json_atomic

SMOKE_SHARE = 0.01
SMOKE_LEAST = 8
"""A smoke run keeps at least this many images of each split, so that every stage has data to run on."""
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class Inputs:
    """What a recipe reads, from the command line: the Karpathy file and image root of its training data,
    those of its evaluation data where it is another data set (NoCaps: the validation annotation file),
    web pairs for a web-pairs cell, and a local CLIP weights file standing in for the pretrained tag."""

    karpathy: Path
    images: Path
    eval_karpathy: Path | None = None
    eval_images: Path | None = None
    web_pairs: Path | None = None
    web_images: Path | None = None
    clip_weights: Path | None = None


@dataclass
class CheckResult:
    """The problems that stop a run (one line each, saying what to do), notes that do not, and what was
    found (hashes, image counts per split) for the report's provenance."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    found: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    return provenance.sha256_file(path)


def _karpathy_counts(path: Path, root: Path) -> dict[str, tuple[int, int]]:
    """Per split (train counting restval): (images listed, of those found under ``root``)."""
    counts = {split: [0, 0] for split in SPLIT_NAMES}
    for entry in load_json(path)["images"]:
        split = {"restval": "train"}.get(entry.get("split"), entry.get("split"))
        if split not in counts:
            continue
        counts[split][0] += 1
        counts[split][1] += (root / entry.get("filepath", "") / entry["filename"]).is_file()
    return {split: (listed, found) for split, (listed, found) in counts.items()}


def _check_karpathy(
    result: CheckResult,
    flag: str,
    path: Path | None,
    images: Path | None,
    dataset: str,
    sha256: str | None,
    eval_split: str | None,
) -> None:
    """A Karpathy file of ``dataset`` and its image root: present, the published file, every image there,
    and images in ``eval_split`` where it is evaluated on (``None``: it is not)."""
    images_flag = flag.replace("karpathy", "images")
    if path is None or not path.is_file():
        result.problems.append(
            f"{flag} {path or '(not given)'}: no Karpathy split file; download dataset_{dataset}.json "
            "(Karpathy's splits, cs.stanford.edu/people/karpathy/deepimagesent) and pass its path."
        )
        return
    document = load_json(path)
    if not is_karpathy(document):
        result.problems.append(f"{flag} {path}: not a Karpathy split file (no 'images' list).")
        return
    digest = _sha256(path)
    result.found[f"{flag} sha256"] = digest
    if sha256 is not None and digest != sha256:
        result.problems.append(
            f"{flag} {path}: SHA-256 {digest[:16]}… is not the published file's ({sha256[:16]}…); "
            f"download dataset_{dataset}.json again."
        )
    elif sha256 is None:
        result.notes.append(f"{flag} {path}: SHA-256 {digest} (the recipe records none to compare with).")
    if images is None or not images.is_dir():
        result.problems.append(
            f"{images_flag} {images or '(not given)'}: no such folder; pass the image root "
            f"of {dataset} ({_WHERE[dataset]})."
        )
        return
    counts = _karpathy_counts(path, images)
    result.found[f"{flag} images per split (listed, found)"] = counts
    missing = {split: (listed, found) for split, (listed, found) in counts.items() if found < listed}
    if missing:
        total = sum(listed - found for listed, found in missing.values())
        per_split = ", ".join(
            f"{listed - found:,} of {listed:,} {split}" for split, (listed, found) in missing.items()
        )
        listed_all = sum(listed for listed, _ in counts.values())
        result.problems.append(
            f"{images_flag} {images}: {total:,} of the {listed_all:,} images listed in {path} are missing "
            f"({per_split}); download them ({_WHERE[dataset]}) into that folder."
        )
    if eval_split is not None and not counts.get(eval_split, (0, 0))[0]:
        result.problems.append(
            f"{flag} {path} lists no {eval_split} images, which the recipe evaluates on; "
            f"pass the full dataset_{dataset}.json (or --set eval_split=val)."
        )
    sizes = KARPATHY_SIZES[dataset]
    listed = {split: counts[split][0] for split in SPLIT_NAMES}
    if listed != sizes:
        result.notes.append(
            f"{flag} {path} lists {', '.join(f'{listed[s]:,} {s}' for s in SPLIT_NAMES)} images, not the "
            f"published split's {', '.join(f'{sizes[s]:,}' for s in SPLIT_NAMES)}: the result will not be "
            "comparable with the published numbers."
        )


_WHERE = {
    "coco": "train2014/ and val2014/ from cocodataset.org",
    "flickr30k": "flickr30k-images/ from shannon.cs.illinois.edu/DenotationGraph",
    "nocaps": "the validation images listed at nocaps.org/download",
}


def _check_nocaps(result: CheckResult, path: Path | None, images: Path | None, sha256: str | None) -> None:
    """NoCaps' validation annotation file and its image folder."""
    if path is None or not path.is_file():
        result.problems.append(
            f"--eval-karpathy {path or '(not given)'}: no NoCaps validation file; download "
            "nocaps_val_4500_captions.json (nocaps.org/download) and pass its path."
        )
        return
    document = load_json(path)
    listed = [image.get("file_name", "") for image in document.get("images", [])]
    digest = _sha256(path)
    result.found["--eval-karpathy sha256"] = digest
    if sha256 is not None and digest != sha256:
        result.problems.append(f"--eval-karpathy {path}: SHA-256 {digest[:16]}… is not the published file's.")
    if images is None or not images.is_dir():
        result.problems.append(
            f"--eval-images {images or '(not given)'}: no such folder; pass the folder of {_WHERE['nocaps']}."
        )
        return
    found = sum((images / name).is_file() for name in listed)
    result.found["--eval-karpathy images (listed, found)"] = (len(listed), found)
    if found < len(listed):
        result.problems.append(
            f"--eval-images {images}: {len(listed) - found:,} of the {len(listed):,} NoCaps "
            f"images listed in {path} are missing; download {_WHERE['nocaps']}."
        )


def _check_weights(result: CheckResult, spec: ClipSpec, clip_weights: Path | None) -> None:
    """The CLIP's weights: a local file, or the tag's weights in this machine's cache (no download)."""
    if clip_weights is not None:
        if not clip_weights.is_file() or clip_weights.suffix not in WEIGHT_SUFFIXES:
            result.problems.append(
                f"--clip-weights {clip_weights}: not a weights file ({', '.join(WEIGHT_SUFFIXES)})."
            )
        return
    if spec.pretrained == "none" or spec.weights_path is not None:
        return
    if local_weights(spec) is None:
        result.problems.append(
            f"CLIP {spec.describe()}: its weights are not on this machine; run once where the hub is "
            f"reachable (python -c \"import open_clip; open_clip.create_model('{spec.model}', "
            f"pretrained='{spec.pretrained}')\"), or pass a local file with --clip-weights FILE."
        )


def check_inputs(recipe: Recipe, inputs: Inputs, grid: dict[str, Any]) -> CheckResult:
    """Every input of a recipe's full run, with one problem line per missing or wrong one.

    ``grid`` is the recipe's grid after ``--set`` (its CLIP and evaluation split).
    """
    result = CheckResult()
    data, eval_split = recipe.data, str(grid.get("eval_split", "test"))
    _check_karpathy(
        result,
        "--karpathy",
        inputs.karpathy,
        inputs.images,
        data.train,
        data.karpathy_sha256,
        eval_split if data.eval is None else None,
    )
    if data.eval == "nocaps":
        _check_nocaps(result, inputs.eval_karpathy, inputs.eval_images, data.eval_sha256)
    elif data.eval is not None:
        _check_karpathy(
            result,
            "--eval-karpathy",
            inputs.eval_karpathy,
            inputs.eval_images,
            data.eval,
            data.eval_sha256,
            eval_split,
        )
    if any(cell.get("setting") == "web-pairs" for cell in recipe.grid.get("cells", [])):
        for flag, value, is_file in (
            ("--web-pairs", inputs.web_pairs, True),
            ("--web-images", inputs.web_images, False),
        ):
            if value is None or not (value.is_file() if is_file else value.is_dir()):
                result.problems.append(
                    f"{flag} {value or '(not given)'}: a web-pairs cell needs the web "
                    "pairs (a JSONL of image and caption) and their image folder."
                )
    embed = grid.get("embed", {})
    spec = ClipSpec(str(embed.get("model", "")), str(embed.get("pretrained", "none")))
    _check_weights(result, spec, inputs.clip_weights)
    return result


def _sample(count: int, share: float, least: int, rng: random.Random) -> set[int]:
    keep = min(count, max(least, math.ceil(count * share)))
    return set(rng.sample(range(count), keep))


def sample_karpathy(path: Path, out: Path, share: float = SMOKE_SHARE, seed: int = 0) -> Path:
    """A Karpathy file with a seeded ``share`` of each split's images (at least :data:`SMOKE_LEAST`)."""
    document = load_json(path)
    rng = random.Random(seed)
    kept: list[dict[str, Any]] = []
    for split in ("train", "restval", "val", "test"):
        entries = [entry for entry in document["images"] if entry.get("split") == split]
        chosen = _sample(len(entries), share, SMOKE_LEAST, rng)
        kept += [entry for index, entry in enumerate(entries) if index in chosen]
    write_json_atomic(out, {**document, "images": kept})
    return out


def sample_nocaps(path: Path, out: Path, share: float = SMOKE_SHARE, seed: int = 0) -> Path:
    """A NoCaps annotation file with a seeded ``share`` of each domain's images and their captions."""
    document = load_json(path)
    rng = random.Random(seed)
    kept: set[int] = set()
    for domain in sorted({image.get("domain") for image in document["images"]}, key=str):
        ids = [image["id"] for image in document["images"] if image.get("domain") == domain]
        kept |= {ids[i] for i in _sample(len(ids), share, SMOKE_LEAST, rng)}
    write_json_atomic(
        out,
        {
            **document,
            "images": [i for i in document["images"] if i["id"] in kept],
            "annotations": [a for a in document["annotations"] if a["image_id"] in kept],
        },
    )
    return out


def sample_jsonl(path: Path, out: Path, share: float = SMOKE_SHARE, seed: int = 0) -> Path:
    """A seeded ``share`` of a JSONL file's lines (web pairs)."""
    lines = [json.dumps(record) for _, record in iter_jsonl(path)]
    chosen = sorted(_sample(len(lines), share, SMOKE_LEAST, random.Random(seed)))
    with atomic_path(out) as tmp:
        tmp.write_text("".join(lines[i] + "\n" for i in chosen), encoding="utf-8")
    return out
