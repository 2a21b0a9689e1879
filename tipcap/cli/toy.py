"""``tipcap toyworld`` (write a toy world) and ``tipcap demo`` (the whole pipeline on it, offline)."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from tipcap.cli.options import SEED, FiniteFloatRange
from tipcap.demo import default_cache_dir, demo_scale


@click.command("toyworld")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the world to.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the world.")
@click.option(
    "--train",
    "train_images",
    default=20_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Training images.",
)
@click.option(
    "--val",
    "val_images",
    default=500,
    show_default=True,
    type=click.IntRange(min=0),
    help="Validation images.",
)
@click.option(
    "--test", "test_images", default=500, show_default=True, type=click.IntRange(min=0), help="Test images."
)
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    help="Image side in pixels.  [default: 48 in world 2, 32 in world 1]",
)
@click.option(
    "--version",
    "world_version",
    default="2",
    show_default=True,
    type=click.Choice(["1", "2"]),
    help="Which toy world: 2, scenes in relations, captions from a grammar, test scenes new to the "
    "training captions; 1, coloured shapes with few combinations (to reproduce its tables).",
)
@click.option(
    "--web-mismatch",
    default=0.2,
    show_default=True,
    type=FiniteFloatRange(0, 1),
    help="Share of web pairs with another image's caption.",
)
@click.option(
    "--clip/--no-clip",
    "train_clip",
    default=False,
    show_default=True,
    help="Also train the full demo's toy CLIP on the world, into OUT/clip (the demo's own CLIP where the "
    "world differs from the demo's only in --test).",
)
@click.option(
    "--gap-offset",
    type=FiniteFloatRange(0, None),
    help="With --clip (world 2): the modality offset c built into the CLIP's towers, which sets the gap "
    "mean's share.  [default: 1.25]",
)
@click.option(
    "--gap-axes",
    type=click.IntRange(min=0),
    help="With --clip (world 2): an even number of coordinates that carry the gap's mean (privileged axes); "
    "0, random axes.  [default: 0]",
)
@click.option(
    "--gap-anisotropy",
    type=FiniteFloatRange(0, None),
    help="With --clip (world 2): decay of the image tower's scale over its channels, which lowers the "
    "residual gap's effective rank; 0, even.  [default: 0]",
)
@click.option(
    "--gap-profile",
    type=click.Choice(["vit-b-32"]),
    help="With --clip (world 2): a gap calibrated to a real CLIP's published figures (its offset, and the "
    "matched cosine at which the CLIP's training stops; experiments/README.md §5.6); --gap-offset, "
    "--gap-axes and --gap-anisotropy change its shape.",
)
@click.option(
    "--clip-check-every",
    type=click.IntRange(min=1),
    help="With --clip (world 2): steps between the checks of the CLIP's stop rule on the validation "
    "split; finer checks keep more contrastive steps where the matched cosine passes the cosine between "
    "images early (small offsets, anisotropic residuals).  [default: 100, or the profile's]",
)
def toyworld_command(
    out: str,
    seed: int,
    train_images: int,
    val_images: int,
    test_images: int,
    image_size: int | None,
    world_version: str,
    web_mismatch: float,
    train_clip: bool,
    gap_offset: float | None,
    gap_axes: int | None,
    gap_anisotropy: float | None,
    gap_profile: str | None,
    clip_check_every: int | None,
) -> None:
    """Write a toy world of coloured shapes: images, a Karpathy split file and web pairs."""
    import dataclasses

    knobs = {"offset": gap_offset, "axes": gap_axes, "anisotropy": gap_anisotropy}
    knobs = {name: value for name, value in knobs.items() if value is not None}
    if (knobs or gap_profile or clip_check_every) and not (train_clip and world_version == "2"):
        raise click.UsageError(
            "--gap-profile, --gap-offset, --gap-axes, --gap-anisotropy and --clip-check-every shape world "
            "2's CLIP: add --clip."
        )
    from tipcap.toy.gap_shapes import PROFILES, GapShape

    profile = PROFILES[gap_profile] if gap_profile else None
    gap = None  # the demo's, unless a profile or a knob sets another (checked before the world is written)
    if profile or knobs:
        gap = dataclasses.replace(profile.shape if profile else GapShape(), **knobs)
    stop = None  # the demo's stop rule, unless a profile or --clip-check-every changes it
    if profile:
        stop = dataclasses.replace(
            demo_scale(quick=False).stop, every=profile.check_every, matched_cosine=profile.matched_cosine
        )
    if clip_check_every:
        stop = dataclasses.replace(stop or demo_scale(quick=False).stop, every=clip_check_every)
    if world_version == "1":
        from tipcap.toy.world1 import write_toyworld as write
    else:
        from tipcap.toy.world2 import write_world as write
    sizes = {"image_size": image_size} if image_size else {}
    karpathy = write(
        out, seed=seed, train=train_images, val=val_images, test=test_images, web_mismatch=web_mismatch,
        progress=True, **sizes,
    )  # fmt: skip
    total = train_images + val_images + test_images
    click.echo(
        f"wrote {total:,} images to {out}/images, captions in {karpathy}, web pairs in {out}/web_pairs.jsonl"
    )
    if train_clip:
        from tipcap.demo import train_demo_clip

        train_demo_clip(
            karpathy, Path(out) / "clip", seed=seed, version=int(world_version), echo=click.echo,
            gap=gap, stop=stop,
        )  # fmt: skip


@click.command("demo")
@click.option("--quick", is_flag=True, help="A reduced world and grid (a few minutes on a laptop CPU).")
@click.option(
    "--seed", default=0, show_default=True, type=SEED, help="Seed of the world, its CLIP and the decoders."
)
@click.option(
    "--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Output folder."
)
@click.option(
    "--cache",
    # A function, so that the environment of each run counts rather than that of the import.
    default=lambda: str(default_cache_dir()),
    show_default="$XDG_CACHE_HOME/tipcap, else ~/.cache/tipcap",
    type=click.Path(file_okay=False),
    help="Where the toy world, its CLIP and their embedding stores are kept for reruns.",
)
@click.option(
    "--version",
    "world_version",
    default="2",
    show_default=True,
    type=click.Choice(["1", "2"]),
    help="Which toy world (see 'tipcap toyworld --help').",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option(
    "--unpinned", is_flag=True,
    help="Use the CPU's fastest kernels; the digits then depend on the processor (see tipcap.portable).",
)  # fmt: skip
def demo_command(
    quick: bool, seed: int, out: str, cache: str, world_version: str, no_progress: bool, unpinned: bool
) -> None:
    """Run the whole pipeline offline on the toy world and print the table of methods.

    By default the CPU arithmetic is pinned (tipcap.portable), so that every x86-64 machine with the same
    package versions prints the same table; the last line gives its digest.
    """
    # Before anything loads torch or numpy, which read the pins once.
    from tipcap.portable import pin_cpu_arithmetic

    not_pinned = "--unpinned" if unpinned else pin_cpu_arithmetic()
    from tipcap.demo import describe_arithmetic, run_demo

    echo_stage = functools.partial(click.echo, err=True)
    run_demo(out, cache, seed=seed, quick=quick, progress=not no_progress, echo=echo_stage,
             version=int(world_version))  # fmt: skip
    click.echo((Path(out) / "table.md").read_text(encoding="utf-8"))
    click.echo(f"wrote {out}/results.csv, {out}/table.md, {out}/cider.png and {out}/gap.png")
    click.echo(describe_arithmetic(Path(out) / "results.csv", not_pinned))
