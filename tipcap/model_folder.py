"""The model folder: what :meth:`TIPCap.save_pretrained <tipcap.model.TIPCap.save_pretrained>` writes and
``from_pretrained`` reads back and checks. No pickles; loading needs no network.

::

    config.json          format, tipcap version, ModelConfig (with the language model's architecture config),
                         entity_names, entity_forms, clip: {model, pretrained, init_seed}
    model.safetensors    decoder weights (tied weights once; the gap excluded)
    gap.safetensors      the gap, when the model has one
    tokenizer files      as transformers' save_pretrained writes them
    clip/                the CLIP's model-config JSON and local weights file, when it was built from files
    provenance.json      the training run's record, when one is given

As in ``transformers``, saving and loading are the model's own; the model card (``README.md``,
:mod:`tipcap.card`) and the hub (:mod:`tipcap.hub`) are publishing, above the model, which imports neither.
Saving removes a card left in the folder, which would describe the weights it replaces; the training run
and ``tipcap push`` write a fresh one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from tipcap import __version__
from tipcap.clip import ClipSpec, resolve_device
from tipcap.config import ModelConfig, from_dict, to_dict
from tipcap.errors import TipcapError
from tipcap.gap import Gap
from tipcap.hub_cache import resolve_model
from tipcap.io import atomic_path, load_json, save_safetensors
from tipcap.language_model import language_model_from, load_tokenizer
from tipcap.provenance import write as write_provenance

if TYPE_CHECKING:
    from tipcap.model import TIPCap

MODEL_FORMAT = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GAP_NAME = "gap.safetensors"
CLIP_DIR = "clip"
CARD_NAME = "README.md"
"""The model card, written by :mod:`tipcap.card`."""


def write_model_folder(
    model: TIPCap, directory: str | Path, provenance: dict[str, Any] | None = None
) -> None:
    """Write ``model``'s config, weights, gap, tokenizer and CLIP files to ``directory`` (each renamed into
    place), and ``provenance`` as ``provenance.json`` when given; remove a card left from earlier weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        if name.startswith("gap."):
            continue
        # Tied weights (GPT-2's input embedding and output layer) are stored once; tie_weights restores the
        # second name on loading.
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages:
            continue
        storages.add(pointer)
        state[name] = tensor.detach().cpu().contiguous()
    save_safetensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    if model.gap is not None:
        model.gap.save(directory / GAP_NAME)
    model.tokenizer.save_pretrained(directory)
    model_config = to_dict(model.config)
    # The vocabulary travels as entity_names; the file it was read from at training is not needed.
    model_config["vocabulary"] = None
    language = model.language_model.config
    model_config["language_model_config"] = {**language.to_diff_dict(), "model_type": language.model_type}
    document = {
        "format": MODEL_FORMAT,
        "tipcap_version": __version__,
        "model": model_config,
        "entity_names": model.entity_names,
        "entity_forms": model.entity_forms,
        "clip": model.clip_spec.save_into(directory / CLIP_DIR) if model.clip_spec is not None else None,
    }
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(document, indent=2), encoding="utf-8")
    if provenance is not None:
        write_provenance(directory, provenance)
    (directory / CARD_NAME).unlink(missing_ok=True)


@dataclass
class SavedModel:
    """A model folder's contents, read and checked: what the model is rebuilt from."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase
    gap: Gap | None
    entity_names: list[str]
    entity_forms: dict[str, list[str]]
    clip: ClipSpec | None


def read_model_folder(directory: Path) -> SavedModel:
    """Read a model folder written by :func:`write_model_folder`.

    Raises:
        TipcapError: when the directory is not a tipcap model, was written by an incompatible version, or
            holds damaged files.
    """
    config_path = directory / CONFIG_NAME
    if not config_path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise TipcapError(
            f"{directory}: not a tipcap model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})."
        )
    document = load_json(config_path)
    if not isinstance(document, dict):
        raise TipcapError(f"{config_path}: not a tipcap model config (expected a JSON object); retrain.")
    if document.get("format") != MODEL_FORMAT or "model" not in document:
        raise TipcapError(
            f"{directory}: written by tipcap {document.get('tipcap_version', '?')} in model format "
            f"{document.get('format')!r}; this tipcap {__version__} reads format {MODEL_FORMAT}. "
            "Load it with the version that wrote it, or retrain."
        )
    try:
        config = from_dict(ModelConfig, document["model"], "model")
    except TipcapError as e:
        raise TipcapError(f"{config_path}: {e}") from None
    entity_names = document.get("entity_names", [])
    clip_record = document.get("clip")
    if not isinstance(entity_names, list) or not all(isinstance(n, str) for n in entity_names):
        raise TipcapError(f"{config_path}: 'entity_names' must be a list of words; retrain.")
    entity_forms = document.get("entity_forms", {})
    if not isinstance(entity_forms, dict) or not all(
        isinstance(forms, list) and all(isinstance(form, str) for form in forms)
        for forms in entity_forms.values()
    ):
        raise TipcapError(f"{config_path}: 'entity_forms' must map names to lists of words; retrain.")
    if clip_record is not None and not (isinstance(clip_record, dict) and "model" in clip_record):
        raise TipcapError(f"{config_path}: 'clip' must be a CLIP record with a 'model'; retrain.")
    try:
        state = load_file(directory / WEIGHTS_NAME)
    except SafetensorError as e:
        raise TipcapError(
            f"{directory / WEIGHTS_NAME}: not a readable safetensors file ({e}); the copy may be "
            "truncated: copy it again, or use an earlier checkpoint."
        ) from None
    broken = [
        name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if broken:
        # Such a model captions every image with the same word, silently.
        raise TipcapError(
            f"{directory / WEIGHTS_NAME}: {len(broken)} tensors hold NaN or infinite values ({broken[0]} "
            "first); use an earlier checkpoint, or retrain."
        )
    tokenizer = load_tokenizer(str(directory))
    gap = Gap.load(directory / GAP_NAME) if (directory / GAP_NAME).is_file() else None
    clip = ClipSpec.from_dict(clip_record, base=directory) if clip_record is not None else None
    return SavedModel(config, state, tokenizer, gap, entity_names, entity_forms, clip)


def load_model_folder(
    model_class: type[TIPCap],
    directory: str | Path,
    device: str | torch.device | None = None,
    clip: ClipSpec | None = None,
    revision: str | None = None,
) -> TIPCap:
    """:meth:`TIPCap.from_pretrained <tipcap.model.TIPCap.from_pretrained>`: the folder (or hub name, with
    ``revision``) read, its model rebuilt (``model_class``), its weights loaded, on ``device``, in eval mode;
    ``clip`` replaces the CLIP it records."""
    directory = resolve_model(directory, revision)
    device = resolve_device(device)
    saved = read_model_folder(directory)
    model = model_class(
        saved.config,
        language_model_from(saved.config),
        saved.tokenizer,
        saved.gap,
        saved.entity_names,
        saved.state.get("entity_embeddings"),
        clip or saved.clip,
        saved.entity_forms,
    )
    _load_weights(model, saved.state, directory)
    return model.to(device).eval()


def _load_weights(model: TIPCap, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Load a folder's weights into the model its config describes, which must fit them exactly (the tied
    output layer and the gap aside, restored and loaded apart)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of other shapes than the config's model has
        mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise TipcapError(
            f"{directory}: weights do not fit the model its {CONFIG_NAME} describes ({mismatch[:200]}); "
            "keep each model's config.json and model.safetensors together."
        ) from None
    tied = {n for n in result.missing_keys if n.startswith("language_model.") and "lm_head" in n}
    missing = [n for n in result.missing_keys if n not in tied and not n.startswith("gap.")]
    if missing or result.unexpected_keys:
        raise TipcapError(
            f"{directory}: weights do not fit the configured model "
            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})."
        )
    model.language_model.tie_weights()
