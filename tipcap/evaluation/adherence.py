"""Prompt adherence: whether a caption mentions the entities it was prompted with.

For each image given prompt words, the share of its prompted entities that its caption mentions
(``Adherence``) and whether it mentions every one of them (``Adherence-all``: 1 or 0). An evaluation's
figure is the mean over its prompted images; images without prompt words have no score. With ``wrong``
prompts (entities absent from the image) ``Adherence`` is the share of wrong words the caption repeats.

What counts as a mention depends on what the prompt words are:

- on a world whose data records each image's objects (:mod:`tipcap.evaluation.registry`), the world's
  names: on a toy world, the exact (colour, shape) pair (``"brown diamond"``): a caption that names a brown
  circle and an orange diamond does not mention a brown diamond;
- elsewhere, the entity itself or any of its forms in the entity vocabulary, or a synonym of its COCO
  category in CHAIR's synonym list (:class:`tipcap.evaluation.chair.CocoObjectWords`): "a man" mentions
  ``person``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tipcap.evaluation.chair import CocoObjectWords
from tipcap.evaluation.registry import worlds
from tipcap.prompts import EntityVocabulary

ADHERENCE_METRICS = ("Adherence", "Adherence-all")
_TOKEN = re.compile(r"[a-z0-9]+")

Mentions = Callable[[str], set[str]]
"""The entity names a caption mentions."""


def vocabulary_mentions(vocabulary: EntityVocabulary, words: CocoObjectWords | None = None) -> Mentions:
    """A caption's entities: the vocabulary's names of the forms it contains, and, with ``words``, the COCO
    categories of the object words it contains (CHAIR's synonyms: "man" → ``person``)."""

    def mentions(caption: str) -> set[str]:
        found = set(vocabulary.extract(caption))
        if words is not None:
            found |= set(words.objects(caption))
        return found

    return mentions


@functools.cache
def packaged_mentions() -> Mentions:
    """:func:`vocabulary_mentions` of the packaged entity vocabulary and COCO's words, read once."""
    return vocabulary_mentions(EntityVocabulary.load(), CocoObjectWords.load())


def mentioned_words(words: Sequence[str], caption: str) -> list[str]:
    """The prompt words a caption mentions, whatever world they come from (for a page that does not know
    it): as written (the word's tokens in a row), as an object an installed world names (a toy (colour,
    shape) pair), or as a name of the packaged entity vocabulary or a COCO category (its forms and CHAIR's
    synonyms)."""
    tokens = f" {' '.join(_TOKEN.findall(caption.lower()))} "
    named = packaged_mentions()(caption).union(*(world.mentions(caption) for world in worlds()))
    return [
        word for word in words if word in named or f" {' '.join(_TOKEN.findall(word.lower()))} " in tokens
    ]


@dataclass(frozen=True)
class ImageAdherence:
    """One prompted image: the prompt words its caption mentions, their share and whether that is all."""

    mentioned: list[str]
    share: float
    complete: bool


def image_adherence(prompt: Sequence[str], caption: str, mentions: Mentions) -> ImageAdherence | None:
    """How one caption follows its prompt words; ``None`` without prompt words (nothing to follow). A word
    prompted twice counts once."""
    words = list(dict.fromkeys(prompt))
    if not words:
        return None
    found = mentions(caption)
    mentioned = [word for word in words if word in found]
    return ImageAdherence(mentioned, len(mentioned) / len(words), len(mentioned) == len(words))


def adherence(
    prompts: Mapping[Any, Sequence[str]], captions: Mapping[Any, str], mentions: Mentions
) -> tuple[dict[str, float | None], dict[Any, ImageAdherence]]:
    """The evaluation's ``Adherence`` and ``Adherence-all`` (means over the prompted images; ``None`` when
    no image was prompted) and each prompted image's :class:`ImageAdherence`, over the images of
    ``captions``."""
    per_image = {
        image_id: found
        for image_id, caption in captions.items()
        if (found := image_adherence(prompts.get(image_id, ()), caption, mentions)) is not None
    }
    if not per_image:
        return dict.fromkeys(ADHERENCE_METRICS), per_image
    count = len(per_image)
    return {
        "Adherence": sum(found.share for found in per_image.values()) / count,
        "Adherence-all": sum(found.complete for found in per_image.values()) / count,
    }, per_image
