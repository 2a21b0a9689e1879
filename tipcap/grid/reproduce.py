"""Rerunning a recipe (:mod:`tipcap.grid.recipes`): check its inputs, prepare its data, run its grid and write
``reproduce.md``, each published metric beside the reproduced one with a pass or fail within the tolerance.

The stages, each timed: ``prepare`` (:func:`tipcap.data.prepare.prepare_dataset`, or
:func:`tipcap.data.nocaps.prepare_nocaps`, into ``OUT/prepared``), ``grid`` (the recipe's grid, written to
``OUT/grid.yaml`` with the prepared paths, run by :class:`tipcap.grid.Ablation` into ``OUT/grid``: stores,
gap, decoders, evaluation) and ``report``. A smoke run does the same on a seeded ~1% of every split (at
least :data:`SMOKE_LEAST` images each) with the first seed alone, into ``OUT/smoke``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tipcap import __version__, provenance
from tipcap.clip import ClipSpec, local_weights
from tipcap.data.karpathy import image_id_of, is_karpathy
from tipcap.data.prepare import KARPATHY_SIZES, SPLIT_NAMES, prepare_dataset
from tipcap.errors import TipcapError
from tipcap.grid.recipes import Recipe, metric_value
from tipcap.grid.runner import Ablation
from tipcap.grid.validate import load_ablation
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
    result: CheckResult, flag: str, path: Path | None, images: Path | None, dataset: str, sha256: str | None
) -> None:
    """A Karpathy file of ``dataset`` and its image root: present, the published file, every image there."""
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
        result.problems.append(f"{images_flag} {images or '(not given)'}: no such folder; pass the image root "
                               f"of {dataset} ({_WHERE[dataset]}).")  # fmt: skip
        return
    counts = _karpathy_counts(path, images)
    result.found[f"{flag} images per split (listed, found)"] = counts
    for split, (listed, found) in counts.items():
        if found < listed:
            result.problems.append(
                f"{images_flag} {images}: {listed - found:,} of the {listed:,} {split} images listed in "
                f"{path} are missing; download them ({_WHERE[dataset]}) into that folder."
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
        result.problems.append(f"--eval-karpathy {path or '(not given)'}: no NoCaps validation file; download "
                               "nocaps_val_4500_captions.json (nocaps.org/download) and pass its path.")  # fmt: skip
        return
    document = load_json(path)
    listed = [image.get("file_name", "") for image in document.get("images", [])]
    digest = _sha256(path)
    result.found["--eval-karpathy sha256"] = digest
    if sha256 is not None and digest != sha256:
        result.problems.append(f"--eval-karpathy {path}: SHA-256 {digest[:16]}… is not the published file's.")
    if images is None or not images.is_dir():
        result.problems.append(f"--eval-images {images or '(not given)'}: no such folder; pass the folder of "
                               f"{_WHERE['nocaps']}.")  # fmt: skip
        return
    found = sum((images / name).is_file() for name in listed)
    result.found["--eval-karpathy images (listed, found)"] = (len(listed), found)
    if found < len(listed):
        result.problems.append(f"--eval-images {images}: {len(listed) - found:,} of the {len(listed):,} NoCaps "
                               f"images listed in {path} are missing; download {_WHERE['nocaps']}.")  # fmt: skip


def _check_weights(result: CheckResult, spec: ClipSpec, clip_weights: Path | None) -> None:
    """The CLIP's weights: a local file, or the tag's weights in this machine's cache (no download)."""
    if clip_weights is not None:
        if not clip_weights.is_file() or clip_weights.suffix not in WEIGHT_SUFFIXES:
            result.problems.append(f"--clip-weights {clip_weights}: not a weights file "
                                   f"({', '.join(WEIGHT_SUFFIXES)}).")  # fmt: skip
        return
    if spec.pretrained == "none" or spec.weights_path is not None:
        return
    if local_weights(spec) is None:
        result.problems.append(
            f"CLIP {spec.describe()}: its weights are not on this machine; run once where the hub is "
            f"reachable (python -c \"import open_clip; open_clip.create_model('{spec.model}', "
            f"pretrained='{spec.pretrained}')\"), or pass a local file with --clip-weights FILE."
        )


def check_inputs(recipe: Recipe, inputs: Inputs, embed: dict[str, Any]) -> CheckResult:
    """Every input of a recipe's full run, with one problem line per missing or wrong one.

    ``embed`` is the grid's resolved ``embed`` section (after ``--set``).
    """
    result = CheckResult()
    data = recipe.data
    _check_karpathy(result, "--karpathy", inputs.karpathy, inputs.images, data.train, data.karpathy_sha256)
    if data.eval == "nocaps":
        _check_nocaps(result, inputs.eval_karpathy, inputs.eval_images, data.eval_sha256)
    elif data.eval is not None:
        _check_karpathy(result, "--eval-karpathy", inputs.eval_karpathy, inputs.eval_images, data.eval,
                        data.eval_sha256)  # fmt: skip
    if any(cell.get("setting") == "web-pairs" for cell in recipe.grid.get("cells", [])):
        for flag, value, is_file in (("--web-pairs", inputs.web_pairs, True),
                                     ("--web-images", inputs.web_images, False)):  # fmt: skip
            if value is None or not (value.is_file() if is_file else value.is_dir()):
                result.problems.append(f"{flag} {value or '(not given)'}: a web-pairs cell needs the web "
                                       "pairs (a JSONL of image and caption) and their image folder.")  # fmt: skip
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
    write_json_atomic(out, {**document, "images": [i for i in document["images"] if i["id"] in kept],
                            "annotations": [a for a in document["annotations"] if a["image_id"] in kept]})  # fmt: skip
    return out


def sample_jsonl(path: Path, out: Path, share: float = SMOKE_SHARE, seed: int = 0) -> Path:
    """A seeded ``share`` of a JSONL file's lines (web pairs)."""
    lines = [json.dumps(record) for _, record in iter_jsonl(path)]
    chosen = sorted(_sample(len(lines), share, SMOKE_LEAST, random.Random(seed)))
    with atomic_path(out) as tmp:
        tmp.write_text("".join(lines[i] + "\n" for i in chosen), encoding="utf-8")
    return out


@dataclass
class Verdict:
    """One metric: published and reproduced (×100), the tolerance, and whether it is met."""

    metric: str
    published: float
    reproduced: float | None
    tolerance: float

    @property
    def difference(self) -> float | None:
        return None if self.reproduced is None else self.reproduced - self.published

    @property
    def passed(self) -> bool:
        # A small slack: a difference printed as exactly the tolerance counts as within it.
        return self.difference is not None and abs(self.difference) <= self.tolerance + 1e-9


def judge(recipe: Recipe, reproduced: dict[str, float | None]) -> list[Verdict]:
    """Each published metric against its reproduced value (``None``: not scored, which fails)."""
    return [
        Verdict(metric, value, reproduced.get(metric), recipe.tolerance.metrics[metric])
        for metric, value in recipe.published.metrics.items()
    ]


def _number(value: float | None, sign: bool = False) -> str:
    return "—" if value is None else (f"{value:+.2f}" if sign else f"{value:.2f}")


def report_markdown(
    recipe: Recipe, verdicts: list[Verdict], seeds: dict[str, list[float]], record: dict[str, Any]
) -> str:
    """``reproduce.md``: the verdict table (with each metric's per-seed values), the recipe's statement of
    architecture and deviations, and the run's provenance (``record``)."""
    passed = sum(v.passed for v in verdicts)
    overall = "PASS" if verdicts and passed == len(verdicts) else "FAIL"
    lines = [
        f"# Reproduction of {recipe.name}: {overall} ({passed} of {len(verdicts)} metrics within tolerance)",
        "",
        f"{recipe.paper}, {recipe.venue}; {recipe.table}.",
        f"Published numbers: {recipe.published.source}.",
        "",
        "| metric | published | reproduced (mean over seeds) | per seed | difference | tolerance | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        per_seed = ", ".join(f"{x:.2f}" for x in seeds.get(v.metric, [])) or "—"
        verdict = "pass" if v.passed else ("fail" if v.reproduced is not None else "fail (not scored)")
        lines.append(f"| {v.metric} | {v.published:.2f} | {_number(v.reproduced)} | {per_seed} | "
                     f"{_number(v.difference, sign=True)} | ±{v.tolerance:g} | {verdict} |")  # fmt: skip
    if not verdicts:
        lines.append("| — | the recipe records no published number | | | | | |")
    lines += ["", f"Tolerance: {recipe.tolerance.reason}", "", "## Architecture", "",
              f"- Paper: {recipe.paper_architecture}", f"- Here: {recipe.architecture}",
              f"- Hyperparameters read from: {recipe.hyperparameters}", "", "## Deviations", ""]  # fmt: skip
    lines += [f"- {d}" for d in recipe.deviations] or ["- none recorded"]
    lines += ["", "## Provenance", "", "```json", json.dumps(record, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


class Reproduction:
    """A recipe run into ``out``: :meth:`check`, :meth:`run` (full or smoke) and :meth:`plan`.

    ``overrides`` are ``--set KEY=VALUE`` for the recipe's grid (as ``tipcap ablate`` takes them).
    """

    def __init__(
        self,
        recipe: Recipe,
        recipe_path: Path,
        inputs: Inputs,
        out: Path,
        overrides: list[str] | None = None,
        progress: bool = True,
        echo: Callable[[str], None] | None = None,
    ):
        self.recipe, self.recipe_path, self.inputs = recipe, recipe_path, inputs
        self.out, self.overrides = out, list(overrides or [])
        self.progress = progress
        self.echo = echo or (lambda message: None)
        self.times: dict[str, float] = {}

    def _grid_data(self) -> dict[str, Any]:
        """The recipe's grid with ``--set`` applied (data paths still empty), to read its CLIP and seeds."""
        from tipcap.config import apply_overrides

        return apply_overrides(json.loads(json.dumps(self.recipe.grid)), self.overrides)

    def check(self) -> CheckResult:
        """:func:`check_inputs` for this recipe and its ``--set`` overrides."""
        return check_inputs(self.recipe, self.inputs, self._grid_data().get("embed", {}))

    def _timed(self, stage: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = work()
        self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - start
        self.echo(f"{stage}: {self.times[stage]:.1f} s")
        return value

    def _prepare(self, folder: Path, smoke: bool) -> dict[str, str]:
        """Prepare the training (and evaluation) data into ``folder``; the grid's data keys."""
        inputs, data = self.inputs, self.recipe.data
        karpathy, eval_karpathy, web_pairs = inputs.karpathy, inputs.eval_karpathy, inputs.web_pairs
        if smoke:
            folder.mkdir(parents=True, exist_ok=True)
            karpathy = sample_karpathy(karpathy, folder / "karpathy-sample.json")
            if data.eval == "nocaps" and eval_karpathy is not None:
                eval_karpathy = sample_nocaps(eval_karpathy, folder / "nocaps-sample.json")
            elif eval_karpathy is not None:
                eval_karpathy = sample_karpathy(eval_karpathy, folder / "eval-karpathy-sample.json")
            if web_pairs is not None:
                web_pairs = sample_jsonl(web_pairs, folder / "web-pairs-sample.jsonl")
        keys: dict[str, str] = {}
        train = prepare_dataset(data.train, karpathy, inputs.images, folder / data.train, progress=self.progress)
        keys["karpathy"] = str((folder / data.train / train.outputs["dataset"]).resolve())
        keys["image_root"] = str(inputs.images.resolve())
        if data.eval == "nocaps":
            from tipcap.data.nocaps import prepare_nocaps

            assert eval_karpathy is not None and inputs.eval_images is not None  # checked
            report = prepare_nocaps(eval_karpathy, inputs.eval_images, folder / "nocaps", progress=self.progress)
            keys["eval_karpathy"] = str((folder / "nocaps" / report.outputs["dataset"]).resolve())
        elif data.eval is not None:
            assert eval_karpathy is not None and inputs.eval_images is not None  # checked
            report = prepare_dataset(data.eval, eval_karpathy, inputs.eval_images, folder / f"eval-{data.eval}",
                                     progress=self.progress)  # fmt: skip
            keys["eval_karpathy"] = str((folder / f"eval-{data.eval}" / report.outputs["dataset"]).resolve())
        if data.eval is not None:
            keys["eval_image_root"] = str(Path(inputs.eval_images or "").resolve())
        if web_pairs is not None and inputs.web_images is not None:
            keys["web_pairs"], keys["web_image_root"] = str(web_pairs.resolve()), str(inputs.web_images.resolve())
        return keys

    def _ablation(self, folder: Path, keys: dict[str, str], smoke: bool) -> Ablation:
        """Write ``folder/grid.yaml`` (the recipe's grid with the prepared data) and load it with ``--set``."""
        grid = {**self.recipe.grid, **keys}
        if self.inputs.clip_weights is not None:
            grid["embed"] = {**grid.get("embed", {}), "pretrained": str(self.inputs.clip_weights.resolve())}
        overrides = list(self.overrides)
        if smoke:
            seeds = self._grid_data().get("seeds", [0])
            overrides.append(f"seeds=[{seeds[0]}]")
        path = folder / "grid.yaml"
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
        config = load_ablation(path, overrides)
        return Ablation(config, folder / "grid", progress=self.progress, echo=self.echo)

    def _folder(self, smoke: bool) -> Path:
        return self.out / "smoke" if smoke else self.out

    def _refuse_problems(self) -> CheckResult:
        checked = self.check()
        if checked.problems:
            raise TipcapError(
                f"{len(checked.problems)} problem(s) with the inputs of {self.recipe.name} "
                f"(tipcap reproduce {self.recipe.name} --check lists them): {checked.problems[0]}"
            )
        return checked

    def plan(self) -> list[str]:
        """Prepare the data, build stores and gaps and write the decoders' torchrun commands
        (``OUT/grid/train_commands.sh``, as ``tipcap ablate --plan``); return them."""
        self._refuse_problems()
        keys = self._timed("prepare", lambda: self._prepare(self.out / "prepared", smoke=False))
        return self._ablation(self.out, keys, smoke=False).plan()

    def run(self, smoke: bool = False) -> list[Verdict]:
        """Every stage, timed; writes ``reproduce.md`` (and ``reproduce.json``) into the run's folder."""
        checked = self._refuse_problems()
        folder = self._folder(smoke)
        keys = self._timed("prepare", lambda: self._prepare(folder / "prepared", smoke))
        ablation = self._ablation(folder, keys, smoke)
        self._timed("grid", ablation.run)
        return self._timed("report", lambda: self._report(ablation, folder, checked, smoke))

    def _reproduced(self, ablation: Ablation) -> dict[str, list[float]]:
        """Each compared metric of the recipe's cell, per seed (×100)."""
        job = next(job for job in ablation.jobs if job.cell.name == self.recipe.cell)
        seeds: list[int | None] = list(ablation.config.seeds) if job.trained else [None]
        values: dict[str, list[float]] = {metric: [] for metric in self.recipe.compared}
        for seed in seeds:
            document = load_json(ablation.eval_dir(job, seed, self.recipe.eval_prompt) / "metrics.json")
            for metric in values:
                value = metric_value(metric, document["metrics"], document.get("domains", {}))
                if value is not None:
                    values[metric].append(value)
        return values

    def _report(self, ablation: Ablation, folder: Path, checked: CheckResult, smoke: bool) -> list[Verdict]:
        per_seed = self._reproduced(ablation)
        means = {metric: statistics.mean(v) if v else None for metric, v in per_seed.items()}
        verdicts = judge(self.recipe, means)
        record = {
            "recipe": str(self.recipe_path), "recipe_sha256": _sha256(self.recipe_path),
            "smoke": smoke, "seeds": ablation.config.seeds, "cell": self.recipe.cell,
            "eval_prompt": self.recipe.eval_prompt, "grid": str(folder / "grid.yaml"),
            "overrides": self.overrides, "inputs": {k: str(v) for k, v in vars(self.inputs).items() if v},
            "found": checked.found, "notes": checked.notes,
            "seconds": {stage: round(seconds, 1) for stage, seconds in self.times.items()},
            "command": sys.argv, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"tipcap": __version__, **provenance.versions()}, "device": _device(),
            "grid_sha256": hashlib.sha256((folder / "grid.yaml").read_bytes()).hexdigest(),
        }  # fmt: skip
        text = report_markdown(self.recipe, verdicts, per_seed, record)
        if smoke:
            text = (f"**Smoke run** on ~{SMOKE_SHARE:.0%} of the data with one seed: it shows that every stage "
                    "runs; its verdicts say nothing about the reproduction.\n\n") + text  # fmt: skip
        with atomic_path(folder / "reproduce.md") as tmp:
            tmp.write_text(text, encoding="utf-8")
        write_json_atomic(folder / "reproduce.json", {
            "verdicts": [{**vars(v), "passed": v.passed} for v in verdicts], "per_seed": per_seed,
            "provenance": record})  # fmt: skip
        return verdicts


def _device() -> str:
    """The accelerator the run had, in words (``cpu`` without one)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
