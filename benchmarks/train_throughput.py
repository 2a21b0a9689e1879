"""Training throughput, side by side: fixed padding, length buckets, packed rows, packed rows compiled.

- **fixed padding**: every caption padded to one length, mean + 10·std of the corpus's token counts (capped
  at the maximum), attending over the padding, as published prefix-captioning code does;
- **bucketed**: tipcap's loop with ``train.packing: false`` (captions of similar length per batch, each
  batch padded to its longest);
- **packed**: ``train.packing: true`` (no padding: sequences laid end to end in rows of
  ``train.pack_length`` positions, attention kept within each);
- **packed + compile**: the same with ``train.compile: true``.

All train the same model (same forward, loss and AdamW step) on the same real COCO captions embedded by a
random tiny CLIP (speed does not depend on the embeddings). Tokens/s counts real caption tokens. The
*useful* FLOP rate counts real positions only (prefix and caption, never padding): 6 FLOP per matrix
parameter per position (forward and backward; the output layer included), 6 per projector parameter per
caption, and 12·layers·width·L per position for attention over a sequence of L. It is set against the
machine's measured fp32 matrix-multiply rate on a CPU (a 2,048² product, as many threads as training uses)
or the GPU's bf16 peak (``--peak-tflops``). Each mode runs ``--repeats`` times, interleaved; the median
window of each run is reported, and the best run of each mode. For compiled runs the first window, which
holds the compilation, is skipped; how much longer it took than a steady window is the compilation's
start-up cost.

``--gpt2-base`` uses GPT-2 base's shape (``GPT2Config()`` defaults: 12 layers, width 768, vocabulary
50,257; random weights), K = 10 and a 512-wide CLIP.

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
from stores import DEFAULT_CORPUS, ROOT, caption_store, coco_captions

from tipcap.config import load_config
from tipcap.training.data import collate
from tipcap.training.loop import Distributed, Trainer
from tipcap.training.setup import build_training

MODES = ("fixed padding", "bucketed", "packed", "packed + compile")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """The machine's fp32 matrix-multiply rate (GFLOP/s): the best of ``repeats`` products of two
    ``size``² matrices."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def trainer_for(config, out: Path) -> Trainer:
    env = Distributed(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return Trainer(config, build_training(config, env.device), out, env, progress=False)


def library_loop(config, out: Path, mean_tokens: float) -> tuple[float, float]:
    """tipcap's loop: median tokens/s over its logging windows after the first, and how much longer the
    first window took than a steady one (compilation and warm-up), in seconds."""
    trainer_for(config, out).train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    steady = statistics.median(windows[1:])
    # A window holds about log_every · batch_size · mean_tokens tokens; its time is tokens / rate.
    tokens = config.train.log_every * config.train.batch_size * mean_tokens
    return steady, tokens * (1 / windows[0] - 1 / steady)


def fixed_padding(config, out: Path, steps: int, length: int) -> float:
    """Tokens/s with every caption padded to ``length`` tokens and attended over."""
    trainer = trainer_for(config, out)
    data, model = trainer.train_data, trainer.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    batch = config.train.batch_size
    model.train()
    tokens, elapsed = 0, 0.0
    for step in range(steps + 3):
        synchronize()
        start = time.perf_counter()
        rows = torch.randint(0, len(data), (batch,), generator=generator).tolist()
        embeddings, ids, mask = collate(data, rows)
        ids = torch.nn.functional.pad(ids[:, :length], (0, max(0, length - ids.shape[1])))
        mask = torch.nn.functional.pad(mask[:, :length], (0, max(0, length - mask.shape[1])))
        with trainer._autocast():
            # Published code attends over the padding too: the mask only hides it from the loss.
            loss = model(model.training_inputs(embeddings), ids, torch.ones_like(mask)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if step >= 3:
            elapsed += time.perf_counter() - start
            tokens += int(mask.sum())
    return tokens / elapsed


def useful_flops_per_token(model, lengths: torch.Tensor, prefix: int) -> float:
    """Training FLOPs per real caption token, counting real positions only (see the module's text)."""
    lm = model.language_model
    width, layers = lm.config.n_embd, lm.config.n_layer
    blocks = sum(p.numel() for p in lm.transformer.h.parameters())
    matrix = blocks + width * lm.config.vocab_size  # the output layer multiplies at every position
    projector = sum(p.numel() for p in model.projector.parameters())
    positions = lengths + prefix
    per_caption = 6 * matrix * positions + 6 * projector + 12 * layers * width * positions**2
    return float(per_caption.mean() / lengths.mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--captions", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument("--log-every", type=int, default=10, help="Steps per timing window.")
    parser.add_argument("--pack-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="Runs of each mode, interleaved.")
    parser.add_argument("--modes", default=",".join(MODES), help="Comma-separated subset of the modes.")
    parser.add_argument("--gpt2-base", action="store_true", help="GPT-2 base's shape, K = 10, d = 512.")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="The GPU's dense bf16 peak (H100/H200: 989)."
    )
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",")]

    captions = coco_captions(args.corpus, args.captions)
    overrides = [f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
                 f"train.log_every={args.log_every}", "train.checkpoint_every=1000000",
                 "train.warmup_steps=0", "train.precision=auto",
                 f"train.pack_length={args.pack_length}"]  # fmt: skip
    dim = 32
    if args.gpt2_base:
        dim = 512
        gpt2_base = "{model_type: gpt2, vocab_size: 50257, n_positions: 1024}"  # GPT2Config() otherwise
        overrides += [f"model.language_model_config={gpt2_base}", "model.prefix_length=10",
                      "model.clip_dim=512"]  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rate = args.peak_tflops * 1e3 if device == "cuda" else matmul_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = caption_store(tmp, captions, dim)
        config = load_config(ROOT / "experiments" / "tiny.yaml", [f"data.train_texts={store}", *overrides])
        probe = trainer_for(config, tmp / "probe")
        lengths = torch.tensor([len(ids) for ids in probe.train_data.token_ids], dtype=torch.float)
        fixed = int(min(lengths.mean() + 10 * lengths.std(), lengths.max()))
        flops = useful_flops_per_token(probe.model, lengths, config.model.prefix_length)
        parameters = sum(p.numel() for p in probe.model.parameters())
        del probe
        print(f"{len(captions)} COCO captions: tokens mean {lengths.mean():.1f}, std {lengths.std():.1f}, "
              f"max {lengths.max():.0f}; fixed padding length {fixed}; "
              f"K = {config.model.prefix_length}")  # fmt: skip
        print(f"model: {parameters / 1e6:.1f}M parameters, {flops / 1e6:.0f} MFLOP per caption token; batch "
              f"{args.batch_size}, pack length {args.pack_length}, device {device}, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        reference = "bf16 peak" if device == "cuda" else "measured fp32 matmul rate"
        print(f"{reference}: {rate:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f}")
        results: dict[str, list[float]] = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            for mode in modes:
                out = tmp / f"{mode.replace(' ', '')}-{repeat}"
                if mode == "fixed padding":
                    tokens_per_s, startup = fixed_padding(config, out, args.steps, fixed), None
                else:
                    settings = [f"data.train_texts={store}", *overrides,
                                f"train.packing={mode != 'bucketed'}",
                                f"train.compile={mode.endswith('compile')}"]  # fmt: skip
                    mode_config = load_config(ROOT / "experiments" / "tiny.yaml", settings)
                    tokens_per_s, startup = library_loop(mode_config, out, float(lengths.mean()))
                results[mode].append(tokens_per_s)
                extra = f", first window {startup:+.1f} s over a steady one" if startup is not None else ""
                print(f"  run {repeat + 1} {mode:17s}: {tokens_per_s:9.0f} tokens/s "
                      f"(load {os.getloadavg()[0]:.1f}{extra})")  # fmt: skip
    base = max(results["bucketed"]) if "bucketed" in results else None
    print(f"best of {args.repeats} run(s)    tokens/s   useful GFLOP/s  share of {reference}   vs bucketed")
    for mode, values in results.items():
        best = max(values)
        achieved = best * flops / 1e9
        ratio = f"{best / base:6.2f}x" if base else "-"
        print(f"{mode:17s} {best:12.0f} {achieved:14.1f} {100 * achieved / rate:14.1f}%  {ratio:>18s}")


if __name__ == "__main__":
    main()
