"""``tipcap caption``: caption images with a trained model; its decoding options are
:class:`~tipcap.config.EvalConfig`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tipcap.cli.options import StageOptions, device_option
from tipcap.config import EvalConfig
from tipcap.errors import TipcapError

_DECODING = StageOptions(
    EvalConfig,
    "eval",
    fields=("beams", "max_tokens", "prompt_guidance", "top_k", "threshold", "batch_size", "search"),
)


def format_timings(timings: dict[str, float]) -> str:
    """``time: decoding 0.4 s · clip 1.2 s · generation 9.8 s`` (decoding: waiting for decoded images)."""
    return "time: " + " · ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items())


def _split_words(text: str | None) -> list[str]:
    """``"dog, frisbee"`` → ``["dog", "frisbee"]``."""
    return [word.strip() for word in (text or "").split(",") if word.strip()]


@click.command("caption")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model",
    "model_dir",
    required=True,
    help="Model folder, or a hub name (owner/name[@revision]) found in or downloaded to the hub's cache.",
)
@click.option("--prompt", "words", default=None, help='Prompt words, comma-separated: "dog, frisbee".')
@click.option(
    "--auto-prompt", is_flag=True, help="Add the entities CLIP finds in each image as prompt words."
)
@_DECODING.options
@click.option(
    "--out", default=None, type=click.Path(dir_okay=False), help="Write JSONL here instead of printing."
)
@device_option()
@click.pass_context
def caption_command(
    ctx: click.Context,
    inputs: tuple[str, ...],
    model_dir: str,
    words: str | None,
    auto_prompt: bool,
    out: str | None,
    device: str | None,
    **_: Any,
) -> None:
    """Caption images (files or folders); unreadable images are reported and the others captioned."""
    from tipcap.hub_cache import resolve_model

    config = _DECODING.build(ctx)
    # A hub name that cannot be fetched fails here, in a second, before torch is imported.
    model_dir = str(resolve_model(model_dir))
    from tipcap.data import list_images
    from tipcap.model import TIPCap
    from tipcap.pipeline import write_captions_jsonl

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(ref.path for ref in list_images(path))
        else:
            paths.append(path)
    model = TIPCap.from_pretrained(model_dir, device=device)
    timings: dict[str, float] = {}
    results = model.caption(
        paths, prompts=_split_words(words), auto_prompt=auto_prompt, num_beams=config.beams,
        max_new_tokens=config.max_tokens, batch_size=config.batch_size, top_k=config.top_k,
        threshold=config.threshold, prompt_guidance=config.prompt_guidance, timings=timings,
        search=config.search,
    )  # fmt: skip
    click.echo(format_timings(timings), err=True)
    for result in results:
        if result.error is not None:
            click.echo(f"skipped {result.error}", err=True)
    captioned = [result for result in results if result.error is None]
    # Checked before anything is written, so that a failed run leaves an earlier --out file as it was.
    if not captioned:
        raise TipcapError("no image could be captioned.")
    if out:
        write_captions_jsonl(out, captioned)
        click.echo(f"wrote {len(captioned)} captions to {out}")
        return
    for result in captioned:
        prompted = f"  [prompt: {', '.join(result.prompt)}]" if result.prompt else ""
        click.echo(f"{result.image}\t{result.caption}{prompted}")
