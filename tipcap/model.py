"""The caption model: CLIP embedding → gap → projector → K prefix vectors → prompt interaction → causal LM.

``TIPCap`` is the ``nn.Module``: its projector (:mod:`tipcap.projectors`), the prompt interaction module
(:class:`tipcap.prompts.PromptInteraction`) or hard prompts, any ``transformers`` causal language model that
accepts ``inputs_embeds`` (GPT-2 by default, :mod:`tipcap.language_model`), and the gap it owns: the
modality-gap model that noises caption embeddings at training (:meth:`TIPCap.training_inputs`) and carries
image embeddings to the text side at inference (:meth:`TIPCap.image_inputs`). The decoder reads *text-side*
inputs ``[B, d]``: :meth:`TIPCap.forward` gives the training loss, :meth:`TIPCap.decode_text_side` decodes.

Captioning images (the CLIP, image streaming, zero-shot prompt words, batches, per-image errors) is
:mod:`tipcap.pipeline`; :meth:`TIPCap.caption` is a thin façade over the model's pipeline, so
``TIPCap.from_pretrained(d).caption(images=[...])`` is all it takes to caption.

``save_pretrained`` and ``from_pretrained`` write and read the model folder (:mod:`tipcap.model_folder`;
``from_pretrained`` also takes a hub name, read through the Hugging Face cache, :mod:`tipcap.hub_cache`).
The model card and publishing on the hub (:mod:`tipcap.card`, :mod:`tipcap.hub`) sit above the model: it
imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import LogitsProcessorList, PreTrainedTokenizerBase

from tipcap.beam_search import decode
from tipcap.clip import ClipSpec
from tipcap.config import ModelConfig, Search, check_positions
from tipcap.errors import TipcapError
from tipcap.gap import Gap
from tipcap.guide import PromptGuide, entity_forms
from tipcap.language_model import configured_tokenizer, language_model_for
from tipcap.model_folder import load_model_folder, write_model_folder
from tipcap.packing import pack
from tipcap.projectors import build_projector
from tipcap.prompts import PromptInteraction, hard_prompt, prompt_word_embeddings

if TYPE_CHECKING:
    from tipcap.pipeline import CaptionPipeline, CaptionResult


class TIPCap(nn.Module):
    """Prefix captioner with a prompt interaction module (or hard prompts) and its gap.

    Args:
        config: the model settings.
        language_model: a causal LM accepting ``inputs_embeds``.
        tokenizer: its tokenizer (needs an end-of-text token).
        gap: the modality-gap model (``None``: inputs are read as they are, as for supervised decoders).
        entity_names: prompt vocabulary (``prompt: pim`` or ``hard``), in the order of ``entity_embeddings``.
        entity_embeddings: ``[V, clip_dim]`` CLIP text embeddings of ``entity_names`` (``prompt: pim``).
        clip_spec: the CLIP whose embedding space the model reads, so that captioning images needs no
            other setting.
        entity_forms: each entity's written forms by name (plurals, synonyms), for prompt guidance;
            an entity not listed is written as its name.
    """

    def __init__(
        self,
        config: ModelConfig,
        language_model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        gap: Gap | None = None,
        entity_names: Sequence[str] = (),
        entity_embeddings: torch.Tensor | None = None,
        clip_spec: ClipSpec | None = None,
        entity_forms: dict[str, list[str]] | None = None,
    ):
        super().__init__()
        self.config = config
        self.clip_spec = clip_spec
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.gap = gap
        self.entity_names = list(entity_names)
        # Before the projector, whose size grows with prefix_length: a prefix too long to fit is refused
        # before it is allocated.
        self.positions = _checked_positions(config, language_model, tokenizer, self.entity_names)
        width = language_model.get_input_embeddings().embedding_dim
        self.projector = build_projector(
            config.projector, config.clip_dim, width, config.prefix_length, config.projector_layers
        )
        self.prompt_interaction = (
            PromptInteraction(config.clip_dim, width, config.pim_layers, config.pim_heads)
            if config.prompt == "pim"
            else None
        )
        # How each entity is written (its name among them), for prompt guidance: "brown diamonds" too.
        self.entity_forms = {name: list((entity_forms or {}).get(name, [name])) for name in self.entity_names}
        if config.prompt == "pim" and (
            entity_embeddings is None or len(entity_embeddings) != len(entity_names)
        ):
            raise TipcapError("a prompt-interaction model needs CLIP embeddings of its entity vocabulary.")
        self.register_buffer("entity_embeddings", entity_embeddings)
        if self.prompt_interaction is not None:
            self.prompt_interaction.set_word_mean(entity_embeddings)
        self.register_buffer("input_mean", torch.zeros(config.clip_dim))
        self.register_buffer("input_scale", torch.ones(()))
        if config.freeze_language_model:
            language_model.requires_grad_(False)
        self._pipeline: CaptionPipeline | None = None

    @classmethod
    def build(
        cls, config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None, **parts: Any
    ) -> TIPCap:
        """A new model: the language model from ``config`` (pretrained or fresh), the tokenizer it names
        unless one is given, the rest initialised; ``parts``: the constructor's other arguments, by name."""
        tokenizer = tokenizer if tokenizer is not None else configured_tokenizer(config)
        return cls(config, language_model_for(config, tokenizer), tokenizer, **parts)

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def training_inputs(
        self,
        embeddings: torch.Tensor,
        generator: torch.Generator | None = None,
        noise_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the decoder reads at training, ``[B, d]`` → ``[B, d]``: caption embeddings with the gap's
        noise, fresh per call (``gap.sample``; its standard deviation times ``noise_scale`` ``[B]`` row by
        row when given), or, without a gap, the embeddings as they are."""
        inputs = embeddings.to(self.device, torch.float32)
        if self.gap is None:
            return inputs
        return self.gap.sample(inputs, generator=generator, row_scale=noise_scale)

    def image_inputs(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """What the decoder reads for CLIP image embeddings, ``[B, d]`` → ``[B, d]``: carried to the text
        side by the gap (``gap.to_text``), or as they are without a gap."""
        inputs = image_embeddings.to(self.device, torch.float32)
        return self.gap.to_text(inputs) if self.gap is not None else inputs

    def prefix(
        self,
        text_side: torch.Tensor,
        prompt_embeddings: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefix vectors ``[B, K, W]`` from text-side inputs ``[B, d]`` and optional prompts."""
        inputs = (text_side.to(self.device, torch.float32) - self.input_mean) / self.input_scale
        prefix = self.projector(inputs)
        if self.prompt_interaction is not None:
            prefix = self.prompt_interaction(prefix, prompt_embeddings, prompt_mask)
        return prefix

    def _context(
        self,
        text_side: torch.Tensor,
        prompts: Sequence[Sequence[str]] | None,
        encode_texts: Callable[[list[str]], torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything before the caption: the prefix and what follows it (the hard prompt, or the prompt
        words as vectors, ``pim_tokens``), ``[B, C, W]``, with a mask ``[B, C]``."""
        prompt_embeddings = prompt_mask = following = None
        if self.config.prompt == "pim" and prompts is not None:
            words = [list(row)[: self.config.max_prompt_words] for row in prompts]
            prompt_embeddings, prompt_mask = prompt_word_embeddings(
                words, self.entity_embeddings, self.entity_names, encode_texts
            )
        prefix = self.prefix(text_side, prompt_embeddings, prompt_mask)
        if prompt_embeddings is not None and self.config.pim_tokens and prompt_embeddings.shape[1] > 0:
            following = self.prompt_interaction.words(prompt_embeddings), prompt_mask
        elif self.config.prompt == "hard" and prompts is not None:
            following = _hard_prompt_vectors(self.language_model, self.tokenizer, prompts, len(prefix))
        if following is None:
            ones = torch.ones(len(prefix), self.config.prefix_length, dtype=torch.long, device=self.device)
            return prefix, ones
        return _right_aligned(prefix, *following)

    def forward(
        self,
        text_side: torch.Tensor,
        caption_ids: torch.Tensor,
        caption_mask: torch.Tensor,
        prompts: Sequence[Sequence[str]] | None = None,
        pack_length: int | None = None,
    ) -> Any:
        """Language-model outputs (``loss``, ``logits``) for captions given their conditioning.

        Args:
            text_side: ``[B, d]`` what the decoder reads (:meth:`training_inputs` of the embeddings).
            caption_ids: ``[B, T]`` caption tokens ending with the end-of-text token, right-padded.
            caption_mask: ``[B, T]`` 1 for real tokens.
            prompts: per row, the prompt words (or ``None``: no prompt).
            pack_length: pack the sequences, without their padding, into rows of this many positions
                (:mod:`tipcap.packing`); the logits are then ``[R, pack_length, vocab]``, the loss the same.

        The loss is the token cross-entropy over the caption (end-of-text included); prefix, prompt and
        padding positions are labelled -100.
        """
        context, context_mask = self._context(text_side, prompts, None)
        caption_ids = caption_ids.to(self.device)
        caption_mask = caption_mask.to(self.device)
        tokens = self.language_model.get_input_embeddings()(caption_ids).to(context.dtype)
        inputs = torch.cat([context, tokens], dim=1)
        mask = torch.cat([context_mask, caption_mask.long()], dim=1)
        ignore = torch.full(context_mask.shape, -100, dtype=torch.long, device=self.device)
        labels = torch.cat([ignore, caption_ids.masked_fill(caption_mask == 0, -100)], dim=1)
        if pack_length is not None:
            packed, positions, packed_labels = pack(inputs, mask, labels, pack_length)
            # No attention mask and no cache: the restarting position ids mark where sequences begin.
            return self.language_model(
                inputs_embeds=packed, position_ids=positions, labels=packed_labels, use_cache=False
            )
        # Positions count real tokens only, as generate() counts them from the attention mask.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return self.language_model(
            inputs_embeds=inputs, attention_mask=mask, position_ids=positions, labels=labels
        )

    @torch.inference_mode()
    def decode_text_side(
        self,
        text_side: torch.Tensor,
        prompts: Sequence[Sequence[str]] | None = None,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        encode_texts: Callable[[list[str]], torch.Tensor] | None = None,
        prompt_guidance: float | None = None,
        search: Search = "tipcap",
    ) -> list[str]:
        """Captions for a batch of *text-side* inputs ``[B, d]`` (greedy or beam search).

        This is the decoder alone: image embeddings must first cross the gap (:meth:`image_inputs`), which
        :meth:`caption` does. Prompt words outside the vocabulary are encoded with ``encode_texts`` (a CLIP
        text encoder), and guided at decoding by ``prompt_guidance`` (``None``: the model's
        ``prompt_guidance``; :mod:`tipcap.guide`). ``search``: :mod:`tipcap.beam_search`'s, or ``generate``.
        """
        context, mask = self._context(text_side, prompts, encode_texts)
        new_tokens = max_new_tokens or self.config.max_caption_tokens
        _check_room(self.positions, self.config.prefix_length, mask, prompts, new_tokens)
        guidance = self.config.prompt_guidance if prompt_guidance is None else prompt_guidance
        guide = _prompt_guide(self, prompts, num_beams, guidance)
        output = decode(
            self.language_model, self.tokenizer, context, mask, num_beams, new_tokens, guide, search
        )
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    @property
    def pipeline(self) -> CaptionPipeline:
        """The model's captioning pipeline (:class:`tipcap.pipeline.CaptionPipeline`: its CLIP, loaded on
        first need, images, prompt words), made on first use and kept."""
        if self._pipeline is None:
            from tipcap.pipeline import CaptionPipeline  # here: the pipeline names the model in its types

            self._pipeline = CaptionPipeline(self)
        return self._pipeline

    def caption(self, images: Sequence[Any] | None = None, **options: Any) -> list[CaptionResult]:
        """Caption images (paths or PIL images) or CLIP image embeddings (``embeddings=[N, d]``): the model's
        pipeline's :meth:`~tipcap.pipeline.CaptionPipeline.caption`, which documents the options."""
        return self.pipeline.caption(images, **options)

    def save_pretrained(self, directory: str | Path, provenance: dict[str, Any] | None = None) -> None:
        """Write config, weights, gap, tokenizer and CLIP files to ``directory``, and ``provenance`` (the
        record of the run that trained the model) as ``provenance.json`` (:mod:`tipcap.model_folder`)."""
        write_model_folder(self, directory, provenance)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        clip: ClipSpec | None = None,
        revision: str | None = None,
    ) -> TIPCap:
        """Rebuild a model saved by :meth:`save_pretrained`, exactly, without network access.

        Args:
            directory: the model directory, or a hub name (``owner/name[@revision]``) found in the Hugging
                Face cache or downloaded into it (:mod:`tipcap.hub_cache`); an existing folder wins.
            device: where to put it (default: CUDA when available, else the CPU).
            clip: a CLIP to use instead of the one the model records.
            revision: the hub revision (branch, tag or commit) of a hub name.

        Raises:
            TipcapError: for a folder that is no tipcap model or of an incompatible version, or a hub model
                neither cached nor downloadable (at once, offline).
        """
        return load_model_folder(cls, directory, device, clip, revision)


def _prompt_guide(
    model: TIPCap, prompts: Sequence[Sequence[str]] | None, num_beams: int, guidance: float
) -> LogitsProcessorList:
    """The guidance of ``model``'s prompt words at decoding (:class:`tipcap.guide.PromptGuide`), when there
    is any: words given to a model trained with prompts, and ``guidance`` above 0."""
    if prompts is None or guidance <= 0 or model.config.prompt == "none":
        return LogitsProcessorList()
    unknown = model.tokenizer.unk_token_id
    entities = [entity_forms(model.tokenizer, words, model.entity_forms, unknown) for words in prompts]
    return LogitsProcessorList([PromptGuide(entities, num_beams, guidance)])


def _checked_positions(
    config: ModelConfig,
    language_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    entity_names: Sequence[str],
) -> int | None:
    """The language model's positions (``None`` when its config names none), once the model ``config``
    describes is checked to fit them (:func:`tipcap.config.check_positions`)."""
    positions = getattr(language_model.config, "max_position_embeddings", None)
    if isinstance(positions, int):
        limit = "the language model" if config.language_model_config else repr(config.language_model)
        longest = _longest_hard_prompt(tokenizer, entity_names, config)
        check_positions(config, positions, limit, hard_prompt_tokens=longest)
    return positions


def _longest_hard_prompt(
    tokenizer: PreTrainedTokenizerBase, entity_names: Sequence[str], config: ModelConfig
) -> int:
    """The tokens of the longest hard prompt that training writes: the ``max_prompt_words`` vocabulary
    words of the most tokens each (0 for a model without hard prompts)."""
    if config.prompt != "hard":
        return 0

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # Counted with the space before it, as a word is written in the prompt.
    longest = sorted(entity_names, key=lambda name: tokens(" " + name), reverse=True)
    return max(tokens(hard_prompt([])), tokens(hard_prompt(longest[: config.max_prompt_words])))


def _hard_prompt_vectors(
    language_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[str]],
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The hard prompts' token embeddings ``[B, L, W]``, left-aligned, with a mask ``[B, L]`` (True at real
    positions); ``None`` when no row has one."""
    hard_ids = [
        tokenizer(hard_prompt(list(words)), add_special_tokens=False)["input_ids"] for words in prompts
    ]
    length = max((len(ids) for ids in hard_ids), default=0)
    if length == 0:
        return None
    embeddings = language_model.get_input_embeddings()
    device = embeddings.weight.device
    ids = torch.full((batch, length), tokenizer.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for row, row_ids in enumerate(hard_ids):
        if row_ids:
            ids[row, : len(row_ids)] = torch.tensor(row_ids, device=device)
            mask[row, : len(row_ids)] = True
    return embeddings(ids), mask


def _right_aligned(
    prefix: torch.Tensor, vectors: torch.Tensor, real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix ``[B, K, W]`` followed by each row's real ``vectors`` ``[B, L, W]`` (mask ``real``
    ``[B, L]``), padding first: ``[pad… | prefix | prompt]`` ``[B, K + L, W]`` and its mask.

    The last context position, which predicts the caption's first token, is then real in every row, an
    empty prompt's too: a stable sort on 0 (padding), 1 (prefix), 2 (prompt).
    """
    batch, k = prefix.shape[:2]
    rank = torch.cat([torch.ones(batch, k, dtype=torch.long, device=prefix.device), 2 * real.long()], dim=1)
    order = torch.argsort(rank, dim=1, stable=True)
    context = torch.cat([prefix, vectors.to(prefix.dtype)], dim=1)
    context = context.gather(1, order.unsqueeze(-1).expand_as(context))
    return context, (rank > 0).long().gather(1, order)


def _check_room(
    positions: int | None,
    prefix: int,
    context_mask: torch.Tensor,
    prompts: Sequence[Sequence[str]] | None,
    new_tokens: int,
) -> None:
    """Refuse a batch whose context ``[B, C]`` (its real positions) and ``new_tokens`` caption tokens would
    run past the language model's ``positions``: a hard prompt's words are written out in full, so many or
    long ones do, as does asking for more tokens than the model was checked for."""
    if not isinstance(positions, int):
        return
    used = context_mask.sum(dim=1)
    over = (used + new_tokens > positions).nonzero()
    if not len(over):
        return
    row = int(over[0])
    words = list(prompts[row]) if prompts is not None else []
    if words and prefix + new_tokens <= positions:
        raise TipcapError(
            f"prompt words {', '.join(words)}: they take {int(used[row]) - prefix} positions after the "
            f"model's {prefix} prefix vectors, and with a caption of up to {new_tokens} tokens that is "
            f"more than its language model's {positions}; give fewer or shorter prompt words."
        )
    raise TipcapError(
        f"max tokens {new_tokens}: after the model's {int(used[row])} context positions, a caption of "
        f"that many tokens runs past its language model's {positions} positions; ask for at most "
        f"{max(positions - int(used[row]), 0)} (max_new_tokens; eval.max_tokens)."
    )
