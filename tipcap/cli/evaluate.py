"""``tipcap evaluate`` (caption a split and score it; its options are :class:`~tipcap.config.EvalConfig`'s)
and ``tipcap score`` (score a predictions file)."""

from __future__ import annotations

from typing import Any

import click

from tipcap.cli.caption import format_timings
from tipcap.cli.options import StageOptions, device_option
from tipcap.config import EvalConfig
from tipcap.data.karpathy import SPLITS
from tipcap.errors import TipcapError

_EVAL = StageOptions(
    EvalConfig,
    "eval",
    helps={
        "prompt": "auto: CLIP zero-shot entities as prompt words; oracle: the scene's objects; oracle-one: "
        "one of them; oracle-missing: one that the caption without prompts leaves out; wrong: as many "
        "entities absent from the scene (all but none and auto need a file that records its scenes' objects, "
        "as the toy world's does). Prompted evaluations report Adherence: the share of prompt words the "
        "caption mentions.",
        "metrics": "Comma-separated pycocoevalcap metrics (SPICE is skipped offline).",
        "score_pretrained": "The scorer's pretrained tag or local weights file; CLIP-S and RefCLIP-S are "
        "skipped with a warning when its weights are not here and cannot be downloaded.",
    },
)


def _echo_scores(document: dict[str, Any]) -> None:
    """The metrics table of a ``metrics.json`` document, and its table per domain when it has domains."""
    from tipcap.evaluation.metrics import format_domain_table, format_table

    click.echo(format_table(document["metrics"], document["skipped"]))
    if document.get("domains"):
        click.echo("per domain (x100):")
        click.echo(format_domain_table(document["metrics"], document["domains"]))


@click.command("score")
@click.option(
    "--predictions",
    "predictions_path",
    required=True,
    type=click.Path(dir_okay=False),
    help='COCO results JSON: [{"image_id": ..., "caption": "..."}, ...].',
)
@click.option(
    "--references",
    "references_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="COCO caption annotation file ({images, annotations}) or Karpathy split JSON (.gz accepted).",
)
@click.option(
    "--split",
    type=click.Choice(SPLITS),
    default=None,
    help="Karpathy split of --references to score against (train includes restval).",
)
@click.option(
    "--metrics",
    "metric_names",
    default="bleu,meteor,rouge,cider,spice",
    show_default=True,
    help="Comma-separated metrics; SPICE is skipped with a warning where its CoreNLP jars are missing.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory for metrics.json [default: <stem>.metrics.json next to --predictions].",
)
def score_command(
    predictions_path: str, references_path: str, split: str | None, metric_names: str, out: str | None
) -> None:
    """Score predicted captions against references exactly as pycocoevalcap's COCOEvalCap does."""
    from tipcap.evaluation.metrics import check_metrics, score_file

    try:
        metrics = check_metrics(metric_names.split(","))
    except TipcapError as e:
        raise TipcapError(f"--metrics {metric_names!r}: {e}") from None
    document, path = score_file(predictions_path, references_path, split, metrics, out, echo=click.echo)
    _echo_scores(document)
    click.echo(f"wrote {path}")


@click.command("evaluate")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Karpathy split file.")
@click.option(
    "--split", type=click.Choice(SPLITS), default="test", show_default=True, help="Split to evaluate."
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option(
    "--model",
    "model_dir",
    default=None,
    help="Caption model: its folder (whose model card gets the figures) or a hub name, owner/name.",
)
@click.option(
    "--method",
    type=click.Choice(["model", "retrieval", "template"]),
    default="model",
    show_default=True,
    help="A caption model, or a non-neural baseline.",
)
@click.option("--images", default=None, type=click.Path(file_okay=False), help="Image root of --data.")
@click.option(
    "--image-store",
    default=None,
    type=click.Path(file_okay=False),
    help="Image store of the split (with --images too, the scorer CLIP reads the images from there).",
)
@click.option("--texts", default=None, type=click.Path(file_okay=False), help="retrieval: caption store.")
@_EVAL.options
@click.option("--instances", default=None, type=click.Path(dir_okay=False),
              help="COCO instance annotations (instances_val2014.json) of the images: report CHAIR-i and "
              "CHAIR-s on COCO's 80 categories.")  # fmt: skip
@device_option()
@click.pass_context
def evaluate_command(
    ctx: click.Context,
    data: str,
    split: str,
    out: str,
    model_dir: str | None,
    method: str,
    images: str | None,
    image_store: str | None,
    texts: str | None,
    instances: str | None,
    device: str | None,
    **_: Any,
) -> None:
    """Caption a split's images, score them, write predictions.json, metrics.json and per_image.json."""
    from tipcap.hub_cache import resolve_model

    config = _EVAL.build(ctx)
    if model_dir is not None:
        resolve_model(model_dir)  # an unavailable hub model fails before torch is imported
    from tipcap.evaluation.evaluate import evaluate_split
    from tipcap.evaluation.references import format_report

    timings: dict[str, float] = {}
    document = evaluate_split(
        data, split, out, config, method=method, model=model_dir, images=images, image_store=image_store,
        texts=texts, instances=instances, device=device, timings=timings,
    )  # fmt: skip
    click.echo(format_report(document["matching"]))
    _echo_scores(document)
    click.echo(format_timings(timings))
    click.echo(
        f"wrote {out}/predictions.json, {out}/metrics.json, {out}/per_image.json and {out}/provenance.json"
    )
