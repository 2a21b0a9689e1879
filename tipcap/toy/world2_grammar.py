"""The language of toy world 2: captions drawn from a grammar, and the same grammar read backwards.

A caption names every group of objects of its scene ("a small red circle", "two blue stars"), sizes some of
the time, and states up to two relations between single objects ("a red circle is to the left of a blue
star"). :func:`describe` writes captions of a scene; :func:`parse` reads a caption's claims back out, so that
captions (a decoder's or a retrieved one) can be checked against the scene (:mod:`tipcap.toy.world2_claims`).

Relations are canonical: "right of" is stored as the swapped "left of", "below" as the swapped "above", and
"next to" with its two objects in sorted order, so that a claim and the scene's fact compare equal.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown")
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring")
SIZES = ("small", "large")
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
    "next to": ("next to", "beside"),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
INVERSE = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
    "next to": "next to",
}
# At most this many relations per caption: longer captions would pass the text towers' context.
MAX_STATED_RELATIONS = 2

_PLURALS = {shape: ("crosses" if shape == "cross" else shape + "s") for shape in SHAPES}
_SHAPE_FORMS = {**{s: s for s in SHAPES}, **{p: s for s, p in _PLURALS.items()}}
_SIZE_FORMS = {word: size for size, words in SIZE_WORDS.items() for word in words}
_RELATION_FORMS = {word: rel for rel, words in RELATION_WORDS.items() for word in words}
_NUMBERS = {"a": 1, "an": 1, "one": 1, "the": None, "two": 2, "three": 3, "four": 4}
_MENTION = re.compile(
    r"\b(?P<det>a|an|one|the|two|three|four)\s+"
    r"(?:(?P<size>" + "|".join(_SIZE_FORMS) + r")\s+)?"
    r"(?P<colour>" + "|".join(COLOURS) + r")\s+"
    r"(?P<shape>" + "|".join(sorted(_SHAPE_FORMS, key=len, reverse=True)) + r")\b"
)
# What may stand between two mentions for the second to be the object of a relation: a verb, then the
# relation's words.
_RELATION_BETWEEN = re.compile(
    r"^\s*(?:(?:is|sits|lies|stands)\s+)?(?P<rel>"
    + "|".join(sorted(_RELATION_FORMS, key=len, reverse=True))
    + r")\s*$"
)


@dataclass(frozen=True)
class Group:
    """Objects of a scene alike in colour, shape and size; ``size`` is None where a caption leaves it out."""

    count: int
    colour: str
    shape: str
    size: str | None


@dataclass(frozen=True)
class Relation:
    """A canonical relation between two single objects, each named by (colour, shape)."""

    subject: tuple[str, str]
    relation: str  # "left of", "above" or "next to"
    object: tuple[str, str]


def canonical(subject: tuple[str, str], relation: str, obj: tuple[str, str]) -> Relation:
    """The one form of a relation: right of and below swapped into left of and above; next to sorted."""
    if relation == "right of":
        return Relation(obj, "left of", subject)
    if relation == "below":
        return Relation(obj, "above", subject)
    if relation == "next to":
        first, second = sorted((subject, obj))
        return Relation(first, "next to", second)
    return Relation(subject, relation, obj)


@dataclass(frozen=True)
class Claims:
    """What a caption states: its groups of objects and its relations (both as sets)."""

    groups: frozenset[Group]
    relations: frozenset[Relation]


def noun_phrase(group: Group, rng: random.Random) -> str:
    """A group in words, e.g. "a small red circle" or "two blue stars" (the size where the group has one,
    in one of its synonyms)."""
    size = f"{rng.choice(SIZE_WORDS[group.size])} " if group.size else ""
    shape = group.shape if group.count == 1 else _PLURALS[group.shape]
    words = f"{size}{group.colour} {shape}"
    if group.count == 1:
        return f"an {words}" if words[0] in "aeiou" else f"a {words}"
    return f"{COUNT_WORDS[group.count]} {words}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(
    groups: list[Group],
    relations: list[tuple[int, str, int]],
    background: str,
    rng: random.Random,
    count: int = 5,
) -> list[str]:
    """``count`` different captions of a scene, at varying detail.

    ``groups`` are the scene's groups with their sizes; ``relations`` hold (group index, relation word,
    group index) for pairs of single objects, with the relation as seen from the first. Each caption names
    every group; sizes are given in about half of them, and up to :data:`MAX_STATED_RELATIONS` relations
    in some. Up to ``20 · count`` drafts are drawn; fewer captions come back only for scenes with fewer
    different wordings.
    """
    captions: list[str] = []
    for _ in range(20 * count):
        if len(captions) == count:
            break
        sized = rng.random() < 0.5
        said = [Group(g.count, g.colour, g.shape, g.size if sized else None) for g in groups]
        stated = rng.sample(relations, min(len(relations), rng.choice((0, 1, MAX_STATED_RELATIONS))))
        draft = _sentence(said, stated, background, rng)
        if draft not in captions:
            captions.append(draft)
    return captions


def _sentence(
    groups: list[Group], stated: list[tuple[int, str, int]], background: str, rng: random.Random
) -> str:
    total = sum(g.count for g in groups)
    clauses, used = [], set()
    for first, relation, second in stated:
        if rng.random() < 0.5:
            first, relation, second = second, INVERSE[relation], first
        verb = rng.choice(("", "is ", "sits "))
        subject = noun_phrase(groups[first], rng) if first not in used else _the(groups[first])
        obj = noun_phrase(groups[second], rng) if second not in used else _the(groups[second])
        clauses.append(f"{subject} {verb}{rng.choice(RELATION_WORDS[relation])} {obj}")
        used.update((first, second))
    rest = [noun_phrase(g, rng) for i, g in enumerate(groups) if i not in used]
    if clauses:
        text = ", and ".join(clauses)
        if rest:
            text += rng.choice((", with ", ", and ", " and there is also ")) + _join(rest)
    else:
        listed = _join(rest)
        shapes = "one shape" if total == 1 else f"{COUNT_WORDS[total]} shapes"
        text = rng.choice((
            listed,
            f"a picture of {listed}",
            f"an image showing {listed}",
            f"there {'is' if groups[0].count == 1 else 'are'} {listed}",
            f"{shapes}: {listed}",
            f"{listed} on a {background} background",
            f"a {background} background with {listed}",
        ))  # fmt: skip
    return text + "."


def _the(group: Group) -> str:
    """A group named again, as "the red circle" (the size, where said, already came with its first name)."""
    return f"the {group.colour} {group.shape}"


def parse(caption: str) -> Claims:
    """The groups and relations a caption states, read with the grammar of :func:`describe`.

    A mention is a determiner or number, an optional size, a colour and a shape; "the ..." names a group
    again. Two consecutive mentions with only a relation's words (and a verb) between them make a relation.
    Groups named more than once with and without a size keep the size.
    """
    text = caption.lower()
    mentions = list(_MENTION.finditer(text))
    groups: dict[tuple[str, str], Group] = {}
    for match in mentions:
        key = (match["colour"], _SHAPE_FORMS[match["shape"]])
        size = _SIZE_FORMS[match["size"]] if match["size"] else None
        number = _NUMBERS[match["det"]]
        known = groups.get(key)
        if known is None:
            groups[key] = Group(number or 1, *key, size)
        elif size and known.size is None:
            groups[key] = Group(known.count, *key, size)
    relations = set()
    for left, right in itertools.pairwise(mentions):
        between = _RELATION_BETWEEN.match(text[left.end() : right.start()])
        if between:
            subject = (left["colour"], _SHAPE_FORMS[left["shape"]])
            obj = (right["colour"], _SHAPE_FORMS[right["shape"]])
            relations.add(canonical(subject, _RELATION_FORMS[between["rel"]], obj))
    return Claims(frozenset(groups.values()), frozenset(relations))


_SHAPE_WORD = re.compile(r"\b(" + "|".join(sorted(_SHAPE_FORMS, key=len, reverse=True)) + r")\b")
_SIZE_WORD = re.compile(r"\b(" + "|".join(_SIZE_FORMS) + r")\b")
_RELATION_PHRASE = re.compile(
    r"\b(" + "|".join(sorted(_RELATION_FORMS, key=len, reverse=True)) + r")\b"
    r"(?=\s+(?:a|an|one|two|three|four|the)\b)"
)


def perturb(caption: str, rng: random.Random) -> str:
    """The caption with one claim made false: a shape changed to another (in the same number), a size to
    the other size, or a relation to its inverse ("left of" to "right of"; "next to" is left alone).

    A hard negative for contrastive training: it shares the caption's colours and most of its words, so an
    image tower tells the two apart only by reading shapes, sizes and places.
    """
    edits = []
    for match in _SHAPE_WORD.finditer(caption):
        shape = _SHAPE_FORMS[match[1]]
        plural = match[1] != shape
        other = rng.choice([s for s in SHAPES if s != shape])
        edits.append((match.span(1), _PLURALS[other] if plural else other))
    for match in _SIZE_WORD.finditer(caption):
        other = "large" if _SIZE_FORMS[match[1]] == "small" else "small"
        edits.append((match.span(1), rng.choice(SIZE_WORDS[other])))
    for match in _RELATION_PHRASE.finditer(caption):
        relation = _RELATION_FORMS[match[1]]
        if relation != "next to":
            edits.append((match.span(1), rng.choice(RELATION_WORDS[INVERSE[relation]])))
    (start, end), replacement = rng.choice(edits)
    return caption[:start] + replacement + caption[end:]
