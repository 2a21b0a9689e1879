"""Model cards: the ``README.md`` of a model directory, with the Hugging Face hub's YAML header.

Publishing, above the model (which never imports it): a training run writes its model's card once the model
is saved (:mod:`tipcap.training.loop`), ``tipcap push`` writes one into a folder that has none
(:mod:`tipcap.hub`), and ``tipcap evaluate`` adds its figures. The card is written from what the folder
holds and nothing outside it, so that a copied or published folder describes itself, the same on any
machine:

- the YAML header (``huggingface_hub.ModelCardData``): ``library_name: tipcap``, tags naming the gap kind
  and the data setting, the training data set when the run's provenance names a known one (recorded at
  training from the caption store, :func:`tipcap.training.setup.corpus_dataset`), and the evaluation
  figures as a
  ``model-index``. No ``pipeline_tag``: ``transformers.pipeline`` cannot load a tipcap model, and the tag
  would offer it. No licence is claimed: it depends on the data, the language model and the CLIP the
  decoder was trained with.
- how to load it: ``TIPCap.from_pretrained``, with tipcap installed;
- the model: its CLIP, language model, prefix, projector and prompt mode (``config.json``), and a warning
  when the CLIP has random weights;
- the data setting and the gap: kind, ‖μ‖, trace Σ and the effective rank of Σ (``gap.safetensors``);
- the training run: its command, config and input hashes (``provenance.json``, written by ``train``);
- the evaluation figures (x100, as papers print them), one row per data set, split, domain and decoding
  setting, with the number of images scored (of the split's) and CLIP-S's scorer, then notes where they
  say less than they seem to: a scorer with random weights, part of a split, CHAIR on the annotated images
  only, a metric with no value (left out of the ``model-index``, which holds no NaN). ``tipcap evaluate``
  adds or replaces its row (:func:`record_evaluation`); saving the weights again removes the card
  (:mod:`tipcap.model_folder`), with figures that belonged to the old weights.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from tipcap.clip import ClipSpec
from tipcap.errors import TipcapError
from tipcap.gap import Gap
from tipcap.gap.report import gap_report
from tipcap.io import atomic_path, load_json
from tipcap.model_folder import CARD_NAME, CONFIG_NAME, GAP_NAME
from tipcap.provenance import FILE_NAME as PROVENANCE_NAME

TASK = "image-to-text"
"""The task of the card's evaluation results (``model-index``)."""
KNOWN_DATASETS = ("coco", "flickr30k")
"""Training data sets named in the card's header, when a caption store's corpus shows it was one of them."""

SCORER_METRICS = ("CLIP-S", "RefCLIP-S")
"""The metrics a scorer CLIP computes, named with it on the card."""
UNDEFINED_REASONS = {"CHAIR-i": "no caption mentions an object, so there is no mention to count"}
"""Why a metric can have no value, for the card's note on a figure left out."""


def model_name(directory: Path) -> str:
    """The name a card gives its model: the folder's name, or its run's when the folder is ``model``."""
    resolved = directory.resolve()
    return resolved.parent.name if resolved.name == "model" and resolved.parent.name else resolved.name


def _training_dataset(record: Mapping[str, Any] | None) -> str | None:
    """The known data set (:data:`KNOWN_DATASETS`) whose captions the run trained on, as its provenance
    records it, or ``None``."""
    name = (record or {}).get("dataset")
    return name if name in KNOWN_DATASETS else None


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _model_section(document: Mapping[str, Any]) -> str:
    """The CLIP, language model and decoder settings of a model's ``config.json``."""
    model = document["model"]
    clip = document.get("clip")
    language = model.get("language_model_config") or {}
    shape = ", ".join(
        f"{key} {language[key]}"
        for key in ("n_layer", "n_embd", "num_hidden_layers", "hidden_size")
        if key in language
    )
    kind = language.get("model_type", model["language_model"])
    spec = ClipSpec.from_dict(clip) if clip else None
    random_clip = spec is not None and spec.pretrained == "none"
    described = "not recorded" if spec is None else spec.describe()
    if random_clip:
        described = f"{spec.model} with random weights (pretrained none, seed {spec.init_seed})"
    rows = [
        ["CLIP", described],
        ["language model", f"{kind} ({shape})" if shape else kind],
        ["tokenizer", model.get("tokenizer") or model["language_model"]],
        ["prefix", f"{model['prefix_length']} vectors from a {model['projector']} projector"],
        ["prompts", f"{model['prompt']} ({len(document.get('entity_names') or [])} entities)"],
    ]
    if model["prompt"] != "none":
        guidance = model.get("prompt_guidance", 0.0)
        rows.append(["prompt guidance", f"{guidance:g}" if guidance else "none (plain decoding)"])
    text = "## Model\n\n" + _table(["part", "setting"], rows)
    if random_clip:
        text += (
            "\n\n**Its CLIP has random weights**: it was never trained, so its embeddings of real images "
            "and captions carry no learnt meaning, and neither do this decoder's captions of real images. "
            "A model for tests and toy data, not for captioning photographs."
        )
    return text


def _gap_section(report: Mapping[str, Any] | None) -> str:
    """The data setting and the gap's statistics."""
    if report is None:
        return (
            "## Data setting and modality gap\n\nNo gap: a decoder trained on image embeddings (supervised)."
        )
    row = [report["setting"] or "none", report["kind"], report["dim"], f"{report['mu_norm']:.4f}",
           f"{report['sigma_trace']:.4f}", f"{report['effective_rank']:.1f}"]  # fmt: skip
    header = ["data setting", "gap kind", "d", "‖μ‖", "trace Σ", "effective rank of Σ"]
    return (
        "## Data setting and modality gap\n\n"
        "The decoder read CLIP text embeddings at training; the gap carries image embeddings to the text "
        "side at inference.\n\n" + _table(header, [row])
    )


def _training_section(record: Mapping[str, Any] | None) -> str:
    """The training command, config, inputs and software of ``provenance.json``."""
    if record is None:
        return "## Training\n\nThis folder holds no training record (`provenance.json`)."
    command = list(record.get("command") or [])
    if command and Path(command[0]).name in ("tipcap", "cli.py"):
        command[0] = "tipcap"
    config = yaml.safe_dump(record.get("config"), sort_keys=False, allow_unicode=True).rstrip()
    inputs = _table(["input", "SHA-256 or store digest"], sorted(record.get("inputs", {}).items()))
    versions = ", ".join(f"{name} {version}" for name, version in (record.get("versions") or {}).items())
    return (
        f"## Training\n\nTrained with tipcap {record.get('tipcap', '?')} ({versions}):\n\n"
        f"```bash\n{shlex.join(command)}\n```\n\nConfig:\n\n```yaml\n{config}\n```\n\n{inputs}"
    )


def _images(args: Mapping[str, Any]) -> str:
    """How many images a row was scored on, and of how many in the split when the file said."""
    images, total = args.get("images"), args.get("split_images")
    if images is None:
        return "?"  # figures recorded before cards kept the count
    return f"{images:,} of {total:,}" if total is not None else f"{images:,}"


def _evaluation_section(results: Sequence[EvalResult]) -> str:
    """One row per data set, split, domain and decoding setting with the number of images it was scored
    on; one column per metric (x100), CLIP-S's scorer named; then notes on what the figures do not say."""
    if not results:
        return (
            "## Evaluation\n\nNot evaluated yet: `tipcap evaluate --model <this folder> ...` adds its "
            "figures here."
        )
    metrics = list(dict.fromkeys(r.metric_name or r.metric_type for r in results))
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in results:
        key = (r.dataset_name, r.dataset_split or "", r.dataset_config or "all", r.metric_config or "")
        row = rows.setdefault(key, {"values": {}, "args": r.dataset_args or {}, "metric_args": {}})
        row["values"][r.metric_name or r.metric_type] = r.metric_value
        row["metric_args"][r.metric_type] = r.metric_args or {}
    scorers = {key: row["metric_args"].get("clip-s", {}).get("scorer") for key, row in rows.items()}
    header = ["data", "split", "domain", "images", "setting", *metrics]
    if any(scorers.values()):
        header.append("CLIP-S scorer")
    table_rows = []
    for key, row in rows.items():
        cells = [*key[:3], _images(row["args"]), key[3]]
        cells += [f"{row['values'][m]:.1f}" if m in row["values"] else "" for m in metrics]
        if any(scorers.values()):
            cells.append(scorers[key] or "")
        table_rows.append(cells)
    notes = []
    for scorer in dict.fromkeys(
        row["metric_args"]["clip-s"]["scorer"]
        for row in rows.values()
        if row["metric_args"].get("clip-s", {}).get("random_weights")
    ):
        notes.append(
            f"CLIP-S and RefCLIP-S by {scorer}: a CLIP with random weights, untrained; these figures do "
            "not measure how well the captions fit the images."
        )
    for key, row in rows.items():
        where = " ".join(part for part in key[:3] if part and part != "all") + f" ({key[3]})"
        images, total = row["args"].get("images"), row["args"].get("split_images")
        if images is not None and total is not None and images < total:
            notes.append(
                f"{where}: scored on {images:,} of the split's {total:,} images, not comparable with figures "
                "on the whole split."
            )
        chair_images = row["metric_args"].get("chair-s", {}).get("images")
        if chair_images is not None and images is not None and chair_images < images:
            notes.append(
                f"{where}: CHAIR on the {chair_images:,} of the {images:,} images that the instance file "
                "annotates."
            )
        for name in row["args"].get("undefined", []):
            reason = UNDEFINED_REASONS.get(name, "no value for these captions")
            notes.append(f"{where}: {name} left out: {reason} (NaN in metrics.json).")
    text = "## Evaluation\n\nScores x100, as papers print them (caption metrics by pycocoevalcap).\n\n"
    text += _table(header, table_rows)
    return text + ("\n\n" + "\n".join(f"- {note}" for note in notes) if notes else "")


def write_model_card(directory: str | Path, results: Sequence[EvalResult] = ()) -> Path:
    """Write ``directory/README.md`` from the folder's config, gap and training record, with ``results``
    as its evaluation figures; return its path.

    Raises:
        TipcapError: when the folder has no tipcap ``config.json``.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise TipcapError(f"{directory}: not a tipcap model directory (no {CONFIG_NAME}).")
    document = load_json(config_path)
    gap_path = directory / GAP_NAME
    report = gap_report(Gap.load(gap_path)) if gap_path.is_file() else None
    record = load_json(directory / PROVENANCE_NAME) if (directory / PROVENANCE_NAME).is_file() else None
    name = model_name(directory)
    tags = ["tipcap", "image-captioning", "clip", "zero-shot-image-captioning"]
    if report is not None:
        tags += [f"gap-{report['kind']}", f"setting-{report['setting'] or 'none'}"]
    dataset = _training_dataset(record)
    data = ModelCardData(
        library_name="tipcap",
        tags=tags,
        datasets=[dataset] if dataset else None,
        model_name=name,
        eval_results=list(results) or None,
    )
    intro = (
        f"# {name}\n\nA tipcap caption decoder: a language model that reads "
        "a prefix projected from a CLIP embedding. It was trained on the CLIP text embeddings of captions; "
        "at inference, its modality gap carries a CLIP image embedding to the text side.\n\n"
        "## How to load it\n\n"
        "With tipcap installed (`pip install -e .` in a clone of its repository), through "
        "`TIPCap.from_pretrained`, which brings the model's gap, tokenizer and CLIP along. It is not a "
        "`transformers` model: `transformers.pipeline` and `AutoModel` cannot load it.\n\n"
        "```python\nfrom tipcap import TIPCap\n\n"
        'model = TIPCap.from_pretrained("owner/name")  # a hub name, or the path of this folder\n'
        'print(model.caption(images=["photo.jpg"])[0].caption)\n```\n\n'
        "or from the command line: `tipcap caption --model owner/name photo.jpg`."
    )
    body = "\n\n".join(
        [
            intro,
            _model_section(document),
            _gap_section(report),
            _training_section(record),
            _evaluation_section(results),
        ]
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")
    path = directory / CARD_NAME
    with atomic_path(path) as tmp:
        card.save(tmp)
    return path


def card_results(directory: str | Path) -> list[EvalResult]:
    """The evaluation figures of a model directory's card (none when it has no card)."""
    path = Path(directory) / CARD_NAME
    if not path.is_file():
        return []
    return list(ModelCard.load(path, ignore_metadata_errors=True).data.eval_results or [])


def _scorer(document: Mapping[str, Any]) -> dict[str, Any]:
    """How a ``metrics.json`` document's CLIP-S scorer is named on the card, and whether its weights are
    random (``pretrained`` none: an untrained CLIP)."""
    identity = (document.get("scorer") or {}).get("identity") or {}
    weights = str(identity.get("pretrained", "?"))
    random_weights = weights == "none"
    shown = f"random weights, seed {identity.get('init_seed', 0)}" if random_weights else weights
    return {"scorer": f"{identity.get('model', '?')} ({shown})", "random_weights": random_weights}


def evaluation_results(
    document: Mapping[str, Any], dataset: str, split: str | None, setting: str
) -> list[EvalResult]:
    """A ``metrics.json`` document's figures (x100) as hub evaluation results, per domain as well.

    Each result carries what the figure rests on: the number of images scored and the split's total
    (``dataset_args``: ``images``, ``split_images``), the CLIP-S scorer (``metric_args``: ``scorer``,
    ``random_weights``; a random scorer's figures are named ``CLIP-S (random scorer)``), and CHAIR's
    annotated images. A metric without a finite value (CHAIR-i when no caption mentions an object) is
    left out and named in ``dataset_args["undefined"]``, for the card's notes.
    """
    matching = document.get("matching") or {}
    whole = {"images": matching.get("scored_images"), "split_images": matching.get("reference_images")}
    groups = [(None, document["metrics"], whole)]
    groups += [
        (domain, scores["metrics"], {"images": scores.get("images")})
        for domain, scores in document.get("domains", {}).items()
    ]
    scorer = _scorer(document)
    chair_images = (document.get("hallucination") or {}).get("annotated_images")
    results = []
    for domain, metrics, counts in groups:
        args: dict[str, Any] = {key: value for key, value in counts.items() if value is not None}
        undefined = [m for m, v in metrics.items() if v is not None and not math.isfinite(v)]
        if undefined:
            args["undefined"] = undefined
        for metric, value in metrics.items():
            if value is None or metric in undefined:
                continue
            name, metric_args = metric, None
            if metric in SCORER_METRICS and document.get("scorer"):
                metric_args = scorer
                name += " (random scorer)" if scorer["random_weights"] else ""
            elif metric in ("CHAIR-i", "CHAIR-s") and domain is None and chair_images is not None:
                metric_args = {"images": chair_images}
            results.append(
                EvalResult(
                    task_type=TASK,
                    dataset_type=dataset,
                    dataset_name=dataset,
                    dataset_split=split,
                    dataset_config=domain,
                    dataset_args=args or None,
                    metric_type=metric.lower(),
                    metric_name=name,
                    metric_value=round(100 * value, 2),
                    metric_config=setting,
                    metric_args=metric_args,
                )
            )
    return results


def record_evaluation(
    directory: str | Path, document: Mapping[str, Any], dataset: str, split: str | None, setting: str
) -> Path:
    """Put an evaluation's figures on a model's card, replacing earlier ones of the same data set, split,
    domain and decoding ``setting``; return the card's path."""
    new = evaluation_results(document, dataset, split, setting)

    def key(r: EvalResult) -> tuple[Any, ...]:
        return (r.dataset_type, r.dataset_split, r.dataset_config, r.metric_config)

    replaced = {key(r) for r in new}
    return write_model_card(directory, [r for r in card_results(directory) if key(r) not in replaced] + new)
