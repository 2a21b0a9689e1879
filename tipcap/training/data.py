"""Training data: caption tokens with their conditioning embeddings, length-bucketed batches, collation.

A :class:`CaptionSet` pairs each caption of a caption store with the embedding the decoder is conditioned on:
its own text embedding (text-only training, the gap applied on the fly) or, for supervised decoders, the
embedding of the image it describes (joined on image id with an image store).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DistributedSampler
from transformers import PreTrainedTokenizerFast

from tipcap.errors import TipcapError
from tipcap.prompts import EntityVocabulary
from tipcap.store import EmbeddingStore

END_OF_TEXT = "<|endoftext|>"
_MEGABATCH = 50  # length buckets are formed within groups of this many batches


def word_level_tokenizer(captions: list[str]) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over the training captions (for small decoders)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=[END_OF_TEXT, "<unk>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token="<unk>",
        clean_up_tokenization_spaces=True,
    )


@dataclass
class CaptionSet:
    """Training rows: conditioning embeddings ``[N, d]`` (fp16, maybe memory-mapped) and token ids."""

    embeddings: torch.Tensor
    token_ids: list[list[int]]
    entities: list[list[str]]
    is_text: bool  # text embeddings (gap applied) or image embeddings (supervised)

    def __len__(self) -> int:
        return len(self.token_ids)


def _tokenize(tokenizer, captions: list[str], max_tokens: int) -> list[list[int]]:
    """Caption token ids ending with the end-of-text token (truncated to ``max_tokens`` before it)."""
    ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    return [[*row[: max_tokens - 1], tokenizer.eos_token_id] for row in ids]


def load_caption_set(
    texts: EmbeddingStore,
    tokenizer,
    max_tokens: int,
    vocabulary: EntityVocabulary | None,
    images: EmbeddingStore | None = None,
) -> CaptionSet:
    """Captions of a text store, conditioned on their text embeddings or (``images``) their image's."""
    captions = texts.captions()
    texts.check_finite(f"data.train_texts {texts.path}")
    if images is None:
        embeddings, is_text = texts.embeddings(), True
    else:
        row_of = {image_id: row for row, image_id in enumerate(images.ids)}
        keep = [row for row, image_id in enumerate(texts.ids) if image_id in row_of]
        if not keep:
            raise TipcapError(f"{texts.path} and {images.path} share no image ids.")
        images.check_finite(f"data.train_images {images.path}")
        embeddings = images.gather(torch.tensor([row_of[texts.ids[row]] for row in keep]))
        captions, is_text = [captions[row] for row in keep], False
    entities = [vocabulary.extract(c) for c in captions] if vocabulary is not None else [[] for _ in captions]
    return CaptionSet(embeddings, _tokenize(tokenizer, captions, max_tokens), entities, is_text)


def epoch_batches(
    data: CaptionSet, batch_size: int, seed: int, epoch: int, rank: int, world: int, bucket: bool = True
) -> list[list[int]]:
    """This rank's batches for one epoch: with ``bucket``, each of captions of similar length; without,
    in the sampler's shuffled order (for packed batches, which carry no padding).

    The DistributedSampler gives the rank its shuffled share; within groups of ``_MEGABATCH`` batches,
    rows are sorted by caption length so that a batch pads little; batch order is then shuffled.
    """
    sampler = DistributedSampler(
        range(len(data)), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    indices = list(sampler)
    if not bucket:
        return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    batches = []
    group = batch_size * _MEGABATCH
    for start in range(0, len(indices), group):
        chunk = sorted(indices[start : start + group], key=lambda i: len(data.token_ids[i]))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return [batches[i] for i in order]


def collate(data: CaptionSet, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings ``[B, d]`` (float32), token ids ``[B, T]`` (right-padded) and their mask ``[B, T]``."""
    embeddings = data.embeddings[torch.tensor(rows)].float()
    length = max(len(data.token_ids[r]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(data.token_ids[r])] = torch.tensor(data.token_ids[r])
        mask[i, : len(data.token_ids[r])] = 1
    return embeddings, ids, mask
