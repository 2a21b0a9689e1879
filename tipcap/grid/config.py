"""An ablation grid's config: its data, CLIP, decoder and cells, expanded into jobs and checked key by key.

Cells:

- a gap kind (``none``, ``isotropic``, ``mean-shift``, ``mean-shift-isotropic``, ``capdec-offset``,
  ``mean-isotropic-matched``, ``norm-matched``, ``diagonal``, ``rotated``, ``gaussian``, ``close``,
  ``cov-noise``, ``memory``; see :mod:`tipcap.gap.model`) fitted in a
  data setting: ``few-pairs`` (a seeded subset of the paired training images: a count or a percentage, or a
  list of them to sweep; each seed draws its own, with seed ``data_seed + seed``), ``web-pairs`` (a JSONL
  of web image-caption pairs), ``unpaired`` (the captions of one seeded half of the training images and the
  images of the other half, so that no image meets its own captions) or ``text-only``; a decoder is
  trained on the training captions with that gap, with ``prompt: none | pim | hard``;
- ``supervised``: a decoder trained on image embeddings, of all paired training images (the upper bound) or,
  with ``setting: few-pairs``, of the few-pairs subset only;
- ``retrieval`` and ``template``: the non-neural baselines (no training, evaluated once).

Evaluation images and references come from ``karpathy`` (in-domain) or ``eval_karpathy`` (cross-domain, e.g.
decoders trained on COCO captions and evaluated on Flickr30k images).

The grid sets every stage of :mod:`tipcap.config` once for all cells (``embed``, ``gap``, ``decoder`` with its
``model`` and ``train`` sections, ``eval``), and a cell may override any field of the ``gap``, ``model``,
``train`` and ``eval`` stages by a dotted key in its ``set`` mapping, e.g. ``set: {gap.renorm: false,
eval.beams: 3}``. :func:`resolve` gives a job's resolved stage configs.

A trained cell may instead choose one such key's value on validation data: ``select: {gap.noise_scale:
[0.25, 0.5, 1, 2, 4]}`` trains a decoder per candidate value and seed (:func:`candidates`), evaluates each on
the grid's ``select_split`` (``val``) and keeps the value with the best mean ``select_metric`` (CIDEr) over
seeds; only that one is evaluated on ``eval_split``. ``select_seeds`` (a subset of ``seeds``; all of them by
default) limits the candidates to those seeds: the other seeds train the chosen value alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict

from tipcap.config import (
    GAP_KINDS,
    EmbedConfig,
    EvalConfig,
    EvalPrompt,
    ExperimentConfig,
    GapConfig,
    Int,
    PositiveFloat,
    Seed,
    SyntheticGapConfig,
    check_gap_config,
    from_dict,
    set_dotted,
    to_dict,
)
from tipcap.errors import TipcapError

BASELINES = ("retrieval", "template")
"""Cell kinds without a trained decoder."""
CELL_KINDS = (*GAP_KINDS, "supervised", *BASELINES)
CELL_STAGES = ("gap", "model", "train", "eval")
"""The stages a cell's ``set`` may override (the embedding stage is the grid's: its stores are shared)."""
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass
class Cell:
    """One method: a gap kind fitted in a setting (or ``supervised``, or a baseline), with prompts or not.

    ``few_pairs`` overrides the grid's value for this cell (``few-pairs`` cells only); ``set`` overrides
    fields of the gap, model, train and eval stages by dotted key (``gap.renorm: false``). ``select`` names
    one such key with a list of candidate values (``{gap.noise_scale: [0.5, 1, 2]}``): a decoder is trained
    per value and seed, each is evaluated on the grid's ``select_split`` with the cell's first
    ``eval_prompts`` mode, and the value with the best mean ``select_metric`` over seeds (the first listed
    on a tie) is the one evaluated on ``eval_split`` and reported under the cell's name. ``decoders`` names
    another cell whose decoders this one evaluates, under its own ``eval`` settings (the same decoder
    decoded two ways): the two cells must train alike (kind, setting, prompt, gap, model and train).
    ``init_from`` names another cell whose trained decoder of each seed this one's starts from
    (``train.init_from``): a prompt-free decoder to which the prompt module is added.
    """

    __pydantic_config__ = _STRICT

    name: str
    kind: str = "gaussian"
    setting: str = "text-only"
    prompt: Literal["none", "pim", "hard"] = "none"
    eval_prompts: list[EvalPrompt] = field(default_factory=lambda: ["none"])
    few_pairs: Int | str | list[Int | str] | None = None
    set: dict[str, Any] = field(default_factory=dict)
    select: dict[str, list[Any]] = field(default_factory=dict)
    decoders: str | None = None
    init_from: str | None = None


@dataclass
class Family:
    """Primary comparisons read together: each ``[A, B]`` (``CELL`` or ``CELL:PROMPT``) in ``metric``, with
    Holm's correction within the family and, with ``margin``, an equivalence test within ``±margin``
    (:func:`tipcap.evaluation.stats.decide`)."""

    __pydantic_config__ = _STRICT

    comparisons: list[list[str]]
    metric: str = "CIDEr"
    margin: PositiveFloat | None = None


@dataclass
class AblationConfig:
    """A grid: decoders trained on one data set (a Karpathy file whose images lie under ``image_root``).

    ``few_pairs`` is a number of paired training images, a percentage of them (``"1%"``), or a list of
    such values to sweep (each few-pairs cell then runs once per value). ``data_seed`` draws the unpaired
    halves, and with the decoder's seed the few-pairs subset (``data_seed + seed``).
    ``eval_karpathy``/``eval_image_root`` evaluate on another data set.
    ``instances`` (COCO instance annotations of the evaluation images, e.g. ``instances_val2014.json``)
    adds CHAIR-i and CHAIR-s to every row. ``store_dir`` keeps the embedding stores elsewhere than
    ``OUT/stores``, so that grids over the same data and CLIP share them (a store whose CLIP or inputs
    differ is rebuilt, never mixed). ``embed``, ``gap``, ``decoder`` (``model`` and ``train`` sections) and
    ``eval`` configure those stages for every cell (``eval.score_clip`` and ``eval.score_pretrained``
    name the CLIP-S scorer). ``compare`` lists pairs ``[A, B]`` of cells (``CELL`` or ``CELL:PROMPT``),
    optionally with a metric (``[A, B, rouge-l]``; CIDEr by default), whose paired difference ``A − B`` is
    written to ``comparisons.md`` and ``comparisons.csv`` as a secondary comparison (read alone, uncorrected).
    ``families`` names the primary comparisons: name → :class:`Family`, each read with Holm's correction
    within it (and an equivalence test where it sets a margin).
    ``synthetic_gap`` replaces every image embedding by a synthetic one with a known gap
    (:mod:`tipcap.synthgap`): each image loses one caption, and its embedding is that caption's plus a
    draw of N(μ*, Σ*); no image file is read.
    ``select_split`` (``val``; never ``eval_split``) and ``select_metric`` (``CIDEr``, or another metric with
    per-image scores) are where and by what the cells with ``select`` choose their candidate value;
    ``select_seeds`` (a subset of ``seeds``, all by default) are the seeds whose candidates are trained and
    scored, so that a sweep costs candidates × select_seeds decoders, not candidates × seeds.
    """

    __pydantic_config__ = _STRICT

    karpathy: str = ""
    image_root: str | None = None
    web_pairs: str | None = None
    web_image_root: str | None = None
    eval_karpathy: str | None = None
    eval_image_root: str | None = None
    instances: str | None = None
    vocabulary: str | None = None
    few_pairs: Int | str | list[Int | str] = 200
    data_seed: Seed = 0
    eval_split: str = "test"
    seeds: list[Seed] = field(default_factory=lambda: [0])
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    gap: dict[str, Any] = field(default_factory=dict)
    decoder: dict[str, Any] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(beams=1, metrics=["bleu", "rouge", "cider"]))
    cells: list[Cell] = field(default_factory=list)
    store_dir: str | None = None
    compare: list[list[str]] = field(default_factory=list)
    families: dict[str, Family] = field(default_factory=dict)
    synthetic_gap: SyntheticGapConfig | None = None
    select_split: str = "val"
    select_metric: str = "CIDEr"
    select_seeds: list[Seed] | None = None

    @property
    def selecting_seeds(self) -> list[int]:
        """The seeds whose candidates a selecting cell trains and scores: ``select_seeds``, or all."""
        return self.seeds if self.select_seeds is None else self.select_seeds

    @property
    def chosen_only_seeds(self) -> list[int]:
        """The seeds outside :attr:`selecting_seeds`, which train a selecting cell's chosen value alone."""
        return [seed for seed in self.seeds if seed not in self.selecting_seeds]


@dataclass(frozen=True)
class Job:
    """A cell at one few-pairs value: ``suffix`` (``""``, or ``"-1pct"`` in a sweep) tells its files apart.

    ``candidate`` (``"gap.noise_scale=0.5"``) marks one candidate of a selecting cell (:func:`candidates`):
    its ``cell`` then sets that value and selects nothing.
    """

    cell: Cell
    few_pairs: str | None = None
    suffix: str = ""
    candidate: str = ""

    @property
    def name(self) -> str:
        """The cell's name in results and evaluation folders (its configured name plus the sweep value)."""
        return self.cell.name + self.suffix

    @property
    def candidate_name(self) -> str:
        """Its name, then ``-KEY=VALUE`` for a candidate (``gaussian-gap.noise_scale=0.5``): its selection
        evaluations' name."""
        return f"{self.name}-{self.candidate}" if self.candidate else self.name

    @property
    def run_name(self) -> str:
        """The name of its decoders' run folders and of its own gap file: :attr:`candidate_name`, except that
        the candidates of an ``eval.*`` key share the cell's decoders (training does not read them)."""
        if self.cell.decoders is not None:
            return self.cell.decoders + self.suffix
        return self.name if self.candidate.startswith("eval.") else self.candidate_name

    @property
    def trained(self) -> bool:
        """Whether the cell trains a decoder (per seed)."""
        return self.cell.kind not in BASELINES


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


def candidate_label(dotted: str, value: Any) -> str:
    """``KEY=VALUE`` as a candidate's files and ``results.csv`` name it (``gap.noise_scale=0.5``)."""
    return f"{dotted}={value if isinstance(value, str) else json.dumps(value)}"


def candidates(job: Job) -> list[Job]:
    """A selecting job's candidates, in the order listed: one job per value of its ``select`` key, whose
    cell sets that value; a job that selects nothing is its own only candidate."""
    if not job.cell.select:
        return [job]
    ((dotted, values),) = job.cell.select.items()
    return [
        Job(
            dataclasses.replace(job.cell, set={**job.cell.set, dotted: value}, select={}),
            job.few_pairs,
            job.suffix,
            candidate_label(dotted, value),
        )
        for value in values
    ]


@dataclass
class JobConfig:
    """A job's resolved stages: its gap (``None`` for supervised and baseline cells), its decoder's model
    and train sections (without data paths), and its evaluation (``eval.prompt`` set per evaluation)."""

    gap: GapConfig | None
    decoder: dict[str, Any]
    eval: EvalConfig
    overrides_gap: bool

    def record(self) -> dict[str, Any]:
        """The resolved values, as a cell's record shows them."""
        gap = to_dict(self.gap) if self.gap is not None else None
        return {"gap": gap, "decoder": self.decoder, "eval": to_dict(self.eval)}


def resolve(config: AblationConfig, cell: Cell, where: str = "set") -> JobConfig:
    """The grid's stage configs with a cell applied: its kind, setting and prompt, then its ``set``.

    Raises:
        TipcapError: naming the key, when a resolved stage does not validate.
    """
    # Deep copies: a cell's override of a nested key (model.language_model_config.n_layer) must not reach
    # the grid's sections, which every other cell resolves from.
    stages: dict[str, Any] = {
        "gap": {**copy.deepcopy(config.gap), "kind": cell.kind, "setting": cell.setting},
        "model": {**copy.deepcopy(config.decoder.get("model", {})), "prompt": cell.prompt},
        "train": copy.deepcopy(config.decoder.get("train", {})),
        "eval": to_dict(config.eval),
    }
    for dotted, value in cell.set.items():
        set_dotted(stages, dotted, value, f"config key '{where}.{dotted}'")
    gap = None
    if cell.kind in GAP_KINDS:
        gap = from_dict(GapConfig, stages["gap"], f"{where}.gap")
    decoder = {"model": stages["model"], "train": stages["train"]}
    from_dict(ExperimentConfig, {**decoder, "data": {}}, where)  # fails now, not later
    evaluation = from_dict(EvalConfig, stages["eval"], f"{where}.eval")
    if "cider" not in evaluation.metrics:
        raise TipcapError(
            f"config key 'eval.metrics': {evaluation.metrics} must include cider "
            "(the table and the plots rank by CIDEr)."
        )
    if gap is not None:  # after the stages, so that a mistyped override is named first
        check_gap_config(gap, f"config key '{where.removesuffix('.set')}'")
    overrides_gap = any(dotted.startswith("gap.") for dotted in cell.set)
    return JobConfig(gap, decoder, evaluation, overrides_gap)
