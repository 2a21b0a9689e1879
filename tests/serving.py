"""Tiny models for the tests of `tipcap serve`, built in a fraction of a second (untrained, seeded)."""

import io
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.config import ModelConfig
from tipcap.model import TIPCap
from tipcap.training.data import word_level_tokenizer

VOCABULARY = ["red circle", "blue square", "green triangle", "yellow star", "purple ring"]


def tiny_decoder(
    prompt: str,
    seed: int,
    embed_names: Callable[[list[str]], torch.Tensor] | None = None,
    *,
    layers: int = 1,
    prefix_length: int = 2,
    max_caption_tokens: int = 8,
    clip_spec: ClipSpec | None = None,
) -> TIPCap:
    """An untrained decoder over :data:`VOCABULARY` (seeded); ``embed_names`` gives a ``pim`` model its
    entities' embeddings ``[n, 32]``."""
    torch.manual_seed(seed)
    tokenizer = word_level_tokenizer([f"a {entity} above a {entity} ." for entity in VOCABULARY])
    language_model = {"model_type": "gpt2", "n_layer": layers, "n_head": 2, "n_embd": 32, "n_positions": 64,
                      "vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
    config = ModelConfig(clip_dim=32, language_model_config=language_model, prompt=prompt,
                         prefix_length=prefix_length, max_caption_tokens=max_caption_tokens)  # fmt: skip
    names = VOCABULARY if prompt != "none" else []
    vectors = embed_names(names) if prompt == "pim" else None
    return TIPCap.build(config, tokenizer, entity_names=names, entity_embeddings=vectors, clip_spec=clip_spec)


def build_model(directory: Path, clip: Path, prompt: str, seed: int) -> Path:
    """An untrained decoder on the tiny CLIP ``clip``, saved to ``directory``.

    A ``hard`` model writes its prompt words into the language model's context, so that even untrained its
    caption changes when a word is added; a ``pim`` model reads its prompt words' CLIP embeddings through
    its prompt interaction (whose gate starts open), the first ``max_prompt_words`` (8) of them; a ``none``
    model has no prompt vocabulary.
    """
    spec = ClipSpec(str(clip))

    def embed_names(names: list[str]) -> torch.Tensor:
        return ClipEncoder.load(spec, device="cpu").encode_texts(names).embeddings

    tiny_decoder(prompt, seed, embed_names, clip_spec=spec).save_pretrained(directory)
    return directory


def png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    """A small PNG of one colour with a lighter square in it."""
    image = Image.new("RGB", size, colour)
    image.paste(tuple(255 - c for c in colour), (5, 5, 15, 15))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(colour: tuple[int, int, int]) -> bytes:
    """A small JPEG of one colour."""
    return encoded(Image.new("RGB", (40, 30), colour), "JPEG")


def encoded(image: Image.Image, format: str) -> bytes:
    """``image`` saved in Pillow's ``format``."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()
