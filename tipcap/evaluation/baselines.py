"""The non-neural baselines of an evaluation: ``retrieval``, the most CLIP-similar caption of a caption
store, and ``template``, the top CLIP zero-shot entities in a sentence template."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tipcap.clip import ClipEncoder
from tipcap.prompts import EntityVocabulary, entity_text_embeddings, zero_shot_entities
from tipcap.store import EmbeddingStore


def retrieve_captions(image_embeddings: torch.Tensor, texts: EmbeddingStore, chunk: int = 65536) -> list[str]:
    """The most CLIP-similar caption of ``texts`` for each image ``[N, d]``, reading the store in chunks."""
    best_score = torch.full((len(image_embeddings),), -torch.inf)
    best_row = torch.zeros(len(image_embeddings), dtype=torch.long)
    queries = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    start = 0
    for block in texts.iter_chunks(chunk):
        scores = queries @ block.float().T
        value, index = scores.max(dim=1)
        better = value > best_score
        best_score = torch.where(better, value, best_score)
        best_row = torch.where(better, index + start, best_row)
        start += len(block)
    captions = texts.captions()
    return [captions[row] for row in best_row.tolist()]


def template_caption(entities: Sequence[str]) -> str:
    """``["dog", "frisbee"]`` → ``"a photo of a dog and a frisbee."``."""
    if not entities:
        return "a photo."
    return "a photo of " + " and ".join(f"a {entity}" for entity in entities) + "."


def template_captions(
    encoder: ClipEncoder, embeddings: torch.Tensor, vocabulary: str | Path | None, threshold: float | None
) -> tuple[list[str], list[list[str]]]:
    """Template captions from each image's CLIP zero-shot entities (at most two, as the template reads, each
    at least ``threshold`` probable) for image embeddings ``[N, d]``, with those entities; ``vocabulary``: an
    entity vocabulary JSON (default: the packaged COCO one)."""
    names = EntityVocabulary.load(vocabulary).names
    entities = entity_text_embeddings(lambda xs: encoder.encode_texts(xs).embeddings, names)
    prompts = zero_shot_entities(embeddings, entities, names, top_k=2, threshold=threshold)
    return [template_caption(words) for words in prompts], prompts
