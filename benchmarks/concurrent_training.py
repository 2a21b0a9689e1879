"""Sharing a machine: one tiny training alone against two at once.

Trains ``experiments/tiny.yaml`` (``--steps`` steps, on real COCO captions with random embeddings) through
the ``tipcap train`` command, first alone and then two at once, and prints the wall time of each and their
ratio. Fair sharing of the cores gives 2x; more means the processes get in each other's way (threads
spinning while they wait, or more threads than cores). The machine's load average is printed beside each
figure, since other work on the machine changes them.

``--env KEY=VALUE`` runs the commands with that environment variable (e.g. ``OMP_WAIT_POLICY=ACTIVE``, or
``TIPCAP_THREADS=2``), to compare thread settings.

Usage: python benchmarks/concurrent_training.py [--steps 1500] [--repeats 1] [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stores import DEFAULT_CORPUS, ROOT, caption_store, coco_captions


def command(store: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "tipcap.cli", "train", "--config", str(ROOT / "experiments" / "tiny.yaml"),
            "--set", f"data.train_texts={store}", "--set", f"train.max_steps={steps}",
            "--out", str(out), "--no-progress"]  # fmt: skip


def timed(commands: list[list[str]], env: dict[str, str]) -> float:
    """Wall time of running ``commands`` at once, each to completion."""
    start = time.perf_counter()
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in commands]
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"training failed: {' '.join(process.args)}")
    return time.perf_counter() - start


def load() -> str:
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update(item.split("=", 1) for item in args.env)

    captions = coco_captions(args.corpus, args.captions)
    print(f"{os.cpu_count()} CPUs; tiny.yaml, {args.steps} steps; extra environment: {args.env or 'none'}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = caption_store(tmp, captions, 32)
        for repeat in range(args.repeats):
            before = load()
            alone = timed([command(store, tmp / f"alone{repeat}", args.steps)], env)
            print(f"one alone    : {alone:7.1f} s  ({before} before)")
            before = load()
            pair = [command(store, tmp / f"pair{repeat}-{i}", args.steps) for i in range(2)]
            both = timed(pair, env)
            print(f"two at once  : {both:7.1f} s  ({before} before)")
            print(f"ratio        : {both / alone:7.2f}x  (fair sharing: 2x)")


if __name__ == "__main__":
    main()
