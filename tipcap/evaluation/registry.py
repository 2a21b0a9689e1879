"""What evaluation learns from worlds that plug into it: ground-truth objects, scorers and prompt sources.

A world is a kind of data whose files record more about their images than references (the toy worlds'
scenes). It plugs in through the Python entry point group :data:`ENTRY_POINT_GROUP`, each entry a
:class:`World`, declared in the packaging metadata of whatever installs it::

    [options.entry_points]
    tipcap.worlds =
        toy = tipcap.toy.plugin:WORLD

so that the library imports no world: it finds them where ``pip install`` wrote them down. A world gives

- the **ground truth** of a data file: each image's objects, by name, and which names a caption mentions
  (read by CHAIR, by prompt adherence and by the prompt sources);
- **scorers**: per-image scores of a caption against what the file records of its image, with the result
  columns they add and the ones among them that get intervals (:mod:`tipcap.evaluation.stats`);
- **prompt sources**: evaluation prompt modes drawn from the ground truth (``EvalConfig.prompt``), next to
  the built-in :data:`BUILTIN_PROMPTS`.

A world's scorers apply to the data files whose ground truth it reads; on any other file (COCO) no world's
scorer runs and no world's column is written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tipcap.errors import TipcapError

if TYPE_CHECKING:
    from tipcap.data.karpathy import ImageId

ENTRY_POINT_GROUP = "tipcap.worlds"
BUILTIN_PROMPTS = ("none", "auto")
"""Prompt modes every evaluation has: no prompt words, or CLIP's zero-shot entities."""


@dataclass(frozen=True)
class Scorer:
    """Scores of captions against what a data file records of each image.

    ``columns`` are the result columns it adds, in order. Those in ``interval_metrics`` are scored per image
    by ``per_image`` (kept in ``scores.json``, with intervals) and reported as the mean over the scored
    images; the others are ``summary``'s, over the same images.
    """

    name: str
    columns: tuple[str, ...]
    records: Callable[[Path], Mapping[ImageId, Any]]
    """What a data file records of each image it can score (empty: none)."""
    interval_metrics: tuple[str, ...] = ()
    per_image: Callable[[str, Any], dict[str, float]] | None = None
    """One caption against its image's record → its ``interval_metrics``."""
    summary: Callable[[Sequence[str], Sequence[Any]], dict[str, float]] | None = None
    """Captions and their images' records → the columns outside ``interval_metrics``."""


@dataclass(frozen=True)
class PromptRequest:
    """What a prompt source draws one evaluation's prompt words from."""

    image_ids: Sequence[ImageId]
    objects: Mapping[ImageId, Sequence[str]]
    """Each image's ground-truth objects (every image of ``image_ids`` has an entry)."""
    mentions: Callable[[str], set[str]]
    """The object names a caption mentions."""
    seed: int
    """``eval.prompt_seed``."""
    vocabulary: Sequence[str]
    """The model's prompt entities (empty: a model trained without prompts)."""
    unprompted: Callable[[], list[str]]
    """The model's captions without prompt words, in ``image_ids`` order (decoded when called)."""


PromptSource = Callable[[PromptRequest], list[list[str]]]
"""Prompt words per image, in ``image_ids`` order."""


@dataclass(frozen=True)
class World:
    """A world's plug-in: how to read its data files' ground truth, and its scorers and prompt sources."""

    name: str
    objects: Callable[[Path], dict[ImageId, list[str]]]
    """Each image's ground-truth objects by name, where a data file records them (empty: not this world's)."""
    mentions: Callable[[str], list[str]]
    """The object names a caption mentions, once per mention."""
    scorers: tuple[Scorer, ...] = ()
    prompt_sources: Mapping[str, PromptSource] = field(default_factory=dict)


@dataclass(frozen=True)
class GroundTruth:
    """The objects a data file records of its images, and the world that names them (``None``: none)."""

    objects: Mapping[ImageId, Sequence[str]]
    world: World | None

    def mentions(self, caption: str) -> set[str]:
        """The world's object names a caption mentions."""
        return set(self.world.mentions(caption)) if self.world is not None else set()


NO_TRUTH = GroundTruth({}, None)


@functools.cache
def worlds() -> tuple[World, ...]:
    """The installed worlds, by entry point name (loaded once per process)."""
    found = []
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            world = entry.load()
        except (ImportError, AttributeError) as e:
            raise TipcapError(
                f"entry point {entry.name} = {entry.value} of group {ENTRY_POINT_GROUP} does not load ({e}); "
                "reinstall the package that declares it (pip install -e . for tipcap's own worlds)."
            ) from None
        if not isinstance(world, World):
            raise TipcapError(
                f"entry point {entry.name} = {entry.value} of group {ENTRY_POINT_GROUP} is not a "
                "tipcap.evaluation.registry.World; fix the package that declares it."
            )
        found.append(world)
    return tuple(found)


def prompt_sources() -> dict[str, PromptSource]:
    """Every installed world's prompt sources by mode (each a mode that needs ground truth)."""
    return {mode: source for world in worlds() for mode, source in world.prompt_sources.items()}


def prompt_modes() -> tuple[str, ...]:
    """The evaluation prompt modes: the built-in ones, then the installed prompt sources'."""
    return (*BUILTIN_PROMPTS, *prompt_sources())


def interval_metrics() -> tuple[str, ...]:
    """Every installed scorer's metrics with per-image scores."""
    return tuple(m for world in worlds() for scorer in world.scorers for m in scorer.interval_metrics)


def ground_truth(data: Path) -> GroundTruth:
    """The ground truth a data file records: the first installed world's that reads any (else
    :data:`NO_TRUTH`)."""
    for world in worlds():
        objects = world.objects(Path(data))
        if objects:
            return GroundTruth(objects, world)
    return NO_TRUTH


def scorers_for(truth: GroundTruth) -> tuple[Scorer, ...]:
    """The scorers that apply to a data file of ``truth``: its world's (none without a world)."""
    return truth.world.scorers if truth.world is not None else ()
