"""The ``tipcap`` command line: a thin layer over the library.

Library modules are imported inside each command, so ``tipcap --help`` answers at once and a command
pays only for what it uses. A :class:`~tipcap.errors.TipcapError` becomes one ``Error:`` line.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from tipcap import __version__
from tipcap.data.captions import PERIOD_POLICIES
from tipcap.data.karpathy import SPLITS
from tipcap.errors import TipcapError


class _Group(click.Group):
    """The root group: sets up warnings and reports user errors as one line, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from tqdm.contrib.logging import logging_redirect_tqdm

        log = logging.getLogger("tipcap")
        if not log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("warning: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.WARNING)
            log.propagate = False
        try:
            # Warnings go through tqdm so that they do not break a progress bar's line.
            with logging_redirect_tqdm(loggers=[log]):
                return super().invoke(ctx)
        except TipcapError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tipcap")
def main() -> None:
    """tipcap: image captioning from text data, across the CLIP modality gap."""


@main.group()
def embed() -> None:
    """Encode captions or images with CLIP into an embedding store."""


def _clip_options(command: Any) -> Any:
    """Options shared by the commands that load a CLIP."""
    options = [
        click.option(
            "--clip",
            "clip_model",
            required=True,
            help="open_clip model name (ViT-B-32) or path of an open_clip model-config JSON.",
        ),
        click.option(
            "--pretrained",
            default="openai",
            show_default=True,
            help="open_clip pretrained tag (openai, laion2b_s34b_b79k, ...), a local weights file, "
            "or 'none' for random weights.",
        ),
        click.option(
            "--seed", default=0, show_default=True, help="Seed for random CLIP weights and for --limit."
        ),
        click.option(
            "--device", default=None, help="Device to encode on (default: cuda when available, else cpu)."
        ),
        click.option(
            "--precision",
            type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
            default="auto",
            show_default=True,
            help="Encoder precision; auto is fp16 on CUDA and fp32 on CPU.",
        ),
        click.option(
            "--out", required=True, type=click.Path(file_okay=False), help="Store directory to write."
        ),
        click.option("--strict", is_flag=True, help="Stop at the first empty caption or unreadable image."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@embed.command("texts")
@click.option(
    "--corpus",
    required=True,
    type=click.Path(dir_okay=False),
    help="Karpathy JSON, {image: [captions]} JSON, JSONL pairs or text file (.gz accepted).",
)
@click.option(
    "--split", type=click.Choice(SPLITS), default=None, help="Karpathy split (train includes restval)."
)
@click.option(
    "--period",
    type=click.Choice(PERIOD_POLICIES),
    default="add",
    show_default=True,
    help="Trailing period: add one to every caption, strip them, or keep captions as written.",
)
@click.option(
    "--batch-size", default=None, type=int, help="Captions per pass [default: 64 on CPU, 1024 on GPU]."
)
@click.option(
    "--shard-size", default=100_000, show_default=True, help="Rows per store shard (the resume unit)."
)
@_clip_options
def embed_texts_command(
    corpus: str, split: str | None, period: str, batch_size: int | None, shard_size: int, **opts: Any
) -> None:
    """Embed the captions of a corpus; each row keeps its caption's image id."""
    from tipcap.clip import ClipSpec
    from tipcap.embed import embed_texts

    report = embed_texts(
        corpus,
        ClipSpec(opts["clip_model"], opts["pretrained"], opts["seed"]),
        opts["out"],
        split=split,
        period=period,
        strict=opts["strict"],
        batch_size=batch_size,
        shard_size=shard_size,
        device=opts["device"],
        precision=opts["precision"],
        progress=not opts["no_progress"],
    )
    click.echo(report.summary())


@embed.command("images")
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
@click.option(
    "--split", type=click.Choice(SPLITS), default=None, help="Karpathy split (train includes restval)."
)
@click.option(
    "--limit", default=None, help="Keep a seeded random subset: a count (500) or a percentage (1%)."
)
@click.option("--batch-size", default=64, show_default=True, help="Images per forward pass.")
@click.option(
    "--workers", default=None, type=int, help="Image decoding processes (default: CPU count, at most 8)."
)
@click.option(
    "--shard-size", default=50_000, show_default=True, help="Rows per store shard (the resume unit)."
)
@_clip_options
def embed_images_command(
    source: str,
    image_root: str | None,
    split: str | None,
    limit: str | None,
    batch_size: int,
    workers: int | None,
    shard_size: int,
    **opts: Any,
) -> None:
    """Embed images; each row keeps its image id (unreadable images are listed in skipped.json)."""
    from tipcap.clip import ClipSpec
    from tipcap.embed import embed_images

    report = embed_images(
        source,
        ClipSpec(opts["clip_model"], opts["pretrained"], opts["seed"]),
        opts["out"],
        image_root=image_root,
        split=split,
        limit=limit,
        seed=opts["seed"],
        strict=opts["strict"],
        batch_size=batch_size,
        workers=workers,
        shard_size=shard_size,
        device=opts["device"],
        precision=opts["precision"],
        progress=not opts["no_progress"],
    )
    click.echo(report.summary())
