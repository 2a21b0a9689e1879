"""Caption metrics with pycocoevalcap, computed exactly as its ``COCOEvalCap`` does.

Predictions and references are read and paired by :mod:`tipcap.evaluation.references`;
:func:`score_captions` tokenises both sides with pycocoevalcap's PTBTokenizer (one call each) and runs
BLEU-1..4, METEOR, ROUGE-L, CIDEr and, where its Stanford CoreNLP jars are installed, SPICE.
:func:`score_file` does it all for ``tipcap score`` and writes ``metrics.json``.

pycocoevalcap (and the Java runtime it needs) is imported only when scoring.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tipcap import __version__, provenance
from tipcap.data.karpathy import ImageId
from tipcap.errors import TipcapError
from tipcap.evaluation.references import format_report, load_predictions, match_predictions, read_references
from tipcap.io import write_json_atomic

log = logging.getLogger("tipcap.evaluation.metrics")

METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
"""Metric names accepted by :func:`score_captions`, in the order their columns are reported."""

COLUMNS = {
    "bleu": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE-L",),
    "cider": ("CIDEr",),
    "spice": ("SPICE",),
}
"""The result keys each metric name produces."""

# Characters Java's PTBTokenizer treats as line ends. pycocoevalcap replaces only "\n" before tokenising
# one caption per line, so any of these would shift every later caption onto the wrong image.
_LINE_BREAKS = str.maketrans(dict.fromkeys("\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029", " "))


# --------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------


def check_metrics(names: Iterable[str]) -> tuple[str, ...]:
    """Validate metric names (case-insensitive) and return them, de-duplicated, in :data:`METRICS` order.

    Raises:
        TipcapError: for an unknown name or an empty selection.
    """
    wanted = {name.strip().lower() for name in names} - {""}
    unknown = sorted(wanted - set(METRICS))
    if unknown:
        raise TipcapError(f"unknown metric {', '.join(map(repr, unknown))}; use any of {', '.join(METRICS)}.")
    if not wanted:
        raise TipcapError(f"no metric selected; use any of {', '.join(METRICS)}.")
    return tuple(name for name in METRICS if name in wanted)


def score_captions(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    metrics: Iterable[str] = METRICS,
) -> dict[str, Any]:
    """Score one caption per image against its references, exactly as pycocoevalcap's ``COCOEvalCap``.

    Both sides go through one PTBTokenizer call each (as ``{id: [{"caption": ...}]}``), then the requested
    scorers run on the images of ``predictions``, in its order. Line breaks inside a caption become spaces
    first (pycocoevalcap does this for ``\\n`` only; a ``\\r`` would misalign every later caption).

    SPICE needs pycocoevalcap's Stanford CoreNLP jars, which it downloads on first use; when they are
    missing or SPICE fails, one ``SPICE skipped: <reason>`` warning is logged and the other metrics are
    still returned.

    Args:
        predictions: image id to predicted caption (e.g. ``match_predictions(...)[0]``).
        references: image id to reference captions; must cover every predicted image with >= 1 caption.
        metrics: any of :data:`METRICS`.

    Returns:
        ``{"metrics": {"BLEU-1": ..., "BLEU-4": ..., "METEOR": ..., "ROUGE-L": ..., "CIDEr": ...,
        "SPICE": ...}, "per_image": {image_id: {"ROUGE-L": ..., "CIDEr": ...}}, "skipped": {"SPICE":
        reason}}``, with the keys of the requested metrics only. ``per_image`` holds the metrics whose
        corpus score is the mean of the images' scores: ROUGE-L, and CIDEr (its IDF taken from the
        references of all scored images); it is empty unless one of them is requested. BLEU and METEOR
        are corpus statistics (pooled n-gram counts, pooled alignments), not means of sentence scores.

    Raises:
        TipcapError: for unknown metrics, no predictions, a predicted image without references, or no
            Java runtime.
    """
    wanted = check_metrics(metrics)
    if not predictions:
        raise TipcapError("no predictions to score.")
    for image_id in predictions:
        if not references.get(image_id):
            raise TipcapError(
                f"image {image_id!r} has a prediction but no reference captions; "
                "pair predictions with match_predictions first."
            )
    if shutil.which("java") is None:
        raise TipcapError(
            "java not found on PATH: pycocoevalcap's tokenizer and METEOR need a Java runtime (8 or newer)."
        )

    res = _tokenize({image_id: [caption] for image_id, caption in predictions.items()})
    gts = _tokenize({image_id: list(references[image_id]) for image_id in predictions})

    scores: dict[str, float] = {}
    per_image: dict[ImageId, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    if "bleu" in wanted:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update(zip(COLUMNS["bleu"], map(float, bleu), strict=True))
    if "meteor" in wanted:
        scores["METEOR"] = _meteor(gts, res)
    if "rouge" in wanted:
        from pycocoevalcap.rouge.rouge import Rouge

        rouge, rouge_per_image = Rouge().compute_score(gts, res)
        scores["ROUGE-L"] = float(rouge)
        for image_id, value in zip(gts, rouge_per_image, strict=True):
            per_image.setdefault(image_id, {})["ROUGE-L"] = float(value)
    if "cider" in wanted:
        from pycocoevalcap.cider.cider import Cider

        cider, cider_per_image = Cider().compute_score(gts, res)
        scores["CIDEr"] = float(cider)
        for image_id, value in zip(gts, cider_per_image, strict=True):
            per_image.setdefault(image_id, {})["CIDEr"] = float(value)
    if "spice" in wanted:
        reason = spice_unavailable()
        if reason is None:
            try:
                scores["SPICE"] = _run_spice(gts, res)
            except Exception as e:  # any failure of the Java scorer only skips SPICE
                reason = f"SPICE failed ({type(e).__name__}: {e})"
        if reason is not None:
            reason = " ".join(reason.split())
            skipped["SPICE"] = reason
            log.warning("SPICE skipped: %s", reason)
    return {"metrics": scores, "per_image": per_image, "skipped": skipped}


def score_domains(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    domains: Mapping[ImageId, str],
    metrics: Iterable[str] = METRICS,
    skipped: Mapping[str, str] | None = None,
    per_image: Mapping[str, Mapping[ImageId, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every metric per domain: :func:`score_captions` on each domain's images on their own.

    This is how NoCaps reports in-, near- and out-domain scores: CIDEr's document frequencies come from the
    domain's references alone, so a domain's CIDEr is not the mean of its images' overall CIDEr. Scores
    computed per image without references to other images (``per_image``: name → image id → score, e.g.
    CLIP-S) are averaged over the domain's images.

    Args:
        predictions: image id to caption, every id with a domain.
        references: image id to reference captions.
        domains: image id to domain name.
        metrics: any of :data:`METRICS`.
        skipped: metrics skipped on the whole set (reason by result key); not run again per domain.
        per_image: per-image scores to average per domain.

    Returns:
        ``{domain: {"images": n, "metrics": {...}, "skipped": {...}}}``, domains in sorted order.
    """
    skipped = dict(skipped or {})
    wanted = [name for name in check_metrics(metrics) if not set(COLUMNS[name]) & set(skipped)]
    groups: dict[str, list[ImageId]] = {}
    for image_id in predictions:
        groups.setdefault(domains[image_id], []).append(image_id)
    scores: dict[str, dict[str, Any]] = {}
    for domain in sorted(groups):
        ids = groups[domain]
        result = score_captions({i: predictions[i] for i in ids}, references, wanted)
        for name, values in (per_image or {}).items():
            result["metrics"][name] = sum(values[i] for i in ids) / len(ids)
        scores[domain] = {"images": len(ids), "metrics": result["metrics"],
                          "skipped": {**skipped, **result["skipped"]}}  # fmt: skip
    return scores


@contextlib.contextmanager
def _java_stderr_into(log_file: IO[bytes]) -> Iterator[None]:
    """Send the stderr of the Java process pycocoevalcap's PTBTokenizer starts into ``log_file``.

    The tokenizer prints one "PTBTokenizer tokenized N tokens at ..." line to the terminal per call, two
    per evaluation; its Popen call sets no stderr, so the module's ``subprocess`` is swapped for the time
    of the call for one whose Popen sets it.
    """
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    quiet = types.SimpleNamespace(
        PIPE=subprocess.PIPE, Popen=functools.partial(subprocess.Popen, stderr=log_file)
    )
    ptb.subprocess = quiet
    try:
        yield
    finally:
        ptb.subprocess = subprocess


def _tokenize(captions: dict[ImageId, list[str]]) -> dict[ImageId, list[str]]:
    """pycocoevalcap's PTBTokenizer on ``{id: [caption, ...]}``, checked to return every caption."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    document = {i: [{"caption": c.translate(_LINE_BREAKS)} for c in cs] for i, cs in captions.items()}
    with tempfile.TemporaryFile() as java_log:
        with _java_stderr_into(java_log):
            tokens = PTBTokenizer().tokenize(document)
        expected = sum(len(cs) for cs in captions.values())
        returned = sum(len(cs) for cs in tokens.values())
        if tokens.keys() != captions.keys() or returned != expected:
            java_log.seek(0)
            said = java_log.read().decode(errors="replace").strip().splitlines()
            raise TipcapError(
                f"pycocoevalcap's PTBTokenizer returned {returned} of {expected} captions"
                + (f" (Java said: {said[-1][:200]})" if said else "")
                + "; check that `java -version` works."
            )
    return tokens


def _meteor(gts: dict[ImageId, list[str]], res: dict[ImageId, list[str]]) -> float:
    """METEOR through pycocoevalcap's Java process, which is always shut down afterwards."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, OSError) as e:  # the Java process died: empty lines or a broken pipe
        raise TipcapError(f"METEOR's Java process failed ({e}); check that `java -version` works.") from None
    finally:
        # What Meteor.__del__ does, but now rather than whenever the object is collected; __del__ then
        # finds the process already reaped. A failed compute_score leaves its lock held: release it, or
        # __del__ would wait for it forever.
        if meteor.lock.locked():
            meteor.lock.release()
        with meteor.lock:
            process = meteor.meteor_p
            with contextlib.suppress(OSError):  # a dead process's pipe may be broken
                process.stdin.close()
            process.kill()
            process.wait()
            process.stdout.close()
            process.stderr.close()
    return float(score)


def _spice_dir() -> Path:
    """pycocoevalcap's ``spice`` folder, where ``spice-1.0.jar`` and ``lib/`` live."""
    import pycocoevalcap.spice.spice as spice_module

    return Path(spice_module.__file__).parent


def spice_unavailable() -> str | None:
    """Why SPICE cannot run (its jar or Stanford CoreNLP missing, no Java), or ``None`` when it can.

    pycocoevalcap's ``Spice()`` downloads Stanford CoreNLP when the jar is missing; checking first keeps an
    offline run from trying.
    """
    from pycocoevalcap.spice.get_stanford_models import JAR, SPICELIB
    from pycocoevalcap.spice.spice import SPICE_JAR

    if shutil.which("java") is None:
        return "java not found on PATH"
    folder = _spice_dir()
    needed = [folder / SPICE_JAR, folder / SPICELIB / f"{JAR}.jar", folder / SPICELIB / f"{JAR}-models.jar"]
    missing = [p.relative_to(folder).as_posix() for p in needed if not p.exists()]
    if missing:
        return (
            f"{', '.join(missing)} not found in {folder} (pycocoevalcap downloads Stanford CoreNLP on first "
            "use; run `python -m pycocoevalcap.spice.get_stanford_models` once with network access)"
        )
    return None


def _run_spice(gts: dict[ImageId, list[str]], res: dict[ImageId, list[str]]) -> float:
    """The SPICE F-score through pycocoevalcap's Java scorer."""
    from pycocoevalcap.spice.spice import Spice

    score, _ = Spice().compute_score(gts, res)
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"SPICE returned {score}")
    return score


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


def format_table(metrics: Mapping[str, float], skipped: Mapping[str, str] | None = None) -> str:
    """Metrics as a two-column table (raw score and x100, as papers print them); skipped ones say so."""
    rows = [(name, f"{value:.4f}", f"{100 * value:.1f}") for name, value in metrics.items()]
    rows += [(name, "skipped", "") for name in (skipped or {}) if name not in metrics]
    width = max([len("metric"), *(len(name) for name, _, _ in rows)])
    lines = [f"{'metric':<{width}}  {'score':>7}  {'x100':>5}"]
    lines += [f"{name:<{width}}  {score:>7}  {scaled:>5}".rstrip() for name, score, scaled in rows]
    return "\n".join(lines)


def format_domain_table(metrics: Mapping[str, float], domains: Mapping[str, Mapping[str, Any]]) -> str:
    """Each metric x100 on the whole set and per domain, as NoCaps papers print them."""
    names = ["overall", *domains]
    header = ["metric", *names]
    rows = [header, ["images", str(sum(d["images"] for d in domains.values())),
                     *(str(d["images"]) for d in domains.values())]]  # fmt: skip
    for name, value in metrics.items():
        per_domain = [domains[d]["metrics"].get(name) for d in domains]
        rows.append(
            [name, f"{100 * value:.1f}", *("" if v is None else f"{100 * v:.1f}" for v in per_domain)]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in rows
    )


def metrics_path(predictions_path: str | Path, out: str | Path | None = None) -> Path:
    """Where ``metrics.json`` goes: ``OUT/metrics.json``, else ``<stem>.metrics.json`` by the predictions."""
    if out is not None:
        return Path(out) / "metrics.json"
    path = Path(predictions_path)
    name = path.name
    for suffix in (".gz", ".json"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return path.with_name(f"{name}.metrics.json")


def metrics_document(
    result: Mapping[str, Any],
    report: Mapping[str, Any],
    *,
    predictions: str | Path,
    references: str | Path,
    split: str | None,
    command: Sequence[str],
    domains: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``metrics.json`` holds: scores, skipped metrics, the scores per domain (:func:`score_domains`,
    when the references give domains), the matching report, per-image CIDEr (a list, so that ids keep their
    JSON type), the inputs, the exact command and the software versions."""
    return {
        "metrics": dict(result["metrics"]),
        **({"domains": dict(domains)} if domains else {}),
        "skipped": dict(result["skipped"]),
        "matching": dict(report),
        "predictions": str(predictions),
        "references": str(references),
        "split": split,
        "command": list(command),
        "versions": {"tipcap": __version__, **provenance.versions()},
        "per_image": [{"image_id": image_id, **scores} for image_id, scores in result["per_image"].items()],
    }


def score_file(
    predictions_path: str | Path,
    references_path: str | Path,
    split: str | None = None,
    metrics: Sequence[str] = METRICS,
    out: str | Path | None = None,
    echo: Callable[[str], object] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Score a COCO results file against references and write ``metrics.json`` (see :func:`metrics_path`).

    ``echo`` receives the matching report (:func:`format_report`) before anything is scored. Returns the
    metrics document and where it was written.

    Raises:
        TipcapError: when a metric is unknown or no prediction is for an image with references.
    """
    metrics = check_metrics(metrics)
    reference_set = read_references(references_path, split)
    references = reference_set.captions
    predictions = load_predictions(predictions_path)
    matched, report = match_predictions(predictions, references)
    if echo is not None:
        echo(format_report(report))
    if not matched:
        raise TipcapError(
            f"{predictions_path}: none of its {len(predictions)} predictions is for an image of "
            f"{references_path} with reference captions (first prediction's image_id: "
            f"{predictions[0]['image_id']!r}, first reference id: {next(iter(references))!r})."
        )
    result = score_captions(matched, references, metrics)
    domains = None
    if reference_set.domains:
        domains = score_domains(matched, references, reference_set.domains, metrics, result["skipped"])
    document = metrics_document(
        result, report, predictions=predictions_path, references=references_path, split=split,
        command=sys.argv, domains=domains,
    )  # fmt: skip
    path = metrics_path(predictions_path, out)
    write_json_atomic(path, document)
    return document, path
