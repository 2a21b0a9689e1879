"""Building the demo's toy world and its CLIP: time of each stage and the CLIP's geometry, per world seed.

For each seed, the world and CLIP of `tipcap demo` (``--quick`` or full, world ``--version`` 1 or 2) are
built into a fresh folder through :func:`tipcap.demo.demo_world`, so the figures are those of a run from an
empty cache. Wall and CPU seconds are printed per stage (CPU seconds are the fairer figure on a shared
machine), then the fields of ``toyclip_report.json``: R@1, the matched and cross-image cosines, ‖μ‖, tr Σ
and its effective rank, and why training stopped.

Usage: python benchmarks/toyworld_build.py [--quick] [--version 2] [--seeds 0 1 2] [--out /tmp/toyworlds]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tipcap.demo import demo_world


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--version", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--out", type=Path, default=None, help="Where to build (default: a temporary folder)."
    )
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="toyworlds-"))
    for seed in args.seeds:
        stages = []

        def echo(message: str, stages: list = stages) -> None:
            stages.append((message, time.perf_counter(), time.process_time()))

        wall, cpu = time.perf_counter(), time.process_time()
        _, clip_dir = demo_world(root / f"seed{seed}", seed=seed, quick=args.quick, progress=False,
                                 echo=echo, version=args.version)  # fmt: skip
        marks = [(wall, cpu), *[(w, c) for _, w, c in stages]]
        print(f"world {args.version}, seed {seed}, {'quick' if args.quick else 'full'}:")
        for (message, w, c), (w0, c0) in zip(stages, marks, strict=False):
            print(f"  {message}  [{w - w0:.0f} s wall, {c - c0:.0f} s CPU since the previous line]")
        report = json.loads((clip_dir / "toyclip_report.json").read_text(encoding="utf-8"))
        print(
            "  "
            + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items())
        )


if __name__ == "__main__":
    main()
