"""The ``tipcap`` command line: a thin layer over the library.

Library modules are imported inside each command, so ``tipcap --help`` answers at once and a command
pays only for what it uses. A :class:`~tipcap.errors.TipcapError` becomes one ``Error:`` line.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from tipcap import __version__
from tipcap.data.captions import PERIOD_POLICIES
from tipcap.data.karpathy import SPLITS
from tipcap.demo import default_cache_dir
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
        except OSError as e:
            raise click.ClickException(os_error_message(e)) from None


_OS_ERROR_ADVICE = {
    errno.EACCES: "check its permissions, or choose another folder with --out",
    errno.EPERM: "check its permissions, or choose another folder with --out",
    errno.EROFS: "the file system is read-only; choose a writable folder with --out",
    errno.ENOSPC: "the disk is full; free some space or choose another --out, then rerun",
    errno.EDQUOT: "the disk quota is exhausted; free some space or choose another --out, then rerun",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "expected a file, found a folder; check the path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and rerun",
}


def os_error_message(error: OSError) -> str:
    """One line for an operating-system failure: the file, what went wrong and what to do."""
    where = error.filename if error.filename is not None else "a file"
    what = error.strerror or str(error)
    advice = _OS_ERROR_ADVICE.get(error.errno, "check the file and the disk, then rerun")
    return f"{where}: {what}; {advice}."


def _set_threads(threads: int | None) -> None:
    """Threads for torch's CPU operations, and how idle ones wait.

    Idle OpenMP threads wait passively (they sleep instead of spinning), so that tipcap processes sharing
    a machine do not take each other's cores while they wait: two trainings at once took 4.8x the time of
    one with spinning threads. Both settings are read when torch loads, which the commands do after this.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tipcap")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    envvar="TIPCAP_THREADS",
    help="CPU threads per process (default: torch's, one per core; env TIPCAP_THREADS). When several "
    "processes share the machine, cores divided by processes is a good choice.",
)
def main(threads: int | None) -> None:
    """tipcap: image captioning from text data, across the CLIP modality gap."""
    _set_threads(threads)


@main.command("prepare")
@click.argument("dataset", type=click.Choice(["coco", "flickr30k"]))
@click.option(
    "--karpathy",
    required=True,
    type=click.Path(dir_okay=False),
    help="Karpathy split file (dataset_coco.json, dataset_flickr30k.json; .gz accepted).",
)
@click.option(
    "--images",
    required=True,
    type=click.Path(file_okay=False),
    help="Image root: COCO's train2014/ and val2014/ folders, or the folder of Flickr30k's images.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write to.")
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=0),
    help="Image decoding processes (default: CPU count, at most 8; 0 decodes in this process).",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def prepare_command(
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


@main.group()
def embed() -> None:
    """Encode captions or images with CLIP into an embedding store."""


def _check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a device this machine does not have before any work starts."""
    if value is not None:
        from tipcap.clip import resolve_device

        try:
            resolve_device(value)
        except TipcapError as e:
            raise click.BadParameter(str(e).split(": ", 1)[1]) from None
    return value


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
            "--device",
            default=None,
            callback=_check_device,
            help="Device to encode on (default: cuda when available, else cpu).",
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


def _shard_size_option(default: int) -> Any:
    """The ``--shard-size`` option of the embed commands."""
    return click.option(
        "--shard-size",
        default=default,
        show_default=True,
        type=click.IntRange(min=1),
        help="Rows per store shard (the resume unit).",
    )


def _store_options(opts: dict[str, Any], shard_size: int) -> dict[str, Any]:
    """How the embed commands write their store, from the shared options."""
    return {"strict": opts["strict"], "shard_size": shard_size, "device": opts["device"],
            "progress": not opts["no_progress"]}  # fmt: skip


def _embed_config(opts: dict[str, Any], batch_size: int | None) -> Any:
    """The embedding stage's config from the shared CLIP options."""
    from tipcap.config import EmbedConfig, from_dict

    settings = {"model": opts["clip_model"], "pretrained": opts["pretrained"], "init_seed": opts["seed"],
                "precision": opts["precision"], "batch_size": batch_size}  # fmt: skip
    return from_dict(EmbedConfig, settings, "embed")


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
    "--batch-size",
    default=None,
    type=click.IntRange(min=1),
    help="Captions per pass [default: 128 on CPU, 1024 on GPU].",
)
@_shard_size_option(100_000)
@_clip_options
def embed_texts_command(
    corpus: str, split: str | None, period: str, batch_size: int | None, shard_size: int, **opts: Any
) -> None:
    """Embed the captions of a corpus; each row keeps its caption's image id."""
    from tipcap.embed import embed_texts

    report = embed_texts(
        corpus,
        _embed_config(opts, batch_size),
        opts["out"],
        split=split,
        period=period,
        **_store_options(opts, shard_size),
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
@click.option(
    "--allow-outside",
    is_flag=True,
    help="Embed images whose paths lead outside the image root (absolute, or climbing out with '..').",
)
@click.option(
    "--batch-size", default=None, type=click.IntRange(min=1), help="Images per forward pass [default: 64]."
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=0),
    help="Image decoding processes; 0 decodes in the main process (default: CPU count, at most 8).",
)
@_shard_size_option(50_000)
@_clip_options
def embed_images_command(
    source: str,
    image_root: str | None,
    split: str | None,
    limit: str | None,
    allow_outside: bool,
    batch_size: int | None,
    workers: int | None,
    shard_size: int,
    **opts: Any,
) -> None:
    """Embed images; each row keeps its image id (unreadable images are listed in skipped.json)."""
    from tipcap.embed import embed_images

    report = embed_images(
        source,
        _embed_config(opts, batch_size),
        opts["out"],
        image_root=image_root,
        allow_outside=allow_outside,
        split=split,
        limit=limit,
        seed=opts["seed"],
        workers=workers,
        **_store_options(opts, shard_size),
    )
    click.echo(report.summary())


@main.command("fit-gap")
@click.option(
    "--setting",
    type=click.Choice(["few-pairs", "web-pairs", "unpaired", "text-only"]),
    required=True,
    help="Which data besides the captions estimate the gap.",
)
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
    "--kind",
    type=click.Choice(["none", "isotropic", "mean-shift", "cov-noise", "gaussian", "memory"]),
    default="gaussian",
    show_default=True,
    help="How the gap is bridged: the Gaussian, or a baseline.",
)
@click.option(
    "--plot", type=click.Path(dir_okay=False), default=None, help="Also draw PCA and spectrum to a PNG."
)
@click.option("--no-renorm", is_flag=True, help="Do not rescale mapped embeddings to unit length.")
@click.option("--no-shrinkage", is_flag=True, help="Plain sample covariance instead of Ledoit-Wolf.")
@click.option(
    "--drop-quantile",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="web-pairs: share of least similar pairs to discard.",
)
@click.option(
    "--sigma2",
    default=0.016,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Isotropic / text-only noise variance.",
)
@click.option(
    "--mu-from", type=click.Path(dir_okay=False), default=None, help="text-only: import mu from a gap file."
)
@click.option("--learnable", is_flag=True, help="Make mu and L trainable, with a KL term to this estimate.")
@click.option(
    "--tau",
    default=0.01,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="memory: softmax temperature.",
)
@click.option(
    "--memory-size",
    default=None,
    type=click.IntRange(min=1),
    help="memory: keep a random subset of this many captions.",
)
@click.option("--seed", default=0, show_default=True, help="Seed for subsets.")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    callback=_check_device,
    help="Device for the unpaired nearest-neighbour search.",
)
def fit_gap_command(
    setting: str,
    texts_dir: str,
    images_dir: str | None,
    out: str,
    kind: str,
    plot: str | None,
    no_renorm: bool,
    no_shrinkage: bool,
    drop_quantile: float,
    sigma2: float,
    mu_from: str | None,
    learnable: bool,
    tau: float,
    memory_size: int | None,
    seed: int,
    device: str,
) -> None:
    """Fit the modality gap from embedding stores, write it, and report how much it closes."""
    from tipcap.config import GapConfig, from_dict
    from tipcap.gap import fit_gap_file, format_report
    from tipcap.store import EmbeddingStore

    settings = {"kind": kind, "setting": setting, "renorm": not no_renorm, "shrinkage": not no_shrinkage,
                "drop_quantile": drop_quantile, "sigma2": sigma2, "mu_from": mu_from, "learnable": learnable,
                "tau": tau, "memory_size": memory_size, "seed": seed}  # fmt: skip
    try:
        config = from_dict(GapConfig, settings, "gap")
    except TipcapError as e:
        # Name the flag the value came from, as click does for the ranges it can check (NaN it cannot).
        flag = re.sub(r"config key 'gap\.(\w+)'", lambda m: "--" + m[1].replace("_", "-"), str(e))
        raise TipcapError(flag) from None
    texts = EmbeddingStore.open(texts_dir)
    images = EmbeddingStore.open(images_dir) if images_dir else None
    fit = fit_gap_file(config, texts, images, out, plot=plot, device=device)
    click.echo(format_report(fit.report))
    if setting == "unpaired" and fit.pairs is not None:
        click.echo("  (cosines on the stores' true pairs, which the unpaired fit did not use)")
    click.echo(f"wrote {out}" + (f" and {plot}" if plot else ""))


@main.command("train")
@click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Experiment YAML."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. train.lr=1e-4.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --out.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_command(
    config_path: str, overrides: tuple[str, ...], out: str, resume: bool, no_progress: bool
) -> None:
    """Train a caption decoder on a caption store (runs unchanged under torchrun)."""
    from tipcap.config import load_config
    from tipcap.train import train

    config = load_config(config_path, list(overrides))
    final = train(config, out, resume=resume, progress=not no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"wrote {final} (metrics in {out}/metrics.jsonl)")


def _format_timings(timings: dict[str, float]) -> str:
    """``time: decoding 0.4 s · clip 1.2 s · generation 9.8 s`` (decoding: waiting for decoded images)."""
    return "time: " + " · ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items())


def _decoding_options(command: Any) -> Any:
    """``--beams`` and ``--batch-size``, shared by the commands that caption."""
    command = click.option(
        "--batch-size",
        default=64,
        show_default=True,
        type=click.IntRange(min=1),
        help="Images per generate call.",
    )(command)
    return click.option(
        "--beams", default=5, show_default=True, type=click.IntRange(min=1), help="Beam width (1: greedy)."
    )(command)


def _split_words(text: str | None) -> list[str]:
    """``"dog, frisbee"`` → ``["dog", "frisbee"]``."""
    return [word.strip() for word in (text or "").split(",") if word.strip()]


@main.command("caption")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Model directory."
)
@click.option("--prompt", default=None, help='Prompt words, comma-separated: "dog, frisbee".')
@click.option(
    "--auto-prompt", is_flag=True, help="Add the entities CLIP finds in each image as prompt words."
)
@_decoding_options
@click.option(
    "--out", default=None, type=click.Path(dir_okay=False), help="Write JSONL here instead of printing."
)
@click.option(
    "--device", default=None, callback=_check_device, help="Device (default: cuda when available, else cpu)."
)
def caption_command(
    inputs: tuple[str, ...],
    model_dir: str,
    prompt: str | None,
    auto_prompt: bool,
    beams: int,
    batch_size: int,
    out: str | None,
    device: str | None,
) -> None:
    """Caption images (files or folders); unreadable images are reported and the others captioned."""
    from tipcap.data import list_images
    from tipcap.model import TIPCap, write_captions_jsonl

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
        paths, prompts=_split_words(prompt), auto_prompt=auto_prompt, num_beams=beams, batch_size=batch_size,
        timings=timings,
    )  # fmt: skip
    click.echo(_format_timings(timings), err=True)
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
        words = f"  [prompt: {', '.join(result.prompt)}]" if result.prompt else ""
        click.echo(f"{result.image}\t{result.caption}{words}")


@main.command("score")
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
    from tipcap.evaluate import check_metrics, format_table, score_file

    try:
        metrics = check_metrics(metric_names.split(","))
    except TipcapError as e:
        raise TipcapError(f"--metrics {metric_names!r}: {e}") from None
    document, path = score_file(predictions_path, references_path, split, metrics, out, echo=click.echo)
    click.echo(format_table(document["metrics"], document["skipped"]))
    click.echo(f"wrote {path}")


@main.command("evaluate")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Karpathy split file.")
@click.option(
    "--split", type=click.Choice(SPLITS), default="test", show_default=True, help="Split to evaluate."
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False), help="Caption model.")
@click.option(
    "--method",
    type=click.Choice(["model", "retrieval", "template"]),
    default="model",
    show_default=True,
    help="A caption model, or a non-neural baseline.",
)
@click.option("--images", default=None, type=click.Path(file_okay=False), help="Image root of --data.")
@click.option(
    "--image-store", default=None, type=click.Path(file_okay=False), help="Image store of the split."
)
@click.option("--texts", default=None, type=click.Path(file_okay=False), help="retrieval: caption store.")
@click.option("--prompt", type=click.Choice(["none", "auto"]), default="none", show_default=True,
              help="auto: CLIP zero-shot entities as prompt words.")  # fmt: skip
@_decoding_options
@click.option("--metrics", "metric_names", default="bleu,meteor,rouge,cider,spice", show_default=True,
              help="Comma-separated pycocoevalcap metrics (SPICE is skipped offline).")  # fmt: skip
@click.option(
    "--device", default=None, callback=_check_device, help="Device (default: cuda when available, else cpu)."
)
def evaluate_command(
    data: str,
    split: str,
    out: str,
    model_dir: str | None,
    method: str,
    images: str | None,
    image_store: str | None,
    texts: str | None,
    prompt: str,
    beams: int,
    batch_size: int,
    metric_names: str,
    device: str | None,
) -> None:
    """Caption a split's images, score them, write predictions.json, metrics.json and per_image.json."""
    from tipcap.config import EvalConfig, from_dict
    from tipcap.evaluate import format_report, format_table
    from tipcap.protocol import evaluate_split

    metrics = [m.strip() for m in metric_names.split(",") if m.strip()]
    settings = {"beams": beams, "batch_size": batch_size, "prompt": prompt, "metrics": metrics}
    config = from_dict(EvalConfig, settings, "eval")
    timings: dict[str, float] = {}
    document = evaluate_split(
        data, split, out, config, method=method, model=model_dir, images=images, image_store=image_store,
        texts=texts, device=device, timings=timings,
    )  # fmt: skip
    click.echo(format_report(document["matching"]))
    click.echo(format_table(document["metrics"], document["skipped"]))
    click.echo(_format_timings(timings))
    click.echo(
        f"wrote {out}/predictions.json, {out}/metrics.json, {out}/per_image.json and {out}/provenance.json"
    )


@main.command("toyworld")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the world to.")
@click.option("--seed", default=0, show_default=True, help="Seed of the world.")
@click.option(
    "--train",
    "train_images",
    default=20_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Training images.",
)
@click.option(
    "--val",
    "val_images",
    default=500,
    show_default=True,
    type=click.IntRange(min=0),
    help="Validation images.",
)
@click.option(
    "--test", "test_images", default=500, show_default=True, type=click.IntRange(min=0), help="Test images."
)
@click.option(
    "--image-size", default=32, show_default=True, type=click.IntRange(min=8), help="Image side in pixels."
)
@click.option(
    "--web-mismatch",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of web pairs with another image's caption.",
)
def toyworld_command(
    out: str,
    seed: int,
    train_images: int,
    val_images: int,
    test_images: int,
    image_size: int,
    web_mismatch: float,
) -> None:
    """Write the toy world of coloured shapes: images, a Karpathy split file and web pairs."""
    from tipcap.toy.world import write_toyworld

    karpathy = write_toyworld(
        out, seed=seed, train=train_images, val=val_images, test=test_images, image_size=image_size,
        web_mismatch=web_mismatch, progress=True,
    )  # fmt: skip
    total = train_images + val_images + test_images
    click.echo(
        f"wrote {total:,} images to {out}/images, captions in {karpathy}, web pairs in {out}/web_pairs.jsonl"
    )


@main.command("ablate")
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
    written = [name for name in ("results.csv", "table.md", "cider.png", "cider_vs_pairs.png")
               if (Path(out) / name).is_file()]  # fmt: skip
    click.echo(f"wrote {', '.join(f'{out}/{name}' for name in written)}")


@main.command("demo")
@click.option("--quick", is_flag=True, help="A reduced world and grid (a few minutes on a laptop CPU).")
@click.option("--seed", default=0, show_default=True, help="Seed of the world, its CLIP and the decoders.")
@click.option(
    "--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False), help="Output folder."
)
@click.option(
    "--cache",
    # A function, so that the environment of each run counts rather than that of the import.
    default=lambda: str(default_cache_dir()),
    show_default="$XDG_CACHE_HOME/tipcap, else ~/.cache/tipcap",
    type=click.Path(file_okay=False),
    help="Where the toy world, its CLIP and their embedding stores are kept for reruns.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def demo_command(quick: bool, seed: int, out: str, cache: str, no_progress: bool) -> None:
    """Run the whole pipeline offline on the toy world and print the table of methods."""
    from tipcap.demo import run_demo

    echo_stage = functools.partial(click.echo, err=True)
    run_demo(out, cache, seed=seed, quick=quick, progress=not no_progress, echo=echo_stage)
    click.echo((Path(out) / "table.md").read_text(encoding="utf-8"))
    click.echo(f"wrote {out}/results.csv, {out}/table.md, {out}/cider.png and {out}/gap.png")


if __name__ == "__main__":
    main()
