"""Captioning images with a trained model: its CLIP, images streamed in batches, prompt words, per-image
errors, timings, and the JSONL of ``tipcap caption --out``.

:class:`CaptionPipeline` holds a :class:`~tipcap.model.TIPCap` and what captioning needs beside the decoder:
the CLIP whose embedding space the model reads (loaded on first need from ``model.clip_spec``, or handed
over with :meth:`~CaptionPipeline.use_clip`), the CLIP text embeddings of the model's prompt vocabulary for
zero-shot prompt words, and the streaming of images through decoding threads
(:func:`tipcap.clip_images.image_batches`). ``model.caption(...)`` is this pipeline's :meth:`caption`,
through ``model.pipeline``, which each model makes once.

Automatic prompt words keep at most ``top_k`` entities of probability at least ``threshold``, by default
``EvalConfig``'s (``eval.top_k``, ``eval.threshold``): ``tipcap caption --auto-prompt`` and ``tipcap
evaluate --prompt auto`` pick the same words.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from tipcap.clip import ClipEncoder
from tipcap.clip_images import image_batches
from tipcap.config import EvalConfig, Search
from tipcap.errors import TipcapError
from tipcap.io import atomic_path, lone_surrogate
from tipcap.prompts import entity_text_embeddings, zero_shot_scores

if TYPE_CHECKING:  # the model imports this module to make its pipeline
    from tipcap.model import TIPCap

logger = logging.getLogger(__name__)

PromptWords = Sequence[str] | Sequence[Sequence[str]]
"""Prompt words: one list for every input (``["dog", "frisbee"]``), or one list per input."""

ImageBatch = tuple[list[int], torch.Tensor, list[tuple[int, str]]]
"""A batch of inputs: the positions of the readable ones, their CLIP image embeddings ``[b, d]``, and
(position, reason) for those that could not be read."""


@dataclass
class CaptionResult:
    """One input's caption and the prompt words used, or why it could not be captioned.

    ``image`` is the image's path (as given), ``"image i"`` for a PIL image, or ``None`` for a row of
    embeddings.
    """

    image: str | None
    caption: str | None
    prompt: list[str] = field(default_factory=list)
    error: str | None = None


def caption_record(result: CaptionResult) -> dict[str, Any]:
    """One line of ``tipcap caption --out``: ``{"image", "caption", "prompt"}``."""
    return {"image": result.image, "caption": result.caption, "prompt": result.prompt}


def write_captions_jsonl(path: str | Path, results: Sequence[CaptionResult]) -> None:
    """Write one JSON line per result (:func:`caption_record`, what ``tipcap caption --out`` writes), to a
    temporary name renamed into place."""
    lines = [caption_record(r) for r in results]
    with atomic_path(Path(path)) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")


def _check_prompt_text(prompts: PromptWords | None) -> None:
    """Refuse a prompt word that is not valid Unicode text: one holding a lone surrogate, as bytes that are
    not UTF-8 reach Python from the command line (``$'dog\\xff'`` arrives as ``'dog\\udcff'``)."""
    rows = [prompts] if prompts and all(isinstance(word, str) for word in prompts) else prompts or []
    for words in rows:
        for word in words:
            if (surrogate := lone_surrogate(word)) is not None:
                raise TipcapError(
                    f"prompt word {word!a}: holds {surrogate!a}, a lone surrogate, which is no character "
                    "(bytes that are not UTF-8 arrive so); type the word in UTF-8."
                )


class CaptionPipeline:
    """Captions images (paths or PIL images) or CLIP image embeddings with ``model``.

    Args:
        model: the caption model; its gap carries image embeddings to the text side.
    """

    def __init__(self, model: TIPCap):
        self.model = model
        self._clip: ClipEncoder | None = None
        self._vocabulary_embeddings: torch.Tensor | None = None

    # -- the CLIP -------------------------------------------------------------------------------

    @property
    def clip(self) -> ClipEncoder:
        """The CLIP whose embedding space the model reads, loaded on first use onto the model's device."""
        if self._clip is None:
            if self.model.clip_spec is None:
                raise TipcapError(
                    "the model does not record its CLIP; load it with from_pretrained(clip=...)."
                )
            self.use_clip(ClipEncoder.load(self.model.clip_spec, device=str(self.model.device)))
        return self._clip

    def use_clip(self, encoder: ClipEncoder) -> None:
        """Use an already loaded CLIP; it must be the one the model's gap was fitted on."""
        if self.model.gap is not None:
            self.model.gap.check_clip(encoder.spec.identity(), f"CLIP {encoder.spec.describe()}")
        self._clip = encoder

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings ``[N, d]`` of ``texts``."""
        return self.clip.encode_texts(texts).embeddings

    def embed_images(
        self,
        images: Sequence[str | Path | Image.Image],
        batch_size: int = 64,
        workers: int | None = None,
        jpeg_draft: bool = False,
    ) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
        """CLIP embeddings ``[M, d]`` of the readable images, their positions, and (position, reason) for
        the others. Images are decoded ``batch_size`` at a time by ``workers`` threads
        (:func:`~tipcap.clip_images.image_batches`; ``jpeg_draft``: JPEGs at a reduced DCT scale, see
        :class:`~tipcap.clip_images.ImageFiles`), so memory does not grow with their number."""
        blocks, readable, failures = [], [], []
        for positions, embeddings, bad in self._image_stream(images, batch_size, workers, {}, jpeg_draft):
            blocks.append(embeddings)
            readable += positions
            failures += bad
        embeddings = torch.cat(blocks) if blocks else torch.empty(0, self.model.config.clip_dim)
        return embeddings, readable, failures

    def _image_stream(
        self,
        images: Sequence[str | Path | Image.Image],
        batch_size: int,
        workers: int | None,
        timings: dict[str, float],
        jpeg_draft: bool = False,
    ) -> Iterator[ImageBatch]:
        """The images' batches (:data:`ImageBatch`). Adds the seconds spent waiting for decoded images and
        encoding them to ``timings``."""
        clip = self.clip
        loader = image_batches(images, clip.preprocess, batch_size, workers, jpeg_draft)
        while True:
            start = time.perf_counter()
            batch = next(loader, None)
            timings["decoding"] = timings.get("decoding", 0.0) + time.perf_counter() - start
            if batch is None:
                return
            positions, pixels, failures = batch
            start = time.perf_counter()
            embeddings = (
                clip.encode_images(pixels)
                if pixels is not None
                else torch.empty(0, self.model.config.clip_dim)
            )
            timings["clip"] = timings.get("clip", 0.0) + time.perf_counter() - start
            yield positions, embeddings, failures

    # -- zero-shot prompt words -----------------------------------------------------------------

    def entity_vocabulary(self) -> tuple[list[str], torch.Tensor]:
        """The model's prompt vocabulary and its prompt-ensembled CLIP text embeddings ``[V, d]``: stored
        with the model (``pim``) or encoded once with its CLIP (``hard``)."""
        model = self.model
        if model.entity_embeddings is not None:
            return model.entity_names, model.entity_embeddings.float().cpu()
        if not model.entity_names:
            raise TipcapError("this model was trained without prompts, so it has no entity vocabulary.")
        if self._vocabulary_embeddings is None:
            self._vocabulary_embeddings = entity_text_embeddings(self.encode_texts, model.entity_names)
        return model.entity_names, self._vocabulary_embeddings

    def entity_guesses(
        self, image_embeddings: torch.Tensor, top_k: int, threshold: float | None
    ) -> list[list[tuple[str, float]]]:
        """Entities of the model's vocabulary found in each image by CLIP zero-shot classification, with
        their probabilities: ``[B, d]`` → B lists of (name, probability), most probable first, at most
        ``top_k`` of probability at least ``threshold`` (``None``: any)."""
        names, embeddings = self.entity_vocabulary()
        return zero_shot_scores(
            image_embeddings.float().cpu(), embeddings, names, top_k=top_k, threshold=threshold
        )

    def auto_prompts(
        self,
        image_embeddings: torch.Tensor,
        top_k: int = EvalConfig.top_k,
        threshold: float | None = EvalConfig.threshold,
    ) -> list[list[str]]:
        """:meth:`entity_guesses` as prompt words: ``[B, d]`` → B word lists, most probable first."""
        guesses = self.entity_guesses(image_embeddings, top_k=top_k, threshold=threshold)
        return [[name for name, _ in row] for row in guesses]

    # -- captioning -----------------------------------------------------------------------------

    def caption(
        self,
        images: Sequence[str | Path | Image.Image] | None = None,
        *,
        embeddings: torch.Tensor | None = None,
        prompts: PromptWords | None = None,
        auto_prompt: bool = False,
        num_beams: int = 5,
        max_new_tokens: int | None = None,
        batch_size: int = 64,
        top_k: int = EvalConfig.top_k,
        threshold: float | None = EvalConfig.threshold,
        workers: int | None = None,
        timings: dict[str, float] | None = None,
        prompt_guidance: float | None = None,
        search: Search = "tipcap",
        jpeg_draft: bool = False,
    ) -> list[CaptionResult]:
        """Caption images (paths or PIL images) or CLIP image embeddings ``[N, d]``.

        The model's gap carries image embeddings to the text side; the CLIP is loaded on first need. Prompt
        words are given (``prompts``) and/or found by CLIP zero-shot classification (``auto_prompt``, at
        most ``top_k`` entities with probability at least ``threshold``, ``None`` keeping the top ``top_k``;
        by default ``eval.top_k`` and ``eval.threshold``), the zero-shot words after the given ones, without
        repeats. A model trained without prompts ignores them, says so once, and reports no prompt words; a
        prompt-interaction model reads the first ``max_prompt_words`` of each input's, says so once when
        there were more, and reports those it read. An unreadable image gets an ``error`` instead of a
        caption, and the others are captioned.

        Images stream through in batches of ``batch_size``: ``workers`` threads decode and preprocess
        the next batches (:func:`~tipcap.clip_images.image_batches`) while this one is encoded and
        captioned, and nothing but the results grows with the number of images. ``timings``, when given,
        gains the seconds spent per stage: ``decoding`` (waiting for decoded images), ``clip``,
        ``generation``. ``prompt_guidance`` overrides the model's guidance of prompt words at decoding
        (:mod:`tipcap.guide`). ``search`` picks the search: tipcap's (:mod:`tipcap.beam_search`), or
        ``transformers``' ``generate``, its reference. ``jpeg_draft`` decodes JPEG files at a reduced DCT
        scale, faster, with pixels close to the reference preprocessing's (off by default;
        :class:`~tipcap.clip_images.ImageFiles`).
        """
        model = self.model
        if (images is None) == (embeddings is None):
            raise TipcapError("caption: give images or embeddings (one of them).")
        _check_prompt_text(prompts)
        timings = {} if timings is None else timings
        if (prompts or auto_prompt) and model.config.prompt == "none":
            logger.warning("this model was trained without prompts; prompt words are ignored.")
            prompts, auto_prompt = None, False
        if images is not None:
            count = len(images)
            batches = self._image_stream(images, batch_size, workers, timings, jpeg_draft)
        else:
            count = len(embeddings)
            batches = self._embedding_batches(embeddings, batch_size)

        def name(position: int) -> str | None:
            if images is None:
                return None
            image = images[position]
            return f"image {position}" if isinstance(image, Image.Image) else str(image)

        results: list[CaptionResult | None] = [None] * count
        cut = 0
        for positions, batch, failures in batches:
            for position, reason in failures:
                results[position] = CaptionResult(name(position), None, error=reason)
            if not positions:
                continue
            words = self._prompt_words(prompts, count, positions, batch, auto_prompt, top_k, threshold)
            if words is not None and model.config.prompt == "pim":
                # The prompt interaction reads the first max_prompt_words; the results list those it read.
                limit = model.config.max_prompt_words
                cut += sum(len(row) > limit for row in words)
                words = [row[:limit] for row in words]
            start = time.perf_counter()
            captions = model.decode_text_side(
                model.image_inputs(batch),
                words,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                encode_texts=self.encode_texts,
                prompt_guidance=prompt_guidance,
                search=search,
            )
            timings["generation"] = timings.get("generation", 0.0) + time.perf_counter() - start
            for row, (position, caption) in enumerate(zip(positions, captions, strict=True)):
                results[position] = CaptionResult(name(position), caption, words[row] if words else [])
        if cut:
            logger.warning(
                "this model reads at most %d prompt words: %d input(s) had more, and only their first %d "
                "were used (each result lists the words used).",
                model.config.max_prompt_words,
                cut,
                model.config.max_prompt_words,
            )
        return results

    @staticmethod
    def _embedding_batches(embeddings: torch.Tensor, batch_size: int) -> Iterator[ImageBatch]:
        """Rows of image embeddings ``[N, d]`` as batches (:data:`ImageBatch`) of ``batch_size``.

        Raises:
            TipcapError: at once, for a row holding NaN or infinite values.
        """
        bad = (~torch.isfinite(embeddings)).any(dim=-1).nonzero()
        if len(bad):
            raise TipcapError(f"caption: embedding row {int(bad[0])} holds NaN or infinite values.")
        count = len(embeddings)
        return (
            (list(range(start, min(start + batch_size, count))), embeddings[start : start + batch_size], [])
            for start in range(0, count, batch_size)
        )

    def _prompt_words(
        self,
        prompts: PromptWords | None,
        count: int,
        readable: list[int],
        embeddings: torch.Tensor,
        auto_prompt: bool,
        top_k: int,
        threshold: float | None,
    ) -> list[list[str]] | None:
        """The prompt words (given ones first, then CLIP's) of the inputs at positions ``readable`` of
        ``count``, whose embeddings are ``[len(readable), d]``; ``None`` for none."""
        if not prompts and not auto_prompt:
            return None
        if not prompts:
            given: list[list[str]] = [[] for _ in readable]
        elif all(isinstance(word, str) for word in prompts):
            given = [list(prompts) for _ in readable]
        else:
            if len(prompts) != count:
                raise TipcapError(f"caption: {len(prompts)} prompt lists for {count} inputs.")
            given = [list(prompts[position]) for position in readable]
        if auto_prompt:
            found = self.auto_prompts(embeddings, top_k=top_k, threshold=threshold)
            given = [list(dict.fromkeys([*mine, *theirs])) for mine, theirs in zip(given, found, strict=True)]
        return given
