"""Scoring captions against the truth of the toy world's scenes.

Because the world knows every scene, a caption can be checked against it: :func:`object_f1` compares the
(colour, shape) pairs a caption names with the scene's objects; :func:`scene_chair` is CHAIR-i and CHAIR-s
(:mod:`tipcap.evaluation.chair`) with the scene as the truth, exactly, where COCO has to piece it together
from annotations and reference captions; :func:`scene_objects` reads the objects from a Karpathy file (also
the words of the ``oracle`` evaluation prompts).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tipcap.data.karpathy import ImageId, image_id_of
from tipcap.evaluation.chair import ChairResult, chair
from tipcap.io import load_json
from tipcap.toy.world import ShapeObject, caption_objects, object_mentions


def object_f1(caption: str, objects: list[dict] | list[ShapeObject]) -> float:
    """F1 between the (colour, shape) pairs named in a caption and those in the scene (0 when none match)."""
    truth = {(o["colour"], o["shape"]) if isinstance(o, dict) else (o.colour, o.shape) for o in objects}
    named = caption_objects(caption)
    hits = len(named & truth)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(named), hits / len(truth)
    return 2 * precision * recall / (precision + recall)


def mentioned_objects(caption: str) -> list[str]:
    """The objects a caption names, once per mention, as scene object names (``"red circle"``)."""
    return [f"{colour} {shape}" for colour, shape in object_mentions(caption)]


def scene_chair(captions: Mapping[ImageId, str], objects: Mapping[ImageId, list[str]]) -> ChairResult:
    """CHAIR of one caption per image against the scenes' objects (names as :func:`scene_objects` gives)."""
    return chair(captions, objects, mentioned_objects)


def scene_objects(karpathy: Path) -> dict[ImageId, list[str]]:
    """Ground-truth (colour, shape) names per image id, where the file records its scenes' objects."""
    document = load_json(karpathy)
    return {
        image_id_of(entry): [f"{o['colour']} {o['shape']}" for o in entry["objects"]]
        for entry in document["images"]
        if "objects" in entry
    }
