"""Captioning images: CLIP image embeddings, the gap's reverse mapping, batched ``generate``.

Decoding is ``transformers``' own ``generate`` (greedy or beam search) on the prefix embeddings; prompts
are the user's words or, with ``auto_prompt``, the entities a CLIP zero-shot classifier finds in the image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.data import ImageError, load_image
from tipcap.errors import TipcapError
from tipcap.model import TIPCap
from tipcap.prompts import EntityVocabulary, entity_text_embeddings, zero_shot_entities

logger = logging.getLogger(__name__)


@dataclass
class CaptionResult:
    """One image's caption, the prompt words used, or why it could not be captioned."""

    image: str
    caption: str | None
    prompt: list[str] = field(default_factory=list)
    error: str | None = None


class Captioner:
    """A caption model with the CLIP whose embedding space it reads.

    Args:
        model: the caption model (its gap, if any, maps image embeddings to the text side).
        encoder: the CLIP that encodes images (and prompt words outside the entity vocabulary).
    """

    def __init__(self, model: TIPCap, encoder: ClipEncoder):
        self.model = model.eval()
        self.encoder = encoder
        if model.gap is not None:
            model.gap.check_clip(encoder.spec.identity(), f"CLIP {encoder.spec.describe()}")
        self._entities: tuple[list[str], torch.Tensor] | None = None

    @classmethod
    def load(
        cls, model_dir: str | Path, clip: ClipSpec | None = None, device: str | None = None
    ) -> Captioner:
        """Load a model directory and its CLIP (the one recorded at training unless ``clip`` is given)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = TIPCap.from_pretrained(model_dir, device=device)
        if clip is None:
            if model.clip_spec is None:
                raise TipcapError(
                    f"{model_dir}: the model does not record its CLIP; pass --clip and --pretrained."
                )
            clip = ClipSpec(**model.clip_spec)
        return cls(model, ClipEncoder.load(clip, device=device))

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encoder.encode_texts(texts).embeddings

    def entity_embeddings(self) -> tuple[list[str], torch.Tensor]:
        """The entity vocabulary and its prompt-ensembled CLIP text embeddings ``[V, d]``."""
        if self._entities is None:
            if self.model.entity_embeddings is not None:
                self._entities = (self.model.entity_names, self.model.entity_embeddings.float().cpu())
            else:
                names = EntityVocabulary.load().names
                self._entities = (names, entity_text_embeddings(self._encode_texts, names))
        return self._entities

    def auto_prompts(
        self, image_embeddings: torch.Tensor, top_k: int = 3, threshold: float | None = None
    ) -> list[list[str]]:
        """Entities found in each image by CLIP zero-shot classification: ``[B, d]`` → B word lists."""
        names, embeddings = self.entity_embeddings()
        return zero_shot_entities(
            image_embeddings.float().cpu(), embeddings, names, top_k=top_k, threshold=threshold
        )

    def caption_embeddings(
        self,
        image_embeddings: torch.Tensor,
        prompts: Sequence[Sequence[str]] | None = None,
        num_beams: int = 5,
        batch_size: int = 64,
        max_new_tokens: int | None = None,
    ) -> list[str]:
        """Captions for CLIP image embeddings ``[N, d]``, in batches of ``batch_size``."""
        if prompts is not None and self.model.config.prompt == "none":
            logger.warning("this model was trained without prompts; the prompt words are ignored.")
            prompts = None
        captions: list[str] = []
        for start in range(0, len(image_embeddings), batch_size):
            batch = image_embeddings[start : start + batch_size].to(self.model.device, torch.float32)
            if self.model.gap is not None:
                batch = self.model.gap.to_text(batch)
            batch_prompts = (
                None if prompts is None else [list(p) for p in prompts[start : start + batch_size]]
            )
            captions += self.model.generate(
                batch,
                batch_prompts,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                encode_texts=self._encode_texts,
            )
        return captions

    def embed_images(self, paths: Sequence[Path]) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
        """Embeddings ``[M, d]`` of the readable images, their positions, and (position, reason) failures."""
        pixels, readable, failures = [], [], []
        for position, path in enumerate(paths):
            try:
                pixels.append(self.encoder.preprocess(load_image(Path(path))))
                readable.append(position)
            except ImageError as e:
                failures.append((position, str(e)))
        if not pixels:
            return torch.empty(0, self.encoder.dim), readable, failures
        embeddings = torch.cat(
            [self.encoder.encode_images(torch.stack(pixels[i : i + 64])) for i in range(0, len(pixels), 64)]
        )
        return embeddings, readable, failures

    def caption_images(
        self,
        paths: Sequence[Path],
        prompt: Sequence[str] | None = None,
        auto_prompt: bool = False,
        num_beams: int = 5,
        batch_size: int = 64,
    ) -> list[CaptionResult]:
        """Caption image files; unreadable ones get an error instead of a caption (the rest go on)."""
        embeddings, readable, failures = self.embed_images(paths)
        prompts: list[list[str]] | None = None
        if auto_prompt:
            prompts = self.auto_prompts(embeddings)
            if prompt:
                prompts = [list(dict.fromkeys([*prompt, *words])) for words in prompts]
        elif prompt:
            prompts = [list(prompt)] * len(readable)
        captions = self.caption_embeddings(embeddings, prompts, num_beams=num_beams, batch_size=batch_size)
        results: dict[int, CaptionResult] = {
            position: CaptionResult(str(paths[position]), caption, prompts[i] if prompts else [])
            for i, (position, caption) in enumerate(zip(readable, captions, strict=True))
        }
        for position, reason in failures:
            results[position] = CaptionResult(str(paths[position]), None, error=reason)
        return [results[i] for i in range(len(paths))]
