"""``tipcap reproduce``: rerun a published result from its recipe; compare it with the published numbers."""

from __future__ import annotations

from pathlib import Path

import click

from tipcap.errors import TipcapError

_FILE = click.Path(dir_okay=False, path_type=Path)
_FOLDER = click.Path(file_okay=False, path_type=Path)


@click.command("reproduce")
@click.argument("name", required=False)
@click.option("--list", "list_", is_flag=True, help="List the recipes with their published numbers.")
@click.option("--check", is_flag=True, help="Only check the inputs; exit non-zero when one is missing.")
@click.option("--smoke", is_flag=True, help="Run every stage on ~1% of the data with one seed, timed.")
@click.option(
    "--plan",
    is_flag=True,
    help="Prepare the data, build stores and gaps, and write the decoders' "
    "torchrun commands to OUT/grid/train_commands.sh; rerun without --plan to finish.",
)
@click.option("--karpathy", type=_FILE, help="Karpathy split file of the training data (dataset_coco.json).")
@click.option("--images", type=_FOLDER, help="Image root of the training data.")
@click.option(
    "--eval-karpathy",
    type=_FILE,
    help="Cross-domain: the evaluation data's Karpathy file (NoCaps: nocaps_val_4500_captions.json).",
)
@click.option("--eval-images", type=_FOLDER, help="Cross-domain: the evaluation data's image root.")
@click.option("--web-pairs", type=_FILE, help="Web-pairs recipes: the JSONL of web image-caption pairs.")
@click.option("--web-images", type=_FOLDER, help="Web-pairs recipes: their image folder.")
@click.option(
    "--clip-weights",
    type=_FILE,
    help="A local weights file of the recipe's CLIP (instead of its pretrained tag's download).",
)
@click.option("--out", type=_FOLDER, help="Output folder [default: runs/reproduce/NAME].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key of the grid.")
@click.option("--recipes", type=_FOLDER, default=None, help="Recipe folder [default: experiments/reproduce].")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def reproduce_command(
    name: str | None,
    list_: bool,
    check: bool,
    smoke: bool,
    plan: bool,
    karpathy: Path | None,
    images: Path | None,
    eval_karpathy: Path | None,
    eval_images: Path | None,
    web_pairs: Path | None,
    web_images: Path | None,
    clip_weights: Path | None,
    out: Path | None,
    overrides: tuple[str, ...],
    recipes: Path | None,
    no_progress: bool,
) -> None:
    """Rerun recipe NAME: --check its inputs, a --smoke run, --plan for torchrun, or the full run, which
    writes OUT/reproduce.md (each metric against the published one, pass or fail within the tolerance)."""
    from tipcap.grid.recipes import RECIPES_DIR, find_recipe, listing, load_recipe, recipe_paths

    folder = recipes or RECIPES_DIR
    if list_:
        click.echo(listing([load_recipe(path) for path in recipe_paths(folder)]), nl=False)
        return
    if name is None:
        raise TipcapError("tipcap reproduce: name a recipe (tipcap reproduce --list lists them).")
    if sum((check, smoke, plan)) > 1:
        raise TipcapError("--check, --smoke and --plan: give one of them (or none, for the full run).")
    recipe = find_recipe(name, folder)
    if karpathy is None or images is None:
        raise TipcapError(
            f"{name}: pass --karpathy FILE and --images DIR (its training data, {recipe.data.train})."
        )
    from tipcap.grid.recipe_inputs import Inputs
    from tipcap.grid.reproduce import Reproduction

    inputs = Inputs(karpathy, images, eval_karpathy, eval_images, web_pairs, web_images, clip_weights)
    reproduction = Reproduction(
        recipe,
        folder / f"{name}.yaml",
        inputs,
        out or Path("runs") / "reproduce" / name,
        list(overrides),
        progress=not no_progress,
        echo=lambda message: click.echo(message, err=True),
    )
    if check:
        checked = reproduction.check()
        for note in checked.notes:
            click.echo(f"note: {note}")
        for problem in checked.problems:
            click.echo(f"problem: {problem}", err=True)
        if checked.problems:
            raise click.exceptions.Exit(1)
        click.echo(f"{name}: every input is present.")
        return
    if plan:
        commands = reproduction.plan()
        click.echo(f"wrote {len(commands)} training commands to {reproduction.out}/grid/train_commands.sh")
        return
    verdicts = reproduction.run(smoke=smoke)
    target = reproduction.out / "smoke" if smoke else reproduction.out
    passed = sum(v.passed for v in verdicts)
    times = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in reproduction.times.items())
    click.echo(f"{name}: {passed} of {len(verdicts)} metrics within tolerance; {times}")
    click.echo(f"wrote {target}/reproduce.md")
