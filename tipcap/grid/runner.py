"""Running an ablation grid (see :mod:`tipcap.grid.config` for its cells) into an output directory.

Every step goes through the library functions behind the commands (``embed``, ``fit-gap``, ``train``,
``evaluate``) and is cached in the output directory: stores, gap files, trained models and evaluations
are reused when present, so a grid that was interrupted finishes only its missing cells on a rerun. The
directory remembers the grid it was run with (``grid.json``): a rerun may add cells, seeds and evaluation
prompts, but a changed data set, CLIP, decoder or cell definition is refused rather than mixed.

``plan`` writes each training cell's config and the commands to train them outside the runner (under
``torchrun``); the runner then reuses the trained models.
"""

from __future__ import annotations

import json
import random
import shlex
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tipcap.config import EvalConfig, ExperimentConfig, from_dict, save_config, to_dict
from tipcap.data import list_images
from tipcap.data.karpathy import read_karpathy, split_matches
from tipcap.embed import clip_spec, embed_images, embed_texts
from tipcap.errors import TipcapError
from tipcap.gap import fit_gap_file
from tipcap.grid.config import BASELINES, AblationConfig, Job, JobConfig, expand, load_ablation, resolve
from tipcap.grid.report import (
    CLAIM_COLUMNS,
    METRIC_COLUMNS,
    markdown_table,
    plot_cider,
    plot_cider_vs_pairs,
    write_csv,
)
from tipcap.io import atomic_path, load_json, write_json_atomic
from tipcap.protocol import evaluate_split
from tipcap.store import EmbeddingStore
from tipcap.toy.claims import mean_claim_f1, scene_records
from tipcap.toy.scoring import object_f1, scene_objects
from tipcap.train import train


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
        self.clip = clip_spec(config.embed)
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
        self._eval_scenes: dict[Any, list[dict]] | None = None
        self._data_names: dict[Path, str] = {}

    # -- cached steps ---------------------------------------------------------------------------

    def _texts(self, name: str, corpus: Path, split: str | None) -> Path:
        out = self.stores / name
        # Checking a store re-reads and hashes its inputs: do it once per run, not once per cell.
        if out not in self._checked:
            embed_texts(corpus, self.config.embed, out, split=split, progress=self.progress)
            self._checked.add(out)
        return out

    def _images(
        self, name: str, source: Path, split: str | None, root: Path, limit: str | None = None
    ) -> Path:
        out = self.stores / name
        if out not in self._checked:
            embed_images(
                source, self.config.embed, out, image_root=root, split=split, limit=limit,
                seed=self.config.data_seed, progress=self.progress,
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

    def job_config(self, job: Job) -> JobConfig:
        """The job's resolved stages (the grid's, with its cell's settings and overrides)."""
        return resolve(self.config, job.cell)

    def gap(self, job: Job) -> Path:
        """The gap file of a job, fitted once: shared by the cells of one kind and setting, or the cell's
        own when it overrides gap settings."""
        resolved = self.job_config(job)
        config = resolved.gap
        name = job.name if resolved.overrides_gap else f"{config.kind}-{config.setting}{job.suffix}"
        path = self.out / "gaps" / f"{name}.safetensors"
        if not path.is_file():
            texts, images = self.stores_for(job)
            images_store = EmbeddingStore.open(images) if images else None
            plot = (
                path.with_suffix(".png") if config.kind == "gaussian" and images_store is not None else None
            )
            fit_gap_file(config, EmbeddingStore.open(texts), images_store, path, plot=plot)
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
        decoder = json.loads(json.dumps(self.job_config(job).decoder))
        vocabulary = str(Path(self.config.vocabulary).resolve()) if self.config.vocabulary else None
        decoder["model"]["vocabulary"] = vocabulary
        decoder["train"]["seed"] = seed
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
            resolved = self.job_config(job)
            evaluation = from_dict(EvalConfig, {**to_dict(resolved.eval), "prompt": eval_prompt}, "eval")
            evaluate_split(
                self.eval_karpathy, split, out, evaluation, method=method,
                model=self.model(job, seed) if method == "model" else None, image_store=test_store,
                texts=texts, clip=self.clip, oracle_prompts=self.eval_objects(),
                vocabulary=self.config.vocabulary,
                context={"cell": job.name, "seed": seed, **resolved.record()},
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

    def eval_scenes(self) -> dict[Any, list[dict]]:
        """Each evaluation image's objects with their positions (toy world 2 files only; read once)."""
        if self._eval_scenes is None:
            self._eval_scenes = scene_records(self.eval_karpathy)
        return self._eval_scenes

    def _claims(self, per_image: list[dict[str, Any]]) -> dict[str, float | None]:
        """Mean colour, shape, size and relation F1 of the predictions (None off toy world 2)."""
        scenes = self.eval_scenes()
        scored = [r for r in per_image if r["image_id"] in scenes]
        if not scored:
            return dict.fromkeys(CLAIM_COLUMNS)
        means = mean_claim_f1([r["prediction"] for r in scored], [scenes[r["image_id"]] for r in scored])
        return {column: means[column.removesuffix("_f1")] for column in CLAIM_COLUMNS}

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
            **{k: metrics.get(k) for k in METRIC_COLUMNS[:-1]}, "object_f1": f1, **self._claims(per_image),
        }  # fmt: skip

    # -- the grid -------------------------------------------------------------------------------

    def _check_oracle_prompts(self) -> None:
        """Refuse ``oracle`` evaluation prompts where an evaluation image records no objects.

        The oracle's words are the image's ground-truth objects; an image without them would be prompted
        with nothing, silently. Checked before any store is built or decoder trained.
        """
        asking = [index for index, cell in enumerate(self.config.cells) if "oracle" in cell.eval_prompts]
        if not asking:
            return
        split = self.config.eval_split
        images = read_karpathy(self.eval_karpathy, split)
        missing = [image.image_id for image in images if image.image_id not in self.eval_objects()]
        if missing:
            raise TipcapError(
                f"config key 'cells[{asking[0]}].eval_prompts': oracle prompts are the ground-truth objects "
                f"of each image, but {len(missing)} of the {len(images)} {split} images of "
                f"{self.eval_karpathy} record no 'objects' (image {missing[0]!r} first); evaluate with "
                "none or auto prompts, or on a file that records its scenes' objects (the toy world's)."
            )

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
        self._check_oracle_prompts()
        self._check_grid()
        rows = []
        for job in self.jobs:
            for seed in self.config.seeds if job.trained else [None]:
                for eval_prompt in job.cell.eval_prompts:
                    rows.append(self.evaluate(job, seed, eval_prompt))
                    write_csv(rows, self.out / "results.csv")
        title = None
        if self.eval_karpathy != self.karpathy:
            source, target = self.data_name(self.karpathy), self.data_name(self.eval_karpathy)
            title = (
                f"Decoders trained on {source}, evaluated on the {self.config.eval_split} split of {target}."
            )
        with atomic_path(self.out / "table.md") as tmp:
            tmp.write_text(markdown_table(rows, title), encoding="utf-8")
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
        self._check_oracle_prompts()
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


def run_ablation(
    config_path: str | Path,
    out: str | Path,
    overrides: list[str] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Load an ablation config and run it into ``out``."""
    return Ablation(load_ablation(config_path, overrides), out, progress=progress, echo=echo).run()
