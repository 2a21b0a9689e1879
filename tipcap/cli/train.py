"""``tipcap train``: train a caption decoder from an experiment config (model, data and train sections)."""

from __future__ import annotations

import os

import click


@click.command("train")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Experiment YAML or JSON: its model, data and train sections.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key of --config, e.g. train.lr=1e-4 (repeatable; applied after the file).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --out.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_command(
    config_path: str, overrides: tuple[str, ...], out: str, resume: bool, no_progress: bool
) -> None:
    """Train a caption decoder on a caption store (runs unchanged under torchrun)."""
    from tipcap.config import load_config
    from tipcap.training.loop import train

    config = load_config(config_path, list(overrides))
    final = train(config, out, resume=resume, progress=not no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"wrote {final} (metrics in {out}/metrics.jsonl)")
