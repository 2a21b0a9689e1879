"""``tipcap embed texts|images``: encode captions or images with CLIP into an embedding store."""

from __future__ import annotations

from typing import Any

import click

from tipcap.cli.options import StageOptions, device_option, stacked
from tipcap.config import EmbedConfig
from tipcap.data.captions import PERIOD_POLICIES
from tipcap.data.karpathy import SPLITS


@click.group("embed")
def embed_group() -> None:
    """Encode captions or images with CLIP into an embedding store."""


def _stage(batch_help: str, seed_help: str) -> StageOptions:
    """The options made of :class:`~tipcap.config.EmbedConfig`: ``--clip``, ``--pretrained``, ``--seed``,
    ``--precision`` and ``--batch-size`` (its help is each command's)."""
    return StageOptions(
        EmbedConfig, "embed", flags={"model": "clip", "init_seed": "seed"}, defaults={"pretrained": "openai"},
        helps={"batch_size": batch_help, "init_seed": seed_help}, required=("model",),
    )  # fmt: skip


_TEXTS = _stage("Captions per pass [default: 128 on CPU, 1024 on GPU].", "Seed of random CLIP weights.")
_IMAGES = _stage("Images per forward pass [default: 64].", "Seed of random CLIP weights and of --limit.")


def _store_options(shard_size: int) -> Any:
    """Options shared by the embed commands: how the store is written."""
    return stacked(
        click.option(
            "--shard-size",
            default=shard_size,
            show_default=True,
            type=click.IntRange(min=1),
            help="Rows per store shard (the resume unit).",
        ),
        device_option(help_text="Device to encode on (default: cuda when available, else cpu)."),
        click.option(
            "--out", required=True, type=click.Path(file_okay=False), help="Store directory to write."
        ),
        click.option("--strict", is_flag=True, help="Stop at the first empty caption or unreadable image."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    )


def _writing(opts: dict[str, Any]) -> dict[str, Any]:
    """How the embed commands write their store, from the shared options."""
    return {"strict": opts["strict"], "shard_size": opts["shard_size"], "device": opts["device"],
            "progress": not opts["no_progress"]}  # fmt: skip


_SPLIT_OPTION = click.option(
    "--split", type=click.Choice(SPLITS), default=None, help="Karpathy split (train includes restval)."
)


@embed_group.command("texts")
@click.option(
    "--corpus",
    required=True,
    type=click.Path(dir_okay=False),
    help="Karpathy JSON, {image: [captions]} JSON, JSONL pairs or text file (.gz accepted).",
)
@_SPLIT_OPTION
@click.option(
    "--period",
    type=click.Choice(PERIOD_POLICIES),
    default="add",
    show_default=True,
    help="Trailing period: add one to every caption, strip them, or keep captions as written.",
)
@_TEXTS.options
@_store_options(100_000)
@click.pass_context
def embed_texts_command(ctx: click.Context, corpus: str, split: str | None, period: str, **opts: Any) -> None:
    """Embed the captions of a corpus; each row keeps its caption's image id."""
    from tipcap.embed import embed_texts

    config = _TEXTS.build(ctx)
    report = embed_texts(corpus, config, opts["out"], split=split, period=period, **_writing(opts))
    click.echo(report.summary())


@embed_group.command("images")
@click.option(
    "--images",
    "source",
    required=True,
    type=click.Path(),
    help="Image folder, Karpathy JSON, {image: [captions]} JSON or JSONL pairs.",
)
@click.option(
    "--image-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder the file's image paths are relative to.",
)
@_SPLIT_OPTION
@click.option(
    "--limit", default=None, help="Keep a seeded random subset: a count (500) or a percentage (1%)."
)
@click.option(
    "--allow-outside",
    is_flag=True,
    help="Embed images whose paths lead outside the image root (absolute, or climbing out with '..').",
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=0),
    help="Image decoding processes; 0 decodes in the main process (default: CPU count, at most 8).",
)
@_IMAGES.options
@_store_options(50_000)
@click.pass_context
def embed_images_command(
    ctx: click.Context,
    source: str,
    image_root: str | None,
    split: str | None,
    limit: str | None,
    allow_outside: bool,
    workers: int | None,
    **opts: Any,
) -> None:
    """Embed images; each row keeps its image id (unreadable images are listed in skipped.json)."""
    from tipcap.embed import embed_images

    config = _IMAGES.build(ctx)
    report = embed_images(
        source, config, opts["out"], image_root=image_root, allow_outside=allow_outside, split=split,
        limit=limit, seed=config.init_seed, workers=workers, **_writing(opts),
    )  # fmt: skip
    click.echo(report.summary())
