"""Training the caption decoder on cached text embeddings, with the gap applied on the fly.

One loop serves one CPU, one GPU and several GPUs or nodes (``torchrun``: DistributedDataParallel,
each rank reading its DistributedSampler share; rank 0 writes). Randomness (gap noise, prompt
sampling, dropout) is seeded from (seed, step, rank), so a run resumed from a checkpoint draws exactly
what the uninterrupted run drew and ends with the same weights.

Run directory::

    config.yaml          the resolved experiment config
    provenance.json      the run's provenance record: that config, its inputs' hashes, command, versions
    run.json             world size, device, data sizes
    metrics.jsonl        training loss / lr / throughput every ``log_every`` steps, validation loss per epoch
    checkpoints/step-N/  model.safetensors, trainer.pt (optimizer, scheduler), state.json (with the run's
                         identity); last k kept
    train.lock           held while a run writes into the folder (deleted when it ends)
    model/               the final model (TIPCap.from_pretrained), with the run's provenance.json and a
                         model card (README.md, tipcap.card) written from the folder alone

A run's *identity* is the digest of its provenance key (its resolved config and its inputs' hashes): each
checkpoint records it, and only a run of that identity resumes from it or writes beside it. One run at a
time writes into a folder: a second is refused while the first holds ``train.lock``.

The model and its data are built by :mod:`tipcap.training.setup`, checkpoints are written and read by
:mod:`tipcap.training.checkpoints`, and :mod:`tipcap.training.distributed` says where a process stands under
torchrun; this module is the loop.
"""

from __future__ import annotations

import gc
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from transformers import get_scheduler

from tipcap import provenance
from tipcap.card import write_model_card
from tipcap.config import ExperimentConfig, save_config, to_dict
from tipcap.errors import TipcapError
from tipcap.io import atomic_path, write_json_atomic
from tipcap.progress import progress_bar
from tipcap.prompts import sample_training_prompt
from tipcap.training.checkpoints import holding, refuse_other_runs, resume_newest, save_checkpoint
from tipcap.training.data import collate, epoch_batches
from tipcap.training.distributed import Distributed
from tipcap.training.setup import TrainingSetup, build_training, run_record


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 131 + rank


class Trainer:
    """Trains a built :class:`TIPCap` on its data into a run directory (see :func:`train`).

    Args:
        config: the run's resolved config (written to ``config.yaml``; a resume must match it).
        setup: the model and data built from it (:func:`tipcap.training.setup.build_training`).
        out: the run directory.
        env: where this process stands under torchrun.
        progress: show a progress bar.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        setup: TrainingSetup,
        out: str | Path,
        env: Distributed,
        progress: bool = True,
    ):
        self.config = config
        self.out = Path(out)
        self.progress = progress
        self.env = env
        self.model = setup.model
        self.train_data = setup.train_data
        self.val_data = setup.val_data
        self.vocabulary = setup.vocabulary
        self.inputs = setup.inputs
        self.dataset = setup.dataset
        self.identity = provenance.sha256_json(provenance.key(self.provenance()))
        cfg = config.train
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in parameters if p.ndim >= 2]
        no_decay = [p for p in parameters if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            # One kernel for all parameters where the device has it, instead of several per tensor.
            fused=env.device.type == "cuda",
        )
        if cfg.compile:
            # In place, so that parameter names (checkpoints, DDP) stay those of the uncompiled model.
            self.model.language_model.compile()
        steps_per_epoch = len(self._groups(0, env.rank))
        if not steps_per_epoch:
            raise TipcapError(
                f"{config.data.train_texts}: fewer captions than one batch per rank; lower train.batch_size."
            )
        self.total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
        self.scheduler = get_scheduler(
            cfg.schedule,
            self.optimizer,
            num_warmup_steps=cfg.warmup_steps,
            num_training_steps=self.total_steps,
        )
        self.ddp_model = self.model
        if self.env.world > 1:
            self.ddp_model = DistributedDataParallel(
                self.model,
                device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None,
                find_unused_parameters=config.model.prompt == "pim",
            )

    def _groups(self, epoch: int, rank: int) -> list[list[list[int]]]:
        """A rank's batches for one epoch, ``train.accumulate`` micro-batches per optimizer step."""
        batches = epoch_batches(
            self.train_data,
            self.config.train.batch_size,
            self.config.train.seed,
            epoch,
            rank,
            self.env.world,
            bucket=not self.config.train.packing,
        )
        size = self.config.train.accumulate
        return [batches[i : i + size] for i in range(0, len(batches), size)]

    def _step_tokens(self, epoch: int, groups: list[list[list[int]]]) -> list[int]:
        """The caption tokens of each optimizer step of an epoch, summed over all ranks' micro-batches.
        Every rank's batches follow from the seed and epoch, so no rank needs to ask the others."""
        tokens = [0] * len(groups)
        for rank in range(self.env.world):
            rank_groups = groups if rank == self.env.rank else self._groups(epoch, rank)
            for index, group in enumerate(rank_groups):
                tokens[index] += sum(len(self.train_data.token_ids[r]) for rows in group for r in rows)
        return tokens

    # -- one step -----------------------------------------------------------------------------

    def _prompts(self, rows: list[int], rng: random.Random) -> list[list[str]] | None:
        cfg = self.config.train
        if self.vocabulary is None:
            return None
        return [
            sample_training_prompt(
                self.train_data.entities[r],
                self.vocabulary.names,
                rng,
                drop_entity=cfg.prompt_drop_entity,
                drop_all=cfg.prompt_drop_all,
                distractor=cfg.prompt_distractor,
                max_words=self.config.model.max_prompt_words,
            )
            for r in rows
        ]

    def _autocast(self):
        precision = self.config.train.precision
        use_bf16 = precision == "bf16" or (precision == "auto" and self.env.device.type == "cuda")
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def _loss(self, rows: list[int], step: int) -> tuple[torch.Tensor, int]:
        seed = _step_seed(self.config.train.seed, step, self.env.rank)
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator(device=self.env.device).manual_seed(seed)
        embeddings, ids, mask = collate(self.train_data, rows)
        prompts = self._prompts(rows, random.Random(seed))
        noise_scale = None
        if prompts is not None and self.config.train.prompt_noise_scale != 1.0:
            noise_scale = torch.tensor(
                [self.config.train.prompt_noise_scale if words else 1.0 for words in prompts]
            )
        conditioning = self.model.training_inputs(embeddings, generator, noise_scale)
        pack_length = self.config.train.pack_length if self.config.train.packing else None
        with self._autocast():
            loss = self.ddp_model(conditioning, ids, mask, prompts, pack_length).loss
        if self.model.gap is not None and self.model.gap.learnable:
            loss = loss + self.config.train.kl_weight * self.model.gap.kl_to_prior()
        return loss, int(mask.sum())

    # -- checkpoints --------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def _save_checkpoint(self, step: int, epoch: int, position: int) -> None:
        if self.env.main:
            save_checkpoint(
                self.checkpoint_dir, (step, epoch, position), self.identity, self.model, self.optimizer,
                self.scheduler, self.config.train.keep_checkpoints,
            )  # fmt: skip

    def _resume(self) -> tuple[int, int, int]:
        return resume_newest(
            self.checkpoint_dir, self.identity, self.model, self.optimizer, self.scheduler, self.env.device
        )

    # -- logging ------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if not self.env.main:
            return
        with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record.get("step", 0))

    def _trim_log(self, step: int) -> None:
        """Drop the log records after ``step``, which the run is about to redo, and any torn last line."""
        path = self.out / "metrics.jsonl"
        if not self.env.main or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line a killed run was writing
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")

    def provenance(self) -> dict[str, Any]:
        """The run's provenance record: its resolved config and the content hashes of its inputs, and beside
        them (outside its key) the data set of its captions when known, for the model card."""
        return {**run_record(self.config, self.inputs), "dataset": self.dataset}

    def _write_run_info(self, resumed_from: int) -> None:
        if not self.env.main:
            return
        save_config(self.config, self.out / "config.yaml")
        provenance.write(self.out, self.provenance())
        info = {
            "world_size": self.env.world,
            "device": str(self.env.device),
            "train_rows": len(self.train_data),
            "total_steps": self.total_steps,
            "resumed_from_step": resumed_from,
        }
        write_json_atomic(self.out / "run.json", info)

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean token loss on the validation captions, conditioned as in training (the gap's noise with a
        fixed seed; a supervised decoder reads the captions' image embeddings), without prompts."""
        if self.val_data is None:
            return None
        self.model.eval()
        generator = torch.Generator(device=self.env.device).manual_seed(self.config.train.seed)
        total, tokens = 0.0, 0
        rows = list(range(self.env.rank, len(self.val_data), self.env.world))
        order = sorted(rows, key=lambda r: len(self.val_data.token_ids[r]))
        for start in range(0, len(order), self.config.train.batch_size):
            batch = order[start : start + self.config.train.batch_size]
            embeddings, ids, mask = collate(self.val_data, batch)
            conditioning = self.model.training_inputs(embeddings, generator)
            with self._autocast():
                loss = self.model(conditioning, ids, mask).loss
            count = int(mask.sum())
            total += float(loss) * count
            tokens += count
        if self.env.world > 1:
            sums = torch.tensor([total, float(tokens)], device=self.env.device)
            dist.all_reduce(sums)
            total, tokens = float(sums[0]), int(sums[1])
        self.model.train()
        return total / max(tokens, 1)

    # -- the loop -----------------------------------------------------------------------------

    def train(self, resume: bool = False) -> Path:
        """Run (or resume) training; return the final model directory."""
        if self.env.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.env.barrier()
        self._tensorboard = None
        if self.env.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(self.out / "tensorboard")
            except ImportError:
                pass
        try:
            return self._run(resume)
        finally:
            if self._tensorboard is not None:
                self._tensorboard.close()

    def _run(self, resume: bool) -> Path:
        cfg = self.config.train
        if resume and (self.out / "config.yaml").is_file():
            saved = yaml.safe_load((self.out / "config.yaml").read_text(encoding="utf-8"))
            if saved != to_dict(self.config):
                raise TipcapError(
                    f"--resume: the config differs from the one {self.out} was started with "
                    f"({self.out / 'config.yaml'}); resume with the same config and --set values."
                )
        if not resume:
            refuse_other_runs(self.out, self.checkpoint_dir, self.identity)
        step, epoch, position = self._resume() if resume else (0, 0, 0)
        self._trim_log(step)
        self._write_run_info(step)
        self.model.train()
        bar = progress_bar(
            total=self.total_steps,
            initial=step,
            disable=not (self.progress and self.env.main),
            unit="step",
            desc=f"training {self.out.name}",
        )
        # Loss sums and the finiteness flag stay on the device: reading them every step would stall a GPU.
        window_loss = torch.zeros((), device=self.env.device)
        finite = torch.ones((), dtype=torch.bool, device=self.env.device)
        window_tokens, window_first, window_start = 0, step, time.perf_counter()
        while step < self.total_steps:
            groups = self._groups(epoch, self.env.rank)
            step_tokens = self._step_tokens(epoch, groups)
            for group_index in range(position, len(groups)):
                for micro, rows in enumerate(groups[group_index]):
                    loss, tokens = self._loss(rows, step * cfg.accumulate + micro)
                    # Each micro-batch's mean token loss weighs by its share of the step's caption tokens
                    # on all ranks (DDP averages the ranks' gradients, hence the factor world), so that
                    # micro-batches and ranks together give the gradient of one batch of them all.
                    (loss * (tokens * self.env.world / step_tokens[group_index])).backward()
                    finite &= torch.isfinite(loss.detach())
                    window_loss += loss.detach() * tokens
                    window_tokens += tokens
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                done_epoch = group_index + 1 == len(groups)
                log_now = step % cfg.log_every == 0 or step == self.total_steps
                save_now = step % cfg.checkpoint_every == 0 or done_epoch or step == self.total_steps
                # Checked before anything is logged or saved, so the last checkpoint stays good.
                if (log_now or save_now) and not bool(finite):
                    raise TipcapError(
                        f"non-finite training loss between steps {window_first} and {step}; stopped. "
                        f"The last good checkpoint is in {self.checkpoint_dir} (lower train.lr, or check "
                        "the data)."
                    )
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "train_loss": float(window_loss) / max(window_tokens, 1),
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens * self.env.world / max(elapsed, 1e-9),
                    }
                    self._log(record)
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    window_loss.zero_()
                    window_tokens, window_first, window_start = 0, step, time.perf_counter()
                if done_epoch:
                    val_loss = self.validate()
                    if val_loss is not None:
                        self._log({"step": step, "epoch": epoch, "val_loss": val_loss})
                if save_now:
                    next_epoch, next_position = (epoch + 1, 0) if done_epoch else (epoch, group_index + 1)
                    self._save_checkpoint(step, next_epoch, next_position)
                if step >= self.total_steps:
                    break
            else:
                epoch, position = epoch + 1, 0
                continue
            break
        bar.close()
        final = self.out / "model"
        if self.env.main:
            self.model.save_pretrained(final, provenance=self.provenance())
            write_model_card(final)
        self._log_rank_agreement(step)
        self.env.barrier()
        return final

    def _log_rank_agreement(self, step: int) -> None:
        """Under torchrun, record each rank's parameter checksum: they must be equal."""
        if self.env.world == 1:
            return
        self._log({"step": step, "rank_checksums": self.env.rank_checksums(self.model)})


def train(config: ExperimentConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Build the model and data a config names and train it into ``out``; return the final model directory.

    The folder is held for the run (:func:`~tipcap.training.checkpoints.holding`), from before the model is
    built.
    """
    env = Distributed.setup()
    try:
        with holding(Path(out), env.main):
            trainer = Trainer(config, build_training(config, env.device), out, env, progress=progress)
            final = trainer.train(resume=resume)
            # The DDP wrapper holds the process group. Freed after the group is destroyed (at interpreter
            # exit), its gloo threads outlive the group, and the process can abort as it exits
            # ("terminate called without an active exception").
            del trainer
            return final
    finally:
        if env.world > 1:
            gc.collect()  # what still refers to the wrapper in a cycle
            dist.destroy_process_group()
