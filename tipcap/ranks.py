"""Where a process stands among those that build one embedding store together under ``torchrun``.

Ranks share a barrier and rank 0's decisions over a gloo process group on the CPU, whatever device each
encodes on: only booleans travel, so no pickled object is ever read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's rank among ``world`` processes (rank 0 of 1 outside torchrun), and its local rank
    (which GPU of its machine it may use)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0, which decides, writes the store's index and reports."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank has come here."""
        if self.world > 1:
            dist.barrier()

    def agree(self, value: bool) -> bool:
        """Rank 0's ``value``, on every rank (a barrier too)."""
        if self.world == 1:
            return value
        flag = torch.tensor([int(value)])
        dist.broadcast(flag, src=0)
        return bool(flag.item())


ONE_PROCESS = Ranks()
"""A build without torchrun."""


@contextlib.contextmanager
def torchrun_ranks() -> Iterator[Ranks]:
    """The ranks torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/
    ``MASTER_PORT``) describes, with a gloo process group for their lifetime; one rank without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield ONE_PROCESS
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        if created:
            dist.destroy_process_group()
