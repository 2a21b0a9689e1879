"""Toy world 1: coloured shapes on a plain background, each image with five paraphrased captions.

Every real command runs on it unchanged: it is written as an image folder, a Karpathy split file (with
train/val/test splits, and each image's objects in an extra ``objects`` field), a JSONL of web pairs in
which a share of the captions belongs to another image, so all four data settings exist offline, and an
entity vocabulary of its (colour, shape) objects for prompts. :func:`caption_objects` reads the objects a
caption names back out of the world's language (world 2's shapes too); :mod:`tipcap.toy.plugin` scores
captions of either world with it.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tipcap.io import atomic_path
from tipcap.progress import progress_bar

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "pink": (245, 130, 190),
    "brown": (130, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
BACKGROUNDS = {
    "gray": (200, 200, 200),
    "white": (245, 245, 240),
    "black": (40, 40, 45),
    "beige": (215, 195, 160),
}
_PLURAL = {"cross": "crosses"}
# What a seed renders and captions: bump whenever a change makes a seed produce another world, so that
# caches keyed by it (the demo's) are not reused across the change.
GENERATOR_VERSION = 3


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene: what it is, and where (its centre, as a fraction of the image side)."""

    colour: str
    shape: str
    size: str
    x: float
    y: float


def _relation(first: ShapeObject, second: ShapeObject) -> str:
    """How ``first`` stands to ``second``: the larger of the horizontal and vertical offsets decides."""
    dx, dy = second.x - first.x, second.y - first.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _name(obj: ShapeObject, with_size: bool) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"


def captions_for(objects: list[ShapeObject], background: str, rng: random.Random) -> list[str]:
    """Five different captions of a scene, drawn from a small grammar of paraphrases.

    Like real captions they leave things unsaid: sizes half of the time, the background in a few
    templates only, the grain of the image never.
    """
    a = [_name(o, rng.random() < 0.5) for o in objects]
    if len(objects) == 1:
        templates = [
            f"a {a[0]}.",
            f"a {a[0]} on a {background} background.",
            f"there is a {a[0]} in the picture.",
            f"a picture of a {a[0]}.",
            f"a single {a[0]} in the middle of a {background} image.",
            f"an image showing a {a[0]}.",
            f"one {a[0]} on a plain background.",
        ]
    elif len(objects) == 2:
        relation = _relation(objects[0], objects[1])
        templates = [
            f"a {a[0]} {relation} a {a[1]}.",
            f"a {a[0]} and a {a[1]}.",
            f"two shapes: a {a[0]} and a {a[1]}.",
            f"a {a[1]} next to a {a[0]}.",
            f"there is a {a[0]} {relation} a {a[1]}.",
            f"a picture of a {a[0]} and a {a[1]} on a {background} background.",
            f"a {a[0]} is {relation} a {a[1]}.",
        ]
    else:
        templates = [
            f"a {a[0]}, a {a[1]} and a {a[2]}.",
            f"three shapes: a {a[0]}, a {a[1]} and a {a[2]}.",
            f"a {a[0]} {_relation(objects[0], objects[1])} a {a[1]}, and a {a[2]}.",
            f"a picture of a {a[2]}, a {a[0]} and a {a[1]}.",
            f"there are three shapes, a {a[1]}, a {a[0]} and a {a[2]}.",
            f"a {a[0]} and a {a[1]} with a {a[2]} nearby.",
            f"a {a[0]}, a {a[1]} and a {a[2]} on {background}.",
        ]
    return rng.sample(templates, 5)


def random_scene(rng: random.Random) -> list[ShapeObject]:
    """1–3 objects at separated positions."""
    count = rng.choice((1, 2, 2, 3))
    cells = rng.sample([(x, y) for x in (0.25, 0.5, 0.75) for y in (0.25, 0.5, 0.75)], count)
    objects = []
    for x, y in cells:
        colour, shape, size = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES)
        objects.append(
            ShapeObject(colour, shape, size, x + rng.uniform(-0.06, 0.06), y + rng.uniform(-0.06, 0.06))
        )
    return objects


def _star(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def render(
    objects: list[ShapeObject],
    size: int,
    background: str = "gray",
    grain: float = 0.04,
    noise: np.random.Generator | None = None,
    radii: tuple[float, float] = (0.16, 0.09),
) -> Image.Image:
    """Draw a scene as an RGB image of ``size`` × ``size`` pixels on a background, with ``grain`` noise.

    ``radii`` are a large and a small object's radius as a fraction of the side (world 2 draws smaller
    ones; its star and ring are drawn here too). The grain is Gaussian noise (mean 128, sd 6, as PIL's
    ``effect_noise``) drawn from ``noise`` (default: a generator seeded with 0). PIL's ``effect_noise``
    itself draws from the C library's ``rand()``, whose state is the whole process's: the same seed then
    rendered other pixels after anything else in the process had drawn from it (a second world, a test run
    before).
    """
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    for obj in objects:
        radius = size * (radii[0] if obj.size == "large" else radii[1])
        cx, cy = obj.x * size, obj.y * size
        colour = COLOURS[obj.colour]
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "ring":
            draw.ellipse(box, outline=colour, width=max(2, round(radius / 2.5)))
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        elif obj.shape == "triangle":
            draw.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour
            )
        elif obj.shape == "diamond":
            draw.polygon(
                [(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=colour
            )
        elif obj.shape == "star":
            draw.polygon(_star(cx, cy, radius * 1.15), fill=colour)
        else:
            bar = radius / 3
            draw.rectangle([cx - radius, cy - bar, cx + radius, cy + bar], fill=colour)
            draw.rectangle([cx - bar, cy - radius, cx + bar, cy + radius], fill=colour)
    noise = noise if noise is not None else np.random.default_rng(0)
    return Image.blend(image, grain_image(size, noise), grain)


def grain_image(size: int, noise: np.random.Generator) -> Image.Image:
    """Gaussian grain (mean 128, sd 6, as PIL's ``effect_noise``) as a ``size`` × ``size`` RGB image."""
    pixels = np.clip(np.rint(128 + 6 * noise.standard_normal((size, size))), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "L").convert("RGB")


# World 2's shapes are read too, so that object F1 scores its captions; world 1's captions never name them.
_SHAPE_FORMS = {
    form: shape for shape in (*SHAPES, "star", "ring") for form in (shape, _PLURAL.get(shape, shape + "s"))
}
_PAIR = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(_SHAPE_FORMS) + r")\b")


def object_mentions(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, in order, once per mention (plurals made singular)."""
    return [(colour, _SHAPE_FORMS[form]) for colour, form in _PAIR.findall(caption.lower())]


def caption_objects(caption: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, e.g. ``{("red", "circle")}`` (plurals made singular)."""
    return set(object_mentions(caption))


def write_toyworld(
    out: str | Path,
    seed: int = 0,
    train: int = 20_000,
    val: int = 500,
    test: int = 500,
    image_size: int = 32,
    web_mismatch: float = 0.2,
    progress: bool = False,
) -> Path:
    """Generate the world into ``out``: ``images/``, ``toyworld.json`` (Karpathy) and ``web_pairs.jsonl``.

    ``web_pairs.jsonl`` pairs each training image with one of its captions, except for a share
    ``web_mismatch`` of the lines whose caption belongs to another image (as in noisy web data).
    Returns the Karpathy file.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    entries = []
    splits = ["train"] * train + ["val"] * val + ["test"] * test
    bar = progress_bar(splits, disable=not progress, desc="rendering the toy world", unit="image")
    for index, split in enumerate(bar):
        objects = random_scene(rng)
        background, grain = rng.choice(list(BACKGROUNDS)), rng.uniform(0.02, 0.2)
        image = render(objects, image_size, background, grain, scene_noise(seed, index))
        captions = captions_for(objects, background, rng)
        entries.append(save_scene(out, index, split, image, objects, background, captions))
    header = {"dataset": "toyworld", "generator": GENERATOR_VERSION, "seed": seed}
    return write_world_files(out, entries, header, entity_vocabulary(), rng, web_mismatch)


def scene_noise(seed: int, index: int) -> np.random.Generator:
    """The generator of one image's grain, seeded by (seed, index): no state outside the world."""
    return np.random.default_rng([abs(seed), index])  # abs: as random.Random(seed)


def save_scene(
    out: Path,
    index: int,
    split: str,
    image: Image.Image,
    objects: Sequence[Any],
    background: str,
    captions: list[str],
) -> dict[str, Any]:
    """Save one scene's image as ``out/images/toy_<index>.png`` and return its Karpathy entry (with the
    scene's objects, dataclasses of either world, and background)."""
    filename = f"toy_{index:06d}.png"
    image.save(out / "images" / filename)
    return {
        "filepath": "images",
        "filename": filename,
        "imgid": index,
        "split": split,
        "objects": [asdict(o) for o in objects],
        "background": background,
        "sentences": [{"raw": c, "tokens": re.findall(r"[a-z0-9]+", c)} for c in captions],
    }


def write_world_files(
    out: Path,
    entries: list[dict],
    header: dict,
    entities: dict,
    rng: random.Random,
    web_mismatch: float,
) -> Path:
    """Write a world's web pairs (a share ``web_mismatch`` of the training images with another training
    image's caption, drawn from ``rng``), its entity vocabulary and, last, its Karpathy file (``header``
    and the image ``entries``); return the Karpathy file's path."""
    web_lines = []
    train_entries = [e for e in entries if e["split"] == "train"]
    for entry in train_entries:
        source = rng.choice(train_entries) if rng.random() < web_mismatch else entry
        caption = rng.choice(source["sentences"])["raw"]
        web_lines.append(json.dumps({"image": f"images/{entry['filename']}", "caption": caption}))
    with atomic_path(out / "web_pairs.jsonl") as tmp:
        tmp.write_text("\n".join(web_lines) + "\n", encoding="utf-8")
    with atomic_path(out / "entities.json") as tmp:
        tmp.write_text(json.dumps(entities, indent=1), encoding="utf-8")
    # Written last: its presence is what tells a cache that the whole world is there.
    karpathy = out / "toyworld.json"
    with atomic_path(karpathy) as tmp:
        tmp.write_text(json.dumps({**header, "images": entries}), encoding="utf-8")
    return karpathy


def entity_vocabulary() -> dict:
    """The world's prompt vocabulary: one entity per (colour, shape), e.g. "red circle" (plural forms too)."""
    entities = [
        {
            "name": f"{colour} {shape}",
            "forms": [f"{colour} {form}" for form in _SHAPE_FORMS if _SHAPE_FORMS[form] == shape],
        }
        for colour in COLOURS
        for shape in SHAPES
    ]
    return {"source": "tipcap toy world: coloured shapes", "entities": entities}
