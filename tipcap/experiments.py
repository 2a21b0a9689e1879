"""Ablations: a grid of data settings × gap kinds × prompt modes × seeds (× few-pairs shares), one protocol.

Every step goes through the library functions behind the commands (``embed``, ``fit-gap``, ``train``,
``evaluate``) and is cached in the output directory: stores, gap files, trained models and evaluations
are reused when present, so a grid that was interrupted finishes only its missing cells on a rerun. The
directory remembers the grid it was run with (``grid.json``): a rerun may add cells, seeds and evaluation
prompts, but a changed data set, CLIP, decoder or cell definition is refused rather than mixed.

Cells:

- a gap kind (``none``, ``isotropic``, ``mean-shift``, ``cov-noise``, ``gaussian``, ``memory``) fitted in a
  data setting: ``few-pairs`` (a seeded subset of the paired training images: a count or a percentage, or a
  list of them to sweep), ``web-pairs`` (a JSONL of web image-caption pairs), ``unpaired`` (the captions of
  one seeded half of the training images and the images of the other half, so that no image meets its own
  captions) or ``text-only``; a decoder is trained on the training captions with that gap, with
  ``prompt: none | pim | hard``;
- ``supervised``: a decoder trained on image embeddings, of all paired training images (the upper bound) or,
  with ``setting: few-pairs``, of the few-pairs subset only;
- ``retrieval`` and ``template``: the non-neural baselines (no training, evaluated once).

Evaluation images and references come from ``karpathy`` (in-domain) or ``eval_karpathy`` (cross-domain, e.g.
decoders trained on COCO captions and evaluated on Flickr30k images).

Outputs: ``results.csv`` (one row per cell, seed and evaluation prompt mode), ``table.md`` (mean ± std
over seeds), ``cider.png`` (CIDEr per method, coloured by setting) and, for grids with few-pairs cells,
``cider_vs_pairs.png`` (CIDEr against the share of paired training images). ``plan`` writes each training
cell's config and the commands to train them outside the runner (under ``torchrun``); the runner then
reuses the trained models.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import shlex
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tipcap.clip import ClipSpec
from tipcap.config import (
    ExperimentConfig,
    apply_overrides,
    from_dict,
    read_yaml_mapping,
    save_config,
    to_dict,
)
from tipcap.data import list_images
from tipcap.data.karpathy import split_matches
from tipcap.embed import embed_images, embed_texts
from tipcap.errors import TipcapError
from tipcap.evaluate import METRICS
from tipcap.gap import KINDS, SETTINGS, fit_gap, join_pairs, plot_gap
from tipcap.io import atomic_path, load_json, write_json_atomic
from tipcap.protocol import evaluate_split
from tipcap.store import EmbeddingStore
from tipcap.toy.scoring import object_f1, scene_objects
from tipcap.train import train

METRIC_COLUMNS = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "SPICE", "CLIPScore", "object_f1")
COLUMNS = ("cell", "method", "kind", "setting", "few_pairs", "paired_fraction", "prompt", "eval_prompt",
           "seed", "train_data", "eval_data", *METRIC_COLUMNS)  # fmt: skip
BASELINES = ("retrieval", "template")
"""Cell kinds without a trained decoder."""
CELL_KINDS = (*KINDS, "supervised", *BASELINES)
_PERCENT = re.compile(r"\d+(\.\d+)?%")
_NAME = re.compile(r"[\w.+-]+")


@dataclass
class Cell:
    """One method: a gap kind fitted in a setting (or ``supervised``, or a baseline), with prompts or not.

    ``few_pairs`` overrides the grid's value for this cell (``few-pairs`` cells only).
    """

    name: str
    kind: str = "gaussian"
    setting: str = "text-only"
    prompt: Literal["none", "pim", "hard"] = "none"
    eval_prompts: list[Literal["none", "auto", "oracle"]] = field(default_factory=lambda: ["none"])
    few_pairs: int | str | list[int | str] | None = None


@dataclass
class AblationConfig:
    """A grid: decoders trained on one data set (a Karpathy file whose images lie under ``image_root``).

    ``few_pairs`` is a number of paired training images, a percentage of them (``"1%"``), or a list of
    such values to sweep (each few-pairs cell then runs once per value). ``data_seed`` draws the few-pairs
    subset and the unpaired halves. ``eval_karpathy``/``eval_image_root`` evaluate on another data set.
    ``store_dir`` keeps the embedding stores elsewhere than ``OUT/stores``, so that grids over the same data
    and CLIP share them (a store whose CLIP or inputs differ is rebuilt, never mixed).
    """

    karpathy: str = ""
    image_root: str | None = None
    web_pairs: str | None = None
    web_image_root: str | None = None
    eval_karpathy: str | None = None
    eval_image_root: str | None = None
    vocabulary: str | None = None
    clip_model: str = ""
    clip_pretrained: str = "none"
    few_pairs: int | str | list[int | str] = 200
    data_seed: int = 0
    eval_split: str = "test"
    beams: int = 1
    metrics: list[str] = field(default_factory=lambda: ["bleu", "rouge", "cider"])
    seeds: list[int] = field(default_factory=lambda: [0])
    decoder: dict[str, Any] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    store_dir: str | None = None


@dataclass(frozen=True)
class Job:
    """A cell at one few-pairs value: ``suffix`` (``""``, or ``"-1pct"`` in a sweep) tells its files apart."""

    cell: Cell
    few_pairs: str | None = None
    suffix: str = ""

    @property
    def name(self) -> str:
        """The cell's name in files and results (its configured name plus the sweep value)."""
        return self.cell.name + self.suffix

    @property
    def trained(self) -> bool:
        """Whether the cell trains a decoder (per seed)."""
        return self.cell.kind not in BASELINES


def _check_few_pairs(value: Any, key: str) -> None:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise TipcapError(f"config key '{key}': an empty list sweeps nothing.")
    for item in values:
        if isinstance(item, int) and item > 0:
            continue
        if isinstance(item, str) and _PERCENT.fullmatch(item) and 0 < float(item[:-1]) <= 100:
            continue
        raise TipcapError(
            f"config key '{key}': expected a number of images (200), a percentage ('1%') or a list of them, "
            f"got {item!r}."
        )


def expand(config: AblationConfig) -> list[Job]:
    """The grid's jobs: few-pairs cells once per few-pairs value of a sweep, the others once."""
    jobs = []
    for cell in config.cells:
        if cell.setting != "few-pairs":
            jobs.append(Job(cell))
            continue
        values = cell.few_pairs if cell.few_pairs is not None else config.few_pairs
        if isinstance(values, list):
            jobs.extend(Job(cell, str(v), "-" + str(v).replace("%", "pct")) for v in values)
        else:
            jobs.append(Job(cell, str(values)))
    return jobs


def _validate(config: AblationConfig, path: Path) -> None:
    """Checks that need more than types; each error names the key."""
    if not config.cells:
        raise TipcapError(f"{path}: no cells to run.")
    if not config.karpathy or not config.clip_model:
        raise TipcapError(f"{path}: set karpathy and clip_model (in the file or with --set).")
    _check_few_pairs(config.few_pairs, "few_pairs")
    unknown = [m for m in config.metrics if m not in METRICS]
    if unknown or "cider" not in config.metrics:
        raise TipcapError(
            f"config key 'metrics': {config.metrics} must name metrics among {', '.join(METRICS)}, "
            "cider included (the table and the plots rank by CIDEr)."
        )
    for index, cell in enumerate(config.cells):
        key = f"cells[{index}]"
        if not _NAME.fullmatch(cell.name):
            raise TipcapError(
                f"config key '{key}.name': {cell.name!r} is not a plain name (letters, digits, .+-_)."
            )
        if cell.kind not in CELL_KINDS:
            raise TipcapError(
                f"config key '{key}.kind': {cell.kind!r} is not one of {', '.join(CELL_KINDS)}."
            )
        if cell.setting not in SETTINGS:
            raise TipcapError(
                f"config key '{key}.setting': {cell.setting!r} is not one of {', '.join(SETTINGS)}."
            )
        if cell.kind == "supervised" and cell.setting not in ("text-only", "few-pairs"):
            raise TipcapError(
                f"config key '{key}.setting': supervised trains on all paired images (the default) "
                "or on the few-pairs subset (few-pairs)."
            )
        if cell.kind in BASELINES and (cell.prompt != "none" or cell.eval_prompts != ["none"]):
            raise TipcapError(f"config key '{key}': {cell.kind} takes no prompt or eval_prompts.")
        if cell.few_pairs is not None:
            if cell.setting != "few-pairs":
                raise TipcapError(f"config key '{key}.few_pairs': applies to few-pairs cells only.")
            _check_few_pairs(cell.few_pairs, f"{key}.few_pairs")
        if cell.setting == "web-pairs" and not config.web_pairs:
            raise TipcapError(f"config key '{key}': a web-pairs cell needs web_pairs (a JSONL of pairs).")
    names = [job.name for job in expand(config)]
    for name in names:
        if names.count(name) > 1:
            raise TipcapError(
                f"{path}: cell name {name!r} is used twice; results would overwrite each other."
            )


def load_ablation(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    """Read an ablation YAML, apply ``key=value`` overrides, and validate it like experiment configs."""
    path = Path(path)
    data = read_yaml_mapping(
        path, f"{path}: no such ablation config.", "a mapping of ablation settings and cells"
    )
    config = from_dict(AblationConfig, apply_overrides(data, overrides or []))
    from_dict(
        ExperimentConfig, {**config.decoder, "data": {}}, "decoder"
    )  # a bad decoder fails now, not later
    _validate(config, path)
    return config


class Ablation:
    """Runs an :class:`AblationConfig` into ``out``, reusing everything already there.

    ``echo`` receives one line per step (a cell trained, evaluated or reused).
    """

    def __init__(
        self,
        config: AblationConfig,
        out: str | Path,
        progress: bool = True,
        echo: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.out = Path(out)
        self.progress = progress
        self.echo = echo or (lambda message: None)
        self.clip = ClipSpec(config.clip_model, config.clip_pretrained)
        self.karpathy = Path(config.karpathy)
        self.root = Path(config.image_root) if config.image_root else self.karpathy.parent
        self.eval_karpathy = Path(config.eval_karpathy) if config.eval_karpathy else self.karpathy
        if config.eval_image_root:
            self.eval_root = Path(config.eval_image_root)
        else:
            self.eval_root = self.eval_karpathy.parent if config.eval_karpathy else self.root
        self.jobs = expand(config)
        self.stores = Path(config.store_dir) if config.store_dir else self.out / "stores"
        self._checked: set[Path] = set()
        self._train_images: int | None = None
        self._eval_objects: dict[Any, list[str]] | None = None
        self._data_names: dict[Path, str] = {}

    # -- cached steps ---------------------------------------------------------------------------

    def _texts(self, name: str, corpus: Path, split: str | None) -> Path:
        out = self.stores / name
        # Checking a store re-reads and hashes its inputs: do it once per run, not once per cell.
        if out not in self._checked:
            embed_texts(corpus, self.clip, out, split=split, progress=self.progress)
            self._checked.add(out)
        return out

    def _images(
        self, name: str, source: Path, split: str | None, root: Path, limit: str | None = None
    ) -> Path:
        out = self.stores / name
        if out not in self._checked:
            embed_images(
                source, self.clip, out, image_root=root, split=split, limit=limit, seed=self.config.data_seed,
                progress=self.progress,
            )  # fmt: skip
            self._checked.add(out)
        return out

    def _few_pairs_images(self, job: Job) -> Path:
        tag = job.few_pairs.replace("%", "pct")
        return self._images(f"train-images-few-{tag}", self.karpathy, "train", self.root, job.few_pairs)

    def _unpaired_halves(self) -> tuple[Path, Path]:
        """Karpathy files of two disjoint, seeded halves of the training images: (captions, images)."""
        folder = self.out / "data"
        texts, images = (
            folder / f"unpaired-{part}-seed{self.config.data_seed}.json" for part in ("texts", "images")
        )
        if not (texts.is_file() and images.is_file()):
            document = load_json(self.karpathy)
            train = [
                e
                for e in document["images"]
                if isinstance(e, dict) and split_matches(e.get("split"), "train")
            ]
            if len(train) < 2:
                raise TipcapError(
                    f"{self.karpathy}: the unpaired setting needs at least two training images."
                )
            order = random.Random(self.config.data_seed).sample(range(len(train)), len(train))
            header = {key: value for key, value in document.items() if key != "images"}
            half = len(train) // 2
            for path, rows in ((texts, order[:half]), (images, order[half:])):
                write_json_atomic(path, {**header, "images": [train[i] for i in sorted(rows)]}, indent=None)
        return texts, images

    def stores_for(self, job: Job) -> tuple[Path, Path | None]:
        """(caption store, image store) from which a job's gap is fitted."""
        setting = job.cell.setting
        if setting == "few-pairs":
            return self._texts("train-text", self.karpathy, "train"), self._few_pairs_images(job)
        if setting == "unpaired":
            texts, images = self._unpaired_halves()
            return (
                self._texts("unpaired-text", texts, "train"),
                self._images("unpaired-images", images, "train", self.root),
            )
        if setting == "web-pairs":
            web = Path(self.config.web_pairs)
            root = Path(self.config.web_image_root) if self.config.web_image_root else web.parent
            return self._texts("web-text", web, None), self._images("web-images", web, None, root)
        return self._texts("train-text", self.karpathy, "train"), None

    def gap(self, job: Job) -> Path:
        """The gap file of a job's kind and setting, fitted once."""
        kind, setting = job.cell.kind, job.cell.setting
        path = self.out / "gaps" / f"{kind}-{setting}{job.suffix}.safetensors"
        if not path.is_file():
            texts, images = self.stores_for(job)
            texts_store = EmbeddingStore.open(texts)
            images_store = EmbeddingStore.open(images) if images else None
            gap = fit_gap(setting, texts_store, images_store, kind=kind)
            gap.save(path)
            if kind == "gaussian" and images_store is not None:
                pairs = join_pairs(texts_store, images_store)
                plot_gap(gap, pairs if len(pairs) else None, path.with_suffix(".png"))
        return path

    def training_config(self, job: Job, seed: int) -> ExperimentConfig:
        """The config a job's decoder is trained with (stores and gap built as needed; absolute paths)."""
        cell = job.cell
        data: dict[str, Any] = {
            "train_texts": str(self._texts("train-text", self.karpathy, "train").resolve())
        }
        if cell.kind == "supervised":
            if cell.setting == "few-pairs":
                images = self._few_pairs_images(job)
            else:
                images = self._images("train-images", self.karpathy, "train", self.root)
            data["train_images"] = str(images.resolve())
        else:
            data["gap"] = str(self.gap(job).resolve())
        decoder = json.loads(json.dumps(self.config.decoder))
        vocabulary = str(Path(self.config.vocabulary).resolve()) if self.config.vocabulary else None
        decoder.setdefault("model", {}).update({"prompt": cell.prompt, "vocabulary": vocabulary})
        decoder.setdefault("train", {})["seed"] = seed
        return from_dict(ExperimentConfig, {**decoder, "data": data})

    def run_dir(self, job: Job, seed: int) -> Path:
        """Where a job's decoder of one seed is trained (``model/`` inside when finished)."""
        return self.out / "runs" / f"{job.name}-seed{seed}"

    def model(self, job: Job, seed: int) -> Path:
        """Train (or reuse, or resume) the job's decoder for one seed."""
        run = self.run_dir(job, seed)
        if (run / "model" / "config.json").is_file():
            return run / "model"
        config = self.training_config(job, seed)
        self.echo(f"{job.name} seed {seed}: training into {run}")
        return train(config, run, resume=(run / "checkpoints").is_dir(), progress=self.progress)

    def _paired_fraction(self, job: Job) -> float | None:
        """The share of the training images whose pairs the job used (``None``: no paired data)."""
        if job.few_pairs is not None:
            store = self._few_pairs_images(job)
        elif job.cell.kind == "supervised":
            store = self._images("train-images", self.karpathy, "train", self.root)
        else:
            return None
        if self._train_images is None:
            self._train_images = len(list_images(self.karpathy, self.root, "train"))
        return len(EmbeddingStore.open(store)) / self._train_images

    def evaluate(self, job: Job, seed: int | None, eval_prompt: str) -> dict[str, Any]:
        """Evaluate one job (cached), with object F1 beside the caption metrics; ``seed`` is ``None``
        for the baselines, which are not trained."""
        cell = job.cell
        out = (
            self.out
            / "eval"
            / (f"{job.name}-{eval_prompt}" if seed is None else f"{job.name}-seed{seed}-{eval_prompt}")
        )
        if (out / "row.json").is_file():
            self.echo(f"{out.name}: reused")
            return json.loads((out / "row.json").read_text(encoding="utf-8"))
        if not (out / "metrics.json").is_file():
            split = self.config.eval_split
            store_name = f"{split}-images" if self.eval_karpathy == self.karpathy else f"eval-{split}-images"
            test_store = self._images(store_name, self.eval_karpathy, split, self.eval_root)
            method = cell.kind if cell.kind in BASELINES else "model"
            texts = self._texts("train-text", self.karpathy, "train") if method == "retrieval" else None
            evaluate_split(
                self.eval_karpathy, split, out, method=method,
                model_dir=self.model(job, seed) if method == "model" else None, image_store=test_store,
                texts=texts, clip=self.clip, prompt=eval_prompt, oracle_prompts=self.eval_objects(),
                vocabulary=self.config.vocabulary, beams=self.config.beams, metrics=self.config.metrics,
            )  # fmt: skip
        row = self._row(job, seed, eval_prompt, out)
        write_json_atomic(out / "row.json", row)
        self.echo(f"{out.name}: CIDEr {row['CIDEr']:.3f}")
        return row

    def data_name(self, karpathy: Path) -> str:
        """A Karpathy file's ``dataset`` field, else its name without suffixes (read once per file)."""
        if karpathy not in self._data_names:
            document = load_json(karpathy)
            self._data_names[karpathy] = str(document.get("dataset") or karpathy.name.split(".")[0])
        return self._data_names[karpathy]

    def eval_objects(self) -> dict[Any, list[str]]:
        """Ground-truth object names per evaluation image id (toy-world files only; read once)."""
        if self._eval_objects is None:
            self._eval_objects = scene_objects(self.eval_karpathy)
        return self._eval_objects

    def _row(self, job: Job, seed: int | None, eval_prompt: str, out: Path) -> dict[str, Any]:
        cell = job.cell
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["metrics"]
        per_image = json.loads((out / "per_image.json").read_text(encoding="utf-8"))
        objects = self.eval_objects()
        scored = [r for r in per_image if r["image_id"] in objects]
        f1 = statistics.mean(object_f1(r["prediction"], [
            {"colour": name.split()[0], "shape": name.split()[1]} for name in objects[r["image_id"]]
        ]) for r in scored) if scored else None  # fmt: skip
        fraction = self._paired_fraction(job)
        setting = "all-pairs" if cell.kind == "supervised" and job.few_pairs is None else cell.setting
        return {
            "cell": job.name, "method": cell.name, "kind": cell.kind, "setting": setting,
            "few_pairs": job.few_pairs, "paired_fraction": fraction, "prompt": cell.prompt,
            "eval_prompt": eval_prompt, "seed": seed, "train_data": self.data_name(self.karpathy),
            "eval_data": self.data_name(self.eval_karpathy),
            **{k: metrics.get(k) for k in METRIC_COLUMNS[:-1]}, "object_f1": f1,
        }  # fmt: skip

    # -- the grid -------------------------------------------------------------------------------

    def _check_grid(self) -> None:
        """Refuse to mix results of another grid into ``out``; remember this one in ``grid.json``."""
        path = self.out / "grid.json"
        current = to_dict(self.config)
        # Where the stores are kept changes no result.
        fixed = {k: v for k, v in current.items() if k not in ("cells", "seeds", "store_dir")}
        cells = {c["name"]: {k: v for k, v in c.items() if k != "eval_prompts"} for c in current["cells"]}
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            changed = [k for k in fixed if saved["fixed"].get(k) != fixed[k]]
            if changed:
                raise TipcapError(
                    f"--out {self.out} holds results of a grid with other {', '.join(changed)}; "
                    "use another --out, or the same values."
                )
            for name, cell in cells.items():
                if name in saved["cells"] and saved["cells"][name] != cell:
                    raise TipcapError(
                        f"--out {self.out}: cell {name!r} was run there with another definition; "
                        "give the changed cell a new name, or use another --out."
                    )
            cells = {**saved["cells"], **cells}
        write_json_atomic(path, {"fixed": fixed, "cells": cells})

    def run(self) -> list[dict[str, Any]]:
        """Run every job × seed × evaluation prompt mode; write the CSV, the table and the plots."""
        self._check_grid()
        rows = []
        for job in self.jobs:
            for seed in self.config.seeds if job.trained else [None]:
                for eval_prompt in job.cell.eval_prompts:
                    rows.append(self.evaluate(job, seed, eval_prompt))
                    self._write_csv(rows)
        title = None
        if self.eval_karpathy != self.karpathy:
            source, target = self.data_name(self.karpathy), self.data_name(self.eval_karpathy)
            title = (
                f"Decoders trained on {source}, evaluated on the {self.config.eval_split} split of {target}."
            )
        (self.out / "table.md").write_text(markdown_table(rows, title), encoding="utf-8")
        plot_cider(rows, self.out / "cider.png")
        fraction_plot = self.out / "cider_vs_pairs.png"
        if any(row["few_pairs"] for row in rows):
            plot_cider_vs_pairs(rows, fraction_plot)
        else:
            fraction_plot.unlink(missing_ok=True)  # from an earlier grid in this folder
        return rows

    def plan(self) -> list[str]:
        """Build stores and gaps, write each untrained decoder's ``train.yaml`` and the command that trains
        it (under ``torchrun``) to ``train_commands.sh``; return the commands. A later :meth:`run` reuses
        the models they write."""
        self._check_grid()
        commands = []
        for job in self.jobs:
            if not job.trained:
                continue
            for seed in self.config.seeds:
                run = self.run_dir(job, seed)
                if (run / "model" / "config.json").is_file():
                    continue
                save_config(self.training_config(job, seed), run / "train.yaml")
                commands.append(
                    'torchrun --nproc_per_node "${NPROC:-1}" -m tipcap.cli train '
                    f"--config {shlex.quote(str((run / 'train.yaml').resolve()))} "
                    f"--out {shlex.quote(str(run.resolve()))} --resume --no-progress"
                )
        header = (
            "#!/bin/sh\n"
            "# Trains the grid's decoders (e.g. NPROC=8 sh train_commands.sh); then rerun tipcap ablate.\n"
            "set -e\n"
        )
        with atomic_path(self.out / "train_commands.sh") as tmp:
            tmp.write_text(header + "".join(c + "\n" for c in commands), encoding="utf-8")
        return commands

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        with atomic_path(self.out / "results.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["cell"], row["eval_prompt"]), []).append(row)
    return groups


def _values(group: list[dict[str, Any]], column: str) -> list[float]:
    """The column's numbers over a group's rows (results.csv leaves missing metrics empty)."""
    return [float(r[column]) for r in group if r[column] not in (None, "")]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown_table(rows: list[dict[str, Any]], title: str | None = None) -> str:
    """Mean ± std over seeds of each method (and evaluation prompt mode), for the metrics computed."""
    groups = _groups(rows)
    columns = [c for c in METRIC_COLUMNS if any(_values(g, c) for g in groups.values())]
    names = {"object_f1": "object F1"}
    lines = [f"{title}\n"] if title else []
    lines += [
        "| method | prompt at test | seeds | " + " | ".join(names.get(c, c) for c in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for (cell, prompt), group in groups.items():
        cells = " | ".join(_mean_std(_values(group, c)) for c in columns)
        lines.append(f"| {cell} | {prompt} | {len(group)} | {cells} |")
    return "\n".join(lines) + "\n"


SETTING_COLOURS = {
    "few-pairs": "tab:blue",
    "web-pairs": "tab:orange",
    "unpaired": "tab:green",
    "text-only": "tab:red",
    "all-pairs": "tab:gray",
}


def _save_figure(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def plot_cider(rows: list[dict[str, Any]], path: Path) -> None:
    """A bar chart of CIDEr per method (mean over seeds, spread as error bars), coloured by data setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = _groups(rows)
    labels = [cell if prompt == "none" else f"{cell} [{prompt}]" for cell, prompt in groups]
    means = [statistics.mean(_values(g, "CIDEr")) for g in groups.values()]
    # NaN draws no error bar: one seed has no spread to show.
    spreads = [statistics.stdev(_values(g, "CIDEr")) if len(g) > 1 else math.nan for g in groups.values()]
    settings = [g[0]["setting"] for g in groups.values()]
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.8))
    axis.bar(range(len(labels)), means, yerr=spreads, capsize=4,
             color=[SETTING_COLOURS.get(s, "tab:purple") for s in settings])  # fmt: skip
    axis.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    axis.set_ylabel("CIDEr")
    axis.set_title("CIDEr per method and data setting (mean over seeds)")
    present = list(dict.fromkeys(settings))
    axis.legend(handles=[Patch(color=SETTING_COLOURS.get(s, "tab:purple"), label=s) for s in present],
                title="setting", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    _save_figure(figure, path)


def plot_cider_vs_pairs(rows: list[dict[str, Any]], path: Path) -> None:
    """CIDEr against the share of paired training images (log scale): a line per few-pairs method, a point
    for supervised training on all pairs, and a horizontal level (labelled with its setting) for each method
    that uses none of the paired training images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 5))
    lines: dict[tuple[str, str], dict[float, list[float]]] = {}
    for row in rows:
        if row["few_pairs"]:
            points = lines.setdefault((row["method"], row["eval_prompt"]), {})
            points.setdefault(100 * float(row["paired_fraction"]), []).extend(_values([row], "CIDEr"))
    for (method, prompt), points in lines.items():
        xs = sorted(points)  # a NaN spread (one seed) draws no error bar
        axis.errorbar(xs, [statistics.mean(points[x]) for x in xs], marker="o", capsize=3,
                      yerr=[statistics.stdev(points[x]) if len(points[x]) > 1 else math.nan for x in xs],
                      label=method if prompt == "none" else f"{method} [{prompt}]")  # fmt: skip
    colours, styles, level = plt.get_cmap("Dark2").colors, ("--", ":", "-."), 0
    shares = sorted({x for points in lines.values() for x in points})
    for (cell, prompt), group in _groups(rows).items():
        if group[0]["few_pairs"]:
            continue
        label = cell if prompt == "none" else f"{cell} [{prompt}]"
        cider = statistics.mean(_values(group, "CIDEr"))
        if group[0]["paired_fraction"] not in (None, ""):
            share = 100 * float(group[0]["paired_fraction"])
            shares.append(share)
            axis.plot([share], [cider], marker="*", markersize=12, linestyle="none", color="black",
                      label=f"{label} (all pairs)")  # fmt: skip
        else:
            setting = group[0]["setting"]
            axis.axhline(cider, linestyle=styles[level % len(styles)], linewidth=1.2,
                         color=colours[level % len(colours)], label=f"{label} ({setting})")  # fmt: skip
            level += 1
    axis.set_xscale("log")
    axis.set_xticks(shares, [f"{share:.3g}%" for share in shares])
    axis.minorticks_off()
    axis.set_xlabel("paired training images used (% of the training split, log scale)")
    axis.set_ylabel("CIDEr")
    axis.set_title("CIDEr against the amount of paired data")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save_figure(figure, path)


def run_ablation(
    config_path: str | Path,
    out: str | Path,
    overrides: list[str] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Load an ablation config and run it into ``out``."""
    return Ablation(load_ablation(config_path, overrides), out, progress=progress, echo=echo).run()


@dataclass(frozen=True)
class DemoScale:
    """Sizes of the demo's world, CLIP and grid."""

    train: int
    val: int
    test: int
    clip_steps: int
    clip_batch: int
    clip_config: dict[str, Any]
    grid: str


def demo_scale(quick: bool) -> DemoScale:
    """The full demo, or the reduced one (``--quick``) that finishes in a few minutes on a laptop CPU."""
    from tipcap.toy.clip import TOYCLIP_CONFIG

    if not quick:
        return DemoScale(20_000, 500, 500, 1_200, 64, TOYCLIP_CONFIG, "toyworld.yaml")
    return DemoScale(2_000, 100, 100, 400, 64, TOYCLIP_CONFIG, "toyworld_quick.yaml")


def demo_world(
    cache: str | Path,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:
    """The demo's toy world and its trained CLIP, generated into ``cache`` or reused from it.

    Both are keyed by what they are made from (seed, sizes, CLIP config and steps) and by the versions of
    the code that makes them (``GENERATOR_VERSION``, ``TRAINING_VERSION``). Returns the world's
    Karpathy file and the CLIP's directory (``toyclip.json``, ``toyclip.safetensors``). ``echo`` receives one
    line per stage (generated or reused).
    """
    import hashlib

    from tipcap.toy.clip import TRAINING_VERSION, train_toyclip
    from tipcap.toy.world import GENERATOR_VERSION, write_toyworld

    echo = echo or (lambda message: None)

    scale = demo_scale(quick)

    def key(*identity: Any) -> str:
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:10]

    world = Path(cache) / f"toyworld-{key(GENERATOR_VERSION, seed, scale.train, scale.val, scale.test)}"
    karpathy = world / "toyworld.json"
    if karpathy.is_file():
        echo(f"toy world: reused {world}")
    else:
        echo(f"toy world: generating {scale.train + scale.val + scale.test} images into {world}")
        write_toyworld(world, seed=seed, train=scale.train, val=scale.val, test=scale.test, progress=progress)
    clip_key = key(TRAINING_VERSION, scale.clip_config, scale.clip_steps, scale.clip_batch, seed)
    clip_dir = world / f"clip-{clip_key}"
    if (clip_dir / "toyclip.safetensors").is_file():
        echo(f"toy CLIP: reused {clip_dir}")
    else:
        echo(f"toy CLIP: training {scale.clip_steps} steps at batch {scale.clip_batch} into {clip_dir}")
        train_toyclip(karpathy, clip_dir, steps=scale.clip_steps, batch_size=scale.clip_batch, seed=seed,
                      config=scale.clip_config, progress=progress)  # fmt: skip
    return karpathy, clip_dir


def run_demo(
    out: str | Path,
    cache: str | Path,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """The whole pipeline offline: a toy world, its CLIP and their embedding stores (cached in ``cache`` by
    seed and size), then the core grid.

    Writes the grid's files into ``out`` plus ``gap.png`` (the few-pairs Gaussian gap) and returns its rows;
    ``echo`` receives one line per stage and cell.
    """
    import importlib.resources
    import shutil

    karpathy, clip_dir = demo_world(cache, seed, quick, progress, echo)
    world = karpathy.parent
    grid = importlib.resources.files("tipcap") / "resources" / demo_scale(quick).grid
    overrides = [
        f"karpathy={karpathy}", f"web_pairs={world / 'web_pairs.jsonl'}",
        f"vocabulary={world / 'entities.json'}", f"clip_model={clip_dir / 'toyclip.json'}",
        f"clip_pretrained={clip_dir / 'toyclip.safetensors'}", f"seeds=[{seed}]",
        f"store_dir={clip_dir / 'stores'}",
    ]  # fmt: skip
    rows = run_ablation(Path(str(grid)), out, overrides, progress=progress, echo=echo)
    gap_plot = Path(out) / "gaps" / "gaussian-few-pairs.png"
    if gap_plot.is_file():
        shutil.copyfile(gap_plot, Path(out) / "gap.png")
    return rows
