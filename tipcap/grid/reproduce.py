"""Rerunning a recipe (:mod:`tipcap.grid.recipes`): check its inputs, prepare its data, run its grid and write
``reproduce.md``, each published metric beside the reproduced one with a pass or fail within the tolerance.

The stages, each timed: ``prepare`` (:func:`tipcap.data.prepare.prepare_dataset`, or
:func:`tipcap.data.nocaps.prepare_nocaps`, into ``OUT/prepared``), ``grid`` (the recipe's grid, written to
``OUT/grid.yaml`` with the prepared paths, run by :class:`tipcap.grid.Ablation` into ``OUT/grid``: stores,
gap, decoders, evaluation) and ``report``. A smoke run does the same on a seeded ~1% of every split (at
least :data:`tipcap.grid.recipe_inputs.SMOKE_LEAST` images each) with the first seed alone, into
``OUT/smoke``.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tipcap import __version__, provenance
from tipcap.config import apply_overrides
from tipcap.data.prepare import prepare_dataset
from tipcap.errors import TipcapError
from tipcap.grid.recipe_inputs import (
    SMOKE_SHARE,
    CheckResult,
    Inputs,
    check_inputs,
    sample_jsonl,
    sample_karpathy,
    sample_nocaps,
)
from tipcap.grid.recipes import Recipe, metric_value
from tipcap.grid.runner import Ablation
from tipcap.grid.validate import load_ablation
from tipcap.io import atomic_path, load_json, write_json_atomic


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
        # Floating-point slack: a difference equal to the tolerance is within it.
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
    overall = "PASS" if passed == len(verdicts) else "FAIL"
    verdict = f"{overall} ({passed} of {len(verdicts)} metrics within tolerance)"
    lines = [
        f"# Reproduction of {recipe.name}: {verdict if verdicts else 'no published number to compare with'}",
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
        lines.append(
            f"| {v.metric} | {v.published:.2f} | {_number(v.reproduced)} | {per_seed} | "
            f"{_number(v.difference, sign=True)} | ±{v.tolerance:g} | {verdict} |"
        )
    if not verdicts:
        lines.append("| — | the recipe records no published number | | | | | |")
    lines += [
        "",
        f"Tolerance: {recipe.tolerance.reason}",
        "",
        "## Architecture",
        "",
        f"- Paper: {recipe.paper_architecture}",
        f"- Here: {recipe.architecture}",
        f"- Hyperparameters read from: {recipe.hyperparameters}",
        "",
        "## Deviations",
        "",
    ]
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
        return apply_overrides(copy.deepcopy(self.recipe.grid), self.overrides)

    def check(self) -> CheckResult:
        """:func:`check_inputs` for this recipe and its ``--set`` overrides."""
        return check_inputs(self.recipe, self.inputs, self._grid_data())

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
        train = prepare_dataset(
            data.train, karpathy, inputs.images, folder / data.train, progress=self.progress
        )
        keys["karpathy"] = str((folder / data.train / train.outputs["dataset"]).resolve())
        keys["image_root"] = str(inputs.images.resolve())
        if data.eval == "nocaps":
            from tipcap.data.nocaps import prepare_nocaps

            assert eval_karpathy is not None and inputs.eval_images is not None  # checked
            report = prepare_nocaps(
                eval_karpathy, inputs.eval_images, folder / "nocaps", progress=self.progress
            )
            keys["eval_karpathy"] = str((folder / "nocaps" / report.outputs["dataset"]).resolve())
        elif data.eval is not None:
            assert eval_karpathy is not None and inputs.eval_images is not None  # checked
            report = prepare_dataset(
                data.eval,
                eval_karpathy,
                inputs.eval_images,
                folder / f"eval-{data.eval}",
                progress=self.progress,
            )
            keys["eval_karpathy"] = str((folder / f"eval-{data.eval}" / report.outputs["dataset"]).resolve())
        if data.eval is not None:
            keys["eval_image_root"] = str(Path(inputs.eval_images or "").resolve())
        if web_pairs is not None and inputs.web_images is not None:
            keys["web_pairs"], keys["web_image_root"] = (
                str(web_pairs.resolve()),
                str(inputs.web_images.resolve()),
            )
        return keys

    def _ablation(self, folder: Path, keys: dict[str, str], smoke: bool) -> Ablation:
        """Write ``folder/grid.yaml`` (the recipe's grid with the prepared data); load it with ``--set``."""
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
            "recipe": str(self.recipe_path),
            "recipe_sha256": provenance.sha256_file(self.recipe_path),
            "smoke": smoke,
            "seeds": ablation.config.seeds,
            "cell": self.recipe.cell,
            "eval_prompt": self.recipe.eval_prompt,
            "grid": str(folder / "grid.yaml"),
            "overrides": self.overrides,
            "inputs": {k: str(v) for k, v in vars(self.inputs).items() if v},
            "found": checked.found,
            "notes": checked.notes,
            "seconds": {stage: round(seconds, 1) for stage, seconds in self.times.items()},
            "command": sys.argv,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"tipcap": __version__, **provenance.versions()},
            "device": _device(),
            "grid_sha256": hashlib.sha256((folder / "grid.yaml").read_bytes()).hexdigest(),
        }
        text = report_markdown(self.recipe, verdicts, per_seed, record)
        if smoke:
            text = (
                f"**Smoke run** on ~{SMOKE_SHARE:.0%} of the data with one seed: it shows that every stage "
                "runs; its verdicts say nothing about the reproduction.\n\n"
            ) + text
        with atomic_path(folder / "reproduce.md") as tmp:
            tmp.write_text(text, encoding="utf-8")
        write_json_atomic(
            folder / "reproduce.json",
            {
                "verdicts": [{**vars(v), "passed": v.passed} for v in verdicts],
                "per_seed": per_seed,
                "provenance": record,
            },
        )
        return verdicts


def _device() -> str:
    """The accelerator the run had, in words (``cpu`` without one)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
