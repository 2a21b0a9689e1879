"""Paired comparisons between a grid's cells: ``A − B = x [lo, hi]`` with a p-value (see :mod:`tipcap.stats`).

A cell is named ``CELL`` or ``CELL:PROMPT`` (its evaluation prompt mode; by default ``none`` when the cell
was evaluated without prompts, else its only mode). The scores come from the grid's output folder: each
evaluation's ``row.json`` (cell, seed, prompt mode) and ``scores.json`` (per-image scores).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tipcap.errors import TipcapError
from tipcap.io import atomic_path
from tipcap.stats import INTERVAL_METRICS, SCORES_FILE, Comparison, ImageScores, compare, read_image_scores

# Evaluations of one grid: (cell, evaluation prompt mode) → seed (None for baselines) → per-image scores.
GridScores = dict[tuple[str, str], dict[Any, ImageScores]]

COMPARISON_COLUMNS = ("a", "b", "metric", "difference", "ci_low", "ci_high", "p_value", "seeds", "images",
                      "resolved")  # fmt: skip


def metric_name(name: str) -> str:
    """The metric a user names (``cider``, ``rouge-l``, ``object-f1``), as results.csv spells it.

    Raises:
        TipcapError: naming ``--metric``, for a metric without per-image scores.
    """
    known = {m.lower().replace("_", "-"): m for m in INTERVAL_METRICS}
    found = known.get(name.lower().replace("_", "-"))
    if found is None:
        raise TipcapError(
            f"--metric {name!r}: paired comparisons need per-image scores; use one of "
            f"{', '.join(INTERVAL_METRICS)} (BLEU and METEOR are corpus statistics)."
        )
    return found


def grid_scores(out: str | Path) -> GridScores:
    """Every finished evaluation's per-image scores in a grid's output folder.

    Raises:
        TipcapError: the folder holds no evaluation with per-image scores.
    """
    found: GridScores = {}
    for row_path in sorted(Path(out).glob("eval/*/row.json")):
        if not (row_path.parent / SCORES_FILE).is_file():
            continue
        row = json.loads(row_path.read_text(encoding="utf-8"))
        scores = read_image_scores(row_path.parent / SCORES_FILE)
        found.setdefault((row["cell"], row["eval_prompt"]), {})[row["seed"]] = scores
    if not found:
        raise TipcapError(
            f"--grid-out {out}: no evaluation with per-image scores (eval/*/scores.json); run tipcap ablate "
            "there first (a rerun adds the scores to earlier evaluations)."
        )
    return found


def resolve_cell(scores: GridScores, reference: str, flag: str = "--a") -> tuple[str, str]:
    """``CELL`` or ``CELL:PROMPT`` as a (cell, evaluation prompt mode) key of ``scores``.

    Raises:
        TipcapError: naming ``flag``, when no such cell or prompt mode was evaluated.
    """
    cell, _, prompt = reference.partition(":")
    modes = [mode for name, mode in scores if name == cell]
    if not modes:
        cells = sorted({name for name, _ in scores})
        raise TipcapError(f"{flag} {reference!r}: no such evaluated cell (cells: {', '.join(cells)}).")
    if not prompt:
        if "none" in modes:
            prompt = "none"
        elif len(modes) == 1:
            prompt = modes[0]
        else:
            choices = ", ".join(f"{cell}:{mode}" for mode in modes)
            raise TipcapError(f"{flag} {reference!r}: name the prompt mode, one of {choices}.")
    if prompt not in modes:
        raise TipcapError(f"{flag} {reference!r}: {cell} was evaluated with prompts {', '.join(modes)} only.")
    return cell, prompt


def _label(key: tuple[str, str]) -> str:
    return key[0] if key[1] == "none" else f"{key[0]}:{key[1]}"


def compare_cells(scores: GridScores, a: str, b: str, metric: str = "CIDEr") -> Comparison:
    """``a − b`` (each ``CELL[:PROMPT]``) in ``metric``, paired on their common seeds and images."""
    key_a, key_b = resolve_cell(scores, a, "--a"), resolve_cell(scores, b, "--b")
    return compare(scores[key_a], scores[key_b], metric_name(metric), names=(_label(key_a), _label(key_b)))


def write_comparisons(comparisons: list[Comparison], out: str | Path) -> None:
    """``comparisons.csv`` (one row per comparison) and ``comparisons.md`` (one line each) in ``out``."""
    out = Path(out)
    with atomic_path(out / "comparisons.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COMPARISON_COLUMNS)
        for c in comparisons:
            d = c.difference
            writer.writerow([c.a, c.b, c.metric, d.mean, d.low, d.high, c.p_value, c.seeds, c.images,
                             c.resolved])  # fmt: skip
    lines = ["Paired differences (A − B) with 95% intervals over test images and seeds:", ""]
    for c in comparisons:
        verdict = "resolved" if c.resolved else "within noise"
        lines.append(f"- {c.describe()}: {verdict}")
    with atomic_path(out / "comparisons.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
