"""The steps a grid needs, and where they write: :class:`GridPlan` plans a grid's embedding stores, gaps,
trainings and evaluations as :class:`~tipcap.grid.steps.Step` s, each made by the library function behind its
command (``embed``, ``fit-gap``, ``train``, ``evaluate``) and keyed as that function records it.

Output directory::

    stores/        embedding stores (``store_dir`` when set; ``synthetic-<digest>/`` with ``synthetic_gap``)
    data/          the unpaired setting's two halves of the training images
    gaps/          gap files, shared by the cells of one kind and setting, or a cell's own when it overrides
                   gap settings; few-pairs gaps per seed
    runs/          one training run per job and seed (``model/`` inside when finished)
    eval/          one evaluation per job, seed and evaluation prompt mode
    eval-<split>/  a selecting cell's candidates evaluated on ``select_split``
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tipcap import provenance
from tipcap.config import EvalConfig, ExperimentConfig, from_dict, to_dict
from tipcap.data.karpathy import split_matches
from tipcap.embed import clip_spec, embed_images, embed_texts, image_store_key, text_store_key
from tipcap.errors import TipcapError
from tipcap.evaluation.evaluate import evaluate_split, evaluation_record
from tipcap.evaluation.registry import GroundTruth, ground_truth
from tipcap.evaluation.stats import SCORES_FILE
from tipcap.gap import fit_gap_file
from tipcap.gap.fit import gap_record
from tipcap.grid.config import BASELINES, AblationConfig, Job, JobConfig, expand, resolve
from tipcap.grid.preflight import check_inputs, check_oracle_prompts, check_selection, record_grid
from tipcap.grid.steps import Key, Step, Steps, by_content, folder_key, gap_key, store_key
from tipcap.io import load_json, write_json_atomic
from tipcap.store import EmbeddingStore
from tipcap.synthgap import SyntheticWorld, build_synthetic_world, synthetic_image_store, synthetic_store_key
from tipcap.training.loop import train
from tipcap.training.setup import run_key


class GridPlan:
    """The steps of an :class:`AblationConfig` run into ``out``; :attr:`steps` runs them.

    The ground-truth objects of each image a Karpathy file records (none off an installed world's data:
    :func:`tipcap.evaluation.registry.ground_truth`) give the ground-truth prompts and the scene CHAIR.
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
        self.steps = Steps(self.echo)
        self._planned: dict[str, Step] = {}
        self._truths: dict[Path, GroundTruth] = {}
        self._world: SyntheticWorld | None = None
        # Read once by the runner: the training images, each scorer's records, each data file's name.
        self._train_images: int | None = None
        self._records: dict[tuple[Path, str], Any] = {}
        self._data_names: dict[Path, str] = {}

    # -- the steps ------------------------------------------------------------------------------

    def _step(self, step: Step) -> Step:
        """The grid's one step of ``step``'s label (the first planned), so that each runs once."""
        return self._planned.setdefault(step.label, step)

    def _texts(self, name: str, corpus: Path, split: str | None) -> Step:
        """The caption store ``name`` of a corpus's split."""
        out, embed = self.stores / name, self.config.embed

        def build() -> None:
            embed_texts(corpus, embed, out, split=split, progress=self.progress)

        def key() -> Key:
            return text_store_key(corpus, embed, split=split)

        return self._step(Step("store", name, out, key, lambda: store_key(out), build))

    def _images(
        self,
        name: str,
        source: Path,
        split: str | None,
        root: Path,
        limit: str | None = None,
        draw: int = 0,
    ) -> Step:
        """The image store ``name`` (``limit``: a subset drawn with seed ``draw``); with ``synthetic_gap``,
        cut from the synthetic world's."""
        out, embed, world = self.stores / name, self.config.embed, self._world

        def key() -> Key:
            if world is not None:
                return synthetic_store_key(world, source, split=split, limit=limit, seed=draw)
            return image_store_key(source, embed, image_root=root, split=split, limit=limit, seed=draw)

        def build() -> None:
            if world is not None:
                synthetic_image_store(world, source, out, split=split, limit=limit, seed=draw)
            else:
                embed_images(
                    source, embed, out, image_root=root, split=split, limit=limit, seed=draw,
                    progress=self.progress,
                )  # fmt: skip

        return self._step(Step("store", name, out, key, lambda: store_key(out), build))

    def few_pairs_draw(self, seed: int | None) -> int:
        """The seed of the few-pairs subset a decoder of ``seed`` uses: ``data_seed + seed``, so that
        seeds differ in the paired images drawn as well as in their decoders' initialisation."""
        return self.config.data_seed + (seed or 0)

    def _few_pairs_images(self, job: Job, seed: int | None) -> Step:
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

    def stores_for(self, job: Job, seed: int | None) -> tuple[Step, Step | None]:
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

    def gap(self, job: Job, seed: int | None) -> Step:
        """The gap of a job's decoder of ``seed``: shared by the cells of one kind and setting, or the cell's
        own when it overrides gap settings. A few-pairs gap is fitted per seed, on that seed's draw of pairs
        (:meth:`few_pairs_draw`)."""
        resolved = self.job_config(job)
        config = resolved.gap
        name = job.run_name if resolved.overrides_gap else f"{config.kind}-{config.setting}{job.suffix}"
        if config.setting == "few-pairs":
            name += f"-seed{seed}"
        path = self.out / "gaps" / f"{name}.safetensors"
        texts, images = self.stores_for(job, seed)

        def opened() -> tuple[EmbeddingStore, EmbeddingStore | None]:
            return EmbeddingStore.open(texts.output), EmbeddingStore.open(images.output) if images else None

        def build() -> None:
            texts_store, images_store = opened()
            plot = (
                path.with_suffix(".png") if config.kind == "gaussian" and images_store is not None else None
            )
            fit_gap_file(config, texts_store, images_store, path, plot=plot)

        return self._step(Step(
            "gap", name, path, lambda: provenance.key(gap_record(config, *opened())), lambda: gap_key(path),
            build, [texts] if images is None else [texts, images], "gap.",
        ))  # fmt: skip

    def training_config(self, job: Job, seed: int) -> ExperimentConfig:
        """The config a job's decoder is trained with (absolute paths of the steps' outputs)."""
        cell = job.cell
        data: dict[str, Any] = {
            "train_texts": str(self._texts("train-text", self.karpathy, "train").output.resolve())
        }
        if cell.kind == "supervised":
            if cell.setting == "few-pairs":
                images = self._few_pairs_images(job, seed)
            else:
                images = self._images("train-images", self.karpathy, "train", self.root)
            data["train_images"] = str(images.output.resolve())
        else:
            data["gap"] = str(self.gap(job, seed).output.resolve())
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

    def training(self, job: Job, seed: int) -> Step:
        """Training a job's decoder for one seed into :meth:`run_dir` (resumed from its checkpoints)."""
        run = self.run_dir(job, seed)
        inputs = [self.training(self.base(job), seed)] if job.cell.init_from is not None else []
        inputs.append(self._texts("train-text", self.karpathy, "train"))
        if job.cell.kind == "supervised":
            few = job.cell.setting == "few-pairs"
            inputs.append(
                self._few_pairs_images(job, seed)
                if few
                else self._images("train-images", self.karpathy, "train", self.root)
            )
        else:
            inputs.append(self.gap(job, seed))
        wanted: list[Key] = []

        # Compared by content (by_content), so that a grid folder moved elsewhere is reused; a run started
        # elsewhere is still cleared (_clear_other_run), since its checkpoints record the old paths.
        def key() -> Key:
            wanted[:] = [run_key(self.training_config(job, seed))]
            return by_content(wanted[0])

        def build() -> None:
            self._clear_other_run(run, wanted[0])
            config = self.training_config(job, seed)
            train(config, run, resume=(run / "checkpoints").is_dir(), progress=self.progress)

        def recorded() -> Key | None:
            found = folder_key(run / "model", "config.json")
            return by_content(found) if found is not None else None

        return self._step(Step("training", run.name, run / "model", key, recorded, build, inputs))

    @staticmethod
    def _clear_other_run(run: Path, wanted: Key) -> None:
        """Empty a run folder that holds a run of another key (another config or other inputs): its
        checkpoints would be refused, and its model is not this one."""
        started = folder_key(run, provenance.FILE_NAME)
        if started is not None and json.loads(json.dumps(wanted)) != started:
            shutil.rmtree(run)

    def eval_dir(self, job: Job, seed: int | None, eval_prompt: str) -> Path:
        """Where one evaluation of a job is written."""
        name = f"{job.name}-{eval_prompt}" if seed is None else f"{job.name}-seed{seed}-{eval_prompt}"
        return self.out / "eval" / name

    def evaluation(self, job: Job, seed: int | None, eval_prompt: str) -> Step:
        """One evaluation of a job on ``eval_split`` (``seed``: ``None`` for the baselines, not trained)."""
        out, split = self.eval_dir(job, seed, eval_prompt), self.config.eval_split
        store_name = f"{split}-images" if self.eval_karpathy == self.karpathy else f"eval-{split}-images"
        images = self._images(store_name, self.eval_karpathy, split, self.eval_root)
        method = job.cell.kind if job.cell.kind in BASELINES else "model"
        texts = self._texts("train-text", self.karpathy, "train") if method == "retrieval" else None
        model = self.training(job, seed) if method == "model" else None
        resolved, evaluation = self._evaluation_config(job, eval_prompt)
        context = {"cell": job.name, "seed": seed, **self._selected(job), **resolved.record()}

        def key() -> Key:
            return provenance.key(evaluation_record(
                evaluation, method, split, self.clip, self.eval_karpathy, EmbeddingStore.open(images.output),
                model.output if model else None, EmbeddingStore.open(texts.output) if texts else None,
                self.config.instances, context,
            ))  # fmt: skip

        def build() -> None:
            (out / "row.json").unlink(missing_ok=True)  # the row of the evaluation it replaces
            evaluate_split(
                self.eval_karpathy, split, out, evaluation, method=method,
                model=model.output if model else None, image_store=images.output,
                images=self.eval_root, texts=texts.output if texts else None, clip=self.clip,
                truth=self.truth(self.eval_karpathy), instances=self.config.instances,
                score_image_store=self._scorer_store(store_name, evaluation),
                vocabulary=self.config.vocabulary, context=context,
            )  # fmt: skip

        inputs = [step for step in (images, texts, model) if step is not None]
        recorded = lambda: folder_key(out, "metrics.json")  # noqa: E731
        return self._step(Step("evaluation", out.name, out, key, recorded, build, inputs))

    def _evaluation_config(self, job: Job, eval_prompt: str) -> tuple[JobConfig, EvalConfig]:
        """A job's resolved stages and its evaluation config with ``eval_prompt`` as the prompt mode."""
        resolved = self.job_config(job)
        return resolved, from_dict(EvalConfig, {**to_dict(resolved.eval), "prompt": eval_prompt}, "eval")

    def _scorer_store(self, store_name: str, evaluation: EvalConfig) -> Path:
        """Where the evaluation images embedded by the CLIP-S scorer are kept (when it is not the grid's
        CLIP), one folder per scorer, so that every cell reuses them."""
        scorer = json.dumps([evaluation.score_clip, evaluation.score_pretrained])
        return self.stores / f"{store_name}-scorer-{hashlib.sha256(scorer.encode()).hexdigest()[:10]}"

    @staticmethod
    def _selected(job: Job) -> dict[str, str]:
        """What an evaluation of a selecting cell's candidate records of it (nothing for other jobs)."""
        return {"selected": job.candidate} if job.candidate else {}

    def select_dir(self, job: Job, seed: int) -> Path:
        """Where a candidate's decoder of one seed is evaluated on ``select_split``, with its cell's first
        evaluation prompt mode."""
        split = self.config.select_split
        return self.out / f"eval-{split}" / f"{job.candidate_name}-seed{seed}-{job.cell.eval_prompts[0]}"

    def validation(self, job: Job, seed: int) -> Step:
        """A candidate's decoder of ``seed`` evaluated on ``select_split``."""
        out, split = self.select_dir(job, seed), self.config.select_split
        store_name = f"{split}-images"
        images = self._images(store_name, self.karpathy, split, self.root)
        model = self.training(job, seed)
        resolved, evaluation = self._evaluation_config(job, job.cell.eval_prompts[0])
        context = {"cell": job.name, "seed": seed, **self._selected(job), **resolved.record()}

        def key() -> Key:
            return provenance.key(evaluation_record(
                evaluation, "model", split, self.clip, self.karpathy, EmbeddingStore.open(images.output),
                model.output, None, None, context,
            ))  # fmt: skip

        def build() -> None:
            (out / SCORES_FILE).unlink(missing_ok=True)  # the scores of the evaluation it replaces
            evaluate_split(
                self.karpathy, split, out, evaluation, model=model.output, image_store=images.output,
                images=self.root, clip=self.clip, truth=self.truth(self.karpathy),
                score_image_store=self._scorer_store(store_name, evaluation),
                vocabulary=self.config.vocabulary, context=context,
            )  # fmt: skip

        recorded = lambda: folder_key(out, "metrics.json")  # noqa: E731
        name = f"{out.parent.name}/{out.name}"
        return self._step(Step("evaluation", name, out, key, recorded, build, [images, model]))

    def truth(self, karpathy: Path) -> GroundTruth:
        """The ground-truth objects a data file records (an installed world's, else none; read once)."""
        if karpathy not in self._truths:
            self._truths[karpathy] = ground_truth(karpathy)
        return self._truths[karpathy]

    def eval_objects(self) -> Mapping[Any, Sequence[str]]:
        """Ground-truth object names per evaluation image id."""
        return self.truth(self.eval_karpathy).objects

    def select_objects(self) -> Mapping[Any, Sequence[str]]:
        """Ground-truth object names per image of the training data set, whose ``select_split`` the
        candidates are scored on."""
        return self.truth(self.karpathy).objects

    def _prepare(self) -> None:
        """Check the grid's inputs, build its synthetic world (``synthetic_gap``) and record it in
        ``grid.json``: all before any step is planned."""
        check_inputs(self.config)
        check_selection(self.config, self.karpathy, self.select_objects)
        if self.config.synthetic_gap is not None and self._world is None:
            self._world = build_synthetic_world(
                self.karpathy, self.config.embed, self.config.synthetic_gap, self.out / "synthetic",
                progress=self.progress,
            )  # fmt: skip
            self.karpathy = self.eval_karpathy = self._world.karpathy
            # Its stores share names with a real grid's ("train-images") but not contents: a folder of
            # their own, named by the world's embeddings, keeps grids that share a store_dir from rebuilding
            # each other's stores (and, run at once, from reading them half-replaced).
            digest = EmbeddingStore.open(self._world.images).digest
            self.stores = self.stores / f"synthetic-{digest[:12]}"
            self.echo(f"synthetic gap: images made from held-out captions, in {self._world.images}")
        check_oracle_prompts(self.config, self.eval_karpathy, self.eval_objects)
        record_grid(self.config, self.out)
