"""What a grid checks before it builds anything, and ``grid.json``, the record of the grid run into a folder.

Missing input files, a split without images to select on, and oracle or wrong prompts without ground-truth
objects are refused by their config keys before anything is recorded or built (so that a corrected rerun
into the same ``out`` is not taken for another grid).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tipcap.config import to_dict
from tipcap.data.karpathy import read_karpathy
from tipcap.errors import TipcapError
from tipcap.evaluation.registry import prompt_sources
from tipcap.grid.config import AblationConfig, Cell
from tipcap.io import write_json_atomic

FEW_PAIRS_DRAW = "data_seed + seed"
"""How a seed's few-pairs subset is drawn, recorded in ``grid.json``: folders written before drew one subset
for every seed, and their few-pairs decoders and gaps must not be mixed with per-seed ones."""


def check_inputs(config: AblationConfig) -> None:
    """Refuse missing input files and folders by their config key, before anything is recorded or built
    (so that a corrected rerun into the same ``out`` is not taken for another grid)."""
    cells = config.cells
    inputs = {"karpathy": config.karpathy, "eval_karpathy": config.eval_karpathy,
              "vocabulary": config.vocabulary}  # fmt: skip
    if any(cell.setting == "web-pairs" for cell in cells):
        inputs["web_pairs"] = config.web_pairs
    for key, value in inputs.items():
        if value and not Path(value).is_file():
            raise TipcapError(f"config key '{key}': {value} is not a file; check the path.")
    folders = {"image_root": config.image_root, "eval_image_root": config.eval_image_root}
    if any(cell.setting == "web-pairs" for cell in cells):
        folders["web_image_root"] = config.web_image_root
    for key, value in folders.items():
        if value and not Path(value).is_dir():
            raise TipcapError(f"config key '{key}': {value} is not a folder; check the path.")


def check_selection(
    config: AblationConfig, karpathy: Path, select_objects: Callable[[], Mapping[Any, Sequence[str]]]
) -> None:
    """Where cells select: refuse a Karpathy file without images in ``select_split``, and oracle or wrong
    prompts (a selecting cell's first mode) where a validation image records no objects; checked before
    anything is recorded or built."""
    selecting = [index for index, cell in enumerate(config.cells) if cell.select]
    if not selecting:
        return
    split = config.select_split
    images = read_karpathy(karpathy, split)
    if not images:
        raise TipcapError(
            f"config key 'select_split': {karpathy} has no {split} images to choose the setting of "
            f"cells[{selecting[0]}] on; set select_split to a held-out split the file has (val), or "
            "remove select from the cells."
        )
    asking = [i for i in selecting if config.cells[i].eval_prompts[0] in prompt_sources()]
    if asking:
        objects = select_objects()
        missing = [image.image_id for image in images if image.image_id not in objects]
        if missing:
            raise TipcapError(
                f"config key 'cells[{asking[0]}].eval_prompts': a selecting cell chooses with its first "
                f"prompt mode, drawn from each image's ground-truth objects, but {len(missing)} of the "
                f"{len(images)} {split} images of {karpathy} record no 'objects'; list none or auto "
                "first."
            )


def check_oracle_prompts(
    config: AblationConfig, eval_karpathy: Path, eval_objects: Callable[[], Mapping[Any, Sequence[str]]]
) -> None:
    """Refuse ``oracle`` and ``wrong`` evaluation prompts where an evaluation image records no objects.

    The oracle's words are the image's ground-truth objects, and the wrong words are drawn from the
    entities outside them; an image without objects would be prompted with nothing, silently. Checked
    before any store is built or decoder trained.
    """
    asking = [
        index for index, cell in enumerate(config.cells) if set(prompt_sources()) & set(cell.eval_prompts)
    ]
    if not asking:
        return
    split = config.eval_split
    images = read_karpathy(eval_karpathy, split)
    missing = [image.image_id for image in images if image.image_id not in eval_objects()]
    if missing:
        raise TipcapError(
            f"config key 'cells[{asking[0]}].eval_prompts': oracle and wrong prompts are drawn from "
            f"the ground-truth objects of each image, but {len(missing)} of the {len(images)} {split} "
            f"images of {eval_karpathy} record no 'objects' (image {missing[0]!r} first); evaluate "
            "with none or auto prompts, or on a file that records its scenes' objects (the toy world's)."
        )


def record_grid(config: AblationConfig, out: Path) -> None:
    """Refuse to mix results of a grid with other data, CLIP or grid-wide stages into ``out``; remember this
    one in ``grid.json`` (its cells in the order first run, which the web app lists models in)."""
    path = out / "grid.json"
    current = to_dict(config)
    # Where the stores are kept and which comparisons are reported change no result; a changed split or
    # metric of selection chooses anew among the same candidates (the chosen one is evaluated again).
    unrecorded = (
        "cells",
        "seeds",
        "store_dir",
        "compare",
        "families",
        "select_split",
        "select_metric",
        "select_seeds",
    )
    fixed = {k: v for k, v in current.items() if k not in unrecorded}
    fixed["few_pairs_draw"] = FEW_PAIRS_DRAW
    cells = {c["name"]: _recorded(c) for c in current["cells"]}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved["cells"] = {name: _recorded(c) for name, c in saved["cells"].items()}
        if not any(c.get("setting") == "few-pairs" for c in saved["cells"].values()):
            saved["fixed"].setdefault("few_pairs_draw", FEW_PAIRS_DRAW)  # nothing was drawn there
        changed = [k for k in fixed if saved["fixed"].get(k) != fixed[k]]
        if changed:
            raise TipcapError(
                f"--out {out} holds results of a grid with other {', '.join(changed)}; "
                "use another --out, or the same values."
            )
        # A changed cell needs no refusal: its steps' provenance keys change, and they are rebuilt.
        cells = {**saved["cells"], **cells}
    write_json_atomic(path, {"fixed": fixed, "cells": cells})


def _recorded(cell: dict[str, Any]) -> dict[str, Any]:
    """A cell as ``grid.json`` keeps it: without its ``eval_prompts`` (a rerun may add modes) and without the
    keys at their defaults, so that a key added to cells later leaves every folder's record as it was."""
    defaults = to_dict(Cell(name=cell["name"]))
    return {k: v for k, v in cell.items() if k != "eval_prompts" and (k == "name" or defaults.get(k, v) != v)}
