"""Prompt guidance: prompt words as soft lexical constraints on each decoding step.

A decoder trained with prompt words learns from them which entities a caption names, but not which
attribute goes with which object: on toy world 2, decoders trained 1,000 steps with prompts (a prompt
interaction module, its words as context vectors, or ViECap's hard prompt) wrote the same captions for
"brown circle, green square" as for "brown square, green circle"; words as context vectors learnt the
binding in 3,000 steps on two seeds of three (experiments/README.md §5.5). Guidance binds them at decoding, in
the spirit of constrained beam search (Anderson et al., 2017), softly: at each step, for every form of a
prompted entity ("brown diamond", "brown diamonds"),

- when the caption so far ends with the form's first ``j`` tokens, the form's next token gains ``bias``
  (after "brown", "diamond"), so that an entity begun is completed as prompted;
- while the entity is neither mentioned nor begun, the form's first token gains ``bias``, so that it is named
  at all.

Biases are added to the log-probabilities before beam search ranks the candidates; ``bias`` 0 is plain
decoding. The :class:`PromptGuide` is a ``transformers`` :class:`~transformers.LogitsProcessor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

Form = tuple[int, ...]
"""One way of writing an entity, as token ids."""


def entity_forms(
    tokenizer, words: Sequence[str], forms_of: dict[str, list[str]], unknown_id: int | None
) -> list[list[Form]]:
    """Each prompt word's forms as token ids: ``[P][forms]``.

    Args:
        tokenizer: the decoder's tokenizer; each form is tokenised after a space, as it follows another word
            in a caption.
        words: the prompt words (canonical entity names, or words outside the vocabulary).
        forms_of: an entity's written forms by name (its name among them); a word not listed is its own form.
        unknown_id: the tokenizer's unknown token, whose forms are dropped (they would guide towards it).
    """
    entities = []
    for word in words:
        forms = []
        for text in forms_of.get(word, [word]):
            ids = tuple(tokenizer(" " + text, add_special_tokens=False)["input_ids"])
            if ids and unknown_id not in ids and ids not in forms:
                forms.append(ids)
        entities.append(forms)
    return entities


def _contains(sequence: list[int], form: Form) -> bool:
    n = len(form)
    return any(tuple(sequence[i : i + n]) == form for i in range(len(sequence) - n + 1))


class PromptGuide(LogitsProcessor):
    """Adds ``bias`` to the tokens that continue or begin a prompted entity (see the module).

    Args:
        entities: per input ``[B]``, per prompt word, its forms as token ids (:func:`entity_forms`).
        num_beams: beams per input: row ``r`` of the scores belongs to input ``r // num_beams``.
        bias: the amount added to a guided token's log-probability.
    """

    def __init__(self, entities: Sequence[Sequence[Sequence[Form]]], num_beams: int, bias: float) -> None:
        self.entities = entities
        self.num_beams = num_beams
        self.bias = bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``input_ids`` ``[R, t]``, the tokens generated so far, and ``scores`` ``[R, V]`` → ``[R, V]``."""
        rows, columns = [], []
        for row, generated in enumerate(input_ids.tolist()):
            guided: set[int] = set()
            for forms in self.entities[row // self.num_beams]:
                going_on = {
                    form[j]
                    for form in forms
                    for j in range(1, min(len(form), len(generated) + 1))
                    if tuple(generated[-j:]) == form[:j]
                }
                guided |= going_on
                # An entity begun is completed, not begun again ("brown brown").
                if not going_on and not any(_contains(generated, form) for form in forms):
                    guided.update(form[0] for form in forms)
            rows.extend([row] * len(guided))
            columns.extend(guided)
        if rows:
            scores = scores.clone()
            scores[torch.tensor(rows), torch.tensor(columns)] += self.bias
        return scores
