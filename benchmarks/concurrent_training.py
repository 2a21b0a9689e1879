"""Sharing a machine: one tiny training alone against two at once, under several thread settings.

Trains ``experiments/tiny.yaml`` (``--steps`` steps, on real COCO captions with random embeddings) through
the ``tipcap train`` command, first alone and then two at once, and prints the wall time of each and their
ratio. Fair sharing of the cores gives 2x; more means the processes get in each other's way (threads
spinning while they wait, or more threads than cores). The machine's load average is printed beside each
figure, since other work on the machine changes them.

Each ``--candidate NAME:KEY=VALUE[,KEY=VALUE...]`` is a thread setting, the environment the commands run
with (``NAME:`` alone: the command line's own default). Repeats are interleaved: each repeat runs every
candidate once, alone and then in a pair, so that a slow spell of the machine falls on all of them alike.
The table at the end gives every run and each candidate's median. A run still going after ``--limit``
seconds is stopped and counted as over it: two processes whose threads spin can take many times that.

Usage: python benchmarks/concurrent_training.py [--steps 1000] [--repeats 3] [--limit 300]
    [--candidate default:] [--candidate passive:OMP_WAIT_POLICY=PASSIVE]
    [--candidate spin:GOMP_SPINCOUNT=300000] ...
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
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


def timed(commands: list[list[str]], env: dict[str, str], limit: float) -> float:
    """Wall time of running ``commands`` at once, each to completion; ``inf`` when they have not all
    finished after ``limit`` seconds (they are stopped then)."""
    start = time.perf_counter()
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in commands]
    try:
        for process in processes:
            remaining = limit - (time.perf_counter() - start)
            if process.wait(timeout=max(remaining, 0.001)) != 0:
                raise SystemExit(f"training failed: {' '.join(process.args)}")
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.wait()
        return math.inf
    return time.perf_counter() - start


def seconds(value: float, limit: float) -> str:
    return f"> {limit:.0f}" if math.isinf(value) else f"{value:.1f}"


def load() -> str:
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def candidate(spec: str) -> tuple[str, dict[str, str]]:
    """``NAME:KEY=VALUE[,KEY=VALUE...]`` as its name and environment."""
    name, _, assignments = spec.partition(":")
    return name, dict(item.split("=", 1) for item in assignments.split(",") if item)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--limit", type=float, default=300.0, help="Seconds after which a run is stopped and counted as over."
    )
    parser.add_argument("--candidate", action="append", type=candidate, metavar="NAME:KEY=VALUE,...")
    args = parser.parse_args()
    candidates = args.candidate or [candidate("default:")]
    base = {**os.environ, "PYTHONPATH": str(ROOT)}

    captions = coco_captions(args.corpus, args.captions)
    print(f"{os.cpu_count()} CPUs; tiny.yaml, {args.steps} steps; {args.repeats} interleaved repeats")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in candidates}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = caption_store(tmp, captions, 32)
        for repeat in range(args.repeats):
            for name, extra in candidates:
                env = {**base, **extra}
                before = load()
                alone = timed([command(store, tmp / f"{name}-alone{repeat}", args.steps)], env, args.limit)
                pair = [command(store, tmp / f"{name}-pair{repeat}-{i}", args.steps) for i in range(2)]
                both = timed(pair, env, args.limit)
                times[name].append((alone, both))
                print(f"{name:>12} repeat {repeat}: alone {seconds(alone, args.limit)} s, two at once "
                      f"{seconds(both, args.limit)} s ({both / alone:.2f}x; {before} before)")  # fmt: skip
    print("\n| setting | environment | alone (s) | two at once (s) | median alone | median two | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, extra in candidates:
        alone = [a for a, _ in times[name]]
        both = [b for _, b in times[name]]
        env = ", ".join(f"{k}={v}" for k, v in extra.items()) or "the command line's default"
        runs = " | ".join(", ".join(seconds(t, args.limit) for t in ts) for ts in (alone, both))
        lone, two = statistics.median(alone), statistics.median(both)
        medians = f"{seconds(lone, args.limit)} | {seconds(two, args.limit)}"
        print(f"| {name} | {env} | {runs} | {medians} | {two / lone:.2f}x |")


if __name__ == "__main__":
    main()
