"""The evaluation protocol: caption a split's images (a model or a baseline), score, write the files.

Every method goes through the same path: the split's images are embedded once (or read from an image
store), captioned, matched with the references and scored with pycocoevalcap, plus CLIP-S and RefCLIP-S
by a scorer CLIP of their own (:mod:`tipcap.evaluation.clip_scores`; skipped with one warning when its
weights are not on the machine) and, where the images' objects are known, CHAIR-i and CHAIR-s
(:mod:`tipcap.evaluation.chair`: COCO instance annotations given as ``instances``, or the ground truth a
world's data file records, :mod:`tipcap.evaluation.registry`). The output directory gets:

- ``predictions.json``: COCO results format, ``[{"image_id", "caption"}]``;
- ``metrics.json``: the scores (also per domain, as NoCaps gives them), the matching report, the method and
  model config, the scorer CLIP, the hallucination counts, the command, versions;
- ``per_image.json``: each image's prediction, references, prompt words, CIDEr, ROUGE-L, CLIP-S, RefCLIP-S
  (for intervals over images), the objects its caption mentions and hallucinates, and its domain;
- ``provenance.json``: the evaluation config, the content hashes of its inputs, command and versions.

Prompt modes (``EvalConfig.prompt``): ``none``; ``auto``, CLIP zero-shot entities; and the prompt sources
that installed worlds add, drawn from each image's ground-truth objects (the toy worlds' ``oracle``,
``oracle-one``, ``oracle-missing`` and ``wrong``). A prompted evaluation also reports how the captions
follow their words (:mod:`tipcap.evaluation.adherence`), image by image in ``per_image.json``.

Methods: ``model`` (a trained caption model; evaluated from its folder, its card gets the figures:
:func:`tipcap.card.record_evaluation`), and the baselines of :mod:`tipcap.evaluation.baselines`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from tipcap import provenance
from tipcap.card import record_evaluation
from tipcap.clip import ClipEncoder, ClipSpec, resolve_device
from tipcap.config import EmbedConfig, EvalConfig, to_dict
from tipcap.data.karpathy import ImageId
from tipcap.embed import embed_images
from tipcap.errors import TipcapError, WeightsUnavailable
from tipcap.evaluation import clip_scores
from tipcap.evaluation.adherence import Mentions, adherence, packaged_mentions, vocabulary_mentions
from tipcap.evaluation.baselines import retrieve_captions, template_captions
from tipcap.evaluation.chair import ChairResult, CocoObjectWords, chair, coco_truth, load_instances
from tipcap.evaluation.metrics import metrics_document, score_captions, score_domains
from tipcap.evaluation.references import match_predictions, read_references
from tipcap.evaluation.registry import GroundTruth, PromptRequest, ground_truth, prompt_sources
from tipcap.hub_cache import resolve_model
from tipcap.io import write_json_atomic
from tipcap.model import TIPCap
from tipcap.prompts import EntityVocabulary
from tipcap.provenance import sha256_file
from tipcap.store import EmbeddingStore

log = logging.getLogger("tipcap.evaluation.evaluate")

METHODS = ("model", "retrieval", "template")


def _mentions(image_ids: Sequence[ImageId], truth: GroundTruth, vocabulary: str | Path | None) -> Mentions:
    """What counts as a caption's mention of a prompt word: the world's object names where every image
    records its objects (a toy world's (colour, shape) pairs), else the entity vocabulary's forms and COCO's
    synonyms."""
    if image_ids and all(image_id in truth.objects for image_id in image_ids):
        return truth.mentions
    if vocabulary is None:
        return packaged_mentions()  # read once per process, not once per evaluation
    return vocabulary_mentions(EntityVocabulary.load(vocabulary), CocoObjectWords.load())


def _resolve_clip(
    clip: ClipSpec | None,
    model: TIPCap | None,
    texts: EmbeddingStore | None,
    images: EmbeddingStore | None,
    method: str,
) -> ClipSpec:
    """The CLIP that embeds the images: the one given, else the model's, else the one that made a store."""
    if clip is not None:
        return clip
    if model is not None and model.clip_spec is not None:
        return model.clip_spec
    for store in (texts, images):
        if store is not None and "clip_spec" in store.meta:
            return ClipSpec.from_dict(store.meta["clip_spec"])
    raise TipcapError(
        f"--method {method}: no CLIP to embed the images with; pass --texts (a caption store) or "
        "--image-store (an image store of the split), whose CLIP is then used."
    )


def _model_captions(
    model: TIPCap,
    embeddings: torch.Tensor,
    image_ids: list[Any],
    config: EvalConfig,
    truth: GroundTruth,
    mentions: Mentions,
    timings: dict[str, float],
) -> tuple[list[str], list[list[str]] | None]:
    """A caption model's captions ``[N]`` for image embeddings ``[N, d]``, and the prompt words used
    (``None`` when no image had any)."""
    prompts = None
    decoding = {
        "num_beams": config.beams, "max_new_tokens": config.max_tokens, "batch_size": config.batch_size,
        "top_k": config.top_k, "threshold": config.threshold, "timings": timings,
        "prompt_guidance": config.prompt_guidance, "search": config.search,
    }  # fmt: skip
    source = prompt_sources().get(config.prompt)
    if source is not None:
        missing = [image_id for image_id in image_ids if image_id not in truth.objects]
        if missing:
            raise TipcapError(
                f"eval.prompt {config.prompt}: {len(missing)} of the {len(image_ids)} images have no "
                f"ground-truth objects (image {missing[0]!r} first); {config.prompt} prompts need a file "
                "that records its scenes' objects (the toy world's)."
            )
        prompts = source(PromptRequest(
            image_ids, truth.objects, mentions, config.prompt_seed, model.entity_names or [],
            lambda: [result.caption for result in model.caption(embeddings=embeddings, **decoding)],
        ))  # fmt: skip
    results = model.caption(
        embeddings=embeddings, prompts=prompts, auto_prompt=config.prompt == "auto", **decoding
    )
    used = [result.prompt for result in results]
    return [result.caption for result in results], used if any(used) else None


class _Scorer:
    """The CLIP-S scorer of one evaluation: its CLIP, loaded, or why the scores are skipped."""

    def __init__(self, spec: ClipSpec, decoder_clip: ClipSpec, decoder_encoder: ClipEncoder, device: str):
        self.spec = spec
        self.identity = spec.identity()
        self.same_as_decoder = self.identity == decoder_clip.identity()
        self.encoder: ClipEncoder | None = decoder_encoder if self.same_as_decoder else None
        self.skipped: str | None = None
        if self.encoder is None:
            try:
                self.encoder = ClipEncoder.load(spec, device=device)
            except WeightsUnavailable as e:
                self.skip(
                    f"the weights of the scorer CLIP {spec.describe()} are not cached on this machine and "
                    f"{e.reason}; pass a local weights file with --score-pretrained (eval.score_pretrained "
                    "in a grid)"
                )

    def skip(self, reason: str) -> None:
        """Give up the scores, saying why once."""
        self.skipped, self.encoder = reason, None
        log.warning("CLIP-S and RefCLIP-S skipped: %s", reason)

    def record(self) -> dict[str, Any]:
        """How ``metrics.json`` names the scorer."""
        return {"clip": self.spec.to_dict(), "identity": self.identity, "prefix": clip_scores.PREFIX,
                "w": clip_scores.WEIGHT}  # fmt: skip


def _scorer_images(
    scorer: _Scorer,
    embeddings: torch.Tensor,
    image_ids: list[ImageId],
    data: str | Path,
    split: str | None,
    images: str | Path | None,
    store_dir: Path,
    device: str,
) -> torch.Tensor | None:
    """The scorer's embeddings ``[N, d]`` of the evaluated images: the decoder's when it is the same CLIP,
    else embedded from the image root into ``store_dir`` (reused there when built before)."""
    if scorer.same_as_decoder:
        return embeddings
    if images is None:
        scorer.skip(
            f"the scorer {scorer.spec.describe()} is not the CLIP of the image store; pass --images too, so "
            "that it can embed the images"
        )
        return None
    spec = scorer.spec
    store = embed_images(
        data, EmbedConfig(spec.model, spec.pretrained, spec.init_seed), store_dir, image_root=images,
        split=split, device=device, progress=False,
    ).store  # fmt: skip
    row_of = {image_id: row for row, image_id in enumerate(store.ids)}
    unread = [image_id for image_id in image_ids if image_id not in row_of]
    if unread:
        scorer.skip(
            f"{len(unread)} of the evaluated images could not be read for the scorer (image {unread[0]!r} "
            f"first; see {store_dir / 'skipped.json'})"
        )
        return None
    return store.gather(torch.tensor([row_of[image_id] for image_id in image_ids])).float()


def _hallucination(
    matched: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    instances: dict[ImageId, set[str]] | None,
    words: CocoObjectWords | None,
    scenes: GroundTruth,
    source: str | Path | None,
    skipped: dict[str, str],
) -> tuple[ChairResult | None, dict[str, Any]] | None:
    """CHAIR of the scored captions against COCO instance annotations (when given) or the scenes' objects
    (when every image has them), and how its truth was made; ``None`` when neither is known.

    With instance annotations, CHAIR scores only the images the file lists (``source``, for the messages).
    The published metric takes an image's truth from its instance annotations and its reference captions
    together; from the references alone, objects the annotators left unsaid would count as hallucinated,
    so an image the file does not list is left out, counted in the record, and warned about once. When
    none is left, CHAIR is skipped (no result; its reason in ``skipped``).
    """
    if instances is not None and words is not None:
        annotated = {image_id: caption for image_id, caption in matched.items() if image_id in instances}
        left_out = len(matched) - len(annotated)
        record = {"objects": "COCO's 80 categories", "synonyms": words.source,
                  "truth": "instance annotations and reference captions", "evaluated_images": len(matched),
                  "annotated_images": len(annotated), "left_out_images": left_out}  # fmt: skip
        if left_out:
            first = next(image_id for image_id in matched if image_id not in instances)
            reason = (
                f"--instances {source} annotates {len(annotated)} of the {len(matched)} evaluated images; "
                f"CHAIR left out the other {left_out} (image {first!r} first), whose truth would come from "
                "their reference captions alone"
            )
            record["left_out"] = reason
            if not annotated:
                skipped.update({"CHAIR-i": reason, "CHAIR-s": reason})
                log.warning("CHAIR skipped: %s", reason)
                return None, record
            log.warning("%s.", reason)
        truth = coco_truth({image_id: references[image_id] for image_id in annotated}, instances, words)
        return chair(annotated, truth, words.objects), record
    if matched and scenes.world is not None and all(image_id in scenes.objects for image_id in matched):
        found = chair(matched, scenes.objects, scenes.world.mentions)
        return found, {"objects": "scene objects", "truth": "the scenes' objects"}
    return None


def evaluation_record(
    config: EvalConfig,
    method: str,
    split: str | None,
    clip: ClipSpec,
    data: str | Path,
    image_store: EmbeddingStore,
    model_dir: str | Path | None,
    texts: EmbeddingStore | None,
    instances: str | Path | None,
    context: dict[str, Any] | None,
) -> dict[str, Any]:
    """The provenance record of an evaluation by :func:`evaluate_split`: its settings (with the CLIP that
    embeds the images and the scorer's) and the content hashes of its references, image store, model,
    caption store and instance file."""
    inputs = {"references": sha256_file(Path(data)), "images": image_store.digest}
    if model_dir is not None:
        inputs["model"] = sha256_file(Path(model_dir) / "model.safetensors")
    if texts is not None:
        inputs["texts"] = texts.digest
    if instances is not None:
        inputs["instances"] = sha256_file(Path(instances))
    scorer = ClipSpec(config.score_clip, config.score_pretrained)
    settings = {"eval": to_dict(config), "method": method, "split": split, "clip": clip.identity(),
                "score_clip": scorer.identity()}  # fmt: skip
    if context is not None:
        settings["context"] = context
    return provenance.record("evaluation", settings, inputs)


def evaluate_split(
    data: str | Path,
    split: str | None,
    out: str | Path,
    config: EvalConfig | None = None,
    *,
    method: str = "model",
    model: TIPCap | str | Path | None = None,
    images: str | Path | None = None,
    image_store: str | Path | None = None,
    texts: str | Path | None = None,
    clip: ClipSpec | None = None,
    truth: GroundTruth | None = None,
    instances: str | Path | None = None,
    score_image_store: str | Path | None = None,
    vocabulary: str | Path | None = None,
    context: dict[str, Any] | None = None,
    device: str | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Caption the images of a Karpathy split with ``method``, score them, and write the result files.

    Args:
        data: Karpathy split file (references, and the images' paths under ``images``); entries with a
            ``domain`` (``prepare nocaps``) are scored per domain as well.
        split: the split to evaluate (``test`` for the published protocol).
        out: output directory.
        config: decoding, prompting, metrics and the CLIP-S scorer (:class:`~tipcap.config.EvalConfig`).
        method: ``model``, ``retrieval`` or ``template``.
        model: the caption model (``model``), its directory (whose card gets the figures), or its hub
            name.
        images: image root of ``data``; the split's images are embedded into ``out/image-store`` unless
            ``image_store`` is given too (the scorer CLIP then reads the images from here).
        image_store: an existing image store of the split, embedded with the decoder's CLIP.
        texts: caption store to retrieve from (``retrieval``).
        clip: the CLIP to use; default: the model's, else the caption store's.
        truth: each image's true objects (the prompt sources' and the truth of the scene CHAIR); default:
            what ``data`` records, read by the installed worlds (:func:`~.registry.ground_truth`).
        instances: a COCO instance annotation file; with it, CHAIR is scored on COCO's 80 categories, over
            the evaluated images the file lists (the others are left out, counted and warned about).
        score_image_store: where the scorer CLIP's image store is kept when it is not the decoder's CLIP
            (default ``out/score-image-store``).
        vocabulary: entity vocabulary JSON of ``template`` (default: the packaged COCO vocabulary).
        context: what else determined the evaluation (a grid cell's resolved stages), recorded in
            ``provenance.json``.
        timings: when given, gains the seconds spent per stage: ``decoding`` (waiting for decoded
            images) and ``clip`` when images are embedded, ``generation``, ``scoring`` (pycocoevalcap) and
            ``clip-s``. They stay out of the written files, which the same inputs reproduce byte for byte.

    Returns:
        The metrics document written to ``metrics.json``.
    """
    config = config or EvalConfig()
    timings = {} if timings is None else timings
    if method not in METHODS:
        raise TipcapError(f"--method {method!r}: use one of {', '.join(METHODS)}.")
    if images is None and image_store is None:
        raise TipcapError("give --images (an image root), --image-store, or both.")
    if method == "model" and model is None:
        raise TipcapError("--method model needs --model.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(device))
    reference_set = read_references(data, split)
    references = reference_set.captions
    # Read before anything is captioned, so that a bad file fails at once.
    words = CocoObjectWords.load() if instances is not None else None
    annotated = load_instances(instances, words) if instances is not None else None
    if annotated is not None and not any(image_id in annotated for image_id in references):
        raise TipcapError(
            f"--instances {instances}: none of the {len(references)} images of split {split!r} of {data} is "
            f"annotated there (first image id: {next(iter(references))!r}); pass the instance file of these "
            "images (instances_val2014.json for the Karpathy val and test splits)."
        )
    if truth is None:
        truth = ground_truth(Path(data))
    # A local folder's card gets the figures; a hub model's cached snapshot stays as downloaded.
    local_model = isinstance(model, (str, Path)) and Path(model).is_dir()
    model_dir = resolve_model(model) if isinstance(model, (str, Path)) else None
    if model_dir is not None:
        model = TIPCap.from_pretrained(model_dir, device=device)
    caption_store = EmbeddingStore.open(texts, "--texts", "texts") if texts is not None else None
    if method == "retrieval" and caption_store is None:
        raise TipcapError("--method retrieval needs --texts (a caption store to retrieve from).")
    store = EmbeddingStore.open(image_store, "--image-store", "images") if image_store is not None else None
    spec = _resolve_clip(clip, model, caption_store, store, method)
    if store is not None:
        if store.clip != spec.identity():
            raise TipcapError(
                f"--image-store {image_store} was embedded with another CLIP than {spec.describe()}."
            )
        store.check_finite(f"--image-store {image_store}")
    else:
        embed = EmbedConfig(spec.model, spec.pretrained, spec.init_seed)
        report = embed_images(data, embed, out / "image-store", image_root=images, split=split, device=device)
        store = report.store
        for stage, seconds in report.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    if caption_store is not None and caption_store.clip != spec.identity():
        raise TipcapError(f"--texts {texts} was embedded with another CLIP than {spec.describe()}.")
    if caption_store is not None:
        caption_store.check_finite(f"--texts {texts}")
    encoder = ClipEncoder.load(spec, device=device)
    scorer = _Scorer(ClipSpec(config.score_clip, config.score_pretrained), spec, encoder, device)

    keep = [row for row, image_id in enumerate(store.ids) if image_id in references]
    if not keep:
        raise TipcapError(f"none of the embedded images is in the references of split {split!r} of {data}.")
    image_ids = [store.ids[row] for row in keep]
    embeddings = store.gather(torch.tensor(keep)).float()

    prompts: list[list[str]] | None = None
    mentions = _mentions(image_ids, truth, vocabulary)
    if method == "model":
        model.pipeline.use_clip(encoder)
        captions, prompts = _model_captions(model, embeddings, image_ids, config, truth, mentions, timings)
    else:
        start = time.perf_counter()
        if method == "retrieval":
            captions = retrieve_captions(embeddings, caption_store)
        else:
            captions, prompts = template_captions(encoder, embeddings, vocabulary, config.threshold)
        timings["generation"] = time.perf_counter() - start

    predictions = [{"image_id": i, "caption": c} for i, c in zip(image_ids, captions, strict=True)]
    write_json_atomic(out / "predictions.json", predictions)
    matched, report = match_predictions(predictions, references)
    start = time.perf_counter()
    result = score_captions(matched, references, config.metrics)
    timings["scoring"] = time.perf_counter() - start
    per_image_extra: dict[ImageId, dict[str, Any]] = {image_id: {} for image_id in image_ids}

    scored = [i for i, image_id in enumerate(image_ids) if image_id in matched]
    score_images = None
    if scorer.encoder is not None:
        score_images = _scorer_images(
            scorer, embeddings, image_ids, data, split, images,
            Path(score_image_store) if score_image_store else out / "score-image-store", device,
        )  # fmt: skip
    if score_images is not None and scored:
        start = time.perf_counter()
        scores = clip_scores.score(
            scorer.encoder, score_images[scored], [captions[i] for i in scored],
            [references[image_ids[i]] for i in scored],
        )  # fmt: skip
        timings["clip-s"] = time.perf_counter() - start
        result["metrics"]["CLIP-S"] = float(scores.clip_s.mean())
        result["metrics"]["RefCLIP-S"] = float(scores.ref_clip_s.mean())
        for position, i in enumerate(scored):
            per_image_extra[image_ids[i]].update(
                {"CLIP-S": float(scores.clip_s[position]), "RefCLIP-S": float(scores.ref_clip_s[position])}
            )
    elif scorer.skipped is not None:
        result["skipped"].update({"CLIP-S": scorer.skipped, "RefCLIP-S": scorer.skipped})

    if prompts is not None:
        by_image = {image_id: prompts[i] for i, image_id in enumerate(image_ids)}
        followed, per_image_followed = adherence(by_image, {i: captions[k] for k, i in enumerate(image_ids)
                                                            if i in matched}, mentions)  # fmt: skip
        result["metrics"].update(followed)
        for image_id, found in per_image_followed.items():
            per_image_extra[image_id].update({
                "prompt_mentioned": found.mentioned, "Adherence": found.share,
                "Adherence-all": float(found.complete),
            })  # fmt: skip

    hallucination = _hallucination(matched, references, annotated, words, truth, instances, result["skipped"])
    chair_result, how = hallucination if hallucination is not None else (None, {})
    if chair_result is not None:
        result["metrics"]["CHAIR-i"] = chair_result.chair_i if chair_result.chair_i is not None else math.nan
        result["metrics"]["CHAIR-s"] = chair_result.chair_s
        for image_id, named in chair_result.per_image.items():
            per_image_extra[image_id].update(
                {"objects_mentioned": named["mentioned"], "objects_hallucinated": named["hallucinated"]}
            )

    domains = None
    if reference_set.domains:
        # CLIP-S and RefCLIP-S need no other image's references: a domain's value is its images' mean.
        per_image_scores = {
            name: {image_id: extra[name] for image_id, extra in per_image_extra.items() if name in extra}
            for name in ("CLIP-S", "RefCLIP-S")
            if name in result["metrics"]
        }
        domains = score_domains(
            matched, references, reference_set.domains, config.metrics, result["skipped"], per_image_scores
        )
    document = metrics_document(
        result, report, predictions=out / "predictions.json", references=data, split=split, command=sys.argv,
        domains=domains,
    )  # fmt: skip
    document["method"] = method
    document["prompt"] = config.prompt
    document["clip"] = spec.to_dict()
    document["scorer"] = scorer.record()
    if hallucination is not None:
        document["hallucination"] = {**how, **(chair_result.counts() if chair_result is not None else {})}
        if instances is not None:
            document["hallucination"]["instances"] = str(Path(instances).resolve())
    if model is not None:
        document["model"] = {"config": to_dict(model.config)}
        if model_dir is not None:
            document["model"]["path"] = str(Path(model_dir).resolve())
    per_image = [
        {
            "image_id": image_id,
            "prediction": caption,
            "references": references[image_id],
            "prompt": prompts[i] if prompts else [],
            "CIDEr": result["per_image"].get(image_id, {}).get("CIDEr"),
            "ROUGE-L": result["per_image"].get(image_id, {}).get("ROUGE-L"),
            **per_image_extra[image_id],
            **({"domain": reference_set.domains.get(image_id)} if reference_set.domains else {}),
        }
        for i, (image_id, caption) in enumerate(zip(image_ids, captions, strict=True))
    ]
    write_json_atomic(out / "per_image.json", per_image)
    record = evaluation_record(
        config, method, split, spec, data, store, model_dir, caption_store, instances, context
    )
    provenance.write(out, record)
    # Last: a grid takes an evaluation folder with metrics.json as finished.
    write_json_atomic(out / "metrics.json", document)
    if local_model and method == "model":
        setting = f"{method}, prompt {config.prompt}, beams {config.beams}"
        record_evaluation(model_dir, document, reference_set.dataset, split, setting)
    return document
