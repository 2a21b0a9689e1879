"""Building what a training run needs from its config: the model (with its gap, CLIP and vocabulary), its
projector's input statistics or the trained weights it starts from, and its data.
:func:`tipcap.training.loop.train` hands the result to the training loop."""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tipcap import provenance
from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.config import ExperimentConfig, to_dict
from tipcap.errors import TipcapError
from tipcap.gap import Gap
from tipcap.io import load_json
from tipcap.language_model import configured_tokenizer
from tipcap.model import TIPCap
from tipcap.model_folder import WEIGHTS_NAME
from tipcap.prompts import EntityVocabulary, entity_text_embeddings
from tipcap.provenance import sha256_file
from tipcap.store import EmbeddingStore
from tipcap.training.data import CaptionSet, load_caption_set, word_level_tokenizer


@dataclass
class TrainingSetup:
    """A built model, its training and validation data, its prompt vocabulary, the content hashes of the
    inputs they were made from, and the data set its captions come from when it is known (for the run's
    provenance record)."""

    model: TIPCap
    train_data: CaptionSet
    val_data: CaptionSet | None
    vocabulary: EntityVocabulary | None
    inputs: dict[str, str]
    dataset: str | None


_KARPATHY_NAME = re.compile(r"dataset_(\w+)\.json(\.gz)?")


def corpus_dataset(corpus: str | Path | None) -> str | None:
    """The data set a caption store's corpus names (``coco`` for ``dataset_coco.json``, or the data set of a
    corpus written by ``tipcap prepare``, named by the ``report.json`` beside its folder), or ``None``.

    Read at training and recorded in the run's provenance, so that the model card need not read the store.
    """
    if not corpus:
        return None
    corpus = Path(corpus)
    match = _KARPATHY_NAME.fullmatch(corpus.name)
    if match:
        return match.group(1)
    report = corpus.parent.parent / "report.json"
    return load_json(report).get("dataset") if report.is_file() else None


def _tokenizer(config: ExperimentConfig, texts: EmbeddingStore):
    """The configured tokenizer; a fresh language model takes its vocabulary size from it."""
    model_cfg = config.model
    tokenizer = None
    if model_cfg.tokenizer == "word-level":
        tokenizer = word_level_tokenizer(texts.captions())
    elif model_cfg.tokenizer is not None or model_cfg.language_model_config is None:
        tokenizer = configured_tokenizer(model_cfg)
    if tokenizer is None:
        raise TipcapError(
            "model.tokenizer: a fresh language model needs a tokenizer ('word-level' or a path)."
        )
    if model_cfg.language_model_config is not None:
        lm_config = dict(model_cfg.language_model_config)
        lm_config.setdefault("vocab_size", len(tokenizer))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            lm_config.setdefault(key, tokenizer.eos_token_id)
        model_cfg.language_model_config = lm_config
    return tokenizer


def _store_clip(texts: EmbeddingStore) -> ClipSpec:
    """The CLIP that made a caption store, as recorded in it."""
    spec_dict = texts.meta.get("clip_spec")
    if spec_dict is None:
        raise TipcapError(
            f"{texts.path}: the store does not say which CLIP made it; rebuild it with tipcap embed."
        )
    spec = ClipSpec.from_dict(spec_dict)
    if spec.identity() != texts.clip:
        raise TipcapError(f"{texts.path}: its CLIP ({spec.describe()}) changed since the store was built.")
    return spec


def _open_store(path: str | None, key: str, content: str) -> EmbeddingStore | None:
    """The store a config key names, or ``None`` when the key is unset."""
    return EmbeddingStore.open(path, key, content) if path else None


def build_training(config: ExperimentConfig, device: torch.device) -> TrainingSetup:
    """Open the stores and gap a config names, check they fit together, and build the model on ``device``.

    The model's random initialisation is seeded with ``train.seed``.
    """
    data_cfg = config.data
    if config.train.freeze_init and not (config.train.init_from and config.model.prompt == "pim"):
        raise TipcapError(
            "train.freeze_init: trains the prompt module alone, on the decoder train.init_from names; set "
            "both, with model.prompt: pim."
        )
    if not data_cfg.train_texts:
        raise TipcapError("data.train_texts: give the caption store to train on.")
    texts = EmbeddingStore.open(data_cfg.train_texts, "data.train_texts", "texts")
    images = _open_store(data_cfg.train_images, "data.train_images", "images")
    # Opened before training data is read, which takes minutes on a full corpus, so that a missing
    # validation store or gap stops the run at once.
    val_texts = _open_store(data_cfg.val_texts, "data.val_texts", "texts")
    val_images = _open_store(data_cfg.val_images, "data.val_images", "images") if val_texts else None
    gap = Gap.load(data_cfg.gap, "data.gap") if data_cfg.gap else None
    if gap is not None:
        gap.check_clip(texts.clip, f"data.train_texts {texts.path}")
        if images is not None:
            raise TipcapError(
                "data.train_images (supervised training on image embeddings) takes no data.gap."
            )
    if data_cfg.val_texts and (images is None) != (data_cfg.val_images is None):
        raise TipcapError(
            "data.val_images goes with data.train_images: a supervised decoder is validated on the image "
            "embeddings of data.val_texts' captions, a text-only one on the captions' own."
        )
    if texts.dim != config.model.clip_dim:
        raise TipcapError(
            f"model.clip_dim is {config.model.clip_dim} but data.train_texts {texts.path} holds "
            f"d={texts.dim}; set model.clip_dim: {texts.dim} in the config, or pass "
            f"--set model.clip_dim={texts.dim}."
        )

    tokenizer = _tokenizer(config, texts)
    clip = _store_clip(texts)
    vocabulary = EntityVocabulary.load(config.model.vocabulary) if config.model.prompt != "none" else None
    if config.model.vocabulary is not None and config.model.prompt == "none":
        logging.getLogger(__name__).warning(
            "model.vocabulary %s is not used: model.prompt is none.", config.model.vocabulary
        )
    entity_names = vocabulary.names if vocabulary is not None else []
    entity_embeddings = None
    if config.model.prompt == "pim":
        encoder = ClipEncoder.load(clip, device=str(device))
        entity_embeddings = entity_text_embeddings(
            lambda xs: encoder.encode_texts(xs).embeddings, entity_names
        )

    torch.manual_seed(config.train.seed)
    forms = vocabulary.forms_by_name() if vocabulary is not None else None
    model = TIPCap.build(
        config.model, tokenizer, gap=gap, entity_names=entity_names, entity_embeddings=entity_embeddings,
        clip_spec=clip, entity_forms=forms,
    ).to(device)  # fmt: skip
    max_tokens = config.model.max_caption_tokens
    train_data = load_caption_set(texts, tokenizer, max_tokens, vocabulary, images)
    # A started model takes the input statistics its projector was trained on (start_from).
    if config.model.standardize_input and not config.train.init_from:
        fit_input_statistics(model, train_data.embeddings)
    if config.train.init_from:
        fresh = start_from(model, config.train.init_from)
        if config.train.freeze_init:
            model.requires_grad_(False)
            model.prompt_interaction.requires_grad_(True)
        logging.getLogger(__name__).info(
            "train.init_from %s: started from its weights; %d tensors of the prompt module are new.",
            config.train.init_from, len(fresh),
        )  # fmt: skip
    val_data = None
    if val_texts is not None:
        val_data = load_caption_set(val_texts, tokenizer, max_tokens, None, val_images)
    inputs = _inputs(config, texts, images, val_texts, val_images)
    dataset = corpus_dataset(texts.meta.get("source", {}).get("corpus"))
    return TrainingSetup(model, train_data, val_data, vocabulary, inputs, dataset)


def _inputs(
    config: ExperimentConfig,
    texts: EmbeddingStore,
    images: EmbeddingStore | None,
    val_texts: EmbeddingStore | None,
    val_images: EmbeddingStore | None,
) -> dict[str, str]:
    """The content hashes of a run's inputs, for its provenance record."""
    inputs = {"train_texts": texts.digest}
    if images is not None:
        inputs["train_images"] = images.digest
    if config.data.gap:
        inputs["gap"] = sha256_file(config.data.gap)
    if config.train.init_from:
        inputs["init_from"] = sha256_file(Path(config.train.init_from) / WEIGHTS_NAME)
    if val_texts is not None:
        inputs["val_texts"] = val_texts.digest
        if val_images is not None:
            inputs["val_images"] = val_images.digest
    return inputs


@torch.no_grad()
def fit_input_statistics(model: TIPCap, embeddings: torch.Tensor, chunk: int = 65536) -> None:
    """Set the model's projector input standardisation (``input_mean``, ``input_scale``) from the training
    embeddings ``[N, d]``, in chunks.

    Each chunk is taken to what the decoder reads without noise (the gap's ``text_side``). The mean
    ``[d]`` is subtracted and the result divided by the root mean square per dimension: one scalar, so
    the geometry of the embeddings, and of any gap noise, is kept.
    """
    dim, device = model.config.clip_dim, model.device
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for block in embeddings.split(chunk):
        block = block.to(device, torch.float32)
        block = (model.gap.text_side(block) if model.gap is not None else block).double()
        total += block.sum(0)
        squares += (block**2).sum()
    count = len(embeddings)
    mean = total / count
    variance = (squares / count - (mean**2).sum()) / dim
    model.input_mean.copy_(mean.float())
    model.input_scale.fill_(math.sqrt(max(float(variance), 1e-12)))


@torch.no_grad()
def start_from(model: TIPCap, directory: str | Path, key: str = "train.init_from") -> list[str]:
    """Copy a trained model's weights (``directory/model.safetensors``) into ``model``, to train on from
    them: every tensor of that model must be one of this model's, of the same shape. The tensors of this
    model that it lacks (the gap aside, which is this run's own) are the prompt module's alone (adding
    prompt words to a trained prompt-free decoder); they keep their initialisation, and their names are
    returned. The projector's input statistics are that model's too, since its projector was trained on
    them.

    Raises:
        TipcapError: naming ``key``, when the folder holds no readable weights, or they do not fit.
    """
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise TipcapError(f"{key} {directory}: no {WEIGHTS_NAME}; name a trained model folder.")
    try:
        state = load_file(weights)
    except SafetensorError as e:
        raise TipcapError(f"{key} {weights}: not a readable safetensors file ({e}).") from None
    own = model.state_dict()
    # The prompt words' embeddings are this model's vocabulary's, computed when it was built.
    state.pop("entity_embeddings", None)
    foreign = [n for n, tensor in state.items() if n not in own or own[n].shape != tensor.shape]
    # The output layer is tied to the token embeddings (saved once, as they are); the gap is this run's
    # own (data.gap), saved apart from the weights.
    kept = ("entity_embeddings", "gap.")
    fresh = [n for n in own if n not in state and not n.startswith(kept) and not n.endswith("lm_head.weight")]
    unshared = [n for n in fresh if not n.startswith("prompt_interaction.")]
    if foreign or unshared:
        name = (foreign or unshared)[0]
        found = f"[{', '.join(map(str, state[name].shape))}]" if name in state else "absent"
        wanted = f"[{', '.join(map(str, own[name].shape))}]" if name in own else "absent"
        raise TipcapError(
            f"{key} {directory}: its {name} is {found} where this model's is {wanted}; the two "
            "configs must agree on the language model, tokenizer, projector and prefix, and differ "
            "only in the prompt module."
        )
    model.load_state_dict(state, strict=False)
    return fresh


def run_record(config: ExperimentConfig, inputs: dict[str, str]) -> dict[str, Any]:
    """A training run's provenance record: its resolved config and the content hashes of its inputs."""
    return provenance.record("training-run", to_dict(config), inputs)


def run_key(config: ExperimentConfig) -> dict[str, Any]:
    """The provenance key a run of ``config`` records, worked out without building its model: a fresh
    language model's config gains its tokenizer's vocabulary size and token ids, as it does in training."""
    config = copy.deepcopy(config)
    data_cfg = config.data
    texts = EmbeddingStore.open(data_cfg.train_texts, "data.train_texts", "texts")
    if config.model.language_model_config is not None:
        _tokenizer(config, texts)
    val_texts = _open_store(data_cfg.val_texts, "data.val_texts", "texts")
    inputs = _inputs(
        config,
        texts,
        _open_store(data_cfg.train_images, "data.train_images", "images"),
        val_texts,
        _open_store(data_cfg.val_images, "data.val_images", "images") if val_texts else None,
    )
    return provenance.key(run_record(config, inputs))
