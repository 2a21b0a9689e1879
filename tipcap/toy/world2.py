"""Toy world 2: scenes of one to four objects, far more of them than any training set, at 48 pixels.

An object has a colour (8), a shape (7), a size (2) and a place on a 3 × 3 grid; objects may repeat ("two
red circles"). Single objects stand in one relation to each other: "next to" when side by side in
neighbouring cells of a row, else left of, right of, above or below by the larger offset. Captions come
from :mod:`tipcap.toy.world2_grammar`.

No test scene's full description (its groups with their sizes, and every relation between its single
objects) is among what the training captions state, nor among the training scenes' own full descriptions:
a test (or validation) scene that collides is drawn again. So a decoder has to compose, and the nearest
training caption matches a test scene only in part.

The world is written in the same form as version 1 (:mod:`tipcap.toy.world1`): an image folder, a Karpathy
file whose entries record their ``objects`` (with positions), web pairs and an entity vocabulary.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from tipcap.errors import TipcapError
from tipcap.progress import progress_bar
from tipcap.toy.world1 import BACKGROUNDS, ShapeObject, save_scene, scene_noise, write_world_files
from tipcap.toy.world1 import render as render_objects
from tipcap.toy.world2_grammar import (
    COLOURS,
    SHAPES,
    SIZES,
    Claims,
    Group,
    Relation,
    canonical,
    describe,
    parse,
)

# What a seed renders and captions: bump whenever a change makes a seed produce another world, so that
# caches keyed by it (the demo's) are not reused across the change.
GENERATOR_VERSION = 3
# Three cells a side, centred in the three 16-pixel patches of a 48-pixel image: each object (radius at most
# 0.13 + jitter 0.03 of the side, under the patch's half-width 1/6) lies inside one patch, so that an image
# tower reads an object's shape and size from one token and its place from that token's position.
IMAGE_SIZE = 48
_CELLS = (1 / 6, 1 / 2, 5 / 6)
_JITTER = 0.03
# Share of scenes in which one object is repeated (same colour, shape and size).
_REPEAT = 0.3
# Draws of a validation or test scene before the world is declared too small to hold a novel one.
_MAX_DRAWS = 1_000


def random_scene(rng: random.Random) -> list[ShapeObject]:
    """1–4 objects in distinct cells of a 3 × 3 grid, jittered; in some scenes one object repeats.

    Objects of one colour and shape also share their size, so that "a red circle" names one group.
    """
    count = rng.choice((1, 2, 2, 3, 3, 3, 4, 4, 4))
    cells = rng.sample([(x, y) for y in _CELLS for x in _CELLS], count)
    named = rng.sample([(colour, shape) for colour in COLOURS for shape in SHAPES], count)
    kinds = [(colour, shape, rng.choice(SIZES)) for colour, shape in named]
    if count > 1 and rng.random() < _REPEAT:
        kinds[-1] = rng.choice(kinds[:-1])
    return [
        ShapeObject(*kind, x + rng.uniform(-_JITTER, _JITTER), y + rng.uniform(-_JITTER, _JITTER))
        for kind, (x, y) in zip(kinds, cells, strict=True)
    ]


def cell_labels(objects: list[ShapeObject]) -> list[tuple[int, int, int]]:
    """What each cell of the 3 × 3 grid holds, row by row: (colour, shape, size) as 1-based indices into
    :data:`COLOURS`, :data:`SHAPES` and :data:`SIZES`, (0, 0, 0) for an empty cell. ``[9]`` triples."""
    cells = [(0, 0, 0)] * 9
    for o in objects:
        column = min(range(3), key=lambda i: abs(_CELLS[i] - o.x))
        row = min(range(3), key=lambda i: abs(_CELLS[i] - o.y))
        cells[3 * row + column] = (
            COLOURS.index(o.colour) + 1,
            SHAPES.index(o.shape) + 1,
            SIZES.index(o.size) + 1,
        )
    return cells


def relation(first: ShapeObject, second: ShapeObject) -> str:
    """How ``first`` stands to ``second``: "next to" in neighbouring cells of one row, else by the larger
    offset (left of, right of, above, below)."""
    dx, dy = second.x - first.x, second.y - first.y
    if abs(dy) < 0.15 and abs(dx) < 0.45:
        return "next to"
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def scene_groups(objects: list[ShapeObject]) -> list[Group]:
    """Objects alike in colour, shape and size, counted, in order of first appearance."""
    counts: dict[tuple[str, str, str], int] = {}
    for o in objects:
        counts[(o.colour, o.shape, o.size)] = counts.get((o.colour, o.shape, o.size), 0) + 1
    return [Group(n, colour, shape, size) for (colour, shape, size), n in counts.items()]


def _singles(objects: list[ShapeObject]) -> list[ShapeObject]:
    """The objects whose (colour, shape) is unique in the scene: the ones a relation can name."""
    named = [(o.colour, o.shape) for o in objects]
    return [o for o in objects if named.count((o.colour, o.shape)) == 1]


def scene_relations(objects: list[ShapeObject]) -> frozenset[Relation]:
    """Every canonical relation between two single objects of a scene."""
    singles = _singles(objects)
    return frozenset(
        canonical((a.colour, a.shape), relation(a, b), (b.colour, b.shape))
        for i, a in enumerate(singles)
        for b in singles[i + 1 :]
    )


def full_description(objects: list[ShapeObject]) -> Claims:
    """All a caption could state about a scene: its groups with sizes and all relations of its singles."""
    return Claims(frozenset(scene_groups(objects)), scene_relations(objects))


def scene_captions(
    objects: list[ShapeObject], background: str, rng: random.Random, count: int = 5
) -> list[str]:
    """``count`` captions of a scene from the world's grammar (fewer where it has fewer wordings)."""
    groups = scene_groups(objects)
    index = {(g.colour, g.shape): i for i, g in enumerate(groups)}
    singles = _singles(objects)
    pairs = [
        (index[(a.colour, a.shape)], relation(a, b), index[(b.colour, b.shape)])
        for i, a in enumerate(singles)
        for b in singles[i + 1 :]
    ]
    return describe(groups, pairs, background, rng, count)


def render(
    objects: list[ShapeObject],
    size: int = IMAGE_SIZE,
    background: str = "gray",
    grain: float = 0.04,
    noise: np.random.Generator | None = None,
) -> Image.Image:
    """Draw a scene of world 2 (:func:`tipcap.toy.world1.render` with world 2's smaller objects)."""
    return render_objects(objects, size, background, grain, noise, radii=(0.13, 0.08))


def write_world(
    out: str | Path,
    seed: int = 0,
    train: int = 20_000,
    val: int = 500,
    test: int = 500,
    image_size: int = IMAGE_SIZE,
    web_mismatch: float = 0.2,
    progress: bool = False,
) -> Path:
    """Generate world 2 into ``out``: ``images/``, ``toyworld.json`` (Karpathy), ``web_pairs.jsonl`` and
    ``entities.json``, as :func:`tipcap.toy.world1.write_toyworld` does for world 1.

    Training scenes are drawn first; each validation and test scene is drawn until its full description
    is neither a training scene's nor stated by a training caption. Returns the Karpathy file.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[Claims] = set()
    scenes = []
    for split, n in (("train", train), ("val", val), ("test", test)):
        for _ in range(n):
            for _draw in range(_MAX_DRAWS):
                objects = random_scene(rng)
                background = rng.choice(list(BACKGROUNDS))
                captions = scene_captions(objects, background, rng)
                if split == "train" or full_description(objects) not in seen:
                    break
            else:
                raise TipcapError(
                    f"--train {train}: no {split} scene in {_MAX_DRAWS} draws is new to the training "
                    "captions; use fewer training images"
                )
            if split == "train":
                seen.add(full_description(objects))
                seen.update(parse(caption) for caption in captions)
            scenes.append((split, objects, background, captions, rng.uniform(0.02, 0.15)))
    entries = []
    bar = progress_bar(scenes, disable=not progress, desc="rendering toy world 2", unit="image")
    for index, (split, objects, background, captions, grain) in enumerate(bar):
        image = render(objects, image_size, background, grain, scene_noise(seed, index))
        entries.append(save_scene(out, index, split, image, objects, background, captions))
    header = {"dataset": "toyworld", "world": 2, "generator": GENERATOR_VERSION, "seed": seed}
    return write_world_files(out, entries, header, entity_vocabulary(), rng, web_mismatch)


def entity_vocabulary() -> dict:
    """The world's prompt vocabulary: one entity per (colour, shape), e.g. "red star" (plural forms too)."""
    plural = {shape: ("crosses" if shape == "cross" else shape + "s") for shape in SHAPES}
    entities = [
        {"name": f"{colour} {shape}", "forms": [f"{colour} {shape}", f"{colour} {plural[shape]}"]}
        for colour in COLOURS
        for shape in SHAPES
    ]
    return {"source": "tipcap toy world 2: coloured shapes in relations", "entities": entities}
