"""Where a training process stands under ``torchrun`` (rank, world size, device), and the checks its ranks
make together."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """Where this process stands under torchrun (rank 0 of 1 without it)."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if world == 1:
            return cls(0, 1, torch.device("cuda" if cuda else "cpu"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(dist.get_rank(), world, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def rank_checksums(self, model: torch.nn.Module) -> list[float]:
        """Each rank's sum of ``model``'s parameters, gathered on every rank: they must be equal."""
        checksum = torch.tensor(
            [float(sum(p.detach().double().sum() for p in model.parameters()))], device=self.device
        )
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        return [float(c) for c in gathered]
