"""The price of pinned CPU arithmetic (tipcap.portable), stage by stage, against the machine's own kernels.

Each run is a fresh interpreter (the pins must be set before torch loads): it writes a small toy world 2,
trains the quick demo's toy CLIP on it (``--clip-steps`` of the seeing stage, then as many contrastive
ones), and trains one text-only decoder of the quick demo's grid for ``--decoder-steps`` steps. The two
modes run ``--repeats`` times, interleaved, and the best time of each stage is reported with the ratio.

Baseline: ``native`` (the machine's widest kernels, as many threads as torch picks). Ceiling: the same
speed (a ratio of 1), which pinning cannot beat, since it only removes choices. What limits it: the pinned
kernels are ATen's baseline x86-64 loops and MKL's SSE code path, so matrix products lose AVX2/AVX-512
width; the toy models are small, so part of each step is Python and dispatch overhead that pinning does not
touch. Run it on an idle machine: other load moves both modes.

Usage: python benchmarks/pinned_arithmetic.py [--clip-steps 100] [--decoder-steps 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUN = """
import json, sys, time
from pathlib import Path
mode, out, clip_steps, decoder_steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if mode == "pinned":
    from tipcap.portable import pin_cpu_arithmetic
    assert pin_cpu_arithmetic() is None
import torch
from tipcap.demo import demo_scale
from tipcap.grid import run_ablation
from tipcap.toy import clip, world2, world2_grammar
times = {}
start = time.perf_counter()
world2.write_world(out / "world", seed=0, train=1000, val=100, test=50, progress=False)
times["world"] = time.perf_counter() - start
scale = demo_scale(True, 2)
start = time.perf_counter()
clip.train_toyclip(out / "world" / "toyworld.json", out / "clip", steps=clip_steps,
                   batch_size=scale.clip_batch, seed=0, config=scale.clip_config,
                   gap=scale.gap,
                   scale_warmup=scale.scale_warmup, negatives=world2_grammar.perturb, seeing_steps=clip_steps,
                   scene_supervision=scale.scene_supervision, progress=False)
times["clip"] = time.perf_counter() - start
grid = Path(sys.argv[5])
overrides = [f"karpathy={out / 'world' / 'toyworld.json'}", f"embed.model={out / 'clip' / 'toyclip.json'}",
             f"embed.pretrained={out / 'clip' / 'toyclip.safetensors'}", "seeds=[0]",
             f"decoder.train.max_steps={decoder_steps}", f"decoder.train.checkpoint_every={decoder_steps}",
             f"eval.score_clip={out / 'clip' / 'toyclip.json'}",
             f"eval.score_pretrained={out / 'clip' / 'toyclip.safetensors'}",
             "cells=[{name: none, kind: none}]"]
start = time.perf_counter()
run_ablation(grid, out / "grid", overrides, progress=False)
times["decoder (train + evaluate)"] = time.perf_counter() - start
print(json.dumps({"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
                  "times": times}))
"""


def run(mode: str, out: Path, clip_steps: int, decoder_steps: int) -> dict:
    """One fresh interpreter's stage times (seconds) in ``mode``."""
    grid = ROOT / "tipcap" / "resources" / "toyworld2_quick.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", RUN, mode, str(out), str(clip_steps), str(decoder_steps), str(grid)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clip-steps", type=int, default=100)
    parser.add_argument("--decoder-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    best: dict[str, dict[str, float]] = {"native": {}, "pinned": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode in best:
                found = run(mode, Path(tmp) / f"{mode}-{repeat}", args.clip_steps, args.decoder_steps)
                stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in found["times"].items())
                print(f"{mode} run {repeat + 1}: {found['capability']}, {found['threads']} threads, {stages}")
                for stage, seconds in found["times"].items():
                    best[mode][stage] = min(seconds, best[mode].get(stage, float("inf")))
    print(f"\nbest of {args.repeats} (load average {os.getloadavg()[0]:.1f} at the end):")
    print("| stage | native (s) | pinned (s) | pinned / native |\n|---|---|---|---|")
    for stage, native in best["native"].items():
        pinned = best["pinned"][stage]
        print(f"| {stage} | {native:.1f} | {pinned:.1f} | {pinned / native:.2f} |")


if __name__ == "__main__":
    main()
