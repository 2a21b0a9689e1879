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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict

from tipcap.config import (
    GAP_KINDS,
    SETTINGS,
    EmbedConfig,
    EvalConfig,
    EvalPrompt,
    ExperimentConfig,
    GapConfig,
    Int,
    PositiveFloat,
    Seed,
    SyntheticGapConfig,
    apply_overrides,
    check_gap_config,
    from_dict,
    read_yaml_mapping,
    set_dotted,
    to_dict,
)
from tipcap.data.karpathy import check_split
from tipcap.errors import TipcapError
from tipcap.grid.compare import metric_name, metric_names

BASELINES = ("retrieval", "template")
"""Cell kinds without a trained decoder."""
CELL_KINDS = (*GAP_KINDS, "supervised", *BASELINES)
CELL_STAGES = ("gap", "model", "train", "eval")
"""The stages a cell's ``set`` may override (the embedding stage is the grid's: its stores are shared)."""
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
_PERCENT = re.compile(r"\d+(\.\d+)?%")
_NAME = re.compile(r"[\w.+-]+")


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


def _check_shared_decoders(config: AblationConfig, cell: Cell, key: str) -> None:
    """A cell that evaluates another cell's decoders must train exactly as that cell does."""
    others = {other.name: other for other in config.cells if other is not cell}
    other = others.get(cell.decoders or "")
    if other is None or other.kind in BASELINES or other.decoders is not None:
        trained = [name for name, c in others.items() if c.kind not in BASELINES and c.decoders is None]
        raise TipcapError(
            f"config key '{key}.decoders': {cell.decoders!r} is not a cell that trains its own decoders; "
            f"name one of {', '.join(trained) or '(none)'}."
        )
    if cell.select or other.select:
        raise TipcapError(f"config key '{key}.decoders': neither cell may select a value.")

    def training(c: Cell) -> tuple[Any, ...]:
        resolved = resolve(config, c)
        return c.kind, c.setting, c.prompt, c.few_pairs, c.init_from, resolved.gap, resolved.decoder

    if training(cell) != training(other):
        raise TipcapError(
            f"config key '{key}.decoders': {cell.name} would train otherwise than {other.name} (kind, "
            "setting, prompt, few_pairs, or a gap, model or train key differ); only eval keys may differ."
        )


def _check_init_from(config: AblationConfig, cell: Cell, key: str) -> None:
    """A cell that starts from another cell's decoders starts from one trained decoder per seed and few-pairs
    value: that cell trains its own, selects nothing, and is listed before it (it may select: each candidate
    starts from the same decoders)."""
    earlier = config.cells[: config.cells.index(cell)]
    trained = [c.name for c in earlier if c.kind not in BASELINES and c.decoders is None and not c.select]
    base = next((c for c in earlier if c.name == cell.init_from), None)
    if base is None or base.name not in trained:
        raise TipcapError(
            f"config key '{key}.init_from': {cell.init_from!r} is not an earlier cell that trains its own "
            f"decoders without selecting; name one of {', '.join(trained) or '(none)'}."
        )
    if cell.decoders is not None or cell.kind in BASELINES:
        raise TipcapError(f"config key '{key}.init_from': a cell that starts from another trains its own "
                          "decoders.")  # fmt: skip
    if cell.few_pairs != base.few_pairs:
        raise TipcapError(f"config key '{key}.init_from': {base.name} has other few_pairs values.")
    if "train.init_from" in cell.set:
        raise TipcapError(f"config key '{key}.set.train.init_from': give init_from (a cell) instead.")


def _check_few_pairs(value: Any, key: str) -> None:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise TipcapError(f"config key '{key}': an empty list sweeps nothing.")
    for item in values:
        if isinstance(item, int) and item > 0:
            continue
        if isinstance(item, str) and _PERCENT.fullmatch(item) and 0 < float(item[:-1]) <= 100:
            continue
        raise TipcapError(
            f"config key '{key}': expected a number of images (200), a percentage ('1%') or a list of them, "
            f"got {item!r}."
        )


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


def _check_select(config: AblationConfig, cell: Cell, key: str) -> None:
    """A cell's ``select``: one key of the cell stages that its ``set`` leaves alone, with distinct values
    that name folders, each resolving to valid stages; a grid whose cells select chooses on another split
    than it reports."""
    if len(cell.select) > 1:
        raise TipcapError(
            f"config key '{key}.select': one key per cell ({', '.join(cell.select)} given); select one and "
            "set the others, or give each key a cell of its own."
        )
    if cell.kind in BASELINES:
        raise TipcapError(f"config key '{key}.select': {cell.kind} trains no decoder to choose a value for.")
    ((dotted, values),) = cell.select.items()
    where = f"{key}.select.{dotted}"
    _check_stage_key(dotted, where)
    if dotted in cell.set:
        raise TipcapError(f"config key '{where}': also in {key}.set; remove it from one of them.")
    if not values:
        raise TipcapError(f"config key '{where}': an empty list selects nothing; list candidate values.")
    labels = [candidate_label(dotted, value) for value in values]
    for value, label in zip(values, labels, strict=True):
        if not _NAME.fullmatch(label.partition("=")[2]):
            raise TipcapError(
                f"config key '{where}': candidate {value!r} cannot name a folder; use numbers, true/false "
                "or plain words."
            )
        if labels.count(label) > 1:
            raise TipcapError(f"config key '{where}': candidate {value!r} is listed twice.")
    for job in candidates(Job(cell)):
        resolve(config, job.cell, f"{key}.select")
    if config.select_split == config.eval_split:
        raise TipcapError(
            f"config key 'select_split': {key} would choose {dotted} on the {config.eval_split} split it is "
            "evaluated on; choose on another split (val)."
        )
    if config.select_split in ("train", "restval"):
        raise TipcapError(
            f"config key 'select_split': {key} would choose {dotted} on the images of the captions its "
            "decoders train on; choose on a held-out split (val)."
        )


def _check_selection_keys(config: AblationConfig) -> None:
    """``select_metric`` has per-image scores and ``select_split`` is a Karpathy split."""
    try:
        metric_name(config.select_metric)
    except TipcapError:
        raise TipcapError(
            f"config key 'select_metric': {config.select_metric!r} has no per-image scores to average over "
            f"the validation images; use one of {', '.join(metric_names())}."
        ) from None
    try:
        check_split(config.select_split)
    except TipcapError as e:
        raise TipcapError(f"config key 'select_split': {e}") from None
    if config.select_seeds is not None:
        outside = [seed for seed in config.select_seeds if seed not in config.seeds]
        if outside or not config.select_seeds or len(set(config.select_seeds)) < len(config.select_seeds):
            raise TipcapError(
                f"config key 'select_seeds': {config.select_seeds} must list distinct seeds of 'seeds' "
                f"({config.seeds}); remove it to choose over all seeds."
            )


def _check_stage_key(dotted: str, where: str) -> None:
    """A dotted key into the stages a cell may change."""
    if dotted.split(".")[0] not in CELL_STAGES or "." not in dotted:
        raise TipcapError(
            f"config key '{where}': a cell overrides fields of the {', '.join(CELL_STAGES)} stages "
            "(e.g. gap.renorm)."
        )


def _validate(config: AblationConfig, path: Path) -> None:
    """Checks that need more than types; each error names the key."""
    if not config.cells:
        raise TipcapError(f"{path}: no cells to run.")
    if not config.karpathy or not config.embed.model:
        raise TipcapError(f"{path}: set karpathy and embed.model (in the file or with --set).")
    _check_few_pairs(config.few_pairs, "few_pairs")
    if config.synthetic_gap is not None:
        config.synthetic_gap.check("synthetic_gap")
    if config.synthetic_gap is not None and config.eval_karpathy:
        raise TipcapError(
            f"{path}: a synthetic_gap grid evaluates on its own data; remove eval_karpathy or synthetic_gap."
        )
    trained = [cell.name for cell in config.cells if cell.kind not in BASELINES]
    if not config.seeds and trained:
        raise TipcapError(f"config key 'seeds': empty, so no decoder would be trained ({trained[0]} first).")
    # The grid's own stages first, so that a mistake there is not blamed on a cell.
    unknown = sorted(set(config.decoder) - {"model", "train"})
    if unknown:
        raise TipcapError(f"config key 'decoder.{unknown[0]}' is unknown; a decoder has model and train.")
    from_dict(ExperimentConfig, {**config.decoder, "data": {}}, "decoder")
    from_dict(GapConfig, config.gap, "gap")
    _check_selection_keys(config)
    for index, cell in enumerate(config.cells):
        key = f"cells[{index}]"
        if not _NAME.fullmatch(cell.name):
            raise TipcapError(
                f"config key '{key}.name': {cell.name!r} is not a plain name (letters, digits, .+-_)."
            )
        if cell.kind not in CELL_KINDS:
            raise TipcapError(
                f"config key '{key}.kind': {cell.kind!r} is not one of {', '.join(CELL_KINDS)}."
            )
        if cell.setting not in SETTINGS:
            raise TipcapError(
                f"config key '{key}.setting': {cell.setting!r} is not one of {', '.join(SETTINGS)}."
            )
        if cell.kind == "supervised" and cell.setting not in ("text-only", "few-pairs"):
            raise TipcapError(
                f"config key '{key}.setting': supervised trains on all paired images (the default) "
                "or on the few-pairs subset (few-pairs)."
            )
        if cell.kind in BASELINES and (cell.prompt != "none" or cell.eval_prompts != ["none"]):
            raise TipcapError(f"config key '{key}': {cell.kind} takes no prompt or eval_prompts.")
        if cell.few_pairs is not None:
            if cell.setting != "few-pairs":
                raise TipcapError(f"config key '{key}.few_pairs': applies to few-pairs cells only.")
            _check_few_pairs(cell.few_pairs, f"{key}.few_pairs")
        if cell.setting == "web-pairs" and config.synthetic_gap is not None:
            raise TipcapError(
                f"config key '{key}.setting': a synthetic_gap grid has no web pairs (its images are made "
                "from captions); use few-pairs or unpaired."
            )
        if cell.setting == "web-pairs" and not config.web_pairs:
            raise TipcapError(f"config key '{key}': a web-pairs cell needs web_pairs (a JSONL of pairs).")
        for dotted in cell.set:
            _check_stage_key(dotted, f"{key}.set.{dotted}")
        resolve(config, cell, f"{key}.set")
        if cell.select:
            _check_select(config, cell, key)
        if cell.decoders is not None:
            _check_shared_decoders(config, cell, key)
        if cell.init_from is not None:
            _check_init_from(config, cell, key)
        elif resolve(config, cell).decoder["train"].get("freeze_init"):
            raise TipcapError(
                f"config key '{key}.set.train.freeze_init': trains the prompt module alone, on the decoders "
                "of the cell that init_from names; give init_from."
            )
    names = [job.name for job in expand(config)]
    for name in names:
        if names.count(name) > 1:
            raise TipcapError(
                f"{path}: cell name {name!r} is used twice; results would overwrite each other."
            )
    _check_comparisons(config)


def _check_comparisons(config: AblationConfig) -> None:
    """Each ``compare`` entry and each family's comparison names two evaluations the grid makes (``CELL``
    or ``CELL:PROMPT``), and each metric has per-image scores."""
    modes = {job.name: job.cell.eval_prompts for job in expand(config)}
    for index, pair in enumerate(config.compare):
        key = f"compare[{index}]"
        if len(pair) not in (2, 3):
            raise TipcapError(
                f"config key '{key}': a comparison is [A, B] or [A, B, metric] (CIDEr by default), "
                f"got {pair!r}."
            )
        if len(pair) == 3:
            _check_metric(pair[2], key)
        _check_pair(pair[:2], key, modes)
    for name, family in config.families.items():
        key = f"families.{name}"
        _check_metric(family.metric, f"{key}.metric")
        if not family.comparisons:
            raise TipcapError(f"config key '{key}.comparisons': empty; list the family's [A, B] pairs.")
        for index, pair in enumerate(family.comparisons):
            if len(pair) != 2:
                raise TipcapError(
                    f"config key '{key}.comparisons[{index}]': a family's comparison is [A, B] (its metric "
                    f"is the family's, {key}.metric), got {pair!r}."
                )
            _check_pair(pair, f"{key}.comparisons[{index}]", modes)


def _check_metric(metric: str, key: str) -> None:
    try:
        metric_name(metric)
    except TipcapError as e:
        raise TipcapError(f"config key '{key}': {e}".replace("--metric ", "")) from None


def _check_pair(pair: list[str], key: str, modes: dict[str, list[str]]) -> None:
    for reference in pair:
        cell, _, prompt = reference.partition(":")
        if cell not in modes:
            raise TipcapError(
                f"config key '{key}': {cell!r} is not a cell of this grid ({', '.join(modes)})."
            )
        if prompt and prompt not in modes[cell]:
            raise TipcapError(
                f"config key '{key}': {cell} is evaluated with prompts {', '.join(modes[cell])} only."
            )
        if not prompt and "none" not in modes[cell] and len(modes[cell]) > 1:
            raise TipcapError(
                f"config key '{key}': name the prompt mode of {cell}, e.g. {cell}:{modes[cell][0]}."
            )


def load_ablation(path: str | Path, overrides: list[str] | None = None) -> AblationConfig:
    """Read an ablation YAML, apply ``key=value`` overrides, and validate it like experiment configs."""
    path = Path(path)
    data = read_yaml_mapping(
        path, f"{path}: no such ablation config.", "a mapping of ablation settings and cells"
    )
    config = from_dict(AblationConfig, apply_overrides(data, overrides or []))
    _validate(config, path)
    return config


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
