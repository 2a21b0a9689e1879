"""``tipcap fit-gap``: fit the modality gap from embedding stores; its options are
:class:`~tipcap.config.GapConfig`'s fields. ``tipcap gap-atlas``: measure the gap's shape and predict the
bridge it favours, without training (:mod:`tipcap.gap.atlas`)."""

from __future__ import annotations

from typing import Any

import click

from tipcap.cli.options import SEED, StageOptions, device_option
from tipcap.config import GapConfig

_GAP = StageOptions(
    GapConfig,
    "gap",
    # Neither has a default here: the setting must be named, and the kind's default depends on it.
    defaults={"kind": None, "setting": None},
    shown={
        "kind": "gaussian; in text-only, which has no images to fit a covariance on, isotropic (with "
        "--mu-from, mean-shift-isotropic)"
    },
    required=("setting",),
)


@click.command("fit-gap")
@click.option("--texts", "texts_dir", required=True, type=click.Path(file_okay=False), help="Caption store.")
@click.option(
    "--images",
    "images_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Image store (paired with --texts by image id, except for unpaired).",
)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="Gap file to write (.safetensors)."
)
@click.option(
    "--plot", type=click.Path(dir_okay=False), default=None, help="Also draw PCA and spectrum to a PNG."
)
@_GAP.options
@device_option("cpu", "Device for the unpaired nearest-neighbour search.")
@click.pass_context
def fit_gap_command(
    ctx: click.Context,
    texts_dir: str,
    images_dir: str | None,
    out: str,
    plot: str | None,
    device: str,
    **_: Any,
) -> None:
    """Fit the modality gap from embedding stores, write it, and report how much it closes."""
    from tipcap.config import default_gap_kind
    from tipcap.gap import fit_gap_file, format_report
    from tipcap.store import EmbeddingStore

    values = _GAP.values(ctx)
    if values["kind"] is None:
        values["kind"], why = default_gap_kind(values["setting"], values["mu_from"])
        click.echo(f"--kind not given: {values['kind']}, {why}")
    config = _GAP.build(ctx, values)
    texts = EmbeddingStore.open(texts_dir, "--texts", "texts")
    images = EmbeddingStore.open(images_dir, "--images", "images") if images_dir else None
    fit = fit_gap_file(config, texts, images, out, plot=plot, device=device)
    click.echo(format_report(fit.report))
    if config.setting == "unpaired" and fit.pairs is not None:
        click.echo("  (cosines on the stores' true pairs, which the unpaired fit did not use)")
    click.echo(f"wrote {out}" + (f" and {plot}" if plot else ""))


@click.command("gap-atlas")
@click.option("--texts", "texts_dir", required=True, type=click.Path(file_okay=False), help="Caption store.")
@click.option(
    "--images", "images_dir", required=True, type=click.Path(file_okay=False),
    help="Image store, paired with --texts by image id.",
)  # fmt: skip
@click.option(
    "--pairs",
    type=int,
    default=None,
    help="Draw this many of the stores' pairs (seeded by --seed); default all.",
)
@click.option(
    "--seed", type=SEED, default=0, show_default=True, help="Seeds the draw, the split and the bootstrap."
)
@click.option("--resamples", type=int, default=200, show_default=True, help="Bootstrap resamples.")
@click.option(
    "--out", default="gap-atlas", show_default=True, type=click.Path(file_okay=False),
    help="Folder for atlas.json and atlas.png.",
)  # fmt: skip
def gap_atlas_command(
    texts_dir: str, images_dir: str, pairs: int | None, seed: int, resamples: int, out: str
) -> None:
    """Measure the modality gap of paired stores without training: its shape, how well each bridge's noise
    explains held-out pairs, and the bridge and noise scale that shape favours."""
    from tipcap.gap.atlas import AtlasConfig, store_atlas
    from tipcap.gap.atlas_report import format_atlas, write_atlas
    from tipcap.store import EmbeddingStore

    config = AtlasConfig(pairs=pairs, seed=seed, resamples=resamples)
    config.check()
    texts = EmbeddingStore.open(texts_dir, "--texts", "texts")
    images = EmbeddingStore.open(images_dir, "--images", "images")
    atlas = store_atlas(texts, images, config)
    document, picture = write_atlas(atlas, out)
    click.echo(format_atlas(atlas))
    click.echo(f"wrote {document} and {picture}")
