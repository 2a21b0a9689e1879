"""A run folder's checkpoints and its lock.

``checkpoints/step-N/`` holds ``model.safetensors``, ``trainer.pt`` (optimizer, scheduler) and ``state.json``
(step, epoch, position in the epoch, and the run's identity: the digest of its provenance key). Only a run of
that identity resumes from a checkpoint or writes beside it; the last k are kept. ``train.lock`` is held while
a run writes into the folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tipcap.errors import TipcapError
from tipcap.io import exclusive_lock, save_safetensors

logger = logging.getLogger(__name__)
LOCK = "train.lock"
FILES = ("model.safetensors", "trainer.pt", "state.json")
_CHECKPOINT_DAMAGE = (
    SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, TypeError,
)  # fmt: skip
"""What a checkpoint damaged on disk raises while it is read (safetensors, torch.load, JSON, missing keys)."""


def save_checkpoint(
    folder: Path,
    position: tuple[int, int, int],
    run: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    keep: int,
) -> None:
    """Write ``folder/step-N`` for ``position`` = (step, epoch, position in the epoch) atomically (a
    temporary directory, then renamed); keep the last ``keep``."""
    step, epoch, index = position
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_safetensors(state, tmp / "model.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "epoch": epoch, "position": index, "run": run}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    kept = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resume_newest(
    folder: Path,
    run: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> tuple[int, int, int]:
    """Load the newest complete checkpoint of run ``run`` in ``folder``; return (step, epoch, position) to
    continue from ((0, 0, 0) when there is none)."""
    candidates = sorted((p for p in folder.glob("step-*") if p.is_dir()), reverse=True)
    damaged = []
    for path in candidates:
        if all((path / name).is_file() for name in FILES):
            try:
                return _load_checkpoint(path, run, _Trained(model, optimizer, scheduler, device))
            # Checkpoints are renamed into place whole, so these are damaged on disk since; an earlier
            # checkpoint is loaded over whatever part of this one was.
            except _CHECKPOINT_DAMAGE as e:
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                logger.warning("checkpoint %s cannot be loaded (%s); trying an earlier one", path, reason)
                damaged.append(path.name)
    if damaged:
        raise TipcapError(
            f"--resume: no checkpoint in {folder} can be loaded ({', '.join(damaged)} are "
            "damaged); delete them to start afresh, or use another --out."
        )
    return 0, 0, 0


def checkpoint_run(path: Path) -> str | None:
    """The identity a checkpoint folder records (``None``: none, or no readable ``state.json``)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state.get("run") if isinstance(state, dict) else None


def refuse_other_runs(out: Path, folder: Path, run: str) -> None:
    """Refuse to start afresh beside another run's checkpoints: the newest k are kept whoever wrote them,
    so the other run's later steps would outlive this run's and a ``--resume`` would load them. (This
    run's own, from an earlier start, are redone and replaced.)"""
    for path in sorted(p for p in folder.glob("step-*") if p.is_dir()):
        if checkpoint_run(path) != run:
            raise TipcapError(
                f"{out} holds checkpoints of another run (checkpoints/{path.name}: another config "
                "or other inputs); continue that run with its own config and --resume, or train this one "
                f"into another --out (or delete {folder} first)."
            )


class _Trained(NamedTuple):
    """What a checkpoint is loaded into."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device


def _load_checkpoint(path: Path, run: str, into: _Trained) -> tuple[int, int, int]:
    """Load a checkpoint folder's weights, optimizer and scheduler ``into`` a run; return its (step, epoch,
    position).

    A checkpoint of another run is refused before anything is loaded: its weights would finish this run
    under this run's provenance.
    """
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if not isinstance(state, dict):
        raise ValueError("state.json is not a JSON object")
    if state.get("run") != run:
        recorded = f"records run {str(state['run'])[:12]}" if state.get("run") else "records no run"
        raise TipcapError(
            f"--resume: {path} is not this run's checkpoint (its state.json {recorded}, this config and "
            f"its inputs make run {run[:12]}); resume with the config and inputs it was "
            f"trained with, or delete {path.parent} to start afresh, or use another --out."
        )
    weights = load_file(path / "model.safetensors", device=str(into.device))
    broken = [n for n, t in weights.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if broken:
        raise ValueError(f"{len(broken)} tensors hold NaN or infinite values ({broken[0]} first)")
    into.model.load_state_dict(weights)
    trainer = torch.load(path / "trainer.pt", map_location=into.device, weights_only=True)
    into.optimizer.load_state_dict(trainer["optimizer"])
    into.scheduler.load_state_dict(trainer["scheduler"])
    return state["step"], state["epoch"], state["position"]


@contextlib.contextmanager
def holding(out: Path, main: bool) -> Iterator[None]:
    """Hold the run folder ``out`` for this run (``train.lock``), or refuse at once when another run holds
    it: two runs into one folder would interleave their logs and prune each other's checkpoints. Under
    torchrun rank 0 (``main``) holds it for all ranks (which share the folder)."""
    if not main:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)

    def busy() -> None:
        raise TipcapError(
            f"{out}: another training is writing into this folder (it holds {out / LOCK}); wait for it to "
            "end, or train into another --out."
        )

    with exclusive_lock(out / LOCK, busy):
        yield
