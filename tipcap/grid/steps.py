"""A grid's work as explicit steps: embedding stores, gaps, trainings and evaluations.

A :class:`Step` names the steps it reads (its inputs), where it writes (its output), the provenance key it
would be built with (:mod:`tipcap.provenance`; worked out once its inputs are built) and the key its output
records. :class:`Steps` runs a step after its inputs, each once per grid run: a step whose recorded key is the
one it would be built with is reused, any other is built, with a line saying why (``not built yet``, or which
config keys and inputs changed). A changed input changes the keys of the steps that read it (they record
their inputs' digests), so a change reaches exactly the steps downstream of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from tipcap import provenance
from tipcap.errors import TipcapError
from tipcap.io import load_json
from tipcap.store import META, open_matching

Key = dict[str, Any]


@dataclass(eq=False)
class Step:
    """One artifact of a grid.

    Args:
        kind: ``store``, ``gap``, ``training`` or ``evaluation``.
        name: the artifact's name within its kind (a folder or file name).
        output: where it is written.
        key: the provenance key it would be built with (called once its inputs are built).
        recorded: the key its output records; ``None`` while it is not (wholly) built.
        build: builds it into ``output``.
        inputs: the steps it reads, built first.
        section: how its config keys are named in a reason (``gap.`` for a gap's ``noise_scale``).
    """

    kind: str
    name: str
    output: Path
    key: Callable[[], Key]
    recorded: Callable[[], Key | None]
    build: Callable[[], object]
    inputs: list[Step] = field(default_factory=list)
    section: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


class Steps:
    """Runs steps in dependency order, each at most once; ``echo`` receives one line per step built."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.done: set[str] = set()

    def run(self, step: Step) -> Path:
        """Build ``step``'s inputs, then ``step`` itself unless its recorded key is current; its output."""
        if step.label in self.done:
            return step.output
        for needed in step.inputs:
            self.run(needed)
        wanted, recorded = _canonical(step.key()), step.recorded()
        if recorded != wanted:
            self.echo(
                f"{step.label}: {'rebuilding' if recorded else 'building'} ({reason(step, recorded, wanted)})"
            )
            step.build()
        self.done.add(step.label)
        return step.output

    def current(self, step: Step, building: Callable[[Step], bool]) -> bool:
        """Whether ``step`` is built with the key it would be built with now: the inputs ``building``
        accepts are built as needed, the others must be current themselves."""
        if step.label in self.done:
            return True
        for needed in step.inputs:
            if building(needed):
                self.run(needed)
            elif not self.current(needed, building):
                return False
        return step.recorded() == _canonical(step.key())


def reason(step: Step, recorded: Key | None, wanted: Key) -> str:
    """Why ``step`` is built: ``not built yet``, or the config keys and inputs that changed."""
    if recorded is None:
        return "not built yet"
    parts = []
    changed = _differences(recorded.get("config"), wanted.get("config"), step.section)
    if changed:
        parts.append(f"its config changed: {', '.join(changed[:4])}" + (", …" if len(changed) > 4 else ""))
    before, now = recorded.get("inputs") or {}, wanted.get("inputs") or {}
    inputs = sorted(name for name in {*before, *now} if before.get(name) != now.get(name))
    if inputs:
        parts.append(f"its inputs changed: {', '.join(inputs)}")
    return "; ".join(parts) or "it records another artifact"


def _differences(before: Any, now: Any, prefix: str) -> list[str]:
    """The dotted keys at which two JSON values differ (``prefix`` leading)."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [
            found
            for name in sorted({*before, *now})
            for found in _differences(before.get(name), now.get(name), f"{prefix}{name}.")
        ]
    return [] if before == now else [prefix.removesuffix(".") or "(all)"]


def _canonical(key: Key) -> Key:
    """``key`` as a JSON file records it (tuples as lists), so that it compares equal to a recorded one."""
    return json.loads(json.dumps(key))


def by_content(key: Key) -> Key:
    """``key`` with each config value that gives the path of an input whose digest it records (a config
    key named as the input, in any section: ``data.gap`` for the input ``gap``) replaced by a mark.

    A training's config names its stores, gap and starting decoder by absolute path, and they live in the
    grid's folder: moved to another disk or machine, the folder keeps what they hold (the digests) but not
    where. Compared by content, its trainings are reused there."""
    key = _canonical(key)
    config, inputs = key.get("config"), key.get("inputs")
    if isinstance(config, dict) and isinstance(inputs, dict):
        for section in config.values():
            if isinstance(section, dict):
                for name in inputs.keys() & section.keys():
                    if isinstance(section[name], str):
                        section[name] = "(the input's digest)"
    return key


# -- recorded keys --------------------------------------------------------------------------------------


def store_key(folder: Path) -> Key | None:
    """The key of the finished, whole store in ``folder`` (its files match their checksums)."""
    recorded = _read(folder / META).get("key")
    return recorded if isinstance(recorded, dict) and open_matching(folder, recorded)[0] is not None else None


def gap_key(path: Path) -> Key | None:
    """The key of the gap file at ``path``, from the provenance record saved in its metadata."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as saved:
            metadata = saved.metadata() or {}
        return provenance.key(json.loads(metadata["provenance"]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None


def folder_key(folder: Path, finished: str) -> Key | None:
    """The key of the ``provenance.json`` in ``folder`` once ``finished`` (a file in it) is written."""
    record = _read(folder / provenance.FILE_NAME) if (folder / finished).is_file() else {}
    return provenance.key(record) if all(name in record for name in provenance.KEY_FIELDS) else None


def _read(path: Path) -> dict[str, Any]:
    """A JSON object file; empty when missing or damaged (what it records is then not built)."""
    try:
        found = load_json(path)
    except (OSError, TipcapError):
        return {}
    return found if isinstance(found, dict) else {}
