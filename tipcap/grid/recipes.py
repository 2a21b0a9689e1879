"""Reproduction recipes: one published result, the grid that reruns it, and how close it must come.

A recipe (``experiments/reproduce/NAME.yaml``) names the paper, venue and table of a published result, the
architecture the paper used and the one run here with every deviation between them, the published metrics
with their source, and a tolerance per metric with the reason for its size. Its ``grid`` section is an
ablation config (:class:`tipcap.grid.config.AblationConfig`) without data paths: :mod:`tipcap.grid.reproduce`
fills them from the command line, runs the grid and compares ``cell``'s mean over seeds with the published
numbers.

Metrics are named as ``results.csv`` names them (``CIDEr``, ``BLEU-4``, ``METEOR``, ``SPICE``), with a NoCaps
domain after a slash (``CIDEr/in-domain``), and given on the papers' scale (×100: 91.8, not 0.918).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict

from tipcap.config import NonNegativeFloat, from_dict, read_yaml_mapping
from tipcap.data.nocaps import DOMAINS
from tipcap.errors import TipcapError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "experiments" / "reproduce"
"""Where the recipes of a clone of the repository lie (``--recipes`` points elsewhere)."""
SCALE = 100.0
"""Papers print caption metrics ×100; tipcap writes fractions."""
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
METRICS = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "SPICE")
"""The caption metrics a recipe may compare (pycocoevalcap's, as ``results.csv`` names them)."""


@dataclass
class RecipeData:
    """The data a recipe trains on (``train``) and evaluates on (``eval``: the same when ``None``).

    ``karpathy_sha256`` is the SHA-256 of the published Karpathy file of ``train``; ``None`` where it has not
    been recorded (the check then prints the hash it finds, for the record).
    """

    __pydantic_config__ = _STRICT

    train: Literal["coco", "flickr30k"]
    eval: Literal["coco", "flickr30k", "nocaps"] | None = None
    karpathy_sha256: str | None = None
    eval_sha256: str | None = None

    @property
    def evaluated_on(self) -> str:
        """The data set of the evaluation images."""
        return self.eval or self.train


@dataclass
class Published:
    """The published metrics (×100) and where they were read (a paper's table, or a README at a commit)."""

    __pydantic_config__ = _STRICT

    source: str
    metrics: dict[str, NonNegativeFloat] = field(default_factory=dict)


@dataclass
class Tolerance:
    """How far (absolute, ×100) a reproduced metric may lie from the published one, and why so far."""

    __pydantic_config__ = _STRICT

    metrics: dict[str, NonNegativeFloat]
    reason: str


@dataclass
class Recipe:
    """One published result and the grid that reruns it (see the module docstring)."""

    __pydantic_config__ = _STRICT

    name: str
    paper: str
    venue: str
    table: str
    paper_architecture: str
    architecture: str
    hyperparameters: str
    data: RecipeData
    published: Published
    tolerance: Tolerance
    cell: str
    grid: dict[str, Any]
    deviations: list[str] = field(default_factory=list)
    eval_prompt: str = "none"

    @property
    def compared(self) -> list[str]:
        """The metrics with a published number, in the order the recipe lists them."""
        return list(self.published.metrics)


def _check_metric(name: str, key: str) -> None:
    metric, _, domain = name.partition("/")
    if metric not in METRICS or (domain and domain not in DOMAINS):
        domains = ", ".join(f"{METRICS[0]}/{d}" for d in DOMAINS)
        raise TipcapError(
            f"{key}: {name!r} is not a metric; use one of {', '.join(METRICS)} (on NoCaps also per domain: "
            f"{domains})."
        )


def load_recipe(path: Path) -> Recipe:
    """Read and check one recipe file.

    Raises:
        TipcapError: naming the file and key, for a malformed recipe, a metric it cannot compare, a
            published metric without a tolerance, or a ``cell`` its grid does not define.
    """
    data = read_yaml_mapping(path, f"{path}: no such recipe.", "a mapping of recipe fields")
    recipe = from_dict(Recipe, data, str(path))
    for key, metrics in (
        ("published.metrics", recipe.published.metrics),
        ("tolerance.metrics", recipe.tolerance.metrics),
    ):
        for name in metrics:
            _check_metric(name, f"{path}: {key}")
    untolerated = [m for m in recipe.published.metrics if m not in recipe.tolerance.metrics]
    if untolerated:
        raise TipcapError(f"{path}: tolerance.metrics gives no tolerance for {', '.join(untolerated)}.")
    cells = [cell.get("name") for cell in recipe.grid.get("cells", []) if isinstance(cell, dict)]
    if recipe.cell not in cells:
        raise TipcapError(
            f"{path}: cell {recipe.cell!r} is not one of its grid's cells ({', '.join(cells)})."
        )
    if recipe.name != path.stem:
        raise TipcapError(f"{path}: name {recipe.name!r} differs from the file's name; rename one.")
    if recipe.data.evaluated_on == "nocaps" and recipe.grid.get("eval_split", "test") != "val":
        raise TipcapError(f"{path}: NoCaps is evaluated on its val split; set grid.eval_split: val.")
    return recipe


def recipe_paths(folder: Path = RECIPES_DIR) -> list[Path]:
    """The recipe files of ``folder``, by name.

    Raises:
        TipcapError: when the folder does not exist (an installation without the repository's
            ``experiments/``).
    """
    if not folder.is_dir():
        raise TipcapError(
            f"--recipes {folder}: no such folder; pass the experiments/reproduce folder of a "
            "clone of the repository."
        )
    return sorted(folder.glob("*.yaml"))


def find_recipe(name: str, folder: Path = RECIPES_DIR) -> Recipe:
    """The recipe called ``name`` in ``folder``.

    Raises:
        TipcapError: naming the recipes there when none is called so.
    """
    path = folder / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(p.stem for p in recipe_paths(folder))
        raise TipcapError(f"recipe {name!r}: not in {folder}; use one of {names} (tipcap reproduce --list).")
    return load_recipe(path)


def listing(recipes: list[Recipe]) -> str:
    """A Markdown table of the recipes: data, the published numbers (×100) and their source."""
    lines = [
        "| recipe | paper | trained on → evaluated on | published (×100) | tolerance | source |",
        "|---|---|---|---|---|---|",
    ]
    for recipe in recipes:
        published = ", ".join(f"{m} {v:g}" for m, v in recipe.published.metrics.items()) or "— (not read)"
        tolerance = ", ".join(f"{m} ±{recipe.tolerance.metrics[m]:g}" for m in recipe.compared) or "—"
        data = f"{recipe.data.train} → {recipe.data.evaluated_on}"
        lines.append(
            f"| {recipe.name} | {recipe.paper} ({recipe.venue}) | {data} | {published} | {tolerance} | "
            f"{recipe.published.source} |"
        )
    with_numbers = sum(1 for recipe in recipes if recipe.published.metrics)
    lines += ["", f"{len(recipes)} recipes, {with_numbers} with published numbers."]
    return "\n".join(lines) + "\n"


def metric_value(metric: str, overall: dict[str, Any], domains: dict[str, dict[str, Any]]) -> float | None:
    """A metric of one evaluation on the papers' scale (×100): from its ``metrics.json``'s ``metrics``
    (``overall``) or, for ``CIDEr/in-domain``, from its ``domains``; ``None`` where it was not scored."""
    name, _, domain = metric.partition("/")
    source = domains.get(domain, {}) if domain else overall
    value = source.get(name)
    return None if value is None else float(value) * SCALE
