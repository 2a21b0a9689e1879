"""Padding-free packing: several ``[prefix | prompt | caption]`` sequences in rows of a fixed token budget.

A padded batch ``[B, T]`` spends compute on every padding position. Packing keeps only the real positions
and lays the sequences end to end in rows of ``budget`` positions (first fit, longest first). Position
ids restart at 0 at each sequence; the causal language model of ``transformers`` reads a restart as the
start of a new sequence and keeps attention within each (a block-diagonal causal mask with SDPA or eager
attention, variable-length kernels with flash attention, a block mask with FlexAttention), as long as it
gets no 2-D attention mask and no cache. The slots left at the end of a row get position 0 each (a
sequence of one, attending to itself) and the label -100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tipcap.errors import TipcapError

IGNORE = -100


@dataclass
class PackedLayout:
    """Where each real position of a padded batch goes in the packed rows.

    ``destinations`` ``[N]``: the flat index (row · budget + offset) of each real position, in the order
    ``mask.nonzero()`` lists them (sequence by sequence, left to right); ``positions`` ``[R, budget]``:
    the position id of every slot.
    """

    rows: int
    budget: int
    destinations: torch.Tensor
    positions: torch.Tensor


def first_fit_rows(lengths: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Row and offset of each sequence: longest first, each into the first row with room (ties by index,
    so the layout depends on the lengths alone)."""
    too_long = [length for length in lengths if length > budget]
    if too_long:
        raise TipcapError(
            f"train.pack_length {budget} is shorter than a training sequence of {max(too_long)} positions "
            "(prefix, prompt and caption); raise train.pack_length."
        )
    row_of, offset_of = [0] * len(lengths), [0] * len(lengths)
    used: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, filled in enumerate(used) if filled + lengths[index] <= budget), len(used))
        if row == len(used):
            used.append(0)
        row_of[index], offset_of[index] = row, used[row]
        used[row] += lengths[index]
    return row_of, offset_of


def pack_layout(mask: torch.Tensor, budget: int) -> PackedLayout:
    """The packed layout of a padded batch whose real positions are ``mask`` ``[B, T]`` (1 real, 0 not).

    Each row's real positions are packed in order, as the unpacked model sees them with positions
    counting real tokens.
    """
    lengths = mask.sum(dim=1).tolist()
    row_of, offset_of = first_fit_rows(lengths, budget)
    rows = max(row_of, default=-1) + 1
    positions = torch.zeros(rows * budget, dtype=torch.long)
    starts = []
    for length, row, offset in zip(lengths, row_of, offset_of, strict=True):
        start = row * budget + offset
        positions[start : start + length] = torch.arange(length)
        starts.append(torch.arange(start, start + length))
    destinations = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long)
    return PackedLayout(rows, budget, destinations, positions.view(rows, budget))


def pack(
    inputs: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack a padded batch: ``inputs`` ``[B, T, W]``, ``mask`` and ``labels`` ``[B, T]`` →
    packed inputs ``[R, budget, W]``, position ids and labels ``[R, budget]``."""
    layout = pack_layout(mask.cpu(), budget)
    real = mask.bool()
    destinations = layout.destinations.to(inputs.device)
    slots = layout.rows * budget
    packed = inputs.new_zeros(slots, inputs.shape[-1]).index_copy(0, destinations, inputs[real])
    packed_labels = labels.new_full((slots,), IGNORE).index_copy(0, destinations, labels[real])
    return (
        packed.view(layout.rows, budget, -1),
        layout.positions.to(inputs.device),
        packed_labels.view(layout.rows, budget),
    )
