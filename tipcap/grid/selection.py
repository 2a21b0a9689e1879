"""Settings chosen on validation data: a selecting cell's candidates (:func:`tipcap.grid.config.candidates`),
each scored per seed on the grid's ``select_split``, and the one with the best mean over seeds.

``selection.csv`` has one row per selecting cell, candidate and seed; ``selection.md`` one table per cell.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from tipcap.grid.config import Job
from tipcap.io import atomic_path

SELECTION_COLUMNS = ("cell", "candidate", "seed", "score", "mean", "selected", "split", "metric")


@dataclass
class Selection:
    """A selecting job's candidates with their validation scores: ``scores[i]`` maps each seed to the mean
    selection metric of candidate ``i``'s decoder of that seed over the validation images."""

    job: Job
    candidates: list[Job]
    scores: list[dict[int, float]]

    @property
    def means(self) -> list[float]:
        """Each candidate's score, averaged over seeds (one per candidate, in the order listed)."""
        return [statistics.mean(by_seed.values()) for by_seed in self.scores]

    @property
    def chosen(self) -> Job:
        """The candidate with the best mean over seeds; the first listed on a tie."""
        means = self.means
        return self.candidates[means.index(max(means))]


def write_selection(selections: list[Selection], out: Path, split: str, metric: str, eval_split: str) -> None:
    """``selection.csv`` and ``selection.md`` in ``out``: every candidate's ``metric`` on ``split`` per seed
    and its mean, and the value each cell chose (the one evaluated on ``eval_split``)."""
    rows = [
        {"cell": s.job.name, "candidate": candidate.candidate, "seed": seed, "score": score, "mean": mean,
         "selected": s.chosen.candidate, "split": split, "metric": metric}
        for s in selections
        for candidate, by_seed, mean in zip(s.candidates, s.scores, s.means, strict=True)
        for seed, score in by_seed.items()
    ]  # fmt: skip
    with atomic_path(out / "selection.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SELECTION_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Settings chosen on the {split} split: each candidate's {metric} (mean over the {split} images) per "
        f"seed, and its mean over seeds. The best mean is chosen (the first listed on a tie); only the "
        f"chosen value is evaluated on the {eval_split} split.",
    ]
    for s in selections:
        key, _, chosen = s.chosen.candidate.partition("=")
        seeds = list(s.scores[0])
        lines += [
            "",
            f"## {s.job.name}: {key} = {chosen}",
            "",
            f"| {key} | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean |",
            "|---|" + "---|" * (len(seeds) + 1),
        ]
        for candidate, by_seed, mean in zip(s.candidates, s.scores, s.means, strict=True):
            value = candidate.candidate.partition("=")[2]
            if candidate is s.chosen:
                value = f"**{value}** (chosen)"
            scores = " | ".join(f"{by_seed[seed]:.4f}" for seed in seeds)
            lines.append(f"| {value} | {scores} | {mean:.4f} |")
    with atomic_path(out / "selection.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
