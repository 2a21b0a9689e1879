"""``tipcap ablate`` (run a grid of cells) and ``tipcap compare`` (two of its cells, per seed)."""

from __future__ import annotations

from pathlib import Path

import click

from tipcap.cli.options import FiniteFloatRange


@click.command("ablate")
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option(
    "--plan",
    is_flag=True,
    help="Only build stores and gaps and write each untrained cell's training command (for torchrun) "
    "to OUT/train_commands.sh; a later run without --plan reuses the models they train.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def ablate_command(
    config_path: str, out: str, overrides: tuple[str, ...], plan: bool, no_progress: bool
) -> None:
    """Run a grid of settings x methods x prompts x seeds; rerunning finishes only the missing cells."""
    from tipcap.grid import Ablation, load_ablation

    ablation = Ablation(
        load_ablation(config_path, list(overrides)),
        out,
        progress=not no_progress,
        echo=lambda message: click.echo(message, err=True),
    )
    if plan:
        commands = ablation.plan()
        click.echo(f"wrote {len(commands)} training commands to {out}/train_commands.sh")
        return
    ablation.run()
    click.echo((Path(out) / "table.md").read_text(encoding="utf-8"))
    if ablation.config.compare or ablation.config.families:
        click.echo((Path(out) / "comparisons.md").read_text(encoding="utf-8"))
    names = ("results.csv", "table.md", "comparisons.md", "comparisons.csv", "cider.png")
    written = [name for name in (*names, "cider_vs_pairs.png") if (Path(out) / name).is_file()]
    click.echo(f"wrote {', '.join(f'{out}/{name}' for name in written)}")


@click.command("compare")
@click.option(
    "--grid-out", required=True, type=click.Path(file_okay=False, exists=True),
    help="A grid's output folder (tipcap ablate --out).",
)  # fmt: skip
@click.option("--a", "a", required=True, metavar="CELL[:PROMPT]", help="The first cell (and prompt mode).")
@click.option("--b", "b", required=True, metavar="CELL[:PROMPT]", help="The cell subtracted from it.")
@click.option(
    "--metric", default="CIDEr", show_default=True,
    help="A metric with per-image scores: CIDEr, ROUGE-L, CLIP-S, RefCLIP-S or object_f1.",
)  # fmt: skip
@click.option(
    "--margin", type=FiniteFloatRange(min=0, min_open=True), default=None,
    help="Also test equivalence within ±MARGIN (TOST over seeds).",
)  # fmt: skip
def compare_command(grid_out: str, a: str, b: str, metric: str, margin: float | None) -> None:
    """Print A − B per seed: the per-seed differences, their t-interval over seeds and the verdict of this
    one comparison (uncorrected), on the seeds and test images both cells share."""
    from tipcap.evaluation.stats import decide
    from tipcap.grid.compare import compare_cells, describe, grid_scores

    comparison = compare_cells(grid_scores(grid_out), a, b, metric)
    click.echo(describe(decide([comparison], margin)[0]))
