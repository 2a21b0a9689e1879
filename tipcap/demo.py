"""The demo: the whole pipeline offline on the toy world, from an empty cache to the table of methods.

It sits on top of :mod:`tipcap.grid` and :mod:`tipcap.toy`, which are imported inside the functions
that use them: this module itself stays import-light (no torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """Where the demo keeps its world, CLIP and stores: ``$XDG_CACHE_HOME/tipcap``, else ``~/.cache/tipcap``.

    An empty or relative ``XDG_CACHE_HOME`` is ignored, as the XDG base-directory spec asks.
    """
    xdg = Path(os.environ.get("XDG_CACHE_HOME", ""))
    return (xdg if xdg.is_absolute() else Path("~/.cache").expanduser()) / "tipcap"


@dataclass(frozen=True)
class DemoScale:
    """Sizes of the demo's world, CLIP and grid."""

    train: int
    val: int
    test: int
    clip_steps: int
    clip_batch: int
    clip_config: dict[str, Any]
    grid: str


def demo_scale(quick: bool) -> DemoScale:
    """The full demo, or the reduced one (``--quick``) that finishes in a few minutes on a laptop CPU."""
    from tipcap.toy.clip import TOYCLIP_CONFIG

    if not quick:
        return DemoScale(20_000, 500, 500, 1_200, 64, TOYCLIP_CONFIG, "toyworld.yaml")
    return DemoScale(2_000, 100, 100, 400, 64, TOYCLIP_CONFIG, "toyworld_quick.yaml")


def demo_world(
    cache: str | Path,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:
    """The demo's toy world and its trained CLIP, generated into ``cache`` or reused from it.

    Both are keyed by what they are made from (seed, sizes, CLIP config and steps) and by the versions of
    the code that makes them (``GENERATOR_VERSION``, ``TRAINING_VERSION``). Returns the world's
    Karpathy file and the CLIP's directory (``toyclip.json``, ``toyclip.safetensors``). ``echo`` receives one
    line per stage (generated or reused).
    """
    import hashlib

    from tipcap.toy.clip import TRAINING_VERSION, train_toyclip
    from tipcap.toy.world import GENERATOR_VERSION, write_toyworld

    echo = echo or (lambda message: None)

    scale = demo_scale(quick)

    def key(*identity: Any) -> str:
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:10]

    world = Path(cache) / f"toyworld-{key(GENERATOR_VERSION, seed, scale.train, scale.val, scale.test)}"
    karpathy = world / "toyworld.json"
    if karpathy.is_file():
        echo(f"toy world: reused {world}")
    else:
        echo(f"toy world: generating {scale.train + scale.val + scale.test} images into {world}")
        write_toyworld(world, seed=seed, train=scale.train, val=scale.val, test=scale.test, progress=progress)
    clip_key = key(TRAINING_VERSION, scale.clip_config, scale.clip_steps, scale.clip_batch, seed)
    clip_dir = world / f"clip-{clip_key}"
    if (clip_dir / "toyclip.safetensors").is_file():
        echo(f"toy CLIP: reused {clip_dir}")
    else:
        echo(f"toy CLIP: training {scale.clip_steps} steps at batch {scale.clip_batch} into {clip_dir}")
        train_toyclip(karpathy, clip_dir, steps=scale.clip_steps, batch_size=scale.clip_batch, seed=seed,
                      config=scale.clip_config, progress=progress)  # fmt: skip
    return karpathy, clip_dir


def run_demo(
    out: str | Path,
    cache: str | Path,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """The whole pipeline offline: a toy world, its CLIP and their embedding stores (cached in ``cache`` by
    seed and size), then the core grid.

    Writes the grid's files into ``out`` plus ``gap.png`` (the few-pairs Gaussian gap) and returns its rows;
    ``echo`` receives one line per stage and cell.
    """
    import importlib.resources
    import shutil

    from tipcap.grid import run_ablation

    karpathy, clip_dir = demo_world(cache, seed, quick, progress, echo)
    world = karpathy.parent
    grid = importlib.resources.files("tipcap") / "resources" / demo_scale(quick).grid
    overrides = [
        f"karpathy={karpathy}", f"web_pairs={world / 'web_pairs.jsonl'}",
        f"vocabulary={world / 'entities.json'}", f"embed.model={clip_dir / 'toyclip.json'}",
        f"embed.pretrained={clip_dir / 'toyclip.safetensors'}", f"seeds=[{seed}]",
        # There is no ViT-B/32 offline: CLIP-S and RefCLIP-S are scored by the toy CLIP.
        f"eval.score_clip={clip_dir / 'toyclip.json'}",
        f"eval.score_pretrained={clip_dir / 'toyclip.safetensors'}",
        f"store_dir={clip_dir / 'stores'}",
    ]  # fmt: skip
    rows = run_ablation(Path(str(grid)), out, overrides, progress=progress, echo=echo)
    gap_plot = Path(out) / "gaps" / f"gaussian-few-pairs-seed{seed}.png"
    if gap_plot.is_file():
        shutil.copyfile(gap_plot, Path(out) / "gap.png")
    return rows
