"""What ``tipcap serve`` serves: its models, the images sent to it, and their captions.

A :class:`CaptionService` loads its models once and shares one CLIP among the models that read the same CLIP
(the demo's methods all do). An uploaded image is decoded in memory, embedded with each CLIP once, and kept
as its embeddings only, under the SHA-256 of its bytes, for re-captioning with other prompt words, beam
widths or methods; the last :data:`HELD_IMAGES` are kept. Nothing is written to disk.

Captioning runs under one lock: the models are shared and ``generate`` is not meant to be run on one
model from several threads at once, so concurrent requests are answered one after the other, each
exactly as it would be alone. Nothing here knows HTTP: a request the page can fix raises
:class:`RequestError`, whose message the page shows.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from tipcap.data.images import FORMAT_NAMES, IMAGE_FORMATS, ImageError
from tipcap.errors import TipcapError
from tipcap.evaluation.adherence import mentioned_words
from tipcap.grid.models import trained_models
from tipcap.model import TIPCap
from tipcap.model_folder import CONFIG_NAME

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
"""The default upload limit: 10 MiB per image."""
HELD_IMAGES = 256
"""How many uploaded images are kept (as embeddings) for re-captioning."""
MAX_BEAMS = 10
MAX_PROMPT_WORDS = 16
"""The most prompt words a request may give a method; a prompt-interaction model takes fewer, its
``max_prompt_words`` (:meth:`CaptionService.prompt_limit`)."""
MAX_WORD_LENGTH = 64
GUESSES = 5
"""How many of CLIP's entity guesses are returned per image."""


class RequestError(TipcapError):
    """A request the user can fix; ``status`` is the HTTP status that answers it."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def find_models(path: str | Path) -> dict[str, Path]:
    """The model directories under ``path``, by name.

    ``path`` is a model directory (named after itself, or after its parent when it is called ``model``, as
    in a training run), or a grid's output folder such as ``tipcap demo``'s (one model per cell, named after
    the cell, with ``-seed<N>`` kept only when the folder holds several seeds).
    """
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return {(path.parent.name if path.name == "model" else path.name) or "model": path}
    models = trained_models(path)
    if not models:
        raise TipcapError(
            f"{path}: holds no tipcap model (a model directory with {CONFIG_NAME}, or the output folder of "
            "`tipcap demo` or `tipcap ablate`); run `tipcap demo --quick` first, or pass --model DIR."
        )
    runs = {name: re.fullmatch(r"(.+)-seed(\d+)", name) for name in models}
    if all(runs.values()) and len({run.group(2) for run in runs.values()}) == 1:
        return {runs[name].group(1): model for name, model in models.items()}
    return models


def load_models(paths: Sequence[str | Path], device: str | None = None) -> dict[str, TIPCap]:
    """Every model :func:`find_models` finds under each path, loaded; a repeated name gets ``-2``, ``-3``…"""
    models: dict[str, TIPCap] = {}
    for path in paths:
        for name, directory in find_models(path).items():
            unique, count = name, 1
            while unique in models:
                count += 1
                unique = f"{name}-{count}"
            models[unique] = TIPCap.from_pretrained(directory, device=device)
    return models


def decode_image(name: str, data: bytes) -> Image.Image:
    """Decode an uploaded image fully, in memory, to RGB; a clear :class:`RequestError` otherwise.

    Only the formats of :data:`~tipcap.data.images.IMAGE_FORMATS` are decoded, whatever else Pillow reads.
    """
    if not data:
        raise RequestError(f"{name}: the file is empty.")
    try:
        with warnings.catch_warnings():
            # Pillow only warns below twice its pixel limit; such an image is refused as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                image.load()
                return image.convert("RGB")
    except UnidentifiedImageError:
        raise RequestError(f"{name}: not an image (give a {FORMAT_NAMES} file).") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(
            f"{name}: more than {Image.MAX_IMAGE_PIXELS:,} pixels; scale it down first."
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(f"{name}: truncated or damaged image ({e}).") from None


def prompt_words(words: Any, limit: int = MAX_PROMPT_WORDS) -> list[str]:
    """Checked prompt words: a list of at most ``limit`` non-empty strings, each stripped, lower-cased, said
    once."""
    if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
        raise RequestError('prompt: give a list of words, e.g. ["dog", "frisbee"].')
    cleaned = [" ".join(word.split()).lower() for word in words]
    if any(not word for word in cleaned):
        raise RequestError("prompt: an empty word; type one or more words, separated by commas.")
    if len(set(cleaned)) > limit or any(len(word) > MAX_WORD_LENGTH for word in cleaned):
        raise RequestError(f"prompt: at most {limit} words of at most {MAX_WORD_LENGTH} characters each.")
    return list(dict.fromkeys(cleaned))


def _size(count: int) -> str:
    """A byte count for people: ``10 MB``, ``29 KB``."""
    return f"{count / 2**20:.1f} MB".replace(".0 MB", " MB") if count >= 2**20 else f"{count / 2**10:.0f} KB"


@dataclass
class HeldImage:
    """An uploaded image as the server keeps it: its name and what has been computed from it."""

    name: str
    embeddings: dict[str, torch.Tensor]
    """CLIP image embedding ``[d]`` per CLIP (keyed by its identity)."""
    plain: dict[tuple[str, int], str] = field(default_factory=dict)
    """The caption without prompt, per (method, beam width)."""
    guesses: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    """CLIP's entity guesses, per method whose vocabulary gave them."""


def _unknown_note(words: list[str], prompt: str) -> str:
    """What a prompt-trained model does with words outside its entity vocabulary, for the page."""
    listed = ", ".join(f"“{word}”" for word in words)
    one = len(words) == 1
    them, they = ("it", "it") if one else ("them", "they")
    how = (
        f"CLIP encodes {them} as it encodes the vocabulary, and the model attends to {them}"
        if prompt == "pim"
        else f"{'it is' if one else 'they are'} written into its text prompt as typed"
    )
    return (
        f"{listed} {'is' if one else 'are'} outside this model's vocabulary: {how}, but the model never met "
        f"{them} in training, so {they} may steer the caption little or oddly."
    )


class CaptionService:
    """Models, by method name, and the images uploaded to them.

    Args:
        models: the loaded models, in the order the page lists them.
        max_upload_bytes: the largest image accepted, in bytes.
        held_images: how many uploaded images are kept for re-captioning.
    """

    def __init__(
        self,
        models: dict[str, TIPCap],
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        held_images: int = HELD_IMAGES,
    ):
        if not models:
            raise TipcapError("no model to serve.")
        self.models = models
        self.max_upload_bytes = max_upload_bytes
        self._held_images = held_images
        self._images: OrderedDict[str, HeldImage] = OrderedDict()
        self._lock = threading.Lock()
        self._clip_key: dict[str, str] = {}
        self._embedder: dict[str, TIPCap] = {}
        for name, model in models.items():
            if model.clip_spec is None:
                raise TipcapError(f"model {name}: it does not record its CLIP, so it cannot caption images.")
            key = json.dumps(model.clip_spec.identity(), sort_keys=True)
            self._clip_key[name] = key
            if key in self._embedder:
                model.pipeline.use_clip(self._embedder[key].pipeline.clip)  # one CLIP in memory per identity
            else:
                self._embedder[key] = model
                model.pipeline.clip  # noqa: B018 - loaded now rather than at the first request
        # Entity guesses come from the method's own vocabulary, else from another method on the same CLIP.
        self._vocabulary_of: dict[str, str | None] = {}
        for name in models:
            sources = [name] + [other for other in models if self._clip_key[other] == self._clip_key[name]]
            source = next((s for s in sources if models[s].entity_names), None)
            self._vocabulary_of[name] = source
            if source is not None:
                models[source].pipeline.entity_vocabulary()  # encoded now for hard-prompt models

    def describe(self) -> dict[str, Any]:
        """The methods served (name, prompt mode and how many prompt words each takes), the default one and
        the limits, for the page."""
        prompted = [name for name, model in self.models.items() if model.config.prompt != "none"]
        return {
            "methods": [
                {"name": name, "prompt": model.config.prompt, "max_prompt_words": self.prompt_limit(name)}
                for name, model in self.models.items()
            ],
            "default": (prompted or list(self.models))[0],
            "max_upload_bytes": self.max_upload_bytes,
            "max_beams": MAX_BEAMS,
        }

    def prompt_limit(self, method: str) -> int:
        """The most prompt words ``method`` takes: a prompt-interaction model reads its
        ``max_prompt_words`` and no more, so more are refused rather than silently left out."""
        config = self.models[method].config
        return min(config.max_prompt_words, MAX_PROMPT_WORDS) if config.prompt == "pim" else MAX_PROMPT_WORDS

    def add_image(self, name: str, data: bytes) -> dict[str, Any]:
        """Decode and embed an uploaded image and keep it; ``{"image_id", "image", "width", "height"}``."""
        name = name.strip()[:200] or "image"
        if len(data) > self.max_upload_bytes:
            raise RequestError(self.too_large(name, len(data)), status=413)
        image = decode_image(name, data)
        for model in self._embedder.values():
            try:
                # Checked here as well as in preprocessing, so that the answer names the upload.
                model.pipeline.clip.preprocess.check(image, name)
            except ImageError as e:
                raise RequestError(f"{e}.") from None
        image_id = hashlib.sha256(data).hexdigest()[:32]
        with self._lock:
            held = self._images.get(image_id)
            if held is None:
                embeddings = {}
                for key, model in self._embedder.items():
                    rows, _, _ = model.pipeline.embed_images([image])
                    embeddings[key] = rows[0]
                held = self._images[image_id] = HeldImage(name, embeddings)
                while len(self._images) > self._held_images:
                    self._images.popitem(last=False)
            self._images.move_to_end(image_id)
        return {"image_id": image_id, "image": name, "width": image.width, "height": image.height}

    def too_large(self, name: str, size: int) -> str:
        """The message for an upload of ``size`` bytes over the limit."""
        limit = _size(self.max_upload_bytes)
        return f"{name}: {_size(size)} is over the upload limit of {limit}; scale it down."

    def caption(self, image_id: str, method: str, prompt: Any = None, beams: int = 3) -> dict[str, Any]:
        """Caption a held image with one method, without prompt and with the prompt words given.

        Returns ``{"image_id", "image", "method", "caption", "plain", "prompt", "mentioned", "missing",
        "unknown", "guesses", "note"}``: ``caption`` with the prompt words, ``plain`` without any, ``prompt``
        the words the model used, ``mentioned`` and ``missing`` those of them its caption names and leaves
        out (:func:`tipcap.evaluation.adherence.mentioned_words`), ``unknown`` those outside the model's
        entity vocabulary, ``guesses`` CLIP's entity guesses ``[{"word", "probability"}]`` and ``note`` a
        remark for the page (``None`` when there is none).
        """
        model = self.models.get(method)
        if model is None:
            raise RequestError(f"method {method!r}: not served; choose one of {', '.join(self.models)}.")
        words = prompt_words([] if prompt is None else prompt, self.prompt_limit(method))
        if isinstance(beams, bool) or not isinstance(beams, int) or not 1 <= beams <= MAX_BEAMS:
            raise RequestError(f"beams: give a whole number from 1 to {MAX_BEAMS}.")
        with self._lock:
            held = self._images.get(image_id)
            if held is None:
                raise RequestError(
                    f"image {image_id}: not held by the server (it keeps the last {self._held_images} "
                    "images); send it again.",
                    status=404,
                )
            self._images.move_to_end(image_id)
            embedding = held.embeddings[self._clip_key[method]][None]
            if (method, beams) not in held.plain:
                held.plain[(method, beams)] = model.caption(embeddings=embedding, num_beams=beams)[0].caption
            plain = held.plain[(method, beams)]
            caption, used, note = plain, [], None
            if model.config.prompt == "none":
                note = "this method was trained without prompts; prompt words do not change its caption."
            elif words:
                result = model.caption(embeddings=embedding, prompts=words, num_beams=beams)[0]
                caption, used = result.caption, result.prompt
            guesses = self._guesses(held, method, embedding)
        known = set(model.entity_names)
        unknown = [word for word in used if word not in known]
        if unknown:
            note = _unknown_note(unknown, model.config.prompt)
        named = mentioned_words(used, caption)
        return {
            "image_id": image_id,
            "image": held.name,
            "method": method,
            "caption": caption,
            "plain": plain,
            "prompt": used,
            "mentioned": [word for word in used if word in named],
            "missing": [word for word in used if word not in named],
            "unknown": unknown,
            "guesses": [{"word": word, "probability": round(p, 4)} for word, p in guesses],
            "note": note,
        }

    def _guesses(self, held: HeldImage, method: str, embedding: torch.Tensor) -> list[tuple[str, float]]:
        source = self._vocabulary_of[method]
        if source is None:
            return []
        if source not in held.guesses:
            guesses = self.models[source].pipeline.entity_guesses(embedding, top_k=GUESSES, threshold=None)
            held.guesses[source] = guesses[0]
        return held.guesses[source]
