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

# tipcap.config's GapKind, spelled out so that `tipcap --help` does not import pydantic.
FIT_GAP_KINDS = [
    "none", "isotropic", "mean-shift", "mean-shift-isotropic", "capdec-offset", "mean-isotropic-matched",
    "norm-matched", "diagonal", "rotated", "gaussian", "close", "cov-noise", "memory",
]  # fmt: skip


class _Once(logging.Filter):
    """Lets each distinct message through once.

    Stages of one command that load the same thing warn alike (``evaluate`` loads its CLIP to embed the
    images and again to caption them); the repeat says nothing new.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


class _Group(click.Group):
    """The root group: sets up warnings, each given once per command, and reports user errors as one line,
    without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from tqdm.contrib.logging import logging_redirect_tqdm

        log = logging.getLogger("tipcap")
        if not log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("warning: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.WARNING)
            log.propagate = False
        once: list[logging.Handler] = []
        try:
            # Warnings go through tqdm so that they do not break a progress bar's line.
            with logging_redirect_tqdm(loggers=[log]):
                # On the handlers in force, which see the records of tipcap's modules too (a logger's own
                # filters do not); one filter each, since every handler sees every record.
                once = list(log.handlers)
                for handler in once:
                    handler.addFilter(_Once())
                return super().invoke(ctx)
        except TipcapError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(os_error_message(e)) from None
        finally:
            for handler in once:
                handler.filters = [f for f in handler.filters if not isinstance(f, _Once)]


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


class _FiniteFloatRange(click.FloatRange):
    """click's FloatRange, which lets NaN through (every comparison with NaN is false), refusing it."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number.", param, ctx)
        return number


def _set_threads(threads: int | None, command: str | None) -> None:
    """Threads for torch's CPU operations, and how idle ones wait.

    Idle OpenMP threads wait passively (they sleep instead of spinning), so that tipcap processes sharing
    a machine do not take each other's cores while they wait: two trainings at once took 4.8x the time of
    one with spinning threads. The demo runs its stages one after another in one process, and keeps
    OpenMP's default (spin briefly, then sleep): passive waiting made its steps 20-60% slower (a decoder
    step 101 ms against 86 ms, a step of the CLIP's image tower 54 ms against 34 ms, 2 cores). Both
    settings are read when torch loads, which the commands do after this.
    """
    if command != "demo":
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
@click.pass_context
def main(context: click.Context, threads: int | None) -> None:
    """tipcap: image captioning from text data, across the CLIP modality gap."""
    _set_threads(threads, context.invoked_subcommand)


@main.group("prepare")
def prepare() -> None:
    """Check a data set's annotation file against its images; write what embed, train and evaluate read."""


def _prepare_options(images_help: str) -> Any:
    """``--images``, ``--out``, ``--workers`` and ``--no-progress``, shared by the prepare commands."""

    def decorate(command: Any) -> Any:
        options = [
            click.option("--images", required=True, type=click.Path(file_okay=False), help=images_help),
            click.option(
                "--out", required=True, type=click.Path(file_okay=False), help="Folder to write to."
            ),
            click.option(
                "--workers",
                default=None,
                type=click.IntRange(min=0),
                help="Image decoding processes (default: CPU count, at most 8; 0 decodes in this process).",
            ),
            click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


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


@prepare.command("coco")
@_KARPATHY_OPTION
@_prepare_options("Image root holding COCO's train2014/ and val2014/ folders.")
def prepare_coco_command(
    karpathy: str, images: str, out: str, workers: int | None, no_progress: bool
) -> None:
    """Check COCO's Karpathy split file against its images; write corpora, image lists and references."""
    _prepare_karpathy("coco", karpathy, images, out, workers, no_progress)


@prepare.command("flickr30k")
@_KARPATHY_OPTION
@_prepare_options("The folder of Flickr30k's images.")
def prepare_flickr30k_command(
    karpathy: str, images: str, out: str, workers: int | None, no_progress: bool
) -> None:
    """Check Flickr30k's Karpathy split file against its images; write corpora, image lists and references."""
    _prepare_karpathy("flickr30k", karpathy, images, out, workers, no_progress)


@prepare.command("nocaps")
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
    type=click.Choice(FIT_GAP_KINDS),
    default=None,
    help="How the gap is bridged: the Gaussian, a control that keeps part of it, or a baseline.  "
    "[default: gaussian; in text-only, which has no images to fit a covariance on, isotropic (with "
    "--mu-from, mean-shift-isotropic)]",
)
@click.option(
    "--plot", type=click.Path(dir_okay=False), default=None, help="Also draw PCA and spectrum to a PNG."
)
@click.option("--no-renorm", is_flag=True, help="Do not rescale mapped embeddings to unit length.")
@click.option("--no-shrinkage", is_flag=True, help="Plain sample covariance instead of Ledoit-Wolf.")
@click.option(
    "--web-estimator",
    type=click.Choice(["mixture", "trim"]),
    default="mixture",
    show_default=True,
    help="web-pairs: weight pairs by a matched/mismatched mixture on cos(v, t), or trim a fixed share.",
)
@click.option(
    "--drop-quantile",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="web-pairs with --web-estimator trim: share of least similar pairs to discard.",
)
@click.option(
    "--sigma2",
    default=0.016,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="isotropic / mean-shift-isotropic / capdec-offset / text-only noise variance per axis.",
)
@click.option(
    "--scale-to-dim",
    is_flag=True,
    help="Carry --sigma2 (set at CapDec's d = 640) and CLOSE's 0.12 (d = 768) to the embeddings' d at the "
    "same expected cosine between noised and clean embeddings: sigma^2 * d0 / d.",
)
@click.option(
    "--match",
    type=click.Choice(["total", "tangential"]),
    default="total",
    show_default=True,
    help="mean-isotropic-matched: match the trace of Sigma, or the noise left tangent to the captions "
    "after renormalising (tr Sigma - E[t'Sigma t]).",
)
@click.option(
    "--noise-scale",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Multiply the training-noise covariance of any kind (for sigma^2 sweeps).",
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
@click.option(
    "--seed", default=0, show_default=True, help="Seed for subsets and the rotated kind's rotation."
)
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
    kind: str | None,
    plot: str | None,
    no_renorm: bool,
    no_shrinkage: bool,
    web_estimator: str,
    drop_quantile: float,
    sigma2: float,
    scale_to_dim: bool,
    match: str,
    noise_scale: float,
    mu_from: str | None,
    learnable: bool,
    tau: float,
    memory_size: int | None,
    seed: int,
    device: str,
) -> None:
    """Fit the modality gap from embedding stores, write it, and report how much it closes."""
    from tipcap.config import GapConfig, default_gap_kind, from_dict
    from tipcap.gap import fit_gap_file, format_report
    from tipcap.store import EmbeddingStore

    if kind is None:
        kind, why = default_gap_kind(setting, mu_from)
        click.echo(f"--kind not given: {kind}, {why}")
    settings = {"kind": kind, "setting": setting, "renorm": not no_renorm, "shrinkage": not no_shrinkage,
                "web_estimator": web_estimator, "drop_quantile": drop_quantile, "sigma2": sigma2,
                "scale_to_dim": scale_to_dim, "match": match,
                "noise_scale": noise_scale, "mu_from": mu_from, "learnable": learnable,
                "tau": tau, "memory_size": memory_size, "seed": seed}  # fmt: skip
    try:
        config = from_dict(GapConfig, settings, "gap")
    except TipcapError as e:
        # Name the flag the value came from, as click does for the ranges it can check (NaN it cannot).
        flag = re.sub(r"config key 'gap\.(\w+)'", lambda m: "--" + m[1].replace("_", "-"), str(e))
        raise TipcapError(flag) from None
    texts = EmbeddingStore.open(texts_dir, "--texts", "texts")
    images = EmbeddingStore.open(images_dir, "--images", "images") if images_dir else None
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
    from tipcap.training.loop import train

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
    "--model",
    "model_dir",
    required=True,
    help="Model folder, or a hub name (owner/name[@revision]) found in or downloaded to the hub's cache.",
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
    from tipcap.hub_cache import resolve_model

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


def _echo_scores(document: dict[str, Any]) -> None:
    """The metrics table of a ``metrics.json`` document, and its table per domain when it has domains."""
    from tipcap.evaluation.metrics import format_domain_table, format_table

    click.echo(format_table(document["metrics"], document["skipped"]))
    if document.get("domains"):
        click.echo("per domain (x100):")
        click.echo(format_domain_table(document["metrics"], document["domains"]))


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
    from tipcap.evaluation.metrics import check_metrics, score_file

    try:
        metrics = check_metrics(metric_names.split(","))
    except TipcapError as e:
        raise TipcapError(f"--metrics {metric_names!r}: {e}") from None
    document, path = score_file(predictions_path, references_path, split, metrics, out, echo=click.echo)
    _echo_scores(document)
    click.echo(f"wrote {path}")


@main.command("evaluate")
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
@click.option("--prompt", default="none", show_default=True,
              type=click.Choice(["none", "auto", "oracle", "oracle-one", "oracle-missing", "wrong"]),
              help="auto: CLIP zero-shot entities as prompt words; oracle: the scene's objects; oracle-one: "
              "one of them; oracle-missing: one that the caption without prompts leaves out; wrong: as many "
              "entities absent from the scene (all but none and auto need a file that records its scenes' "
              "objects, as the toy world's does). Prompted evaluations report Adherence: the share of "
              "prompt words the caption mentions.")  # fmt: skip
@_decoding_options
@click.option("--metrics", "metric_names", default="bleu,meteor,rouge,cider,spice", show_default=True,
              help="Comma-separated pycocoevalcap metrics (SPICE is skipped offline).")  # fmt: skip
@click.option(
    "--score-clip",
    default="ViT-B-32",
    show_default=True,
    help="CLIP that computes CLIP-S and RefCLIP-S: an open_clip model name or model-config JSON.",
)
@click.option("--score-pretrained", default="openai", show_default=True,
              help="The scorer's pretrained tag or local weights file; CLIP-S and RefCLIP-S are skipped "
              "with a warning when its weights are not here and cannot be downloaded.")  # fmt: skip
@click.option("--instances", default=None, type=click.Path(dir_okay=False),
              help="COCO instance annotations (instances_val2014.json) of the images: report CHAIR-i and "
              "CHAIR-s on COCO's 80 categories.")  # fmt: skip
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
    score_clip: str,
    score_pretrained: str,
    instances: str | None,
    device: str | None,
) -> None:
    """Caption a split's images, score them, write predictions.json, metrics.json and per_image.json."""
    from tipcap.hub_cache import resolve_model

    if model_dir is not None:
        resolve_model(model_dir)  # an unavailable hub model fails before torch is imported
    from tipcap.config import EvalConfig, from_dict
    from tipcap.evaluation.evaluate import evaluate_split
    from tipcap.evaluation.metrics import format_report

    metrics = [m.strip() for m in metric_names.split(",") if m.strip()]
    settings = {"beams": beams, "batch_size": batch_size, "prompt": prompt, "metrics": metrics,
                "score_clip": score_clip, "score_pretrained": score_pretrained}  # fmt: skip
    config = from_dict(EvalConfig, settings, "eval")
    timings: dict[str, float] = {}
    document = evaluate_split(
        data, split, out, config, method=method, model=model_dir, images=images, image_store=image_store,
        texts=texts, instances=instances, device=device, timings=timings,
    )  # fmt: skip
    click.echo(format_report(document["matching"]))
    _echo_scores(document)
    click.echo(_format_timings(timings))
    click.echo(
        f"wrote {out}/predictions.json, {out}/metrics.json, {out}/per_image.json and {out}/provenance.json"
    )


@main.command("push")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Model folder.")
@click.option("--repo", required=True, help="Hub model name to publish to, owner/name (created if missing).")
@click.option("--private", is_flag=True, help="Create the hub repository as private.")
@click.option("--token", default=None, help="Hugging Face token (default: HF_TOKEN, else `hf auth login`'s).")
@click.option("--message", default=None, help="Commit message.")
def push_command(model_dir: str, repo: str, private: bool, token: str | None, message: str | None) -> None:
    """Publish a model folder, with its model card, to the Hugging Face hub."""
    from tipcap.hub import push_model

    url = push_model(model_dir, repo, private=private, token=token, commit_message=message)
    click.echo(f"pushed {model_dir} to {repo}: {url}")


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
    "--image-size",
    type=click.IntRange(min=8),
    help="Image side in pixels.  [default: 48 in world 2, 32 in world 1]",
)
@click.option(
    "--version",
    "world_version",
    default="2",
    show_default=True,
    type=click.Choice(["1", "2"]),
    help="Which toy world: 2, scenes in relations, captions from a grammar, test scenes new to the "
    "training captions; 1, coloured shapes with few combinations (to reproduce its tables).",
)
@click.option(
    "--web-mismatch",
    default=0.2,
    show_default=True,
    type=_FiniteFloatRange(0, 1),
    help="Share of web pairs with another image's caption.",
)
@click.option(
    "--clip/--no-clip",
    "train_clip",
    default=False,
    show_default=True,
    help="Also train the full demo's toy CLIP on the world, into OUT/clip (the demo's own CLIP where the "
    "world differs from the demo's only in --test).",
)
def toyworld_command(
    out: str,
    seed: int,
    train_images: int,
    val_images: int,
    test_images: int,
    image_size: int | None,
    world_version: str,
    web_mismatch: float,
    train_clip: bool,
) -> None:
    """Write a toy world of coloured shapes: images, a Karpathy split file and web pairs."""
    if world_version == "1":
        from tipcap.toy.world import write_toyworld as write
    else:
        from tipcap.toy.scenes import write_world as write
    sizes = {"image_size": image_size} if image_size else {}
    karpathy = write(
        out, seed=seed, train=train_images, val=val_images, test=test_images, web_mismatch=web_mismatch,
        progress=True, **sizes,
    )  # fmt: skip
    total = train_images + val_images + test_images
    click.echo(
        f"wrote {total:,} images to {out}/images, captions in {karpathy}, web pairs in {out}/web_pairs.jsonl"
    )
    if train_clip:
        from tipcap.demo import train_demo_clip

        train_demo_clip(karpathy, Path(out) / "clip", seed=seed, version=int(world_version), echo=click.echo)


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
    if ablation.config.compare or ablation.config.families:
        click.echo((Path(out) / "comparisons.md").read_text(encoding="utf-8"))
    names = ("results.csv", "table.md", "comparisons.md", "comparisons.csv", "cider.png")
    written = [name for name in (*names, "cider_vs_pairs.png") if (Path(out) / name).is_file()]
    click.echo(f"wrote {', '.join(f'{out}/{name}' for name in written)}")


@main.command("compare")
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
    "--margin", type=_FiniteFloatRange(min=0, min_open=True), default=None,
    help="Also test equivalence within ±MARGIN (TOST over seeds).",
)  # fmt: skip
def compare_command(grid_out: str, a: str, b: str, metric: str, margin: float | None) -> None:
    """Print A − B per seed: the per-seed differences, their t-interval over seeds and the verdict of this
    one comparison (uncorrected), on the seeds and test images both cells share."""
    from tipcap.evaluation.stats import decide
    from tipcap.grid.compare import compare_cells, describe, grid_scores

    comparison = compare_cells(grid_scores(grid_out), a, b, metric)
    click.echo(describe(decide([comparison], margin)[0]))


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
@click.option(
    "--version",
    "world_version",
    default="2",
    show_default=True,
    type=click.Choice(["1", "2"]),
    help="Which toy world (see 'tipcap toyworld --help').",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option(
    "--unpinned", is_flag=True,
    help="Use the CPU's fastest kernels; the digits then depend on the processor (see tipcap.portable).",
)  # fmt: skip
def demo_command(
    quick: bool, seed: int, out: str, cache: str, world_version: str, no_progress: bool, unpinned: bool
) -> None:
    """Run the whole pipeline offline on the toy world and print the table of methods.

    By default the CPU arithmetic is pinned (tipcap.portable), so that every x86-64 machine with the same
    package versions prints the same table; the last line gives its digest.
    """
    # Before anything loads torch or numpy, which read the pins once.
    from tipcap.portable import pin_cpu_arithmetic

    not_pinned = "--unpinned" if unpinned else pin_cpu_arithmetic()
    from tipcap.demo import describe_arithmetic, run_demo

    echo_stage = functools.partial(click.echo, err=True)
    run_demo(out, cache, seed=seed, quick=quick, progress=not no_progress, echo=echo_stage,
             version=int(world_version))  # fmt: skip
    click.echo((Path(out) / "table.md").read_text(encoding="utf-8"))
    click.echo(f"wrote {out}/results.csv, {out}/table.md, {out}/cider.png and {out}/gap.png")
    click.echo(describe_arithmetic(Path(out) / "results.csv", not_pinned))


@main.command("serve")
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Path(file_okay=False),
    help="A model directory, or a folder of them (the output of tipcap demo or ablate); repeatable.",
)
@click.option("--demo", is_flag=True, help="Serve the models tipcap demo trained (in runs/demo).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: a free one)."
)
@click.option(
    "--max-upload-mb",
    default=10.0,
    show_default=True,
    # At least a small PNG's size; at most what the server should hold in memory for one upload.
    type=_FiniteFloatRange(min=0.01, max=1024),
    help="Largest image accepted, in MB (0.01 to 1024).",
)
@click.option("--device", default=None, help="Device (default: cuda when available, else cpu).")
def serve_command(
    models: tuple[str, ...], demo: bool, host: str, port: int, max_upload_mb: float, device: str | None
) -> None:
    """Caption images in the browser, with prompt words at a click; prints the page's address."""
    try:
        from tipcap.app.server import serve
    except ImportError as e:
        raise TipcapError(
            f"tipcap serve needs the app extra ({e}); pip install -e '.[app]' in tipcap's clone."
        ) from None
    from tipcap.app.service import CaptionService, load_models

    paths = [*models, *(["runs/demo"] if demo else [])]
    if not paths:
        raise TipcapError("serve: give --model DIR, or --demo to serve the models tipcap demo trained.")
    service = CaptionService(load_models(paths, device), max_upload_bytes=int(max_upload_mb * 2**20))
    serve(service, host, port, echo=click.echo)


if __name__ == "__main__":
    main()
