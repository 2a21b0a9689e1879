"""Object hallucination: CHAIR-i and CHAIR-s (Rohrbach et al. 2018, "Object Hallucination in Image
Captioning").

A caption *mentions* objects; a mention is *hallucinated* when its object is not among the image's true
objects. Over a set of captions, one per image:

    CHAIR-i = hallucinated mentions / all mentions          (every mention counts, repeats included)
    CHAIR-s = captions with >= 1 hallucinated mention / all captions

On COCO the objects are the 80 instance categories. :class:`CocoObjectWords` finds their mentions in a
caption with the synonym list kept in ``resources/coco_synonyms.json`` (singular words, plurals by rule,
phrases such as "hot dog" and "teddy bear" matched whole and before their words, and the qualifier rules of
the published metric: "baby elephant" names an elephant and no person). An image's true objects are the
categories of its instance annotations (:func:`load_instances`, a COCO ``instances_*.json``) together with
those its reference captions mention, as in the published metric; an evaluation scores only the images the
instance file lists (:func:`tipcap.evaluation.evaluate.evaluate_split`). :func:`chair` takes any mention
finder and truth, so the toy world scores its own objects the same way (:mod:`tipcap.toy.plugin`).
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tipcap.data.karpathy import ImageId
from tipcap.errors import TipcapError
from tipcap.io import load_json

_TOKEN = re.compile(r"[a-z]+")


def plural(word: str, irregular: Mapping[str, str]) -> str:
    """The plural of a singular word or phrase (its last word): ``irregular`` first, then English rules."""
    *head, last = word.split(" ")
    if last in irregular:
        last = irregular[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*head, last])


def tokens(caption: str) -> list[str]:
    """Lower-case words of letters only: ``"Hot-dogs, two!"`` → ``["hot", "dogs", "two"]``."""
    return _TOKEN.findall(caption.lower())


@dataclass(frozen=True)
class Mention:
    """One object named in a caption: the words as written (``"puppies"``) and the object (``"dog"``)."""

    words: str
    object: str


@dataclass
class CocoObjectWords:
    """Finds the COCO categories a caption mentions, from a synonym file (default: the packaged one).

    Use :meth:`load`. ``forms`` maps each word or phrase (as a tuple of words, singular and plural) to
    its category.
    """

    categories: list[str]
    forms: dict[tuple[str, ...], str]
    qualifiers: dict[str, frozenset[str]]
    not_objects: frozenset[tuple[str, ...]]
    unless_mentioned: dict[str, str]
    source: str
    longest: int = field(init=False)

    def __post_init__(self) -> None:
        self.longest = max(len(phrase) for phrase in [*self.forms, *self.not_objects])

    @classmethod
    def load(cls, path: str | Path | None = None) -> CocoObjectWords:
        """Read a synonym file (the schema of ``resources/coco_synonyms.json``)."""
        if path is None:
            resource = importlib.resources.files("tipcap") / "resources" / "coco_synonyms.json"
            document, source = json.loads(resource.read_text(encoding="utf-8")), "coco_synonyms.json"
        else:
            document, source = load_json(Path(path)), str(path)
        try:
            irregular = dict(document.get("plurals", {}))
            forms: dict[tuple[str, ...], str] = {}
            categories = []
            for category in document["categories"]:
                categories.append(category["name"])
                for word in category["synonyms"]:
                    for form in (word, plural(word, irregular)):
                        forms.setdefault(tuple(form.split(" ")), category["name"])
            qualifiers: dict[str, frozenset[str]] = {}
            for rule in document.get("qualifiers", []):
                before = frozenset(f for w in rule["before"] for f in (w, plural(w, irregular)))
                for word in rule["words"]:
                    qualifiers[word] = qualifiers.get(word, frozenset()) | before
            not_objects = frozenset(
                tuple(form.split(" "))
                for phrase in document.get("not_objects", [])
                for form in (phrase, plural(phrase, irregular))
            )
            unless = {
                f: category
                for word, category in document.get("unless_mentioned", {}).items()
                for f in (word, plural(word, irregular))
            }
        except (KeyError, TypeError, AttributeError) as e:
            raise TipcapError(f"{source}: not a synonym file of COCO categories ({e!r} is wrong).") from None
        return cls(categories, forms, qualifiers, not_objects, unless, source)

    def mentions(self, caption: str) -> list[Mention]:
        """The objects a caption mentions, in order, once per mention.

        Words are read left to right, the longest phrase first ("hot dog" before "dog"); a qualifier
        directly before a word it qualifies is skipped; a word listed in ``unless_mentioned`` is dropped
        when the caption also mentions that category ("toilet seat" is no chair).
        """
        words = tokens(caption)
        found: list[Mention] = []
        i = 0
        while i < len(words):
            qualified = self.qualifiers.get(words[i])
            if qualified is not None and i + 1 < len(words) and words[i + 1] in qualified:
                i += 1
                continue
            step = 1
            for size in range(min(self.longest, len(words) - i), 0, -1):
                phrase = tuple(words[i : i + size])
                if phrase in self.not_objects:
                    step = size
                    break
                if phrase in self.forms:
                    found.append(Mention(" ".join(phrase), self.forms[phrase]))
                    step = size
                    break
            i += step
        named = {mention.object for mention in found}
        return [m for m in found if self.unless_mentioned.get(m.words) not in named]

    def objects(self, caption: str) -> list[str]:
        """The categories of :meth:`mentions`, once per mention."""
        return [mention.object for mention in self.mentions(caption)]


def load_instances(path: str | Path, words: CocoObjectWords) -> dict[ImageId, set[str]]:
    """The categories annotated in each image of a COCO instance annotation file (``instances_*.json``).

    Images listed in ``images`` without annotations map to an empty set.

    Raises:
        TipcapError: naming the file, when it is not a COCO instance file, an annotation names a category
            id the file does not define, or a category is not one of ``words``' categories.
    """
    path = Path(path)
    document = load_json(path)
    what = "a COCO instance annotation file (instances_*.json, with 'annotations' and 'categories')"
    if not isinstance(document, dict):
        raise TipcapError(f"--instances {path}: not {what}.")
    for key in ("annotations", "categories"):
        if not isinstance(document.get(key), list):
            raise TipcapError(f"--instances {path}: no '{key}' list; expected {what}.")
    known = set(words.categories)
    names: dict[Any, str] = {}
    for index, category in enumerate(document["categories"]):
        if not (isinstance(category, dict) and "id" in category and isinstance(category.get("name"), str)):
            raise TipcapError(f"--instances {path}: categories[{index}] has no 'id' and 'name'.")
        if category["name"] not in known:
            raise TipcapError(
                f"--instances {path}: category {category['name']!r} (id {category['id']}) is not one of "
                "COCO's 80 categories; CHAIR reads COCO instance annotations only."
            )
        names[category["id"]] = category["name"]
    objects: dict[ImageId, set[str]] = {}
    for image in document.get("images") or []:
        if isinstance(image, dict) and "id" in image:
            objects.setdefault(image["id"], set())
    for index, annotation in enumerate(document["annotations"]):
        if not isinstance(annotation, dict) or "image_id" not in annotation:
            raise TipcapError(f"--instances {path}: annotations[{index}] has no 'image_id'.")
        category = annotation.get("category_id")
        if category not in names:
            raise TipcapError(
                f"--instances {path}: annotations[{index}] has category_id {category!r}, which 'categories' "
                "does not define."
            )
        objects.setdefault(annotation["image_id"], set()).add(names[category])
    return objects


def coco_truth(
    references: Mapping[ImageId, Sequence[str]],
    instances: Mapping[ImageId, set[str]],
    words: CocoObjectWords,
) -> dict[ImageId, set[str]]:
    """Each image's true objects: its annotated categories plus those its reference captions mention."""
    return {
        image_id: set(instances.get(image_id, ())).union(*(words.objects(c) for c in captions))
        for image_id, captions in references.items()
    }


@dataclass
class ChairResult:
    """CHAIR over a set of captions, with the counts behind it and each image's mentions.

    ``chair_i`` is ``None`` when no caption mentions any object. ``per_image`` maps an image id to
    ``{"mentioned": [...], "hallucinated": [...]}`` (objects, once per mention, in caption order).
    """

    chair_i: float | None
    chair_s: float
    mentions: int
    hallucinated_mentions: int
    captions: int
    hallucinated_captions: int
    per_image: dict[ImageId, dict[str, list[str]]]

    def counts(self) -> dict[str, int]:
        """The four counts, for a report."""
        return {"mentions": self.mentions, "hallucinated_mentions": self.hallucinated_mentions,
                "captions": self.captions, "hallucinated_captions": self.hallucinated_captions}  # fmt: skip


def chair(
    captions: Mapping[ImageId, str],
    truth: Mapping[ImageId, Iterable[str]],
    mentions: Callable[[str], list[str]],
) -> ChairResult:
    """CHAIR-i and CHAIR-s of one caption per image.

    Args:
        captions: image id → caption.
        truth: image id → the objects in the image (must cover every captioned image).
        mentions: the objects a caption mentions, once per mention (e.g. :meth:`CocoObjectWords.objects`).
    """
    if not captions:
        raise TipcapError("CHAIR: no captions to score.")
    total = hallucinated_total = hallucinated_captions = 0
    per_image: dict[ImageId, dict[str, list[str]]] = {}
    for image_id, caption in captions.items():
        present = set(truth[image_id])
        named = mentions(caption)
        wrong = [name for name in named if name not in present]
        total += len(named)
        hallucinated_total += len(wrong)
        hallucinated_captions += bool(wrong)
        per_image[image_id] = {"mentioned": named, "hallucinated": wrong}
    return ChairResult(
        chair_i=hallucinated_total / total if total else None,
        chair_s=hallucinated_captions / len(captions),
        mentions=total,
        hallucinated_mentions=hallucinated_total,
        captions=len(captions),
        hallucinated_captions=hallucinated_captions,
        per_image=per_image,
    )
