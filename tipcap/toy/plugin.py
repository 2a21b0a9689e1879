"""The toy worlds as evaluation sees them: :data:`WORLD`, the entry point ``toy`` of the group
``tipcap.worlds`` (setup.cfg) through which :mod:`tipcap.evaluation.registry` finds them.

Because a toy world knows every scene, a caption can be checked against it:

- **ground truth**: each image's (colour, shape) objects, read from a Karpathy file of either world by
  :func:`scene_objects`, and :func:`mentioned_objects` finds them in a caption; with them CHAIR
  (:mod:`tipcap.evaluation.chair`) takes the scene as the truth, exactly, where COCO has to piece it together
  from annotations and reference captions, and prompt adherence counts a prompted object as mentioned only
  as the exact (colour, shape) pair;
- **object F1** (either world, with intervals): :func:`object_f1` compares the (colour, shape) pairs a
  caption names with the scene's objects;
- **claims F1** (world 2; empty on world 1, whose relations are not in world 2's language): colour, shape,
  size and relation F1 of a caption's parsed claims (:mod:`tipcap.toy.world2_claims`);
- **prompt sources** ``oracle``, ``oracle-one``, ``oracle-missing`` and ``wrong``
  (:mod:`tipcap.toy.prompt_sources`).
"""

from __future__ import annotations

from pathlib import Path

from tipcap.data.karpathy import ImageId, image_id_of
from tipcap.evaluation.registry import Scorer, World
from tipcap.io import load_json
from tipcap.toy.prompt_sources import PROMPT_SOURCES
from tipcap.toy.world1 import ShapeObject, caption_objects, object_mentions
from tipcap.toy.world2_claims import mean_claim_f1, scene_records


def object_f1(caption: str, objects: list[dict] | list[ShapeObject]) -> float:
    """F1 between the (colour, shape) pairs named in a caption and those in the scene (0 when none match).

    ``objects`` are the scene's, as :class:`ShapeObject` or as the dictionaries a Karpathy file of either
    world records."""
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


def scene_objects(karpathy: Path) -> dict[ImageId, list[str]]:
    """Ground-truth (colour, shape) names per image id, where the file records its scenes' objects."""
    return {
        image_id: [f"{o['colour']} {o['shape']}" for o in scene]
        for image_id, scene in _scenes(karpathy).items()
    }


def _scenes(karpathy: Path) -> dict[ImageId, list[dict]]:
    """Each image's objects as its entry records them, for the entries of a Karpathy file that do."""
    document = load_json(karpathy)
    return {image_id_of(entry): entry["objects"] for entry in document["images"] if "objects" in entry}


OBJECT_F1 = Scorer(
    "object F1",
    columns=("object_f1",),
    records=_scenes,
    interval_metrics=("object_f1",),
    per_image=lambda caption, scene: {"object_f1": object_f1(caption, scene)},
)
CLAIMS_F1 = Scorer(
    "claims F1",
    columns=("colour_f1", "shape_f1", "size_f1", "relation_f1"),
    records=scene_records,
    summary=lambda captions, scenes: {f"{a}_f1": f1 for a, f1 in mean_claim_f1(captions, scenes).items()},
)
WORLD = World(
    "toy",
    objects=scene_objects,
    mentions=mentioned_objects,
    scorers=(OBJECT_F1, CLAIMS_F1),
    prompt_sources=PROMPT_SOURCES,
)
