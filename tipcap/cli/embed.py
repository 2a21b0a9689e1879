"""``tipcap embed texts|images``: encode captions or images with CLIP into an embedding store."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import click

from tipcap.cli.options import StageOptions, device_option, stacked
from tipcap.config import EmbedConfig
from tipcap.data.captions import PERIOD_POLICIES
from tipcap.data.karpathy import SPLITS

if TYPE_CHECKING:
    from tipcap.ranks import Ranks


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


def _quiet_unless_main(ranks: Ranks) -> None:
    """Under torchrun, leave the warnings (a bad shard, a rebuild) to rank 0, so that each is one line."""
    if not ranks.main:
        logging.getLogger("tipcap").setLevel(logging.ERROR)


_SPLIT_OPTION = click.option(
    "--split", type=click.Choice(SPLITS), default=None, help="Karpathy split (train includes restval)."
)


@embed_group.command("texts")
@click.option(
    "--corpus",
    required=True,
    type=click.Path(dir_okay=False),
    help="Karpathy JSON, {image: [captions]} JSON, JSONL pairs or text file (.gz accepted), or webdataset "
    "shards: a .tar or a brace pattern ('cc3m/{00000..00331}.tar').",
)
@_SPLIT_OPTION
@click.option(
    "--period",
    type=click.Choice(PERIOD_POLICIES),
    default="add",
    show_default=True,
    help="Trailing period: add one to every caption, strip them, or keep captions as written.",
)
@click.option(
    "--caption-key",
    default=None,
    help="Webdataset shards: read each caption from this key of the sample's .json [default: its .txt].",
)
@_TEXTS.options
@_store_options(100_000)
@click.pass_context
def embed_texts_command(
    ctx: click.Context, corpus: str, split: str | None, period: str, caption_key: str | None, **opts: Any
) -> None:
    """Embed the captions of a corpus; each row keeps its caption's image id (under torchrun, the ranks
    share the store's shards)."""
    from tipcap.embed import embed_texts
    from tipcap.ranks import torchrun_ranks

    config = _TEXTS.build(ctx)
    with torchrun_ranks() as ranks:
        _quiet_unless_main(ranks)
        report = embed_texts(corpus, config, opts["out"], split=split, period=period, caption_key=caption_key,
                             ranks=ranks, **_writing(opts))  # fmt: skip
    if ranks.main:
        click.echo(report.summary())


@embed_group.command("images")
@click.option(
    "--images",
    "source",
    required=True,
    type=click.Path(),
    help="Image folder, Karpathy JSON, {image: [captions]} JSON, JSONL pairs, or webdataset shards: a .tar "
    "or a brace pattern ('cc3m/{00000..00331}.tar').",
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
    help="Image decoding threads; 0 decodes in the calling thread (default: CPU count, at most 8).",
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
    """Embed images; each row keeps its image id (unreadable images are listed in skipped.json). Under
    torchrun, the ranks share the store's shards."""
    from tipcap.embed import embed_images
    from tipcap.ranks import torchrun_ranks

    config = _IMAGES.build(ctx)
    with torchrun_ranks() as ranks:
        _quiet_unless_main(ranks)
        report = embed_images(
            source, config, opts["out"], image_root=image_root, allow_outside=allow_outside, split=split,
            limit=limit, seed=config.init_seed, workers=workers, ranks=ranks, **_writing(opts),
        )  # fmt: skip
    if ranks.main:
        click.echo(report.summary())
