"""Running an ablation grid (see :mod:`tipcap.grid.config` for its cells) into an output directory.

Every step goes through the library functions behind the commands (``embed``, ``fit-gap``, ``train``,
``evaluate``) and is cached in the output directory: stores, gap files, trained models and evaluations
are reused when present, so a grid that was interrupted finishes only its missing cells on a rerun. The
directory remembers the grid it was run with (``grid.json``): a rerun may add cells, seeds and evaluation
prompts, but a changed data set, CLIP, decoder or cell definition is refused rather than mixed.

With ``synthetic_gap`` every image store is cut from a synthetic world (:mod:`tipcap.synthgap`) built in
``out/synthetic``, whose Karpathy file (each image without its held-out caption) replaces ``karpathy``.

A cell with ``select`` trains a decoder per candidate value and seed of ``select_seeds``
(``runs/<cell>-<key>=<value>-seed<s>``),
evaluates each on ``select_split`` (``eval-<split>/<cell>-<key>=<value>-seed<s>-<prompt>``), and evaluates
only the candidate with the best mean over seeds on ``eval_split``, under the cell's own name
(``eval/<cell>-seed<s>-<prompt>``, its row recording the value in ``selected``); ``selection.csv`` and
``selection.md`` give every candidate's scores. Should the choice change on a rerun (a seed added), the
evaluations of the value chosen before are redone with the new one. The grid's other seeds train the chosen
value alone.

``plan`` writes each training cell's config and the commands to train them outside the runner (under
``torchrun``); the runner then reuses the trained models.
"""

from __future__ import annotations

import hashlib
import json
import random
import shlex
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tipcap.config import GROUND_TRUTH_PROMPTS, EvalConfig, ExperimentConfig, from_dict, save_config, to_dict
from tipcap.data import list_images
from tipcap.data.karpathy import read_karpathy, split_matches
from tipcap.embed import clip_spec, embed_images, embed_texts
from tipcap.errors import TipcapError
from tipcap.evaluation.evaluate import evaluate_split
from tipcap.evaluation.stats import (
    INTERVAL_METRICS,
    SCORES_FILE,
    ImageScores,
    cell_interval,
    read_image_scores,
    write_image_scores,
)
from tipcap.gap import fit_gap_file
from tipcap.grid.compare import GridScores, grid_decisions, metric_name, write_comparisons
from tipcap.grid.config import (
    BASELINES,
    AblationConfig,
    Cell,
    Job,
    JobConfig,
    candidates,
    expand,
    resolve,
)
from tipcap.grid.report import (
    CLAIM_COLUMNS,
    METRIC_COLUMNS,
    markdown_table,
    plot_cider,
    plot_cider_vs_pairs,
    write_csv,
)
from tipcap.grid.selection import Selection, write_selection
from tipcap.grid.validate import load_ablation
from tipcap.io import atomic_path, load_json, write_json_atomic
from tipcap.provenance import FILE_NAME as PROVENANCE_FILE
from tipcap.store import EmbeddingStore
from tipcap.synthgap import SyntheticWorld, build_synthetic_world, synthetic_image_store
from tipcap.toy.claims import mean_claim_f1, scene_records
from tipcap.toy.scoring import object_f1, scene_objects
from tipcap.training.loop import train

FEW_PAIRS_DRAW = "data_seed + seed"
"""How a seed's few-pairs subset is drawn, recorded in ``grid.json``: folders written before drew one subset
for every seed, and their few-pairs decoders and gaps must not be mixed with per-seed ones."""


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
        self._world: SyntheticWorld | None = None
        self._select_objects: dict[Any, list[str]] | None = None

    # -- cached steps ---------------------------------------------------------------------------

    def _texts(self, name: str, corpus: Path, split: str | None) -> Path:
        out = self.stores / name
        # Checking a store re-reads and hashes its inputs: do it once per run, not once per cell.
        if out not in self._checked:
            embed_texts(corpus, self.config.embed, out, split=split, progress=self.progress)
            self._checked.add(out)
        return out

    def _images(
        self,
        name: str,
        source: Path,
        split: str | None,
        root: Path,
        limit: str | None = None,
        draw: int = 0,
    ) -> Path:
        """An image store (``limit``: a subset drawn with seed ``draw``), built or checked once per run."""
        out = self.stores / name
        if self._world is not None:
            if out not in self._checked:
                synthetic_image_store(self._world, source, out, split=split, limit=limit, seed=draw)
                self._checked.add(out)
            return out
        if out not in self._checked:
            embed_images(
                source, self.config.embed, out, image_root=root, split=split, limit=limit,
                seed=draw, progress=self.progress,
            )  # fmt: skip
            self._checked.add(out)
        return out

    def few_pairs_draw(self, seed: int | None) -> int:
        """The seed of the few-pairs subset a decoder of ``seed`` uses: ``data_seed + seed``, so that
        seeds differ in the paired images drawn as well as in their decoders' initialisation."""
        return self.config.data_seed + (seed or 0)

    def _few_pairs_images(self, job: Job, seed: int | None) -> Path:
        tag = job.few_pairs.replace("%", "pct")
        draw = self.few_pairs_draw(seed)
        return self._images(
            f"train-images-few-{tag}-draw{draw}", self.karpathy, "train", self.root, job.few_pairs, draw
        )

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

    def stores_for(self, job: Job, seed: int | None) -> tuple[Path, Path | None]:
        """(caption store, image store) from which a job's gap for ``seed`` is fitted."""
        setting = job.cell.setting
        if setting == "few-pairs":
            return self._texts("train-text", self.karpathy, "train"), self._few_pairs_images(job, seed)
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

    def gap(self, job: Job, seed: int | None) -> Path:
        """The gap file of a job's decoder of ``seed``, fitted once: shared by the cells of one kind and
        setting, or the cell's own when it overrides gap settings. A few-pairs gap is fitted per seed, on
        that seed's draw of pairs (:meth:`few_pairs_draw`)."""
        resolved = self.job_config(job)
        config = resolved.gap
        name = job.run_name if resolved.overrides_gap else f"{config.kind}-{config.setting}{job.suffix}"
        if config.setting == "few-pairs":
            name += f"-seed{seed}"
        path = self.out / "gaps" / f"{name}.safetensors"
        if not path.is_file():
            texts, images = self.stores_for(job, seed)
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
                images = self._few_pairs_images(job, seed)
            else:
                images = self._images("train-images", self.karpathy, "train", self.root)
            data["train_images"] = str(images.resolve())
        else:
            data["gap"] = str(self.gap(job, seed).resolve())
        decoder = json.loads(json.dumps(self.job_config(job).decoder))
        # Only a prompted decoder reads the entity vocabulary.
        if self.config.vocabulary and decoder["model"].get("prompt", "none") != "none":
            decoder["model"]["vocabulary"] = str(Path(self.config.vocabulary).resolve())
        decoder["train"]["seed"] = seed
        if cell.init_from is not None:
            decoder["train"]["init_from"] = str((self.run_dir(self.base(job), seed) / "model").resolve())
        return from_dict(ExperimentConfig, {**decoder, "data": data})

    def base(self, job: Job) -> Job:
        """The job whose decoders a job's start from: its cell's ``init_from``, at its few-pairs value."""
        return next(j for j in self.jobs if j.cell.name == job.cell.init_from and j.suffix == job.suffix)

    def run_dir(self, job: Job, seed: int) -> Path:
        """Where a job's decoder of one seed is trained (``model/`` inside when finished)."""
        return self.out / "runs" / f"{job.run_name}-seed{seed}"

    def model(self, job: Job, seed: int) -> Path:
        """Train (or reuse, or resume) the job's decoder for one seed."""
        run = self.run_dir(job, seed)
        if (run / "model" / "config.json").is_file():
            return run / "model"
        if job.cell.init_from is not None:
            self.model(self.base(job), seed)
        config = self.training_config(job, seed)
        self.echo(f"{job.name} seed {seed}: training into {run}")
        return train(config, run, resume=(run / "checkpoints").is_dir(), progress=self.progress)

    def _paired_fraction(self, job: Job, seed: int | None) -> float | None:
        """The share of the training images whose pairs the job used (``None``: no paired data)."""
        if job.few_pairs is not None:
            store = self._few_pairs_images(job, seed)
        elif job.cell.kind == "supervised":
            store = self._images("train-images", self.karpathy, "train", self.root)
        else:
            return None
        if self._train_images is None:
            self._train_images = len(list_images(self.karpathy, self.root, "train"))
        return len(EmbeddingStore.open(store)) / self._train_images

    def eval_dir(self, job: Job, seed: int | None, eval_prompt: str) -> Path:
        """Where one evaluation of a job is written."""
        name = f"{job.name}-{eval_prompt}" if seed is None else f"{job.name}-seed{seed}-{eval_prompt}"
        return self.out / "eval" / name

    def evaluate(self, job: Job, seed: int | None, eval_prompt: str) -> dict[str, Any]:
        """Evaluate one job (cached), with object F1 beside the caption metrics and per-image scores in
        ``scores.json``; ``seed`` is ``None`` for the baselines, which are not trained."""
        cell = job.cell
        out = self.eval_dir(job, seed, eval_prompt)
        if job.candidate:
            self._forget_other_candidate(job, out)
        if (out / "row.json").is_file() and (out / SCORES_FILE).is_file():
            self.echo(f"{out.name}: reused")
            return json.loads((out / "row.json").read_text(encoding="utf-8"))
        if not (out / "metrics.json").is_file():
            split = self.config.eval_split
            store_name = f"{split}-images" if self.eval_karpathy == self.karpathy else f"eval-{split}-images"
            test_store = self._images(store_name, self.eval_karpathy, split, self.eval_root)
            method = cell.kind if cell.kind in BASELINES else "model"
            texts = self._texts("train-text", self.karpathy, "train") if method == "retrieval" else None
            resolved, evaluation = self._evaluation_config(job, eval_prompt)
            evaluate_split(
                self.eval_karpathy, split, out, evaluation, method=method,
                model=self.model(job, seed) if method == "model" else None, image_store=test_store,
                images=self.eval_root, texts=texts, clip=self.clip, objects=self.eval_objects(),
                instances=self.config.instances,
                score_image_store=self._scorer_store(store_name, evaluation),
                vocabulary=self.config.vocabulary,
                context={"cell": job.name, "seed": seed, **self._selected(job), **resolved.record()},
            )  # fmt: skip
        row = self._row(job, seed, eval_prompt, out)
        # row.json last: its presence marks a finished evaluation.
        write_json_atomic(out / "row.json", row)
        self.echo(f"{out.name}: CIDEr {row['CIDEr']:.3f}")
        return row

    def _evaluation_config(self, job: Job, eval_prompt: str) -> tuple[JobConfig, EvalConfig]:
        """A job's resolved stages and its evaluation config with ``eval_prompt`` as the prompt mode."""
        resolved = self.job_config(job)
        return resolved, from_dict(EvalConfig, {**to_dict(resolved.eval), "prompt": eval_prompt}, "eval")

    def _scorer_store(self, store_name: str, evaluation: EvalConfig) -> Path:
        """Where the evaluation images embedded by the CLIP-S scorer are kept (when it is not the grid's
        CLIP), one folder per scorer, so that every cell reuses them."""
        scorer = json.dumps([evaluation.score_clip, evaluation.score_pretrained])
        return self.stores / f"{store_name}-scorer-{hashlib.sha256(scorer.encode()).hexdigest()[:10]}"

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

    def _image_scores(
        self, out: Path, per_image: list[dict[str, Any]], objects: dict[Any, list[str]] | None = None
    ) -> ImageScores:
        """Write an evaluation's per-image scores (``scores.json``: CIDEr, ROUGE-L, CLIP-S, RefCLIP-S and, on
        images that record their objects in ``objects``, by default the evaluation images', object F1) and
        return them."""
        objects = self.eval_objects() if objects is None else objects
        f1 = [
            object_f1(r["prediction"], [
                {"colour": name.split()[0], "shape": name.split()[1]} for name in objects[r["image_id"]]
            ]) if r["image_id"] in objects else None
            for r in per_image
        ]  # fmt: skip
        columns = {m: [r.get(m) for r in per_image] for m in INTERVAL_METRICS if m != "object_f1"}
        columns["object_f1"] = f1
        columns = {m: values for m, values in columns.items() if any(v is not None for v in values)}
        write_image_scores(out / SCORES_FILE, [r["image_id"] for r in per_image], columns)
        return read_image_scores(out / SCORES_FILE)

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
        scores = self._image_scores(out, per_image)
        f1 = [v for v in scores.get("object_f1", {}).values() if v is not None]
        fraction = self._paired_fraction(job, seed)
        setting = "all-pairs" if cell.kind == "supervised" and job.few_pairs is None else cell.setting
        row = {
            "cell": job.name, "method": cell.name, "kind": cell.kind, "setting": setting,
            "few_pairs": job.few_pairs, "paired_fraction": fraction, "prompt": cell.prompt,
            "eval_prompt": eval_prompt, "selected": job.candidate or None, "seed": seed,
            "train_data": self.data_name(self.karpathy),
            "eval_data": self.data_name(self.eval_karpathy),
            **{k: metrics.get(k) for k in METRIC_COLUMNS[:-1]},
            "object_f1": statistics.mean(f1) if f1 else None,
            **self._claims(per_image),
        }  # fmt: skip
        # This evaluation's image-level interval: the bootstrap over its test images (its seed alone).
        for metric in INTERVAL_METRICS:
            found = cell_interval({seed: scores}, metric)
            row[f"{metric}_ci_low"] = found.low if found is not None else None
            row[f"{metric}_ci_high"] = found.high if found is not None else None
        return row

    # -- settings chosen on validation data -----------------------------------------------------

    @staticmethod
    def _selected(job: Job) -> dict[str, str]:
        """What an evaluation of a selecting cell's candidate records of it (nothing for other jobs)."""
        return {"selected": job.candidate} if job.candidate else {}

    def _forget_other_candidate(self, job: Job, out: Path) -> None:
        """Have ``out``, an evaluation of the candidate a selecting cell chose, evaluated again when it holds
        another candidate's (chosen before a seed was added, or unknown after an interruption)."""
        if not (out / "metrics.json").is_file():
            return
        provenance = out / PROVENANCE_FILE
        context = load_json(provenance)["config"].get("context", {}) if provenance.is_file() else {}
        if context.get("selected") == job.candidate:
            return
        before = context.get("selected", "an unrecorded candidate")
        self.echo(f"{out.name}: holds {before}, but {job.candidate} is chosen now; evaluating it again")
        (out / "row.json").unlink(missing_ok=True)
        (out / "metrics.json").unlink()

    def select_objects(self) -> dict[Any, list[str]]:
        """Ground-truth object names per image of the training data set, whose ``select_split`` the
        candidates are scored on (toy-world files only; read once)."""
        if self.karpathy == self.eval_karpathy:
            return self.eval_objects()
        if self._select_objects is None:
            self._select_objects = scene_objects(self.karpathy)
        return self._select_objects

    def select_dir(self, job: Job, seed: int) -> Path:
        """Where a candidate's decoder of one seed is evaluated on ``select_split``, with its cell's first
        evaluation prompt mode."""
        split = self.config.select_split
        return self.out / f"eval-{split}" / f"{job.candidate_name}-seed{seed}-{job.cell.eval_prompts[0]}"

    def select_score(self, job: Job, seed: int) -> float:
        """A candidate's decoder of ``seed`` (trained as needed) scored on ``select_split``: the mean of its
        per-image ``select_metric`` over those images, read from the evaluation's ``scores.json`` (the
        evaluation is made once)."""
        out, split = self.select_dir(job, seed), self.config.select_split
        if not (out / SCORES_FILE).is_file():
            store_name = f"{split}-images"
            store = self._images(store_name, self.karpathy, split, self.root)
            resolved, evaluation = self._evaluation_config(job, job.cell.eval_prompts[0])
            evaluate_split(
                self.karpathy, split, out, evaluation, model=self.model(job, seed), image_store=store,
                images=self.root, clip=self.clip, objects=self.select_objects(),
                score_image_store=self._scorer_store(store_name, evaluation),
                vocabulary=self.config.vocabulary,
                context={"cell": job.name, "seed": seed, **self._selected(job), **resolved.record()},
            )  # fmt: skip
            per_image = json.loads((out / "per_image.json").read_text(encoding="utf-8"))
            self._image_scores(out, per_image, self.select_objects())
        metric = metric_name(self.config.select_metric)
        scored = read_image_scores(out / SCORES_FILE).get(metric, {})
        values = [value for value in scored.values() if value is not None]
        if not values:
            raise TipcapError(
                f"config key 'select_metric': the {split} evaluation in {out} has no {metric} scores; choose "
                "by a metric these evaluations score (CIDEr always)."
            )
        score = statistics.mean(values)
        self.echo(f"{out.name}: {metric} {score:.3f} on {split}")
        return score

    def select(self, job: Job) -> Selection:
        """Train every candidate of a selecting job for each seed and score it on ``select_split``; its
        :attr:`~tipcap.grid.selection.Selection.chosen` candidate is the one to evaluate on ``eval_split``."""
        found = candidates(job)
        scores = [{seed: self.select_score(c, seed) for seed in self.config.selecting_seeds} for c in found]
        selection = Selection(job, found, scores)
        self.echo(f"{job.name}: chose {selection.chosen.candidate} on {self.config.select_split}")
        return selection

    def _describe_selection(self, job: Job) -> str:
        """How a selecting job chooses its value, in one line."""
        (dotted,) = job.cell.select
        listed = ", ".join(c.candidate.partition("=")[2] for c in candidates(job))
        config = self.config
        rest = ", ".join(map(str, config.chosen_only_seeds))
        seeds = f"of {', '.join(map(str, config.selecting_seeds))} " if rest else ""
        return (
            f"{job.name}: trains a decoder per seed {seeds}for each {dotted} in {listed}, chooses the value "
            f"with the best mean {metric_name(config.select_metric)} over seeds on the {config.select_split} "
            f"split and evaluates only it on {config.eval_split}"
            + (f"; seeds {rest} train the chosen value alone" if rest else "")
        )

    def _check_selection(self) -> None:
        """Where cells select: refuse a Karpathy file without images in ``select_split``, and oracle or wrong
        prompts (a selecting cell's first mode) where a validation image records no objects; checked before
        anything is recorded or built."""
        selecting = [index for index, cell in enumerate(self.config.cells) if cell.select]
        if not selecting:
            return
        split = self.config.select_split
        images = read_karpathy(self.karpathy, split)
        if not images:
            raise TipcapError(
                f"config key 'select_split': {self.karpathy} has no {split} images to choose the setting of "
                f"cells[{selecting[0]}] on; set select_split to a held-out split the file has (val), or "
                "remove select from the cells."
            )
        asking = [i for i in selecting if self.config.cells[i].eval_prompts[0] in GROUND_TRUTH_PROMPTS]
        if asking:
            objects = self.select_objects()
            missing = [image.image_id for image in images if image.image_id not in objects]
            if missing:
                raise TipcapError(
                    f"config key 'cells[{asking[0]}].eval_prompts': a selecting cell chooses with its first "
                    f"prompt mode, drawn from each image's ground-truth objects, but {len(missing)} of the "
                    f"{len(images)} {split} images of {self.karpathy} record no 'objects'; list none or auto "
                    "first."
                )

    # -- the grid -------------------------------------------------------------------------------

    def _prepare_synthetic_world(self) -> None:
        """With ``synthetic_gap``: build the world once, and read captions, references and images from it."""
        if self.config.synthetic_gap is None or self._world is not None:
            return
        self._world = build_synthetic_world(
            self.karpathy, self.config.embed, self.config.synthetic_gap, self.out / "synthetic",
            progress=self.progress,
        )  # fmt: skip
        self.karpathy = self.eval_karpathy = self._world.karpathy
        # Its stores share names with a real grid's ("train-images") but not contents: a folder of their
        # own, named by the world's embeddings, keeps grids that share a store_dir from rebuilding each
        # other's stores (and, run at once, from reading them half-replaced).
        digest = EmbeddingStore.open(self._world.images).digest
        self.stores = self.stores / f"synthetic-{digest[:12]}"
        self.echo(f"synthetic gap: images made from held-out captions, in {self._world.images}")

    def _check_oracle_prompts(self) -> None:
        """Refuse ``oracle`` and ``wrong`` evaluation prompts where an evaluation image records no objects.

        The oracle's words are the image's ground-truth objects, and the wrong words are drawn from the
        entities outside them; an image without objects would be prompted with nothing, silently. Checked
        before any store is built or decoder trained.
        """
        asking = [
            index
            for index, cell in enumerate(self.config.cells)
            if set(GROUND_TRUTH_PROMPTS) & set(cell.eval_prompts)
        ]
        if not asking:
            return
        split = self.config.eval_split
        images = read_karpathy(self.eval_karpathy, split)
        missing = [image.image_id for image in images if image.image_id not in self.eval_objects()]
        if missing:
            raise TipcapError(
                f"config key 'cells[{asking[0]}].eval_prompts': oracle and wrong prompts are drawn from "
                f"the ground-truth objects of each image, but {len(missing)} of the {len(images)} {split} "
                f"images of {self.eval_karpathy} record no 'objects' (image {missing[0]!r} first); evaluate "
                "with none or auto prompts, or on a file that records its scenes' objects (the toy world's)."
            )

    def _check_inputs(self) -> None:
        """Refuse missing input files and folders by their config key, before anything is recorded or built
        (so that a corrected rerun into the same ``out`` is not taken for another grid)."""
        cells = self.config.cells
        inputs = {"karpathy": self.config.karpathy, "eval_karpathy": self.config.eval_karpathy,
                  "vocabulary": self.config.vocabulary}  # fmt: skip
        if any(cell.setting == "web-pairs" for cell in cells):
            inputs["web_pairs"] = self.config.web_pairs
        for key, value in inputs.items():
            if value and not Path(value).is_file():
                raise TipcapError(f"config key '{key}': {value} is not a file; check the path.")
        folders = {"image_root": self.config.image_root, "eval_image_root": self.config.eval_image_root}
        if any(cell.setting == "web-pairs" for cell in cells):
            folders["web_image_root"] = self.config.web_image_root
        for key, value in folders.items():
            if value and not Path(value).is_dir():
                raise TipcapError(f"config key '{key}': {value} is not a folder; check the path.")

    def _check_grid(self) -> None:
        """Refuse to mix results of another grid into ``out``; remember this one in ``grid.json``."""
        path = self.out / "grid.json"
        current = to_dict(self.config)
        # Where the stores are kept and which comparisons are reported change no result; a changed split or
        # metric of selection chooses anew among the same candidates (the chosen one is evaluated again).
        unrecorded = (
            "cells",
            "seeds",
            "store_dir",
            "compare",
            "families",
            "select_split",
            "select_metric",
            "select_seeds",
        )
        fixed = {k: v for k, v in current.items() if k not in unrecorded}
        fixed["few_pairs_draw"] = FEW_PAIRS_DRAW
        cells = {c["name"]: _recorded(c) for c in current["cells"]}
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            saved["cells"] = {name: _recorded(c) for name, c in saved["cells"].items()}
            if not any(c.get("setting") == "few-pairs" for c in saved["cells"].values()):
                saved["fixed"].setdefault("few_pairs_draw", FEW_PAIRS_DRAW)  # nothing was drawn there
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
        """Run every job × seed × evaluation prompt mode; write the CSV, the table, the comparisons the
        config asks for and the plots."""
        self._check_inputs()
        self._check_selection()
        self._prepare_synthetic_world()
        self._check_oracle_prompts()
        self._check_grid()
        rows = []
        scores: GridScores = {}
        selections: list[Selection] = []
        for job in self.jobs:
            evaluated = job
            if job.cell.select:
                selections.append(self.select(job))
                self._write_selection(selections)
                evaluated = selections[-1].chosen
            for seed in self.config.seeds if job.trained else [None]:
                for eval_prompt in job.cell.eval_prompts:
                    rows.append(self.evaluate(evaluated, seed, eval_prompt))
                    write_csv(rows, self.out / "results.csv")
                    evaluation = read_image_scores(self.eval_dir(job, seed, eval_prompt) / SCORES_FILE)
                    scores.setdefault((job.name, eval_prompt), {})[seed] = evaluation
        if not selections:
            for name in ("selection.csv", "selection.md"):
                (self.out / name).unlink(missing_ok=True)  # from an earlier grid in this folder
        intervals = {
            key: {m: found for m in INTERVAL_METRICS if (found := cell_interval(seeds, m)) is not None}
            for key, seeds in scores.items()
        }
        title = None
        if self.eval_karpathy != self.karpathy:
            source, target = self.data_name(self.karpathy), self.data_name(self.eval_karpathy)
            title = (
                f"Decoders trained on {source}, evaluated on the {self.config.eval_split} split of {target}."
            )
        with atomic_path(self.out / "table.md") as tmp:
            tmp.write_text(markdown_table(rows, intervals, title), encoding="utf-8")
        if self.config.compare or self.config.families:
            write_comparisons(grid_decisions(scores, self.config.families, self.config.compare), self.out)
        plot_cider(rows, self.out / "cider.png", intervals)
        plot_cider_vs_pairs(rows, self.out / "cider_vs_pairs.png")
        return rows

    def _write_selection(self, selections: list[Selection]) -> None:
        """``selection.csv`` and ``selection.md`` of the cells chosen so far."""
        config = self.config
        metric = metric_name(config.select_metric)
        write_selection(selections, self.out, config.select_split, metric, config.eval_split)

    def _planned_decoders(self, job: Job) -> list[tuple[Job, list[int]]]:
        """The decoders a trained job needs, as (candidate, seeds): a job that selects nothing, each seed;
        a selecting one, its candidates on ``select_seeds``, and once those are all trained, scored and
        chosen among, the chosen one on the other seeds."""
        config = self.config
        if not job.cell.select:
            return [(job, config.seeds)]
        found = candidates(job)
        planned = [(candidate, config.selecting_seeds) for candidate in found]
        rest = config.chosen_only_seeds
        trained = all(
            (self.run_dir(candidate, seed) / "model" / "config.json").is_file()
            for candidate in found
            for seed in config.selecting_seeds
        )
        if rest and trained:
            planned.append((self.select(job).chosen, rest))
        elif rest:
            self.echo(
                f"{job.name}: seeds {', '.join(map(str, rest))} wait for the choice; plan again once the "
                f"candidates of seeds {', '.join(map(str, config.selecting_seeds))} are trained"
            )
        return planned

    def plan(self) -> list[str]:
        """Build stores and gaps, write each untrained decoder's ``train.yaml`` and the command that trains
        it (under ``torchrun``) to ``train_commands.sh``; return the commands. A later :meth:`run` reuses
        the models they write. A selecting cell's candidates are each trained on ``select_seeds``; how the
        cell chooses among them is echoed and written as a comment. Once they are trained, a second plan
        scores them on ``select_split`` and plans the chosen value's decoders of the other seeds."""
        self._check_inputs()
        self._check_selection()
        self._prepare_synthetic_world()
        self._check_oracle_prompts()
        self._check_grid()
        commands, notes, planned, waiting = [], [], set(), []
        for job in self.jobs:
            if not job.trained:
                continue
            if job.cell.select:
                notes.append(self._describe_selection(job))
                self.echo(notes[-1])
            for trained, seeds in self._planned_decoders(job):
                for seed in seeds:
                    run = self.run_dir(trained, seed)
                    if run in planned or (run / "model" / "config.json").is_file():
                        continue  # the candidates of an eval.* key share their decoders
                    if trained.cell.init_from is not None:
                        base = self.run_dir(self.base(trained), seed)
                        if not (base / "model" / "config.json").is_file():
                            waiting.append(f"{trained.name} seed {seed} waits for {base.name}")
                            continue
                    planned.add(run)
                    save_config(self.training_config(trained, seed), run / "train.yaml")
                    commands.append(
                        'torchrun --nproc_per_node "${NPROC:-1}" -m tipcap.cli train '
                        f"--config {shlex.quote(str((run / 'train.yaml').resolve()))} "
                        f"--out {shlex.quote(str(run.resolve()))} --resume --no-progress"
                    )
        if waiting:
            notes.append(f"{'; '.join(waiting)}: plan again once those are trained")
            self.echo(notes[-1])
        header = (
            "#!/bin/sh\n"
            "# Trains the grid's decoders (e.g. NPROC=8 sh train_commands.sh); then rerun tipcap ablate.\n"
            + "".join(f"# {note}.\n" for note in notes)
            + "set -e\n"
        )
        with atomic_path(self.out / "train_commands.sh") as tmp:
            tmp.write_text(header + "".join(c + "\n" for c in commands), encoding="utf-8")
        return commands


def _recorded(cell: dict[str, Any]) -> dict[str, Any]:
    """A cell as ``grid.json`` keeps it: without its ``eval_prompts`` (a rerun may add modes) and without the
    keys at their defaults, so that a key added to cells later leaves every folder's record as it was."""
    defaults = to_dict(Cell(name=cell["name"]))
    return {k: v for k, v in cell.items() if k != "eval_prompts" and (k == "name" or defaults.get(k, v) != v)}


def run_ablation(
    config_path: str | Path,
    out: str | Path,
    overrides: list[str] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Load an ablation config and run it into ``out``."""
    return Ablation(load_ablation(config_path, overrides), out, progress=progress, echo=echo).run()
