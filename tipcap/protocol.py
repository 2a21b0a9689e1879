"""The evaluation protocol: caption a split's images (a model or a baseline), score, write the files.

Every method goes through the same path: the split's images are embedded once (or read from an image
store), captioned, matched with the references and scored with pycocoevalcap, plus the reference-free
CLIPScore (2.5 · max(cos(v, CLIP text of the caption), 0), Hessel et al. 2021). The output directory gets:

- ``predictions.json``: COCO results format, ``[{"image_id", "caption"}]``;
- ``metrics.json``: the scores, the matching report, the method and model config, the command, versions;
- ``per_image.json``: each image's prediction, references, prompt words and CIDEr;
- ``provenance.json``: the evaluation config, the content hashes of its inputs, command and versions.

Methods: ``model`` (a trained caption model), ``retrieval`` (the most CLIP-similar caption of a caption
store), ``template`` (the top CLIP zero-shot entities in a sentence template).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tipcap import provenance
from tipcap.clip import ClipEncoder, ClipSpec, resolve_device
from tipcap.config import EmbedConfig, EvalConfig, to_dict
from tipcap.embed import embed_images
from tipcap.errors import TipcapError
from tipcap.evaluate import (
    load_references,
    match_predictions,
    metrics_document,
    score_captions,
    write_json_atomic,
)
from tipcap.model import TIPCap
from tipcap.prompts import EntityVocabulary, entity_text_embeddings, zero_shot_entities
from tipcap.provenance import sha256_file
from tipcap.store import EmbeddingStore

METHODS = ("model", "retrieval", "template")
CLIPSCORE_WEIGHT = 2.5


def retrieve_captions(image_embeddings: torch.Tensor, texts: EmbeddingStore, chunk: int = 65536) -> list[str]:
    """The most CLIP-similar caption of ``texts`` for each image ``[N, d]``, reading the store in chunks."""
    best_score = torch.full((len(image_embeddings),), -torch.inf)
    best_row = torch.zeros(len(image_embeddings), dtype=torch.long)
    queries = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    start = 0
    for block in texts.iter_chunks(chunk):
        scores = queries @ block.float().T
        value, index = scores.max(dim=1)
        better = value > best_score
        best_score = torch.where(better, value, best_score)
        best_row = torch.where(better, index + start, best_row)
        start += len(block)
    captions = texts.captions()
    return [captions[row] for row in best_row.tolist()]


def template_caption(entities: Sequence[str]) -> str:
    """``["dog", "frisbee"]`` → ``"a photo of a dog and a frisbee."``."""
    if not entities:
        return "a photo."
    return "a photo of " + " and ".join(f"a {entity}" for entity in entities) + "."


def clip_score(encoder: ClipEncoder, image_embeddings: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Per-image CLIPScore ``[N]``: 2.5 · max(cos(v, CLIP text embedding of the caption), 0)."""
    texts = encoder.encode_texts(captions).embeddings
    cosine = torch.nn.functional.cosine_similarity(image_embeddings.float(), texts, dim=-1)
    return CLIPSCORE_WEIGHT * cosine.clamp(min=0)


def _resolve_clip(clip: ClipSpec | None, model: TIPCap | None, texts: EmbeddingStore | None) -> ClipSpec:
    if clip is not None:
        return clip
    if model is not None and model.clip_spec is not None:
        return model.clip_spec
    if texts is not None and "clip_spec" in texts.meta:
        return ClipSpec.from_dict(texts.meta["clip_spec"])
    raise TipcapError("no CLIP to embed images with: pass --clip and --pretrained.")


def _model_captions(
    model: TIPCap,
    embeddings: torch.Tensor,
    image_ids: list[Any],
    config: EvalConfig,
    oracle: dict | None,
    timings: dict[str, float],
) -> tuple[list[str], list[list[str]] | None]:
    """A caption model's captions ``[N]`` for image embeddings ``[N, d]``, and the prompt words used."""
    prompts = None
    if config.prompt == "oracle":
        if oracle is None:
            raise TipcapError("eval.prompt oracle needs the ground-truth entity words of every image.")
        missing = [image_id for image_id in image_ids if image_id not in oracle]
        if missing:
            raise TipcapError(
                f"eval.prompt oracle: {len(missing)} of the {len(image_ids)} images have no ground-truth "
                f"entity words (image {missing[0]!r} first)."
            )
        prompts = [oracle[image_id] for image_id in image_ids]
    results = model.caption(
        embeddings=embeddings, prompts=prompts, auto_prompt=config.prompt == "auto", num_beams=config.beams,
        max_new_tokens=config.max_tokens, batch_size=config.batch_size, top_k=config.top_k,
        threshold=config.threshold, timings=timings,
    )  # fmt: skip
    used = [result.prompt for result in results]
    return [result.caption for result in results], used if any(used) else None


def _template_captions(
    encoder: ClipEncoder, embeddings: torch.Tensor, vocabulary: str | Path | None, config: EvalConfig
) -> tuple[list[str], list[list[str]]]:
    """Template captions from each image's CLIP zero-shot entities (at most two, as the template reads)."""
    names = EntityVocabulary.load(vocabulary).names
    entities = entity_text_embeddings(lambda xs: encoder.encode_texts(xs).embeddings, names)
    prompts = zero_shot_entities(embeddings, entities, names, top_k=2, threshold=config.threshold)
    return [template_caption(words) for words in prompts], prompts


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
    oracle_prompts: dict[Any, list[str]] | None = None,
    vocabulary: str | Path | None = None,
    context: dict[str, Any] | None = None,
    device: str | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Caption the images of a Karpathy split with ``method``, score them, and write the result files.

    Args:
        data: Karpathy split file (references, and the images' paths under ``images``).
        split: the split to evaluate (``test`` for the published protocol).
        out: output directory.
        config: decoding, prompting and metrics (:class:`~tipcap.config.EvalConfig`); ``oracle`` prompts
            are the words given per image id in ``oracle_prompts`` (e.g. the ground-truth objects).
        method: ``model``, ``retrieval`` or ``template``.
        model: the caption model (``model``), or its directory.
        images: image root of ``data``; the split's images are embedded into ``out/image-store``.
        image_store: an existing image store of the split, instead of ``images``.
        texts: caption store to retrieve from (``retrieval``).
        clip: the CLIP to use; default: the model's, else the caption store's.
        vocabulary: entity vocabulary JSON of ``template`` (default: the packaged COCO vocabulary).
        context: what else determined the evaluation (a grid cell's resolved stages), recorded in
            ``provenance.json``.
        timings: when given, gains the seconds spent per stage: ``decoding`` (waiting for decoded
            images) and ``clip`` when images are embedded, ``generation``, ``scoring`` (pycocoevalcap) and
            ``clipscore``. They stay out of the written files, which the same inputs reproduce byte for byte.

    Returns:
        The metrics document written to ``metrics.json``.
    """
    config = config or EvalConfig()
    timings = {} if timings is None else timings
    if method not in METHODS:
        raise TipcapError(f"--method {method!r}: use one of {', '.join(METHODS)}.")
    if (images is None) == (image_store is None):
        raise TipcapError("give exactly one of --images (an image root) and --image-store.")
    if method == "model" and model is None:
        raise TipcapError("--method model needs --model.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(device))
    references = load_references(data, split)
    model_dir = model if isinstance(model, (str, Path)) else None
    if model_dir is not None:
        model = TIPCap.from_pretrained(model_dir, device=device)
    caption_store = EmbeddingStore.open(texts) if texts is not None else None
    if method == "retrieval" and caption_store is None:
        raise TipcapError("--method retrieval needs --texts (a caption store to retrieve from).")
    spec = _resolve_clip(clip, model, caption_store)
    if image_store is not None:
        store = EmbeddingStore.open(image_store)
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

    keep = [row for row, image_id in enumerate(store.ids) if image_id in references]
    if not keep:
        raise TipcapError(f"none of the embedded images is in the references of split {split!r} of {data}.")
    image_ids = [store.ids[row] for row in keep]
    embeddings = store.gather(torch.tensor(keep)).float()

    prompts: list[list[str]] | None = None
    if method == "model":
        model.use_clip(encoder)
        captions, prompts = _model_captions(model, embeddings, image_ids, config, oracle_prompts, timings)
    else:
        start = time.perf_counter()
        if method == "retrieval":
            captions = retrieve_captions(embeddings, caption_store)
        else:
            captions, prompts = _template_captions(encoder, embeddings, vocabulary, config)
        timings["generation"] = time.perf_counter() - start

    predictions = [{"image_id": i, "caption": c} for i, c in zip(image_ids, captions, strict=True)]
    write_json_atomic(out / "predictions.json", predictions)
    matched, report = match_predictions(predictions, references)
    start = time.perf_counter()
    result = score_captions(matched, references, config.metrics)
    timings["scoring"] = time.perf_counter() - start
    start = time.perf_counter()
    clip_scores = clip_score(encoder, embeddings, captions)
    timings["clipscore"] = time.perf_counter() - start
    result["metrics"]["CLIPScore"] = float(clip_scores.mean())
    document = metrics_document(
        result, report, predictions=out / "predictions.json", references=data, split=split, command=sys.argv
    )
    document["method"] = method
    document["prompt"] = config.prompt
    document["clip"] = spec.to_dict()
    if model is not None:
        document["model"] = {"config": to_dict(model.config)}
        if model_dir is not None:
            document["model"]["path"] = str(Path(model_dir).resolve())
    write_json_atomic(out / "metrics.json", document)
    per_image = [
        {
            "image_id": image_id,
            "prediction": caption,
            "references": references[image_id],
            "prompt": prompts[i] if prompts else [],
            "CIDEr": result["per_image"].get(image_id, {}).get("CIDEr"),
            "CLIPScore": float(clip_scores[i]),
        }
        for i, (image_id, caption) in enumerate(zip(image_ids, captions, strict=True))
    ]
    write_json_atomic(out / "per_image.json", per_image)
    inputs = {"references": sha256_file(Path(data)), "images": store.digest}
    if model_dir is not None:
        inputs["model"] = sha256_file(Path(model_dir) / "model.safetensors")
    if caption_store is not None:
        inputs["texts"] = caption_store.digest
    settings = {"eval": to_dict(config), "method": method, "split": split, "clip": spec.identity()}
    if context is not None:
        settings["context"] = context
    provenance.write(out, provenance.record("evaluation", settings, inputs))
    return document
