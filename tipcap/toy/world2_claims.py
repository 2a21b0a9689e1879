"""Checking a caption's claims against a toy-world-2 scene: colour, shape, size and relation F1.

A caption is read with the world's grammar (:func:`tipcap.toy.world2_grammar.parse`) and each kind of claim is
compared, as a set, with the same kind of fact about the scene:

| aspect | a claim, a fact |
|---|---|
| ``colour`` | a colour named / present |
| ``shape`` | a shape named / present |
| ``size`` | a (colour, shape, size) named with its size / present |
| ``relation`` | a canonical relation stated / holding between two single objects |

Precision counts the caption's claims that hold, recall the scene's facts that the caption states; F1 is
0 where nothing matches (also where the caption states nothing of that kind). A caption of the grammar
states only what holds, so its precision is 1 on every aspect it speaks of. Which objects a caption names
is object F1's, for both worlds (:func:`tipcap.toy.plugin.object_f1`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tipcap.data.karpathy import ImageId, image_id_of
from tipcap.io import load_json
from tipcap.toy.world1 import ShapeObject
from tipcap.toy.world2 import full_description
from tipcap.toy.world2_grammar import parse

ASPECTS = ("colour", "shape", "size", "relation")


@dataclass(frozen=True)
class Agreement:
    """How far a caption's claims of one kind agree with the scene's facts of that kind."""

    precision: float
    recall: float
    f1: float


def _agreement(claims: set[Hashable], facts: set[Hashable]) -> Agreement:
    hits = len(claims & facts)
    if hits == 0:
        return Agreement(0.0, 0.0, 0.0)
    precision, recall = hits / len(claims), hits / len(facts)
    return Agreement(precision, recall, 2 * precision * recall / (precision + recall))


def _aspects(groups: Iterable, relations: Iterable) -> dict[str, set[Hashable]]:
    groups = list(groups)
    return {
        "colour": {g.colour for g in groups},
        "shape": {g.shape for g in groups},
        "size": {(g.colour, g.shape, g.size) for g in groups if g.size},
        "relation": set(relations),
    }


def _objects(scene: list[dict] | list[ShapeObject]) -> list[ShapeObject]:
    return [o if isinstance(o, ShapeObject) else ShapeObject(**o) for o in scene]


def claim_agreement(caption: str, scene: list[dict] | list[ShapeObject]) -> dict[str, Agreement]:
    """Per aspect (:data:`ASPECTS`), how the caption's claims agree with the scene.

    ``scene`` is the scene's objects, as :class:`ShapeObject` or as the dictionaries a world-2 Karpathy
    file records (colour, shape, size, x, y).
    """
    stated = parse(caption)
    truth = full_description(_objects(scene))
    claims, facts = _aspects(stated.groups, stated.relations), _aspects(truth.groups, truth.relations)
    return {aspect: _agreement(claims[aspect], facts[aspect]) for aspect in ASPECTS}


def claim_f1(caption: str, scene: list[dict] | list[ShapeObject]) -> dict[str, float]:
    """Per aspect, the F1 of a caption's claims against the scene, e.g. ``{"colour": 1.0, ...}``."""
    return {aspect: agreement.f1 for aspect, agreement in claim_agreement(caption, scene).items()}


def mean_claim_f1(captions: Iterable[str], scenes: Iterable[list[dict]]) -> dict[str, float]:
    """Per aspect, the mean F1 over captions paired with their scenes (one caption per scene)."""
    scores = [claim_f1(caption, scene) for caption, scene in zip(captions, scenes, strict=True)]
    if not scores:
        raise ValueError("no captions to score")
    return {aspect: sum(s[aspect] for s in scores) / len(scores) for aspect in ASPECTS}


def scene_records(karpathy: Path) -> dict[ImageId, list[dict]]:
    """Each image's objects (colour, shape, size, x, y) per image id, for a toy-world-2 Karpathy file;
    empty for any other file (world 1's relations are not in its language)."""
    document = load_json(karpathy)
    if document.get("world") != 2:
        return {}
    return {image_id_of(entry): entry["objects"] for entry in document["images"] if "objects" in entry}
