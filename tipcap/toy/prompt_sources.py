"""Evaluation prompts drawn from the toy scenes' objects (the prompt sources the toy worlds register in
:mod:`tipcap.evaluation.registry`).

- ``oracle``: the image's true objects;
- ``oracle-one``: one of them, drawn;
- ``oracle-missing``: one that the model's caption without prompts leaves out, drawn (the object a person
  would click); an image whose caption names every object gets no word;
- ``wrong``: as many entities of the model's vocabulary, drawn from those absent from the image.

Each image's draw is seeded by ``eval.prompt_seed`` and the image's id alone (a string seed, hashed the same
way in every process), so an image gets the same words whichever other images are evaluated with it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

from tipcap.data.karpathy import ImageId
from tipcap.errors import TipcapError
from tipcap.evaluation.registry import PromptRequest, PromptSource


def wrong_prompts(
    objects: Mapping[ImageId, Sequence[str]],
    image_ids: Sequence[ImageId],
    vocabulary: Sequence[str],
    seed: int,
) -> list[list[str]]:
    """Entities absent from each image: as many as its true objects, drawn without replacement from
    ``vocabulary`` minus those objects."""
    names = list(dict.fromkeys(vocabulary))
    prompts = []
    for image_id in image_ids:
        present = set(objects[image_id])
        absent = [name for name in names if name not in present]
        draw = random.Random(f"wrong-prompts:{seed}:{image_id!r}")
        prompts.append(draw.sample(absent, min(len(objects[image_id]), len(absent))))
    return prompts


def oracle_one_prompts(
    objects: Mapping[ImageId, Sequence[str]], image_ids: Sequence[ImageId], seed: int
) -> list[list[str]]:
    """One true object per image, drawn; none for an image without objects."""
    return [
        [random.Random(f"oracle-one:{seed}:{image_id!r}").choice(list(objects[image_id]))]
        if objects[image_id]
        else []
        for image_id in image_ids
    ]


def missing_object_prompts(
    objects: Mapping[ImageId, Sequence[str]],
    image_ids: Sequence[ImageId],
    captions: Sequence[str],
    mentions: Callable[[str], set[str]],
    seed: int,
) -> list[list[str]]:
    """Per image, one of its true objects that its caption (``captions``, in ``image_ids`` order) does not
    mention, drawn; none where the caption names them all."""
    prompts = []
    for image_id, caption in zip(image_ids, captions, strict=True):
        named = mentions(caption)
        missing = [name for name in dict.fromkeys(objects[image_id]) if name not in named]
        draw = random.Random(f"oracle-missing:{seed}:{image_id!r}")
        prompts.append([draw.choice(missing)] if missing else [])
    return prompts


def _wrong(request: PromptRequest) -> list[list[str]]:
    if not request.vocabulary:
        raise TipcapError(
            "eval.prompt wrong draws entities from the model's prompt vocabulary, and this model was "
            "trained without prompts; evaluate it with prompt none."
        )
    return wrong_prompts(request.objects, request.image_ids, request.vocabulary, request.seed)


PROMPT_SOURCES: dict[str, PromptSource] = {
    "oracle": lambda request: [list(request.objects[image_id]) for image_id in request.image_ids],
    "oracle-one": lambda request: oracle_one_prompts(request.objects, request.image_ids, request.seed),
    "oracle-missing": lambda request: missing_object_prompts(
        request.objects, request.image_ids, request.unprompted(), request.mentions, request.seed
    ),
    "wrong": _wrong,
}
