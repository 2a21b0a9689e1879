"""Checking an ablation grid's config key by key as it is read (:func:`load_ablation`): each error names the
key to change."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tipcap.config import SETTINGS, ExperimentConfig, GapConfig, apply_overrides, from_dict, read_yaml_mapping
from tipcap.data.karpathy import check_split
from tipcap.errors import TipcapError
from tipcap.grid.compare import metric_name, metric_names
from tipcap.grid.config import (
    BASELINES,
    CELL_KINDS,
    CELL_STAGES,
    AblationConfig,
    Cell,
    Job,
    candidate_label,
    candidates,
    expand,
    resolve,
)

_PERCENT = re.compile(r"\d+(\.\d+)?%")
_NAME = re.compile(r"[\w.+-]+")


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
