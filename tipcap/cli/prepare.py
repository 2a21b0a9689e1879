"""``tipcap prepare``: check a data set's annotation file against its images and write what the other
commands read."""

from __future__ import annotations

from typing import Any

import click

from tipcap.cli.options import stacked


@click.group("prepare")
def prepare_group() -> None:
    """Check a data set's annotation file against its images; write what embed, train and evaluate read."""


def _prepare_options(images_help: str) -> Any:
    """``--images``, ``--out``, ``--workers`` and ``--no-progress``, shared by the prepare commands."""
    return stacked(
        click.option("--images", required=True, type=click.Path(file_okay=False), help=images_help),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write to."),
        click.option(
            "--workers",
            default=None,
            type=click.IntRange(min=0),
            help="Image decoding processes (default: CPU count, at most 8; 0 decodes in this process).",
        ),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    )


def _prepare_karpathy(
    dataset: str, karpathy: str, images: str, out: str, workers: int | None, no_progress: bool
) -> None:
    """Check a Karpathy split file against its images; write corpora, image lists and references."""
    from tipcap.data.prepare import prepare_dataset

    report = prepare_dataset(dataset, karpathy, images, out, workers=workers, progress=not no_progress)
    click.echo(report.summary())
    written = [report.outputs["dataset"]]
    for kind in ("corpus", "images", "references"):
        written += report.outputs[kind].values()
    click.echo(f"wrote {out}/report.json and, in {out}: {', '.join(written)}")


_KARPATHY_OPTION = click.option(
    "--karpathy",
    required=True,
    type=click.Path(dir_okay=False),
    help="Karpathy split file (dataset_coco.json, dataset_flickr30k.json; .gz accepted).",
)


@prepare_group.command("coco")
@_KARPATHY_OPTION
@_prepare_options("Image root holding COCO's train2014/ and val2014/ folders.")
def prepare_coco_command(
    karpathy: str, images: str, out: str, workers: int | None, no_progress: bool
) -> None:
    """Check COCO's Karpathy split file against its images; write corpora, image lists and references."""
    _prepare_karpathy("coco", karpathy, images, out, workers, no_progress)


@prepare_group.command("flickr30k")
@_KARPATHY_OPTION
@_prepare_options("The folder of Flickr30k's images.")
def prepare_flickr30k_command(
    karpathy: str, images: str, out: str, workers: int | None, no_progress: bool
) -> None:
    """Check Flickr30k's Karpathy split file against its images; write corpora, image lists and references."""
    _prepare_karpathy("flickr30k", karpathy, images, out, workers, no_progress)


@prepare_group.command("nocaps")
@click.option(
    "--annotations",
    required=True,
    type=click.Path(dir_okay=False),
    help="NoCaps validation annotation file, nocaps_val_4500_captions.json (.gz accepted).",
)
@_prepare_options("The folder of the NoCaps validation images, named by their file_name.")
def prepare_nocaps_command(
    annotations: str, images: str, out: str, workers: int | None, no_progress: bool
) -> None:
    """Check NoCaps validation against its images; write the evaluation file with each image's domain."""
    from tipcap.data.nocaps import prepare_nocaps

    report = prepare_nocaps(annotations, images, out, workers=workers, progress=not no_progress)
    click.echo(report.summary())
    click.echo(
        f"wrote {out}/report.json, {out}/{report.outputs['dataset']} (evaluate --data, --split val) and "
        f"{out}/{report.outputs['references']}"
    )
