"""Training throughput: length-bucketed batches (tipcap's loop) against padding every caption to one length.

Published prefix-captioning code pads every caption to one fixed length, mean + 10·std of the corpus's
token counts (capped at the maximum), so most of each batch is padding. tipcap sorts captions into
batches of similar length and pads each batch only to its own longest caption. Both loops here train the
same model (same forward, loss, AdamW step) on the same real COCO captions; the conditioning embeddings
are random (speed does not depend on them). Tokens/s counts real caption tokens in both.

Where a GPU is at hand, also run with ``--gpt2-base`` (GPT-2 base: 12 layers, width 768, K = 10) to see
tokens/s at that size and the fraction of the GPU's bf16 peak it reaches (``--peak-tflops``).

Usage: python benchmarks/train_throughput.py [--captions 4000] [--steps 60] [--batch-size 80] [--gpt2-base]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from tipcap import provenance
from tipcap.config import load_config
from tipcap.data import read_captions
from tipcap.store import Shard, build_store
from tipcap.train import Trainer, collate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "dataset_coco_sample.json.gz"


def write_store(directory: Path, captions: list[str], dim: int) -> Path:
    """A caption store of real captions with random unit embeddings."""
    embeddings = torch.nn.functional.normalize(
        torch.randn(len(captions), dim, generator=torch.Generator().manual_seed(0)), dim=-1
    )

    def encode(rows: range, advance) -> Shard:
        advance(len(rows))
        return Shard(embeddings[rows.start : rows.stop], list(rows))

    record = provenance.record("text-store", {"clip": {"model": "random"}}, {"rows": "benchmark"})
    build_store(
        directory, record, len(captions), encode, extra_files={"captions.json": captions}, progress=False
    )
    return directory


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bucketed(trainer: Trainer) -> float:
    """Median tokens/s of the library's own training loop over its logging windows (the first skipped)."""
    trainer.train()
    records = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r)


def padded(trainer: Trainer, steps: int, length: int) -> float:
    """Tokens/s with every caption padded to ``length`` tokens (the published scripts' way)."""
    data, model = trainer.train_data, trainer.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    batch = trainer.config.train.batch_size
    model.train()
    tokens, elapsed = 0, 0.0
    for step in range(steps + 5):
        synchronize()
        start = time.perf_counter()
        rows = torch.randint(0, len(data), (batch,), generator=generator).tolist()
        embeddings, ids, mask = collate(data, rows)
        ids = torch.nn.functional.pad(ids[:, :length], (0, max(0, length - ids.shape[1])))
        mask = torch.nn.functional.pad(mask[:, :length], (0, max(0, length - mask.shape[1])))
        with trainer._autocast():
            # Published code attends over the padding too: the mask only hides it from the loss.
            loss = model(embeddings, ids, torch.ones_like(mask)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if step >= 5:
            elapsed += time.perf_counter() - start
            tokens += int(mask.sum())
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--captions", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument(
        "--gpt2-base", action="store_true", help="GPT-2 base size (12 layers, width 768), K = 10."
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="The GPU's dense bf16 peak (H100/H200: 989)."
    )
    args = parser.parse_args()

    captions = [c.text for c in read_captions(args.corpus, split="val").captions[: args.captions]]
    overrides = [f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
                 "train.log_every=10", "train.checkpoint_every=1000000", "train.warmup_steps=0",
                 "train.precision=auto"]  # fmt: skip
    if args.gpt2_base:
        gpt2_base = "{model_type: gpt2, n_layer: 12, n_head: 12, n_embd: 768, n_positions: 1024}"
        overrides += [
            f"model.language_model_config={gpt2_base}",
            "model.prefix_length=10",
            "model.clip_dim=512",
        ]
    dim = 512 if args.gpt2_base else 32
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "store", captions, dim)
        config = load_config(ROOT / "experiments" / "tiny.yaml", [f"data.train_texts={store}", *overrides])
        trainer = Trainer(config, Path(tmp) / "run", progress=False)
        lengths = torch.tensor([len(ids) for ids in trainer.train_data.token_ids], dtype=torch.float)
        fixed = int(min(lengths.mean() + 10 * lengths.std(), lengths.max()))
        parameters = sum(p.numel() for p in trainer.model.parameters())
        print(f"{len(captions)} COCO captions: tokens mean {lengths.mean():.1f}, std {lengths.std():.1f}, "
              f"max {lengths.max():.0f}; fixed padding length (mean + 10 std, capped) {fixed}")  # fmt: skip
        print(
            f"model: {parameters / 1e6:.1f}M parameters, batch {args.batch_size}, device {trainer.env.device}"
        )
        ours = bucketed(trainer)
        baseline = padded(trainer, args.steps, fixed)
    print(f"tipcap loop (length-bucketed) : {ours:10.0f} tokens/s")
    print(f"fixed padding to {fixed:3d} tokens  : {baseline:10.0f} tokens/s")
    print(f"ratio                         : {ours / baseline:10.2f}x")
    if torch.cuda.is_available():
        # Training costs about 6 FLOP per parameter per token, on the prefix positions as well.
        prefix = config.model.prefix_length
        per_token = 6 * parameters * (lengths.mean() + prefix) / lengths.mean()
        achieved = ours * float(per_token) / 1e12
        share = 100 * achieved / args.peak_tflops
        print(f"about {achieved:.0f} TFLOP/s, {share:.1f}% of the {args.peak_tflops:.0f} TFLOP/s bf16 peak")


if __name__ == "__main__":
    main()
