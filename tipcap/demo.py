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


WORLD_VERSIONS = (1, 2)


@dataclass(frozen=True)
class DemoScale:
    """Sizes of the demo's world, CLIP and grid; ``stop`` ends the CLIP's training early (world 2)."""

    train: int
    val: int
    test: int
    clip_steps: int
    clip_batch: int
    clip_config: dict[str, Any]
    grid: str
    stop: Any = None  # a tipcap.toy.clip.StopRule, or None to train all clip_steps
    gap: Any = None  # a tipcap.toy.gap_shapes.GapShape built into the CLIP's towers, or None (world 1)
    scale_warmup: int = 0  # steps over which the CLIP's logit scale rises to 100
    hard_negatives: bool = False  # train the CLIP against captions with one claim made false (world 2)
    seeing_steps: int = 0  # image tower alone on the scene read-out, before contrastive training (world 2)
    scene_supervision: float = 0.0  # weight of the scene read-out during contrastive training (world 2)


def demo_scale(quick: bool, version: int = 2) -> DemoScale:
    """The full demo, or the reduced one (``--quick``: about 3 minutes on a 2-core CPU, pinned), on toy world
    ``version`` (1 keeps the tables of the first world reproducible)."""
    from tipcap.toy.clip import TOYCLIP2_CONFIG, TOYCLIP_CONFIG, StopRule
    from tipcap.toy.gap_shapes import GapShape

    if version == 1:
        if not quick:
            return DemoScale(20_000, 500, 500, 1_200, 64, TOYCLIP_CONFIG, "toyworld.yaml")
        return DemoScale(2_000, 100, 100, 400, 64, TOYCLIP_CONFIG, "toyworld_quick.yaml")
    if not quick:
        return DemoScale(
            20_000, 500, 500, 600, 32, TOYCLIP2_CONFIG, "toyworld2.yaml",
            StopRule(every=100, recall_at_1=0.99, held_out=200), GapShape(1.25), 200, True, 2_000, 1.0,
        )  # fmt: skip
    return DemoScale(
        2_000, 100, 200, 150, 32, TOYCLIP2_CONFIG, "toyworld2_quick.yaml",
        StopRule(every=50, recall_at_1=0.95, held_out=100), GapShape(1.25), 50, True, 500, 1.0,
    )  # fmt: skip


def demo_world(
    cache: str | Path,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    version: int = 2,
) -> tuple[Path, Path]:
    """The demo's toy world and its trained CLIP, generated into ``cache`` or reused from it.

    Both are keyed by what they are made from (world version, seed, sizes, CLIP config, steps and stop
    rule) and by the versions of the code that makes them (``GENERATOR_VERSION`` of the world's module,
    ``TRAINING_VERSION``). Returns the world's
    Karpathy file and the CLIP's directory (``toyclip.json``, ``toyclip.safetensors``). ``echo`` receives one
    line per stage (generated or reused).
    """
    import hashlib
    import time
    from dataclasses import asdict

    from tipcap.toy import clip

    echo = echo or (lambda message: None)
    scale = demo_scale(quick, version)
    maker = _world_module(version)

    def key(*identity: Any) -> str:
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:10]

    identity = (maker.GENERATOR_VERSION, seed, scale.train, scale.val, scale.test)
    # World 1's key stays what it was, so its caches stay valid.
    world = Path(cache) / (f"toyworld-{key(*identity)}" if version == 1 else f"toyworld2-{key(*identity)}")
    karpathy = world / "toyworld.json"
    if karpathy.is_file():
        echo(f"toy world: reused {world}")
    else:
        echo(f"toy world: generating {scale.train + scale.val + scale.test} images into {world}")
        start = time.perf_counter()
        write = maker.write_toyworld if version == 1 else maker.write_world
        write(world, seed=seed, train=scale.train, val=scale.val, test=scale.test, progress=progress)
        echo(f"toy world: generated in {time.perf_counter() - start:.0f} s")
    # A stop rule's unset fields stay out of the key, so that caches made before they existed stay valid.
    stop = [{k: v for k, v in asdict(scale.stop).items() if v is not None}] if scale.stop else []
    # World 1's key stays what it was (it does not build the gap).
    built = [scale.gap.offset, scale.scale_warmup, scale.hard_negatives] if scale.gap else []
    built += [scale.seeing_steps, scale.scene_supervision] if scale.seeing_steps else []
    # A CLIP trained with the machine's own kernels differs from a pinned one (tipcap.portable).
    arithmetic = [] if arithmetic_mode() == "native" else [arithmetic_mode()]
    clip_key = key(
        clip.TRAINING_VERSION, scale.clip_config, scale.clip_steps, scale.clip_batch, seed, *stop, *built,
        *arithmetic,
    )  # fmt: skip
    clip_dir = world / f"clip-{clip_key}"
    if (clip_dir / "toyclip.safetensors").is_file():
        echo(f"toy CLIP: reused {clip_dir}")
    else:
        train_demo_clip(karpathy, clip_dir, seed, quick, version, progress, echo)
    return karpathy, clip_dir


def train_demo_clip(
    karpathy: str | Path,
    out: str | Path,
    seed: int = 0,
    quick: bool = False,
    version: int = 2,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    gap: Any = None,
    stop: Any = None,
) -> Any:
    """Train the demo's toy CLIP (as :func:`demo_scale` sizes it) on a world into ``out``; returns its
    :class:`tipcap.toy.clip.ToyClipReport`. A world that differs from the demo's only in its test split
    gets the same CLIP, since training reads the training and validation splits alone. ``gap`` (a
    :class:`tipcap.toy.gap_shapes.GapShape`, world 2) builds another gap into the towers than the demo's,
    and ``stop`` (a :class:`tipcap.toy.clip.StopRule`) ends its training by another rule."""
    from tipcap.toy import clip, world2_grammar

    echo = echo or (lambda message: None)
    scale = demo_scale(quick, version)
    # Two stages, each with its own progress bar: the image tower alone, then both towers contrastively.
    seeing = f"{scale.seeing_steps} steps of the image tower alone, then " if scale.seeing_steps else ""
    echo(
        f"toy CLIP: training {seeing}up to {scale.clip_steps} contrastive steps at batch {scale.clip_batch}, "
        f"into {out}"
    )
    _, report = clip.train_toyclip(
        karpathy, out, steps=scale.clip_steps, batch_size=scale.clip_batch, seed=seed,
        config=scale.clip_config, stop=stop or scale.stop, gap=gap or scale.gap,
        scale_warmup=scale.scale_warmup, negatives=world2_grammar.perturb if scale.hard_negatives else None,
        seeing_steps=scale.seeing_steps, scene_supervision=scale.scene_supervision, progress=progress,
    )  # fmt: skip
    claims = "" if report.claim_accuracy is None else f"; claim accuracy {report.claim_accuracy:.2f}"
    echo(
        f"toy CLIP: {seeing.replace(', then ', ' and ')}{report.steps} contrastive steps in "
        f"{report.seconds:.0f} s (stopped by {report.stop_reason}); "
        f"R@1 {report.recall_at_1:.2f}, matched cosine {report.matched_cosine:.2f} against "
        f"{report.within_modality_cosine:.2f} between images{claims}"
    )
    return report


def _world_module(version: int) -> Any:
    """The module that writes toy world ``version``."""
    import importlib

    if version not in WORLD_VERSIONS:
        from tipcap.errors import TipcapError

        raise TipcapError(f"--version {version}: the toy worlds are {', '.join(map(str, WORLD_VERSIONS))}")
    return importlib.import_module("tipcap.toy.world1" if version == 1 else "tipcap.toy.world2")


def run_demo(
    out: str | Path,
    cache: str | Path,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    version: int = 2,
) -> list[dict[str, Any]]:
    """The whole pipeline offline: a toy world, its CLIP and their embedding stores (cached in ``cache`` by
    seed and size), then the core grid.

    Writes the grid's files into ``out`` plus ``gap.png`` (the few-pairs Gaussian gap) and returns its rows;
    ``echo`` receives one line per stage and cell.
    """
    import importlib.resources
    import shutil
    import time

    from tipcap.grid import run_ablation

    _check_arithmetic(Path(out))
    karpathy, clip_dir = demo_world(cache, seed, quick, progress, echo, version)
    world = karpathy.parent
    grid = importlib.resources.files("tipcap") / "resources" / demo_scale(quick, version).grid
    overrides = [
        f"karpathy={karpathy}", f"web_pairs={world / 'web_pairs.jsonl'}",
        f"vocabulary={world / 'entities.json'}", f"embed.model={clip_dir / 'toyclip.json'}",
        f"embed.pretrained={clip_dir / 'toyclip.safetensors'}", f"seeds=[{seed}]",
        # There is no ViT-B/32 offline: CLIP-S and RefCLIP-S are scored by the toy CLIP.
        f"eval.score_clip={clip_dir / 'toyclip.json'}",
        f"eval.score_pretrained={clip_dir / 'toyclip.safetensors'}",
        f"store_dir={clip_dir / 'stores'}",
    ]  # fmt: skip
    start = time.perf_counter()
    rows = run_ablation(Path(str(grid)), out, overrides, progress=progress, echo=echo)
    (echo or (lambda message: None))(f"grid: finished in {time.perf_counter() - start:.0f} s")
    gap_plot = Path(out) / "gaps" / f"gaussian-few-pairs-seed{seed}.png"
    if gap_plot.is_file():
        shutil.copyfile(gap_plot, Path(out) / "gap.png")
    return rows


ARITHMETIC_FILE = "arithmetic.json"


def arithmetic_mode() -> str:
    """``pinned`` when this process runs with :mod:`tipcap.portable`'s pins in force, else ``native``."""
    from tipcap.portable import pinned

    return "pinned" if pinned() else "native"


def _check_arithmetic(out: Path) -> None:
    """Refuse to add cells to a demo folder whose earlier cells ran with the other arithmetic; record the
    mode in a new folder.

    Raises:
        TipcapError: naming ``--out``, when ``out`` holds a run of the other mode.
    """
    from tipcap.errors import TipcapError
    from tipcap.io import load_json, write_json_atomic

    mode, record = arithmetic_mode(), out / ARITHMETIC_FILE
    if record.is_file():
        earlier = load_json(record).get("mode")
        if earlier != mode:
            flag = "without --unpinned" if earlier == "pinned" else "with --unpinned"
            raise TipcapError(
                f"--out {out}: holds a demo run with {earlier} CPU arithmetic, and this run's is {mode}; "
                f"give another --out, or rerun {flag}."
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, {"mode": mode})


def describe_arithmetic(results: Path, not_pinned: str | None) -> str:
    """One line: the SHA-256 of ``results`` (a demo's results.csv) and whether another machine should print
    the same one (``not_pinned``: why the pins were not set, or ``None``)."""
    import hashlib

    from tipcap.portable import versions

    digest = hashlib.sha256(results.read_bytes()).hexdigest()[:16]
    if not_pinned is None and arithmetic_mode() == "pinned":
        packages = ", ".join(f"{name} {version}" for name, version in versions().items())
        return (
            f"results.csv digest {digest}: CPU arithmetic pinned (tipcap.portable), so any x86-64 machine "
            f"with {packages} prints this digest."
        )
    reason = not_pinned or "the pins did not take effect"
    return (
        f"results.csv digest {digest}: CPU arithmetic not pinned ({reason}); the digits depend on this CPU."
    )
