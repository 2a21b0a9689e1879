"""A grid's result files: ``results.csv`` (one row per cell, seed and evaluation prompt mode, with each
row's image-level 95% interval: the bootstrap over the test images of that one evaluation), ``table.md``
(mean over seeds ± the half-width of the 95% t-interval over seeds, with the seeds' standard deviation; a cell
evaluated once gets the image-level interval, marked; :mod:`tipcap.evaluation.stats`), ``cider.png`` (CIDEr
per method, coloured by setting) and, for grids with few-pairs cells at two shares of paired data or more,
``cider_vs_pairs.png`` (CIDEr against the share of paired training images).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tipcap.evaluation.registry import Scorer
from tipcap.evaluation.stats import Interval, interval_metrics
from tipcap.io import atomic_path

CELL_COLUMNS = ("cell", "method", "kind", "setting", "few_pairs", "paired_fraction", "prompt", "eval_prompt",
                "seed", "train_data", "eval_data")  # fmt: skip
METRIC_COLUMNS = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "SPICE", "CLIP-S", "RefCLIP-S", "CHAIR-i",
                  "CHAIR-s", "Adherence", "Adherence-all")  # fmt: skip


def result_columns(scorers: Sequence[Scorer] = ()) -> tuple[str, ...]:
    """The ``results.csv`` header of a grid whose evaluation data the ``scorers`` apply to
    (:func:`tipcap.evaluation.registry.scorers_for`; none on COCO): the cell, the metrics, the scorers'
    columns, each row's image-level 95% interval (the bootstrap over the test images of its one seed) for
    the metrics with per-image scores (the seed-level intervals are ``table.md``'s), and ``selected``: the
    value a cell with ``select`` chose on validation data (``gap.noise_scale=0.5``)."""
    scored = interval_metrics([m for scorer in scorers for m in scorer.interval_metrics])
    intervals = (f"{m}_{end}" for m in scored for end in ("ci_low", "ci_high"))
    return (*CELL_COLUMNS, *METRIC_COLUMNS, *(c for s in scorers for c in s.columns), *intervals, "selected")


def write_csv(rows: list[dict[str, Any]], path: Path, columns: Sequence[str]) -> None:
    """Write result rows under the ``columns`` header (:func:`result_columns`), atomically (a reader never
    sees half a file). Columns a row lacks (an interval of a metric without per-image scores) stay empty;
    keys outside them (a world's scores kept in a row cached before) are left out."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
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


SEED_LEVEL, IMAGE_LEVEL, CORPUS = "seeds", "images", "corpus"
_FOOTNOTES = {
    SEED_LEVEL: "± is the half-width of the 95% t-interval over the seeds (each seed's score on the same "
    "test images, t with seeds − 1 degrees of freedom: the test images are held fixed, so it says where "
    "the score of other seeds would lie on these images, not on another test set), and sd the seeds' "
    "standard deviation (tipcap.evaluation.stats).",
    IMAGE_LEVEL: "‡ marks a cell evaluated once (one seed, or a baseline without seed): ± is the half-width "
    "of the 95% bootstrap interval over its test images only (image-level, no seed-level inference).",
    CORPUS: "† marks a corpus metric without per-image scores, shown ± its standard deviation over seeds.",
}


def _entry(values: list[float], found: Interval | None) -> tuple[str, str | None]:
    """Mean over seeds, ± the interval's half-width where there is one (with the seeds' sd, or marked ‡
    when it is over images), else ± the std over seeds (marked †); and which footnote the entry needs."""
    if not values:
        return "—", None
    mean = statistics.mean(values)
    if found is not None and found.over == SEED_LEVEL:
        return f"{mean:.3f} ± {found.half_width:.3f} (sd {found.seed_sd:.3f})", SEED_LEVEL
    if found is not None:
        return f"{mean:.3f} ± {found.half_width:.3f}‡", IMAGE_LEVEL
    if len(values) == 1:
        return f"{mean:.3f}", None
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}†", CORPUS


def markdown_table(
    rows: list[dict[str, Any]],
    intervals: dict[tuple[str, str], dict[str, Interval]] | None = None,
    title: str | None = None,
    scorers: Sequence[Scorer] = (),
) -> str:
    """Each method (and evaluation prompt mode): the mean over seeds ± the half-width of its 95% t-interval
    over seeds, with the seeds' sd (``intervals``: (cell, prompt mode) → metric → interval); a cell evaluated
    once gets its 95% interval over test images, marked ‡. Corpus metrics without per-image scores (BLEU-4,
    METEOR, SPICE) show ± the std over seeds, marked †. The footnote says what ± is, for the kinds shown.
    The ``scorers``' columns follow the metrics (``object_f1`` headed "object F1")."""
    intervals = intervals or {}
    groups = _groups(rows)
    scored = (c for scorer in scorers for c in scorer.columns)
    columns = [c for c in (*METRIC_COLUMNS, *scored) if any(_values(g, c) for g in groups.values())]
    names = {c: c.replace("_f1", " F1") for c in columns}
    lines = [f"{title}\n"] if title else []
    lines += [
        "| method | prompt at test | seeds | " + " | ".join(names.get(c, c) for c in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    shown: set[str | None] = set()
    for key, group in groups.items():
        found = intervals.get(key, {})
        entries = [_entry(_values(group, c), found.get(c)) for c in columns]
        shown.update(kind for _, kind in entries)
        lines.append(f"| {key[0]} | {key[1]} | {len(group)} | " + " | ".join(e for e, _ in entries) + " |")
    footnote = " ".join(_FOOTNOTES[kind] for kind in _FOOTNOTES if kind in shown)
    lines += ["", footnote or "No entry has an interval or a spread over seeds."]
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


def plot_cider(
    rows: list[dict[str, Any]],
    path: Path,
    intervals: dict[tuple[str, str], dict[str, Interval]] | None = None,
) -> None:
    """A bar chart of CIDEr per method (mean over seeds), coloured by data setting, with the 95% interval
    as error bars, as in ``table.md``: over seeds, or over the test images of a cell evaluated once
    (``intervals``: as for :func:`markdown_table`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    intervals = intervals or {}
    groups = _groups(rows)
    labels = [cell if prompt == "none" else f"{cell} [{prompt}]" for cell, prompt in groups]
    means = [statistics.mean(_values(g, "CIDEr")) for g in groups.values()]
    # NaN draws no error bar (a cell without per-image scores).
    found = [intervals.get(key, {}).get("CIDEr") for key in groups]
    below = [mean - f.low if f else math.nan for mean, f in zip(means, found, strict=True)]
    above = [f.high - mean if f else math.nan for mean, f in zip(means, found, strict=True)]
    settings = [g[0]["setting"] for g in groups.values()]
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.8))
    axis.bar(range(len(labels)), means, yerr=[below, above], capsize=4,
             color=[SETTING_COLOURS.get(s, "tab:purple") for s in settings])  # fmt: skip
    axis.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    axis.set_ylabel("CIDEr")
    axis.set_title(
        "CIDEr per method and data setting (mean over seeds, 95% t-interval over seeds;\n"
        "a cell evaluated once: 95% interval over its test images)"
    )
    present = list(dict.fromkeys(settings))
    axis.legend(handles=[Patch(color=SETTING_COLOURS.get(s, "tab:purple"), label=s) for s in present],
                title="setting", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    _save_figure(figure, path)


def plot_cider_vs_pairs(rows: list[dict[str, Any]], path: Path) -> bool:
    """CIDEr against the share of paired training images (log scale): a line per few-pairs method, a point
    for supervised training on all pairs, and a horizontal level (labelled with its setting) for each method
    that uses none of the paired training images.

    Drawn only for a grid with at least two shares of few pairs: with one, the few-pairs methods are single
    points, which ``cider.png`` shows already. Returns whether it drew; when it did not, a ``path`` left by
    an earlier grid in the folder is removed.
    """
    if len({row["few_pairs"] for row in rows if row["few_pairs"]}) < 2:
        path.unlink(missing_ok=True)
        return False
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
    return True
