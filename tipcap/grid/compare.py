"""Paired comparisons between a grid's cells, read per seed, with verdicts (:mod:`tipcap.evaluation.stats`).

A cell is named ``CELL`` or ``CELL:PROMPT`` (its evaluation prompt mode; by default ``none`` when the cell
was evaluated without prompts, else its only mode). The scores come from the grid's output folder: each
evaluation's ``row.json`` (cell, seed, prompt mode) and ``scores.json`` (per-image scores).

A grid's declared ``families`` are its primary comparisons, each family read with Holm's correction (and
TOST where it sets a margin); its ``compare`` list holds secondary comparisons, each read alone and
uncorrected. :func:`write_comparisons` writes both to ``comparisons.md`` and ``comparisons.csv``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tipcap.errors import TipcapError
from tipcap.evaluation.registry import interval_metrics
from tipcap.evaluation.stats import (
    ALPHA,
    INTERVAL_METRICS,
    SCORES_FILE,
    SIGN_FLIP_MIN_SEEDS,
    Comparison,
    Decision,
    ImageScores,
    Interval,
    compare,
    decide,
    read_image_scores,
)
from tipcap.io import atomic_path

if TYPE_CHECKING:
    from tipcap.grid.config import Family

# Evaluations of one grid: (cell, evaluation prompt mode) → seed (None for baselines) → per-image scores.
GridScores = dict[tuple[str, str], dict[Any, ImageScores]]

COMPARISON_COLUMNS = ("family", "metric", "a", "b", "seeds", "images", "seed_differences", "difference",
                      "seed_sd", "interval_over", "ci_low", "ci_high", "adjusted_level", "adjusted_low",
                      "adjusted_high", "p_t", "p_holm", "p_sign_flip", "p_images_fixed_decoders", "margin",
                      "p_tost", "p_tost_holm", "equivalent", "verdict")  # fmt: skip
"""``comparisons.csv``: one row per comparison (``family`` empty: a secondary one, uncorrected, whose Holm
columns stay empty); ``seed_differences`` is a JSON object seed → difference."""


def metric_name(name: str) -> str:
    """The metric a user names (``cider``, ``rouge-l``, ``object-f1``), as results.csv spells it.

    Raises:
        TipcapError: naming ``--metric``, for a metric without per-image scores.
    """
    known = {m.lower().replace("_", "-"): m for m in metric_names()}
    found = known.get(name.lower().replace("_", "-"))
    if found is None:
        raise TipcapError(
            f"--metric {name!r}: paired comparisons need per-image scores; use one of "
            f"{', '.join(metric_names())} (BLEU and METEOR are corpus statistics)."
        )
    return found


def metric_names() -> tuple[str, ...]:
    """The metrics with per-image scores: the library's and the installed worlds' scorers'."""
    return (*INTERVAL_METRICS, *interval_metrics())


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


def grid_decisions(
    scores: GridScores, families: Mapping[str, Family], secondary: Sequence[Sequence[str]]
) -> list[Decision]:
    """The grid's comparisons read: each family's (Holm within it, TOST where it has a margin), then each
    secondary ``[A, B]`` or ``[A, B, metric]`` alone."""
    decisions = []
    for name, family in families.items():
        comparisons = [compare_cells(scores, a, b, family.metric) for a, b in family.comparisons]
        decisions += decide(comparisons, family.margin, family=name)
    for pair in secondary:
        decisions += decide([compare_cells(scores, *pair)])
    return decisions


def _interval(found: Interval) -> str:
    return f"[{found.low:+.4f}, {found.high:+.4f}]"


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def describe(decision: Decision) -> str:
    """Lines: the comparison (per-seed differences, interval, tests) and its verdict; with a margin, the
    equivalence test. For ``tipcap compare``, which reads one comparison alone (uncorrected)."""
    c = decision.comparison
    lines = [c.describe(), f"  verdict (a single comparison, uncorrected): {decision.verdict}"]
    if decision.margin is not None and decision.p_tost is not None:
        band = c.t_interval(1 - 2 * ALPHA)
        shown = "equivalent" if decision.equivalent else "equivalence not shown"
        lines.append(
            f"  equivalence within ±{decision.margin:g} (TOST over seeds): p = {decision.p_tost:.3g}, "
            f"{band.confidence:.0%} t-interval {_interval(band)}: {shown}"
        )
    elif decision.margin is not None:
        lines.append(f"  equivalence within ±{decision.margin:g}: no test with one seed")
    return "\n".join(lines)


def _csv_row(decision: Decision) -> list[Any]:
    c, d, alone = decision.comparison, decision.comparison.difference, decision.family is None
    adjusted = None if alone else decision.adjusted
    differences = json.dumps({str(s): v for s, v in zip(c.seeds, c.seed_differences, strict=True)})
    return [
        decision.family or "", c.metric, c.a, c.b, len(c.seeds), c.images, differences, d.mean, d.seed_sd,
        d.over, d.low, d.high, adjusted.confidence if adjusted else None, adjusted.low if adjusted else None,
        adjusted.high if adjusted else None, c.p_t, None if alone else decision.p_holm, c.p_sign_flip,
        c.p_images_fixed_decoders, decision.margin, decision.p_tost,
        None if alone else decision.p_tost_holm, decision.equivalent if decision.margin is not None else None,
        decision.verdict,
    ]  # fmt: skip


_TABLE_HEADER = (
    "| A − B | metric | per-seed differences | mean | seed SD | 95% interval | adjusted interval | p (t) "
    "| Holm p | sign-flip p | p images, decoders fixed | equivalence (TOST) | verdict |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
)


def _table_row(decision: Decision) -> str:
    c, d, alone = decision.comparison, decision.comparison.difference, decision.family is None
    seeds = ", ".join(f"{v:+.4f}" for v in c.seed_differences)
    spread = "—" if d.seed_sd is None else f"{d.seed_sd:.4f}"
    found = _interval(d) if d.over == "seeds" else f"{_interval(d)} (images, one seed)"
    adjusted = "—"
    if decision.adjusted is not None and not alone:
        adjusted = f"{_interval(decision.adjusted)} ({100 * decision.adjusted.confidence:.3g}%)"
    sign_flip = _p(c.p_sign_flip) if c.p_t is None or c.p_sign_flip is not None else "not shown"
    tost = "—"
    if decision.p_tost is not None and not alone:
        shown = "equivalent" if decision.equivalent else "not shown"
        tost = f"{shown}: p {_p(decision.p_tost)}, Holm p {_p(decision.p_tost_holm)}"
    cells = (f"{c.a} − {c.b}", c.metric, seeds, f"{d.mean:+.4f}", spread, found, adjusted, _p(c.p_t),
             "—" if alone else _p(decision.p_holm), sign_flip, _p(c.p_images_fixed_decoders), tost,
             decision.verdict)  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _notes(decisions: Sequence[Decision]) -> list[str]:
    notes = [
        "",
        "Per-seed differences: for each seed, the mean over the test images both cells scored of A − B (a "
        "baseline evaluated once pairs with every seed). The seed is the unit of replication and the test "
        "images are held fixed: the intervals and tests say what other seeds would give on these images.",
        "",
        "- 95% interval: the t-interval over the per-seed differences (df = seeds − 1); with one seed, the "
        "bootstrap interval over that seed's images, marked, and no verdict.",
        "- adjusted interval: the t-interval at the comparison's Holm step level (in brackets: 1 − α/(m − k) "
        "for the k-th smallest p (t) of the family's m, from k = 0; past the step where Holm stops, that "
        f"step's level), so that it excludes 0 exactly when the comparison is resolved. α = {ALPHA:.2g}.",
        "- p (t): the two-sided one-sample t-test of the per-seed differences against 0; Holm p: it adjusted "
        "by Holm's step-down correction within the family.",
    ]
    # The fewest seeds of a tested comparison without a sign-flip p, as an example of its smallest value.
    tested = [d.comparison for d in decisions if d.comparison.p_t is not None]
    unshown = min((len(c.seeds) for c in tested if c.p_sign_flip is None), default=None)
    example = f" ({2 / 2**unshown:.3g} with {unshown} seeds)" if unshown else ""
    notes.append(
        "- sign-flip p: exact, over all 2^S sign flips of the S per-seed differences; shown from "
        f"{SIGN_FLIP_MIN_SEEDS} seeds, since its smallest two-sided value, 2/2^S, is above α below that"
        f"{example}."
    )
    notes += [
        "- p images, decoders fixed (p_images_fixed_decoders): a permutation test over images of the "
        "seed-averaged scores with these trained decoders held fixed; it asks whether these decoders differ "
        "on these images, not whether the methods do, and decides nothing.",
        "- equivalence (TOST, where the family has a margin): two one-sided t-tests over seeds against "
        "±margin, p the larger of the two (p ≤ α exactly when the 90% t-interval lies inside ±margin), Holm "
        "p it adjusted within the family; equivalent when Holm p ≤ α.",
        "- verdict: resolved (A > B) or (A < B) when the (Holm-adjusted) p (t) ≤ α; else equivalent "
        "within ±margin when the (Holm-adjusted) TOST p ≤ α; else undecided: the seeds show neither a "
        "difference nor its absence, which is not evidence of no effect.",
    ]
    return notes


def comparisons_markdown(decisions: Sequence[Decision]) -> str:
    """``comparisons.md``: a table per family (its metric, size, correction and margin), then one of the
    secondary comparisons, then what each column is."""
    lines = ["# Paired comparisons (A − B), per seed"]
    families = list(dict.fromkeys(d.family for d in decisions if d.family is not None))
    for name in families:
        members = [d for d in decisions if d.family == name]
        margin, tests = members[0].margin, members[0].tests
        equivalence = (
            f"equivalence within ±{margin:g} by TOST, Holm-corrected too" if margin is not None
            else "no equivalence margin"
        )  # fmt: skip
        plural = "s" if tests != 1 else ""
        correction = (
            f"Holm's correction over its {tests} tested comparison{plural} at α = {ALPHA:.2g}" if tests
            else "one seed: no seed-level test, no verdict"
        )  # fmt: skip
        lines += ["", f"## Family {name}: {members[0].comparison.metric}, {correction}, {equivalence}", "",
                  *_TABLE_HEADER, *map(_table_row, members)]  # fmt: skip
    secondary = [d for d in decisions if d.family is None]
    if secondary:
        lines += ["", "## Secondary comparisons: each read alone, uncorrected", "", *_TABLE_HEADER,
                  *map(_table_row, secondary)]  # fmt: skip
    return "\n".join(lines + _notes(decisions)) + "\n"


def write_comparisons(decisions: Sequence[Decision], out: str | Path) -> None:
    """``comparisons.csv`` (one row per comparison, :data:`COMPARISON_COLUMNS`) and ``comparisons.md``
    (:func:`comparisons_markdown`) in ``out``."""
    out = Path(out)
    with atomic_path(out / "comparisons.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COMPARISON_COLUMNS)
        writer.writerows(map(_csv_row, decisions))
    with atomic_path(out / "comparisons.md") as tmp:
        tmp.write_text(comparisons_markdown(decisions), encoding="utf-8")
