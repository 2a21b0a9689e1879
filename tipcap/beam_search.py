"""Batched beam search and greedy decoding over ``inputs_embeds``, with a key-value cache allocated once.

``transformers``' ``generate`` keeps the key-value cache in a ``DynamicCache``: every step concatenates the
new keys and values onto the whole cache (a copy of it), and beam search then reorders the whole cache by
``index_select`` (another copy). In batched beam search those copies took most of the time. Here the cache
(:class:`BeamCache`) is one buffer per layer, ``[B·beams, heads, context + max_new_tokens, head_dim]``,
allocated at the first step; a step writes its keys and values into the next slot in place, and reordering
beams moves the generated slots only, in place: every beam of an input shares its context, so the context
slots never move. The context runs through the language model once per input, not once per beam. An input
whose result can no longer change (a greedy row past its end of text; a beam search whose finished
hypotheses no running beam can beat) stops costing steps: once a quarter of the rows searched are such,
they leave the batch, and the cache moves the others' rows to the front of its buffers, in place.

The search is ``generate``'s, step for step, with its defaults (``transformers`` 5): beams scored by the sum
of their tokens' log-probabilities (after the logits processors), ``2 · num_beams`` candidates kept per step
so that ``num_beams`` stay unfinished, a finished hypothesis scored by its sum divided by its length (end of
text included; ``length_penalty`` 1.0), the ``num_beams`` best finished ones kept per input, an input done
once its best unfinished beam, divided by the current length, cannot beat its worst finished one
(``early_stopping=False``), and every beam finished at ``max_new_tokens``. ``num_beams`` 1 is
``generate``'s greedy decoding: the processors see the raw logits, finished rows are fed the pad token.

Ties: candidates of equal score are ranked by ``torch.topk``, as in ``generate``, over tensors of the same
shape and values, so they are ranked alike. The two paths can differ only where the language model's
outputs for a row differ in their last bits with the batch around it (``B`` inputs for the context rather
than ``B·beams`` rows, fewer rows once some have left) or between a contiguous cache and views into a
larger buffer (the attention over it); where that turns the order of two candidates, their scores were
equal to float32 rounding, and either caption is a correct result of the search. On the CPU, none of these
changed a bit in the tests (``tests/test_beam_search.py``).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers import LogitsProcessorList, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer

from tipcap.config import Search
from tipcap.language_model import padding_warning_filtered

NEGATIVE = -1.0e9
"""The score ``generate`` adds to rule a beam out (finished, or beyond the first beam at the start)."""


class BeamCacheLayer(DynamicLayer):
    """One layer's keys and values in buffers allocated once: ``[rows, heads, capacity, head_dim]``.

    :meth:`update` writes the new positions into the next slots and returns views of the filled ones, so
    the attention reads ``[rows, heads, length, head_dim]`` as from a ``DynamicLayer``, without a copy. A
    batch of fewer rows than the live ones (the context, once per input) is written into each of its
    ``rows // batch`` consecutive rows (the beams of that input). :meth:`keep_rows` moves the rows still
    searched to the front; the buffers' rows past them are left unused.

    Args:
        capacity: the most positions the layer holds (context and generated tokens).
        rows: the rows of the buffers (inputs × beams).
    """

    def __init__(self, capacity: int, rows: int):
        super().__init__()
        self.capacity = capacity
        self.rows = rows
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        heads = key_states.shape[1]
        self.keys = key_states.new_empty(self.rows, heads, self.capacity, key_states.shape[-1])
        self.values = value_states.new_empty(self.rows, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[b, heads, n, head_dim]`` keys and values into the next ``n`` slots; return the filled
        slots ``[b, heads, length, head_dim]`` (for ``b`` inputs, each input's first beam)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        group = self.rows // key_states.shape[0]
        for buffer, states in ((self.keys, key_states), (self.values, value_states)):
            slots = buffer[: self.rows, :, start:end].unflatten(0, (-1, group))
            slots.copy_(states.unsqueeze(1))
        self.length = end
        return self.keys[: self.rows : group, :, :end], self.values[: self.rows : group, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def reorder_slots(self, rows: torch.Tensor, start: int) -> None:
        """Row ``i`` of the slots from ``start`` on becomes row ``rows[i]``'s, in place."""
        for buffer in (self.keys, self.values):
            slots = buffer[: self.rows, :, start : self.length]
            slots.copy_(slots.index_select(0, rows))

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (ascending), moved in place to the front of the buffers."""
        for buffer in (self.keys, self.values):
            filled = buffer[:, :, : self.length]
            filled[: len(rows)].copy_(filled.index_select(0, rows))
        self.rows = len(rows)


class BeamCache(Cache):
    """A key-value cache of :class:`BeamCacheLayer` s, made for one batch.

    Args:
        capacity: positions per row (context and the most generated tokens).
        rows: inputs × beams.
    """

    def __init__(self, capacity: int, rows: int):
        # One layer per language-model layer, made as the model first writes into it.
        super().__init__(layer_class_to_replicate=partial(BeamCacheLayer, capacity, rows))

    def reorder_slots(self, rows: torch.Tensor, start: int) -> None:
        """Reorder every layer's slots from ``start`` on (:meth:`BeamCacheLayer.reorder_slots`)."""
        for layer in self.layers:
            layer.reorder_slots(rows, start)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` in every layer (:meth:`BeamCacheLayer.keep_rows`)."""
        for layer in self.layers:
            layer.keep_rows(rows)


def decode(
    language_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    context: torch.Tensor,
    mask: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    logits_processor: LogitsProcessorList,
    search: Search = "tipcap",
) -> torch.Tensor:
    """Caption tokens ``[B, T]`` for a left-padded context ``[B, C, W]`` (mask ``[B, C]``) by ``search``:
    :func:`search_tokens`, or ``generate`` with the same settings (pad tokens after the end of text)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # Both feed a greedy row that has finished the pad token without a mask (see padding_warning_filtered).
    with padding_warning_filtered():
        if search == "tipcap":
            return search_tokens(
                language_model, context, mask, num_beams, max_new_tokens, eos, pad, logits_processor
            )
        return language_model.generate(
            inputs_embeds=context,
            attention_mask=mask,
            logits_processor=logits_processor,
            num_beams=num_beams,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
        )


class _Rows:
    """The language model over the rows still searched (inputs × beams), with their cache, attention
    mask ``[rows, C]`` (``None``: no padding) and last context position ``[rows, 1]``; the context has gone
    through it already."""

    def __init__(
        self,
        language_model: nn.Module,
        cache: BeamCache,
        mask: torch.Tensor | None,
        last_position: torch.Tensor,
    ):
        self.language_model = language_model
        self.cache = cache
        self.mask = mask
        self.last_position = last_position

    def logits(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """The next token's logits ``[rows, V]`` in float32 after the rows' ``step``-th tokens ``[rows]``."""
        mask = None
        if self.mask is not None:
            mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), step)], dim=1)
        output = self.language_model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=self.last_position + step,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return _step_logits(output)

    def keep(self, rows: torch.Tensor) -> None:
        """Search only ``rows`` (ascending) from now on."""
        self.cache.keep_rows(rows)
        self.mask = self.mask[rows] if self.mask is not None else None
        self.last_position = self.last_position[rows]


def _step_logits(output) -> torch.Tensor:
    """The last position's logits ``[rows, vocab]`` in float32, copied (as ``generate`` takes them)."""
    return output.logits[:, -1, :].to(copy=True, dtype=torch.float32)


def _processed(
    logits_processor: LogitsProcessorList,
    sequences: torch.Tensor,
    scores: torch.Tensor,
    rows: torch.Tensor,
    total: int,
) -> torch.Tensor:
    """``logits_processor`` applied to the ``scores`` ``[r, V]`` of ``rows`` ``[r]`` of the ``total`` the
    batch began with, whose tokens so far are ``sequences`` ``[r, t]``: a processor reads a row's index
    (:class:`tipcap.guide.PromptGuide` its input), so it sees every row, the others as zeros."""
    if not logits_processor:
        return scores
    if len(rows) == total:
        return logits_processor(sequences, scores)
    all_sequences = sequences.new_zeros(total, sequences.shape[1])
    all_sequences[rows] = sequences
    all_scores = scores.new_zeros(total, scores.shape[1])
    all_scores[rows] = scores
    return logits_processor(all_sequences, all_scores)[rows]


@torch.inference_mode()
def search_tokens(
    language_model: nn.Module,
    context: torch.Tensor,
    mask: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    logits_processor: LogitsProcessorList,
) -> torch.Tensor:
    """The best caption's tokens ``[B, T]`` (``T ≤ max_new_tokens``; the end-of-text token included, pad
    tokens after it) for a left-padded context ``[B, C, W]`` with its mask ``[B, C]``: beam search over
    ``num_beams`` beams, or greedy decoding for 1 (see the module)."""
    batch, length = mask.shape
    cache = BeamCache(length + max_new_tokens, batch * num_beams)
    # generate drops a mask of all ones (no padding), which takes the attention's unmasked path.
    full = bool((mask == 1).all())
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    output = language_model(
        inputs_embeds=context,
        attention_mask=None if full else mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits = _step_logits(output).repeat_interleave(num_beams, dim=0)
    del output
    rows = _Rows(
        language_model,
        cache,
        None if full else mask.repeat_interleave(num_beams, dim=0),
        positions[:, -1:].repeat_interleave(num_beams, dim=0),
    )
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=context.device)
    if num_beams == 1:
        steps = _greedy(logits, rows, tokens, eos_token_id, pad_token_id, logits_processor)
    else:
        steps = _beams(logits, rows, length, num_beams, tokens, eos_token_id, logits_processor)
    return tokens[:, :steps]


def _greedy(
    logits: torch.Tensor,
    rows: _Rows,
    tokens: torch.Tensor,
    eos_token_id: int,
    pad_token_id: int,
    logits_processor: LogitsProcessorList,
) -> int:
    """``generate``'s greedy decoding from the context's logits ``[B, V]``: writes each input's tokens
    into ``tokens`` ``[B, max_new_tokens]`` (pad tokens after the end of text); returns the steps run.

    A finished row has only pad tokens to come, so it leaves the batch once a quarter of the rows have
    finished (see :func:`_beams`)."""
    batch, max_new_tokens = tokens.shape
    live = torch.arange(batch, device=tokens.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=tokens.device)
    for step in range(max_new_tokens):
        chosen = _processed(logits_processor, tokens[live, :step], logits, live, batch).argmax(dim=-1)
        chosen = torch.where(unfinished, chosen, pad_token_id)
        tokens[live, step] = chosen
        unfinished &= chosen != eos_token_id
        if not unfinished.any() or step + 1 >= max_new_tokens:
            return step + 1
        if 4 * int((~unfinished).sum()) >= len(live):
            kept = unfinished.nonzero()[:, 0]
            live, chosen, unfinished = live[kept], chosen[kept], unfinished[kept]
            rows.keep(kept)
        logits = rows.logits(chosen, step + 1)
    return max_new_tokens


def _beams(
    logits: torch.Tensor,
    rows: _Rows,
    context_length: int,
    num_beams: int,
    tokens: torch.Tensor,
    eos_token_id: int,
    logits_processor: LogitsProcessorList,
) -> int:
    """``generate``'s beam search from the context's logits ``[B·beams, V]``: writes each input's best
    finished hypothesis into ``tokens`` ``[B, max_new_tokens]``; returns the steps run.

    An input is done when no running beam can beat its worst finished hypothesis: its hypotheses are
    final, and ``generate`` runs its beams on to the batch's end for nothing. Here, once a quarter of the
    inputs searched are done, their rows leave the batch (the cache keeps the others' in place), so that
    a batch's long captions do not cost its short ones' steps (ties: see the module)."""
    device = logits.device
    batch, max_new_tokens = tokens.shape
    keep = 2 * num_beams
    vocabulary = logits.shape[-1]
    live = torch.arange(batch, device=device)
    beam_offsets = torch.arange(num_beams, device=device)
    running = tokens.unsqueeze(1).repeat(1, num_beams, 1)
    finished = running.clone()
    running_scores = torch.zeros(batch, num_beams, device=device)
    # Only the first beam is live at the start: the others would repeat its candidates.
    running_scores[:, 1:] = NEGATIVE
    finished_scores = torch.full((batch, num_beams), NEGATIVE, device=device)
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    # Only the best num_beams candidates of a step may enter the finished hypotheses.
    top = torch.arange(keep, device=device) < num_beams
    step = 0
    while True:
        searched = len(live)
        all_rows = (live[:, None] * num_beams + beam_offsets).flatten()
        log_probs = nn.functional.log_softmax(logits, dim=-1)
        log_probs = _processed(
            logits_processor, running[:, :, :step].flatten(0, 1), log_probs, all_rows, batch * num_beams
        )
        scores = (log_probs.view(searched, num_beams, -1) + running_scores[:, :, None]).view(searched, -1)
        candidate_scores, candidates = torch.topk(scores, k=keep)
        parents = candidates // vocabulary
        sequences = running.gather(1, parents[:, :, None].expand(-1, -1, max_new_tokens))
        sequences[:, :, step] = candidates % vocabulary
        ends = (sequences[:, :, step] == eos_token_id) | (step + 1 >= max_new_tokens)

        live_scores = candidate_scores + ends.float() * NEGATIVE
        chosen = torch.topk(live_scores, k=num_beams)[1]
        running = sequences.gather(1, chosen[:, :, None].expand(-1, -1, max_new_tokens))
        running_scores = live_scores.gather(1, chosen)
        offsets = torch.arange(searched, device=device)[:, None] * num_beams
        beam_rows = (parents.gather(1, chosen) + offsets).flatten()

        just_finished = ends & top[None, :]
        normalised = candidate_scores / ((step + 1) ** 1.0)
        normalised = normalised + (~improvable).float() * NEGATIVE
        normalised = normalised + (~just_finished) * NEGATIVE
        merged_scores = torch.cat([finished_scores, normalised], dim=1)
        best = torch.topk(merged_scores, k=num_beams)[1]
        finished = torch.cat([finished, sequences], dim=1).gather(
            1, best[:, :, None].expand(-1, -1, max_new_tokens)
        )
        finished_scores = merged_scores.gather(1, best)
        is_finished = torch.cat([is_finished, just_finished], dim=1).gather(1, best)

        rows.cache.reorder_slots(beam_rows, context_length)
        step += 1
        best_running = running_scores[:, :1] / (step**1.0)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], NEGATIVE)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        if not improvable.any() or ends.all():
            tokens[live] = finished[:, 0]
            return step
        done = ~improvable[:, 0]
        if 4 * int(done.sum()) >= searched:
            tokens[live[done]] = finished[done, 0]
            kept = (~done).nonzero()[:, 0]
            live = live[kept]
            running, running_scores = running[kept], running_scores[kept]
            finished, finished_scores = finished[kept], finished_scores[kept]
            is_finished, improvable = is_finished[kept], improvable[kept]
            rows.keep((kept[:, None] * num_beams + beam_offsets).flatten())
        logits = rows.logits(running[:, :, step - 1].flatten(), step)
