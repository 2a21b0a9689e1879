"""Running an ablation grid (see :mod:`tipcap.grid.config` for its cells) into an output directory.

The runner plans the steps a grid needs (:mod:`tipcap.grid.steps`): embedding stores, gaps, trainings and
evaluations, each made by the library function behind its command (``embed``, ``fit-gap``, ``train``,
``evaluate``), and runs them in dependency order. A step whose output records the provenance key it would be
built with now is reused; any other is built, with a line saying why. So a grid that was interrupted finishes
only its missing steps on a rerun, and a changed cell rebuilds exactly its own steps. The directory remembers
the grid it was run with (``grid.json``, :mod:`tipcap.grid.preflight`): a rerun may add or change cells, seeds
and evaluation prompts, but a changed data set, CLIP or grid-wide stage is refused rather than mixed.

With ``synthetic_gap`` every image store is cut from a synthetic world (:mod:`tipcap.synthgap`) built in
``out/synthetic``, whose Karpathy file (each image without its held-out caption) replaces ``karpathy``.

A cell with ``select`` trains a decoder per candidate value and seed of ``select_seeds``
(``runs/<cell>-<key>=<value>-seed<s>``),
evaluates each on ``select_split`` (``eval-<split>/<cell>-<key>=<value>-seed<s>-<prompt>``), and evaluates
only the candidate with the best mean over seeds on ``eval_split``, under the cell's own name
(``eval/<cell>-seed<s>-<prompt>``, its row recording the value in ``selected``); ``selection.csv`` and
``selection.md`` give every candidate's scores. Should the choice change on a rerun (a seed added), the
evaluations of the value chosen before are redone with the new one (the value is part of their key). The
grid's other seeds train the chosen value alone.

``plan`` writes each training cell's config and the commands to train them outside the runner (under
``torchrun``); the runner then reuses the trained models.
"""

from __future__ import annotations

import json
import shlex
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tipcap.config import save_config
from tipcap.data import list_images
from tipcap.errors import TipcapError
from tipcap.evaluation.registry import Scorer, scorers_for
from tipcap.evaluation.stats import (
    INTERVAL_METRICS,
    SCORES_FILE,
    ImageScores,
    cell_interval,
    interval_metrics,
    read_image_scores,
    write_image_scores,
)
from tipcap.grid.compare import GridScores, grid_decisions, metric_name, write_comparisons
from tipcap.grid.config import Job, candidates
from tipcap.grid.planning import GridPlan
from tipcap.grid.report import (
    METRIC_COLUMNS,
    markdown_table,
    plot_cider,
    plot_cider_vs_pairs,
    result_columns,
    write_csv,
)
from tipcap.grid.selection import Selection, write_selection
from tipcap.grid.steps import Step
from tipcap.grid.validate import load_ablation
from tipcap.io import atomic_path, load_json, write_json_atomic
from tipcap.store import EmbeddingStore
from tipcap.training.setup import run_key


class Ablation(GridPlan):
    """Runs an :class:`AblationConfig` into ``out``, reusing every step whose provenance key is unchanged.

    ``echo`` receives one line per step built (with the reason) and per evaluation reused or scored.
    """

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
        return len(EmbeddingStore.open(self.steps.run(store))) / self._train_images

    def row(self, job: Job, seed: int | None, eval_prompt: str, out: Path) -> dict[str, Any]:
        """The row of ``results.csv`` of one evaluation of a job in ``out``, with the columns of the data's
        scorers (a toy world's object F1) beside the caption metrics and per-image scores in ``scores.json``:
        read from ``row.json``, else made and written."""
        if (out / "row.json").is_file() and (out / SCORES_FILE).is_file():
            self.echo(f"{out.name}: reused")
            return json.loads((out / "row.json").read_text(encoding="utf-8"))
        row = self._row(job, seed, eval_prompt, out)
        # row.json last: its presence marks a finished evaluation.
        write_json_atomic(out / "row.json", row)
        self.echo(f"{out.name}: CIDEr {row['CIDEr']:.3f}")
        return row

    def data_name(self, karpathy: Path) -> str:
        """A Karpathy file's ``dataset`` field, else its name without suffixes (read once per file)."""
        if karpathy not in self._data_names:
            document = load_json(karpathy)
            self._data_names[karpathy] = str(document.get("dataset") or karpathy.name.split(".")[0])
        return self._data_names[karpathy]

    def _row(self, job: Job, seed: int | None, eval_prompt: str, out: Path) -> dict[str, Any]:
        cell = job.cell
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["metrics"]
        per_image = json.loads((out / "per_image.json").read_text(encoding="utf-8"))
        scores = self._image_scores(out, per_image, self.eval_karpathy)
        fraction = self._paired_fraction(job, seed)
        setting = "all-pairs" if cell.kind == "supervised" and job.few_pairs is None else cell.setting
        row = {
            "cell": job.name, "method": cell.name, "kind": cell.kind, "setting": setting,
            "few_pairs": job.few_pairs, "paired_fraction": fraction, "prompt": cell.prompt,
            "eval_prompt": eval_prompt, "selected": job.candidate or None, "seed": seed,
            "train_data": self.data_name(self.karpathy),
            "eval_data": self.data_name(self.eval_karpathy),
            **{k: metrics.get(k) for k in METRIC_COLUMNS},
            **self._scorer_columns(per_image, scores),
        }  # fmt: skip
        # This evaluation's image-level interval: the bootstrap over its test images (its seed alone).
        for metric in self.interval_metrics():
            found = cell_interval({seed: scores}, metric)
            row[f"{metric}_ci_low"] = found.low if found is not None else None
            row[f"{metric}_ci_high"] = found.high if found is not None else None
        return row

    # -- settings chosen on validation data -----------------------------------------------------

    def select_score(self, job: Job, seed: int) -> float:
        """A candidate's decoder of ``seed`` (trained as needed) scored on ``select_split``: the mean of its
        per-image ``select_metric`` over those images, read from the evaluation's ``scores.json``."""
        out, split = self.steps.run(self.validation(job, seed)), self.config.select_split
        if not (out / SCORES_FILE).is_file():
            per_image = json.loads((out / "per_image.json").read_text(encoding="utf-8"))
            self._image_scores(out, per_image, self.karpathy)
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

    def _write_selection(self, selections: list[Selection]) -> None:
        """``selection.csv`` and ``selection.md`` of the cells chosen so far."""
        config = self.config
        metric = metric_name(config.select_metric)
        write_selection(selections, self.out, config.select_split, metric, config.eval_split)

    # -- the grid -------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Run every job × seed × evaluation prompt mode; write the CSV, the table, the comparisons the
        config asks for and the plots."""
        self._prepare()
        rows = []
        columns = result_columns(self.scorers(self.eval_karpathy))
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
                    out = self.steps.run(self.evaluation(evaluated, seed, eval_prompt))
                    rows.append(self.row(evaluated, seed, eval_prompt, out))
                    write_csv(rows, self.out / "results.csv", columns)
                    evaluation = read_image_scores(self.eval_dir(job, seed, eval_prompt) / SCORES_FILE)
                    scores.setdefault((job.name, eval_prompt), {})[seed] = evaluation
        if not selections:
            for name in ("selection.csv", "selection.md"):
                (self.out / name).unlink(missing_ok=True)  # from an earlier grid in this folder
        intervals = {
            key: {m: found for m in self.interval_metrics() if (found := cell_interval(seeds, m)) is not None}
            for key, seeds in scores.items()
        }
        title = None
        if self.eval_karpathy != self.karpathy:
            source, target = self.data_name(self.karpathy), self.data_name(self.eval_karpathy)
            title = (
                f"Decoders trained on {source}, evaluated on the {self.config.eval_split} split of {target}."
            )
        with atomic_path(self.out / "table.md") as tmp:
            tmp.write_text(
                markdown_table(rows, intervals, title, self.scorers(self.eval_karpathy)), encoding="utf-8"
            )
        if self.config.compare or self.config.families:
            write_comparisons(grid_decisions(scores, self.config.families, self.config.compare), self.out)
        plot_cider(rows, self.out / "cider.png", intervals)
        plot_cider_vs_pairs(rows, self.out / "cider_vs_pairs.png")
        return rows

    def _trained(self, step: Step) -> bool:
        """Whether a training step is current, building the stores and gaps it reads but training
        nothing."""
        return self.steps.current(step, lambda needed: needed.kind != "training")

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
            self._trained(self.training(candidate, seed))
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
        self._prepare()
        commands, notes, planned, waiting = [], [], set(), []
        for job in self.jobs:
            if not job.trained:
                continue
            if job.cell.select:
                notes.append(self._describe_selection(job))
                self.echo(notes[-1])
            for trained, seeds in self._planned_decoders(job):
                for seed in seeds:
                    run, step = self.run_dir(trained, seed), self.training(trained, seed)
                    if run in planned:
                        continue  # the candidates of an eval.* key share their decoders
                    if trained.cell.init_from is not None:
                        base = self.training(self.base(trained), seed)
                        if not self._trained(base):
                            waiting.append(f"{trained.name} seed {seed} waits for {base.name}")
                            continue
                    if self._trained(step):
                        continue
                    planned.add(run)
                    config = self.training_config(trained, seed)
                    self._clear_other_run(run, run_key(config))
                    save_config(config, run / "train.yaml")
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

    # -- the scores of the data's world (a toy world's object F1 and claims) ----------------------

    def scorers(self, karpathy: Path) -> tuple[Scorer, ...]:
        """The installed worlds' scorers that apply to a data file (none off a world's data)."""
        return scorers_for(self.truth(karpathy))

    def interval_metrics(self) -> tuple[str, ...]:
        """The metrics of the evaluations with per-image scores: the library's and the scorers'."""
        return interval_metrics([m for s in self.scorers(self.eval_karpathy) for m in s.interval_metrics])

    def _scorer_records(self, karpathy: Path, scorer: Scorer) -> Any:
        """What a data file records of each image that ``scorer`` scores (read once per file)."""
        if (karpathy, scorer.name) not in self._records:
            self._records[karpathy, scorer.name] = scorer.records(karpathy)
        return self._records[karpathy, scorer.name]

    def _image_scores(self, out: Path, per_image: list[dict[str, Any]], karpathy: Path) -> ImageScores:
        """Write an evaluation's per-image scores (``scores.json``: CIDEr, ROUGE-L, CLIP-S, RefCLIP-S and the
        per-image scores of the data file's scorers, on the images they score) and return them."""
        columns = {m: [r.get(m) for r in per_image] for m in INTERVAL_METRICS}
        for scorer in self.scorers(karpathy):
            if scorer.per_image is None:
                continue
            records = self._scorer_records(karpathy, scorer)
            scores = [scorer.per_image(r["prediction"], records[r["image_id"]]) if r["image_id"] in records
                      else None for r in per_image]  # fmt: skip
            columns.update({m: [s[m] if s else None for s in scores] for m in scorer.interval_metrics})
        columns = {m: values for m, values in columns.items() if any(v is not None for v in values)}
        write_image_scores(out / SCORES_FILE, [r["image_id"] for r in per_image], columns)
        return read_image_scores(out / SCORES_FILE)

    def _scorer_columns(
        self, per_image: list[dict[str, Any]], scores: ImageScores
    ) -> dict[str, float | None]:
        """The evaluation data's scorers' result columns (the mean of each per-image score over the images
        it scores; the scorer's summary for the others), ``None`` where a scorer scores no image."""
        row: dict[str, float | None] = {}
        for scorer in self.scorers(self.eval_karpathy):
            for metric in scorer.interval_metrics:
                values = [v for v in scores.get(metric, {}).values() if v is not None]
                row[metric] = statistics.mean(values) if values else None
            records = self._scorer_records(self.eval_karpathy, scorer)
            scored = [r for r in per_image if r["image_id"] in records]
            rest = [c for c in scorer.columns if c not in scorer.interval_metrics]
            summary = {}
            if scored and scorer.summary is not None:
                summary = scorer.summary(
                    [r["prediction"] for r in scored], [records[r["image_id"]] for r in scored]
                )
            row.update({column: summary.get(column) for column in rest})
        return row


def run_ablation(
    config_path: str | Path,
    out: str | Path,
    overrides: list[str] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Load an ablation config and run it into ``out``."""
    return Ablation(load_ablation(config_path, overrides), out, progress=progress, echo=echo).run()
