"""The caption model: CLIP embedding → gap → projector → K prefix vectors → prompt interaction → causal LM.

``TIPCap`` wraps any ``transformers`` causal language model that accepts ``inputs_embeds`` (GPT-2 by
default) and owns what captioning needs: its gap (the modality-gap model that carries image embeddings to
the text side, :meth:`TIPCap.image_inputs`, and noises text embeddings at training,
:meth:`TIPCap.training_inputs`), the CLIP whose embedding space it reads (loaded on first need), and its
prompt vocabulary. So ``TIPCap.from_pretrained(d).caption(images=[...])`` is all it takes to caption.

The decoder itself reads *text-side* inputs (``[B, d]`` after the gap): :meth:`TIPCap.forward` at training
and :meth:`TIPCap.decode_text_side` at inference, which callers with image embeddings never need.

A model directory holds ``config.json`` (every setting needed to rebuild it, the language model's own
architecture config included, so loading needs no network), ``model.safetensors``, ``gap.safetensors``
when a gap was used, the tokenizer's files, ``clip/`` with its CLIP's model config and local weights
file when it was built from files, so that the folder can be moved or shared and still load its CLIP, and
a model card (``README.md``, :mod:`tipcap.card`). ``from_pretrained`` also takes a hub name
(:mod:`tipcap.hub`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
)

from tipcap import __version__
from tipcap.card import write_model_card
from tipcap.clip import ClipEncoder, ClipSpec, image_batches, resolve_device
from tipcap.config import ModelConfig, check_positions, from_dict, to_dict
from tipcap.errors import TipcapError
from tipcap.gap import Gap
from tipcap.guide import PromptGuide, entity_forms
from tipcap.hub import load_named, resolve_model
from tipcap.io import atomic_path, load_json, lone_surrogate, save_safetensors
from tipcap.packing import pack
from tipcap.prompts import (
    PROMPT_TEMPLATES,
    PromptInteraction,
    entity_text_embeddings,
    hard_prompt,
    pad_prompt_embeddings,
    zero_shot_scores,
)
from tipcap.provenance import write as write_provenance

logger = logging.getLogger(__name__)

MODEL_FORMAT = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GAP_NAME = "gap.safetensors"
CLIP_DIR = "clip"


class MLPProjector(nn.Module):
    """ClipCap's MLP: ``[B, d]`` → ``[B, K, W]`` through one tanh hidden layer of (K·W)/2 units."""

    def __init__(self, clip_dim: int, width: int, prefix_length: int):
        super().__init__()
        self.prefix_length, self.width = prefix_length, width
        hidden = prefix_length * width // 2
        self.net = nn.Sequential(
            nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, prefix_length * width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, self.prefix_length, self.width)


class TransformerProjector(nn.Module):
    """ClipCap's transformer mapper: K tokens from a linear map plus K learned queries, through layers.

    ``[B, d]`` → ``[B, K, W]`` (the outputs at the learned queries' positions).
    """

    def __init__(self, clip_dim: int, width: int, prefix_length: int, layers: int, heads: int = 8):
        super().__init__()
        self.prefix_length, self.width = prefix_length, width
        self.linear = nn.Linear(clip_dim, prefix_length * width)
        self.queries = nn.Parameter(torch.randn(prefix_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(x).view(-1, self.prefix_length, self.width)
        queries = self.queries.unsqueeze(0).expand(len(x), -1, -1)
        return self.encoder(torch.cat([tokens, queries], dim=1))[:, self.prefix_length :]


def _language_model_from(config: ModelConfig) -> nn.Module:
    """The causal LM: a fresh one from ``language_model_config``, else pretrained weights by name or path."""
    model = _load_language_model(config)
    # transformers picks the loss from the class name, which names none for GPT-2 (GPT2LMHeadModel), and
    # warns that it falls back to the causal-LM loss; the decoder is a causal LM, so that loss is the one.
    model.loss_type = "ForCausalLM"
    return model


def _load_language_model(config: ModelConfig) -> nn.Module:
    """The language model as ``config`` names it (see :func:`_language_model_from`)."""
    if config.language_model_config is not None:
        settings = dict(config.language_model_config)
        model_type = settings.pop("model_type", "gpt2")
        try:
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))
        # transformers reports an unknown type, a value of the wrong type or impossible sizes with whatever
        # its code meets first (value, type, validation, arithmetic errors).
        except Exception as e:
            message = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise TipcapError(
                f"model.language_model_config: transformers cannot build a {model_type!r} causal LM from "
                f"it ({type(e).__name__}: {message}); check model_type and the sizes."
            ) from None
    try:
        return load_named(AutoModelForCausalLM.from_pretrained, config.language_model, "model.language_model")
    except OSError as e:
        raise TipcapError(
            f"language model {config.language_model!r} cannot be loaded ({str(e).splitlines()[0]}); "
            "offline, pass a local directory holding its config and weights."
        ) from None


def load_tokenizer(name_or_path: str, key: str = "model.tokenizer") -> PreTrainedTokenizerBase:
    """A tokenizer by hub name or local directory, with a pad token (the end-of-text token if none).

    ``key`` is the config key that named it, for the messages.
    """
    try:
        tokenizer = load_named(AutoTokenizer.from_pretrained, name_or_path, key)
    except TipcapError:
        raise
    # Damaged tokenizer files surface as whatever the tokenizers library raises (JSON, key and value
    # errors from Python, plain exceptions from its Rust core).
    except Exception as e:
        message = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if Path(name_or_path).is_dir():
            raise TipcapError(
                f"{name_or_path}: its tokenizer files cannot be read ({message}); copy them again from the "
                "training run, or retrain."
            ) from None
        raise TipcapError(
            f"tokenizer {name_or_path!r} cannot be loaded ({message}); "
            "offline, pass a local directory holding the tokenizer files."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_PADDING_WARNING = "We strongly recommend passing in an `attention_mask`"


class _PaddingWarningFilter(logging.Filter):
    """Drops transformers' warning that input ids may be padded while no attention mask is given.

    ``generate`` drops an attention mask of all ones (a context without padding) and feeds each row's last
    token; a row that has finished its caption is fed the pad token, which is the end-of-text token, and the
    language model warns. Those rows' later tokens are discarded, so the warning does not apply.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_PADDING_WARNING)


@contextlib.contextmanager
def _padding_warning_filtered() -> Iterator[None]:
    """:class:`_PaddingWarningFilter` on transformers' model logger, for the time of a ``generate`` call."""
    log, warning = logging.getLogger("transformers.modeling_utils"), _PaddingWarningFilter()
    log.addFilter(warning)
    try:
        yield
    finally:
        log.removeFilter(warning)


def configured_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer ``model.tokenizer`` names, else the language model's own, loaded by its name."""
    if config.tokenizer is not None:
        return load_tokenizer(config.tokenizer, "model.tokenizer")
    return load_tokenizer(config.language_model, "model.language_model")


@dataclass
class CaptionResult:
    """One input's caption and the prompt words used, or why it could not be captioned.

    ``image`` is the image's path (as given), or ``None`` for a row of embeddings.
    """

    image: str | None
    caption: str | None
    prompt: list[str] = field(default_factory=list)
    error: str | None = None


PromptWords = Sequence[str] | Sequence[Sequence[str]]
"""Prompt words: one list for every input (``["dog", "frisbee"]``), or one list per input."""


def _check_prompt_text(prompts: PromptWords | None) -> None:
    """Refuse a prompt word that is not valid Unicode text: one holding a lone surrogate, as bytes that are
    not UTF-8 reach Python from the command line (``$'dog\\xff'`` arrives as ``'dog\\udcff'``)."""
    rows = [prompts] if prompts and all(isinstance(word, str) for word in prompts) else prompts or []
    for words in rows:
        for word in words:
            if (surrogate := lone_surrogate(word)) is not None:
                raise TipcapError(
                    f"prompt word {word!a}: holds {surrogate!a}, a lone surrogate, which is no character "
                    "(bytes that are not UTF-8 arrive so); type the word in UTF-8."
                )


class TIPCap(nn.Module):
    """Prefix captioner with a prompt interaction module, its gap and (loaded on first need) its CLIP.

    Args:
        config: the model settings.
        language_model: a causal LM accepting ``inputs_embeds``.
        tokenizer: its tokenizer (needs an end-of-text token).
        gap: the modality-gap model (``None``: inputs are read as they are, as for supervised decoders).
        entity_names: prompt vocabulary (``prompt: pim`` or ``hard``), in the order of ``entity_embeddings``.
        entity_embeddings: ``[V, clip_dim]`` CLIP text embeddings of ``entity_names`` (``prompt: pim``).
        clip_spec: the CLIP whose embedding space the model reads, so that captioning images needs no
            other setting.
        entity_forms: each entity's written forms by name (plurals, synonyms), for prompt guidance;
            an entity not listed is written as its name.
    """

    def __init__(
        self,
        config: ModelConfig,
        language_model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        gap: Gap | None = None,
        entity_names: Sequence[str] = (),
        entity_embeddings: torch.Tensor | None = None,
        clip_spec: ClipSpec | None = None,
        entity_forms: dict[str, list[str]] | None = None,
    ):
        super().__init__()
        self.config = config
        self.clip_spec = clip_spec
        self.language_model = language_model
        self.tokenizer = tokenizer
        self.gap = gap
        self.entity_names = list(entity_names)
        # Before the projector, whose size grows with prefix_length: a prefix too long to fit is refused
        # before it is allocated.
        self.positions = getattr(language_model.config, "max_position_embeddings", None)
        if isinstance(self.positions, int):
            limit = "the language model" if config.language_model_config else repr(config.language_model)
            check_positions(config, self.positions, limit, hard_prompt_tokens=self._longest_hard_prompt())
        width = language_model.get_input_embeddings().embedding_dim
        if config.projector == "mlp":
            self.projector = MLPProjector(config.clip_dim, width, config.prefix_length)
        else:
            self.projector = TransformerProjector(
                config.clip_dim, width, config.prefix_length, config.projector_layers
            )
        self.prompt_interaction = (
            PromptInteraction(config.clip_dim, width, config.pim_layers, config.pim_heads)
            if config.prompt == "pim"
            else None
        )
        # How each entity is written (its name among them), for prompt guidance: "brown diamonds" too.
        self.entity_forms = {name: list((entity_forms or {}).get(name, [name])) for name in self.entity_names}
        self._entity_row = {name: row for row, name in enumerate(self.entity_names)}
        if config.prompt == "pim" and (
            entity_embeddings is None or len(entity_embeddings) != len(entity_names)
        ):
            raise TipcapError("a prompt-interaction model needs CLIP embeddings of its entity vocabulary.")
        self.register_buffer("entity_embeddings", entity_embeddings)
        if self.prompt_interaction is not None:
            self.prompt_interaction.set_word_mean(entity_embeddings)
        self.register_buffer("input_mean", torch.zeros(config.clip_dim))
        self.register_buffer("input_scale", torch.ones(()))
        if config.freeze_language_model:
            language_model.requires_grad_(False)
        self._clip: ClipEncoder | None = None
        self._vocabulary_embeddings: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        gap: Gap | None = None,
        entity_names: Sequence[str] = (),
        entity_embeddings: torch.Tensor | None = None,
        clip_spec: ClipSpec | None = None,
        entity_forms: dict[str, list[str]] | None = None,
    ) -> TIPCap:
        """A new model: the language model from ``config`` (pretrained or fresh), the rest initialised."""
        if tokenizer is None:
            tokenizer = configured_tokenizer(config)
        language_model = _language_model_from(config)
        if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise TipcapError(
                f"the tokenizer has {len(tokenizer)} tokens, more than the language model's vocabulary."
            )
        return cls(
            config, language_model, tokenizer, gap, entity_names, entity_embeddings, clip_spec, entity_forms
        )

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    # -- the gap --------------------------------------------------------------------------------

    def training_inputs(
        self,
        embeddings: torch.Tensor,
        generator: torch.Generator | None = None,
        noise_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the decoder reads at training, ``[B, d]`` → ``[B, d]``: caption embeddings with the gap's
        noise, fresh per call (``gap.sample``; its standard deviation times ``noise_scale`` ``[B]`` row by
        row when given), or, without a gap, the embeddings as they are."""
        inputs = embeddings.to(self.device, torch.float32)
        if self.gap is None:
            return inputs
        return self.gap.sample(inputs, generator=generator, row_scale=noise_scale)

    def image_inputs(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """What the decoder reads for CLIP image embeddings, ``[B, d]`` → ``[B, d]``: carried to the text
        side by the gap (``gap.to_text``), or as they are without a gap."""
        inputs = image_embeddings.to(self.device, torch.float32)
        return self.gap.to_text(inputs) if self.gap is not None else inputs

    @torch.no_grad()
    def fit_input_statistics(self, embeddings: torch.Tensor, chunk: int = 65536) -> None:
        """Set the projector's input standardisation from the training embeddings ``[N, d]``, in chunks.

        Each chunk is taken to what the decoder reads without noise (the gap's ``text_side``). The mean
        ``[d]`` is subtracted and the result divided by the root mean square per dimension: one scalar, so
        the geometry of the embeddings, and of any gap noise, is kept.
        """
        total = torch.zeros(self.config.clip_dim, dtype=torch.float64, device=self.device)
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for block in embeddings.split(chunk):
            block = block.to(self.device, torch.float32)
            block = (self.gap.text_side(block) if self.gap is not None else block).double()
            total += block.sum(0)
            squares += (block**2).sum()
        count = len(embeddings)
        mean = total / count
        variance = (squares / count - (mean**2).sum()) / self.config.clip_dim
        self.input_mean.copy_(mean.float())
        self.input_scale.fill_(math.sqrt(max(float(variance), 1e-12)))

    @torch.no_grad()
    def start_from(self, directory: str | Path, key: str = "train.init_from") -> list[str]:
        """Copy a trained model's weights (``directory/model.safetensors``) into this one, to train on from
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
        own = self.state_dict()
        # The prompt words' embeddings are this model's vocabulary's, computed when it was built.
        state.pop("entity_embeddings", None)
        foreign = [n for n, tensor in state.items() if n not in own or own[n].shape != tensor.shape]
        # The output layer is tied to the token embeddings (saved once, as they are); the gap is this run's
        # own (data.gap), saved apart from the weights.
        kept = ("entity_embeddings", "gap.")
        fresh = [
            n for n in own if n not in state and not n.startswith(kept) and not n.endswith("lm_head.weight")
        ]
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
        self.load_state_dict(state, strict=False)
        return fresh

    # -- its CLIP -------------------------------------------------------------------------------

    @property
    def clip(self) -> ClipEncoder:
        """The CLIP whose embedding space the model reads, loaded on first use onto the model's device."""
        if self._clip is None:
            if self.clip_spec is None:
                raise TipcapError(
                    "the model does not record its CLIP; load it with from_pretrained(clip=...)."
                )
            self.use_clip(ClipEncoder.load(self.clip_spec, device=str(self.device)))
        return self._clip

    def use_clip(self, encoder: ClipEncoder) -> None:
        """Use an already loaded CLIP; it must be the one the gap was fitted on."""
        if self.gap is not None:
            self.gap.check_clip(encoder.spec.identity(), f"CLIP {encoder.spec.describe()}")
        self._clip = encoder

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.clip.encode_texts(texts).embeddings

    def embed_images(
        self, images: Sequence[str | Path | Image.Image], batch_size: int = 64, workers: int | None = None
    ) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
        """CLIP embeddings ``[M, d]`` of the readable images, their positions, and (position, reason) for
        the others. Images are decoded ``batch_size`` at a time by ``workers`` processes
        (:func:`~tipcap.clip.image_batches`), so memory does not grow with their number."""
        blocks, readable, failures = [], [], []
        for positions, embeddings, bad in self._image_stream(images, batch_size, workers, {}):
            blocks.append(embeddings)
            readable += positions
            failures += bad
        embeddings = torch.cat(blocks) if blocks else torch.empty(0, self.config.clip_dim)
        return embeddings, readable, failures

    def _image_stream(
        self,
        images: Sequence[str | Path | Image.Image],
        batch_size: int,
        workers: int | None,
        timings: dict[str, float],
    ) -> Iterator[tuple[list[int], torch.Tensor, list[tuple[int, str]]]]:
        """Per batch of images: the readable positions, their CLIP embeddings ``[b, d]``, the failures.
        Adds the seconds spent waiting for decoded images and encoding them to ``timings``."""
        clip = self.clip
        loader = iter(image_batches(images, clip.preprocess, batch_size, workers))
        while True:
            start = time.perf_counter()
            batch = next(loader, None)
            timings["decoding"] = timings.get("decoding", 0.0) + time.perf_counter() - start
            if batch is None:
                return
            positions, pixels, failures = batch
            start = time.perf_counter()
            embeddings = (
                clip.encode_images(pixels) if pixels is not None else torch.empty(0, self.config.clip_dim)
            )
            timings["clip"] = timings.get("clip", 0.0) + time.perf_counter() - start
            yield positions, embeddings, failures

    # -- prompts --------------------------------------------------------------------------------

    def entity_vocabulary(self) -> tuple[list[str], torch.Tensor]:
        """The model's prompt vocabulary and its prompt-ensembled CLIP text embeddings ``[V, d]``: stored
        with the model (``pim``) or encoded once with its CLIP (``hard``)."""
        if self.entity_embeddings is not None:
            return self.entity_names, self.entity_embeddings.float().cpu()
        if not self.entity_names:
            raise TipcapError("this model was trained without prompts, so it has no entity vocabulary.")
        if self._vocabulary_embeddings is None:
            self._vocabulary_embeddings = entity_text_embeddings(self._encode_texts, self.entity_names)
        return self.entity_names, self._vocabulary_embeddings

    def auto_prompts(
        self, image_embeddings: torch.Tensor, top_k: int = 3, threshold: float | None = None
    ) -> list[list[str]]:
        """Entities of the model's vocabulary found in each image by CLIP zero-shot classification:
        ``[B, d]`` → B word lists, most probable first."""
        return [
            [name for name, _ in row]
            for row in self.entity_guesses(image_embeddings, top_k=top_k, threshold=threshold)
        ]

    def entity_guesses(
        self, image_embeddings: torch.Tensor, top_k: int = 3, threshold: float | None = None
    ) -> list[list[tuple[str, float]]]:
        """:meth:`auto_prompts` with each entity's zero-shot probability: ``[B, d]`` → B lists of
        (name, probability), most probable first."""
        names, embeddings = self.entity_vocabulary()
        return zero_shot_scores(
            image_embeddings.float().cpu(), embeddings, names, top_k=top_k, threshold=threshold
        )

    def prompt_embeddings(
        self,
        prompts: Sequence[Sequence[str]],
        encode_texts: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP embeddings of each row's prompt words, padded: ``[B, P, d]`` and a mask ``[B, P]``.

        Words of the entity vocabulary are looked up; others are encoded with ``encode_texts`` (a CLIP
        text encoder, prompt-ensembled like the vocabulary) or refused when none is given.
        """
        prompts = [list(words)[: self.config.max_prompt_words] for words in prompts]
        table, names = self.entity_embeddings.float(), self.entity_names
        unknown = sorted({w for words in prompts for w in words if w not in self._entity_row})
        if unknown:
            if encode_texts is None:
                raise TipcapError(f"prompt words outside the entity vocabulary: {', '.join(unknown)}.")
            vectors = entity_text_embeddings(encode_texts, unknown, PROMPT_TEMPLATES)
            table, names = torch.cat([table, vectors.to(table)]), [*names, *unknown]
        return pad_prompt_embeddings(prompts, table, names)

    # -- the decoder ------------------------------------------------------------------------------

    def prefix(
        self,
        text_side: torch.Tensor,
        prompt_embeddings: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prefix vectors ``[B, K, W]`` from text-side inputs ``[B, d]`` and optional prompts."""
        inputs = (text_side.to(self.device, torch.float32) - self.input_mean) / self.input_scale
        prefix = self.projector(inputs)
        if self.prompt_interaction is not None:
            prefix = self.prompt_interaction(prefix, prompt_embeddings, prompt_mask)
        return prefix

    def _longest_hard_prompt(self) -> int:
        """The tokens of the longest hard prompt that training writes: the ``max_prompt_words`` vocabulary
        words of the most tokens each (0 for a model without hard prompts)."""
        if self.config.prompt != "hard":
            return 0

        def tokens(text: str) -> int:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        # Counted with the space before it, as a word is written in the prompt.
        longest = sorted(self.entity_names, key=lambda name: tokens(" " + name), reverse=True)
        return max(tokens(hard_prompt([])), tokens(hard_prompt(longest[: self.config.max_prompt_words])))

    def _hard_prompt_ids(self, prompts: Sequence[Sequence[str]] | None, batch: int) -> list[list[int]]:
        if self.config.prompt != "hard" or prompts is None:
            return [[] for _ in range(batch)]
        return [
            self.tokenizer(hard_prompt(list(words)), add_special_tokens=False)["input_ids"]
            for words in prompts
        ]

    def _prompt_vectors(
        self,
        prompts: Sequence[Sequence[str]] | None,
        prompt_embeddings: torch.Tensor | None,
        prompt_mask: torch.Tensor | None,
        batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What follows the prefix: the hard prompt's token embeddings, or (``pim_tokens``) the projected
        prompt words, ``[B, L, W]`` with a mask ``[B, L]`` (True at real positions); None when nothing."""
        if self.config.prompt == "pim":
            if not self.config.pim_tokens or prompt_embeddings is None or prompt_embeddings.shape[1] == 0:
                return None
            assert self.prompt_interaction is not None and prompt_mask is not None
            return self.prompt_interaction.words(prompt_embeddings), prompt_mask.to(torch.bool)
        hard_ids = self._hard_prompt_ids(prompts, batch)
        length = max((len(ids) for ids in hard_ids), default=0)
        if length == 0:
            return None
        ids = torch.full((batch, length), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        for row, row_ids in enumerate(hard_ids):
            if row_ids:
                ids[row, : len(row_ids)] = torch.tensor(row_ids, device=self.device)
                mask[row, : len(row_ids)] = True
        return self.language_model.get_input_embeddings()(ids), mask

    def _context(
        self,
        text_side: torch.Tensor,
        prompts: Sequence[Sequence[str]] | None,
        encode_texts: Callable[[list[str]], torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything before the caption: the prefix and what follows it (the hard prompt, or the prompt
        words as vectors), ``[B, C, W]``, with a mask ``[B, C]``."""
        prompt_embeddings = prompt_mask = None
        if self.config.prompt == "pim" and prompts is not None:
            prompt_embeddings, prompt_mask = self.prompt_embeddings(prompts, encode_texts)
        prefix = self.prefix(text_side, prompt_embeddings, prompt_mask)
        batch, k = prefix.shape[0], self.config.prefix_length
        following = self._prompt_vectors(prompts, prompt_embeddings, prompt_mask, batch)
        if following is None:
            return prefix, torch.ones(batch, k, dtype=torch.long, device=self.device)
        vectors, real = following
        # Padding first, then the prefix, then the real positions ([pad… | prefix | prompt]), so that the
        # last context position, which predicts the caption's first token, is real in every row, an empty
        # prompt's too: a stable sort on 0 (padding), 1 (prefix), 2 (prompt).
        rank = torch.cat([torch.ones(batch, k, dtype=torch.long, device=self.device), 2 * real.long()], dim=1)
        order = torch.argsort(rank, dim=1, stable=True)
        context = torch.cat([prefix, vectors.to(prefix.dtype)], dim=1)
        context = context.gather(1, order.unsqueeze(-1).expand_as(context))
        return context, (rank > 0).long().gather(1, order)

    def forward(
        self,
        text_side: torch.Tensor,
        caption_ids: torch.Tensor,
        caption_mask: torch.Tensor,
        prompts: Sequence[Sequence[str]] | None = None,
        pack_length: int | None = None,
    ) -> Any:
        """Language-model outputs (``loss``, ``logits``) for captions given their conditioning.

        Args:
            text_side: ``[B, d]`` what the decoder reads (:meth:`training_inputs` of the embeddings).
            caption_ids: ``[B, T]`` caption tokens ending with the end-of-text token, right-padded.
            caption_mask: ``[B, T]`` 1 for real tokens.
            prompts: per row, the prompt words (or ``None``: no prompt).
            pack_length: pack the sequences, without their padding, into rows of this many positions
                (:mod:`tipcap.packing`); the logits are then ``[R, pack_length, vocab]``, the loss the same.

        The loss is the token cross-entropy over the caption (end-of-text included); prefix, prompt and
        padding positions are labelled -100.
        """
        context, context_mask = self._context(text_side, prompts, None)
        caption_ids = caption_ids.to(self.device)
        caption_mask = caption_mask.to(self.device)
        tokens = self.language_model.get_input_embeddings()(caption_ids).to(context.dtype)
        inputs = torch.cat([context, tokens], dim=1)
        mask = torch.cat([context_mask, caption_mask.long()], dim=1)
        ignore = torch.full(context_mask.shape, -100, dtype=torch.long, device=self.device)
        labels = torch.cat([ignore, caption_ids.masked_fill(caption_mask == 0, -100)], dim=1)
        if pack_length is not None:
            packed, positions, packed_labels = pack(inputs, mask, labels, pack_length)
            # No attention mask and no cache: the restarting position ids mark where sequences begin.
            return self.language_model(
                inputs_embeds=packed, position_ids=positions, labels=packed_labels, use_cache=False
            )
        # Positions count real tokens only, as generate() counts them from the attention mask.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return self.language_model(
            inputs_embeds=inputs, attention_mask=mask, position_ids=positions, labels=labels
        )

    def _check_room(
        self, context_mask: torch.Tensor, prompts: Sequence[Sequence[str]] | None, new_tokens: int
    ) -> None:
        """Refuse a batch whose context ``[B, C]`` (its real positions) and ``new_tokens`` caption tokens
        would run past the language model's positions: a hard prompt's words are written out in full, so
        many or long ones do, as does asking for more tokens than the model was checked for."""
        if not isinstance(self.positions, int):
            return
        used = context_mask.sum(dim=1)
        over = (used + new_tokens > self.positions).nonzero()
        if not len(over):
            return
        row, prefix = int(over[0]), self.config.prefix_length
        words = list(prompts[row]) if prompts is not None else []
        if words and prefix + new_tokens <= self.positions:
            raise TipcapError(
                f"prompt words {', '.join(words)}: they take {int(used[row]) - prefix} positions after the "
                f"model's {prefix} prefix vectors, and with a caption of up to {new_tokens} tokens that is "
                f"more than its language model's {self.positions}; give fewer or shorter prompt words."
            )
        raise TipcapError(
            f"max tokens {new_tokens}: after the model's {int(used[row])} context positions, a caption of "
            f"that many tokens runs past its language model's {self.positions} positions; ask for at most "
            f"{max(self.positions - int(used[row]), 0)} (max_new_tokens; eval.max_tokens)."
        )

    @torch.inference_mode()
    def decode_text_side(
        self,
        text_side: torch.Tensor,
        prompts: Sequence[Sequence[str]] | None = None,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        encode_texts: Callable[[list[str]], torch.Tensor] | None = None,
        prompt_guidance: float | None = None,
    ) -> list[str]:
        """Captions for a batch of *text-side* inputs ``[B, d]`` (greedy or beam search).

        This is the decoder alone: image embeddings must first cross the gap (:meth:`image_inputs`), which
        :meth:`caption` does. Prompt words are guided at decoding by ``prompt_guidance`` (``None``: the
        model's ``prompt_guidance``; :mod:`tipcap.guide`).
        """
        context, mask = self._context(text_side, prompts, encode_texts)
        self._check_room(mask, prompts, max_new_tokens or self.config.max_caption_tokens)
        guidance = self.config.prompt_guidance if prompt_guidance is None else prompt_guidance
        processors = LogitsProcessorList()
        if prompts is not None and guidance > 0 and self.config.prompt != "none":
            unknown = self.tokenizer.unk_token_id
            entities = [entity_forms(self.tokenizer, words, self.entity_forms, unknown) for words in prompts]
            processors.append(PromptGuide(entities, num_beams, guidance))
        with _padding_warning_filtered():
            output = self.language_model.generate(
                inputs_embeds=context,
                attention_mask=mask,
                logits_processor=processors,
                num_beams=num_beams,
                do_sample=False,
                max_new_tokens=max_new_tokens or self.config.max_caption_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    # -- captioning -------------------------------------------------------------------------------

    def caption(
        self,
        images: Sequence[str | Path | Image.Image] | None = None,
        *,
        embeddings: torch.Tensor | None = None,
        prompts: PromptWords | None = None,
        auto_prompt: bool = False,
        num_beams: int = 5,
        max_new_tokens: int | None = None,
        batch_size: int = 64,
        top_k: int = 3,
        threshold: float | None = None,
        workers: int | None = None,
        timings: dict[str, float] | None = None,
        prompt_guidance: float | None = None,
    ) -> list[CaptionResult]:
        """Caption images (paths or PIL images) or CLIP image embeddings ``[N, d]``.

        The gap carries image embeddings to the text side; the CLIP is loaded on first need. Prompt words
        are given (``prompts``) and/or found by CLIP zero-shot classification (``auto_prompt``, at most
        ``top_k`` entities with probability at least ``threshold``); a model trained without prompts
        ignores them, says so once, and reports no prompt words; a prompt-interaction model reads the first
        ``max_prompt_words`` of each input's (given ones first), says so once when there were more, and
        reports those it read. An unreadable image gets an ``error`` instead of a caption, and the others
        are captioned.

        Images stream through in batches of ``batch_size``: ``workers`` processes decode and preprocess
        the next batches (:func:`~tipcap.clip.image_batches`) while this one is encoded and captioned, and
        nothing but the results grows with the number of images. ``timings``, when given, gains the
        seconds spent per stage: ``decoding`` (waiting for decoded images), ``clip``, ``generation``.
        ``prompt_guidance`` overrides the model's guidance of prompt words at decoding (:mod:`tipcap.guide`).
        """
        if (images is None) == (embeddings is None):
            raise TipcapError("caption: give images or embeddings (one of them).")
        _check_prompt_text(prompts)
        timings = {} if timings is None else timings
        if (prompts or auto_prompt) and self.config.prompt == "none":
            logger.warning("this model was trained without prompts; prompt words are ignored.")
            prompts, auto_prompt = None, False
        if images is not None:
            count = len(images)
            batches = self._image_stream(images, batch_size, workers, timings)
        else:
            bad = (~torch.isfinite(embeddings)).any(dim=-1).nonzero()
            if len(bad):
                raise TipcapError(f"caption: embedding row {int(bad[0])} holds NaN or infinite values.")
            count = len(embeddings)
            batches = (
                (
                    list(range(start, min(start + batch_size, count))),
                    embeddings[start : start + batch_size],
                    [],
                )
                for start in range(0, count, batch_size)
            )

        def name(position: int) -> str | None:
            if images is None:
                return None
            image = images[position]
            return f"image {position}" if isinstance(image, Image.Image) else str(image)

        results: list[CaptionResult | None] = [None] * count
        cut = 0
        for positions, batch, failures in batches:
            for position, reason in failures:
                results[position] = CaptionResult(name(position), None, error=reason)
            if not positions:
                continue
            words = self._prompt_words(prompts, count, positions, batch, auto_prompt, top_k, threshold)
            if words is not None and self.config.prompt == "pim":
                # The prompt interaction reads the first max_prompt_words; the results list those it read.
                limit = self.config.max_prompt_words
                cut += sum(len(row) > limit for row in words)
                words = [row[:limit] for row in words]
            start = time.perf_counter()
            captions = self.decode_text_side(
                self.image_inputs(batch),
                words,
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                encode_texts=self._encode_texts,
                prompt_guidance=prompt_guidance,
            )
            timings["generation"] = timings.get("generation", 0.0) + time.perf_counter() - start
            for row, (position, caption) in enumerate(zip(positions, captions, strict=True)):
                results[position] = CaptionResult(name(position), caption, words[row] if words else [])
        if cut:
            logger.warning(
                "this model reads at most %d prompt words: %d input(s) had more, and only their first %d "
                "were used (each result lists the words used).",
                self.config.max_prompt_words,
                cut,
                self.config.max_prompt_words,
            )
        return results

    def _prompt_words(
        self,
        prompts: PromptWords | None,
        count: int,
        readable: list[int],
        embeddings: torch.Tensor,
        auto_prompt: bool,
        top_k: int,
        threshold: float | None,
    ) -> list[list[str]] | None:
        """The prompt words (given ones first, then CLIP's) of the inputs at positions ``readable`` of
        ``count``, whose embeddings are ``[len(readable), d]``; ``None`` for none."""
        if not prompts and not auto_prompt:
            return None
        if not prompts:
            given: list[list[str]] = [[] for _ in readable]
        elif all(isinstance(word, str) for word in prompts):
            given = [list(prompts) for _ in readable]
        else:
            if len(prompts) != count:
                raise TipcapError(f"caption: {len(prompts)} prompt lists for {count} inputs.")
            given = [list(prompts[position]) for position in readable]
        if auto_prompt:
            found = self.auto_prompts(embeddings, top_k=top_k, threshold=threshold)
            given = [list(dict.fromkeys([*mine, *theirs])) for mine, theirs in zip(given, found, strict=True)]
        return given

    # -- saving -------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, provenance: dict[str, Any] | None = None) -> None:
        """Write config, weights, gap, tokenizer, CLIP files and the model card to ``directory`` (each renamed
        into place).

        Args:
            directory: the model directory.
            provenance: the record of the run that trained the model (:mod:`tipcap.provenance`), written as
                ``provenance.json`` and summarised on the card.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {}
        storages: set[int] = set()
        for name, tensor in self.state_dict().items():
            if name.startswith("gap."):
                continue
            # Tied weights (GPT-2's input embedding and output layer) are stored once; tie_weights
            # restores the second name on loading.
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in storages:
                continue
            storages.add(pointer)
            state[name] = tensor.detach().cpu().contiguous()
        save_safetensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        if self.gap is not None:
            self.gap.save(directory / GAP_NAME)
        self.tokenizer.save_pretrained(directory)
        model_config = to_dict(self.config)
        # The vocabulary travels as entity_names; the file it was read from at training is not needed.
        model_config["vocabulary"] = None
        model_config["language_model_config"] = {
            **self.language_model.config.to_diff_dict(),
            "model_type": self.language_model.config.model_type,
        }
        document = {
            "format": MODEL_FORMAT,
            "tipcap_version": __version__,
            "model": model_config,
            "entity_names": self.entity_names,
            "entity_forms": self.entity_forms,
            "clip": self.clip_spec.save_into(directory / CLIP_DIR) if self.clip_spec is not None else None,
        }
        with atomic_path(directory / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(document, indent=2), encoding="utf-8")
        if provenance is not None:
            write_provenance(directory, provenance)
        write_model_card(directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device | None = None,
        clip: ClipSpec | None = None,
        revision: str | None = None,
    ) -> TIPCap:
        """Rebuild a model saved by :meth:`save_pretrained`, exactly; from a folder without network access.

        Args:
            directory: the model directory, or a hub name (``owner/name``, ``owner/name@revision``) found in
                the Hugging Face cache or downloaded into it (:func:`tipcap.hub.resolve_model`). An existing
                folder of that name wins.
            device: where to put it (default: CUDA when available, else the CPU).
            clip: a CLIP to use instead of the one the model records.
            revision: the hub revision (branch, tag or commit) of a hub name.

        Raises:
            TipcapError: when the directory is not a tipcap model or was written by an incompatible version,
                or a hub model is neither cached nor downloadable (at once, offline).
        """
        directory = resolve_model(directory, revision)
        device = resolve_device(device)
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
            name
            for name, tensor in state.items()
            if tensor.is_floating_point() and not tensor.isfinite().all()
        ]
        if broken:
            # Such a model captions every image with the same word, silently.
            raise TipcapError(
                f"{directory / WEIGHTS_NAME}: {len(broken)} tensors hold NaN or infinite values ({broken[0]} "
                "first); use an earlier checkpoint, or retrain."
            )
        tokenizer = load_tokenizer(str(directory))
        gap = Gap.load(directory / GAP_NAME) if (directory / GAP_NAME).is_file() else None
        if clip is None and clip_record is not None:
            clip = ClipSpec.from_dict(clip_record, base=directory)
        model = cls(
            config,
            _language_model_from(config),
            tokenizer,
            gap,
            entity_names,
            state.get("entity_embeddings"),
            clip,
            entity_forms,
        )
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
        return model.to(device).eval()


def caption_record(result: CaptionResult) -> dict[str, Any]:
    """One line of ``tipcap caption --out``: ``{"image", "caption", "prompt"}``."""
    return {"image": result.image, "caption": result.caption, "prompt": result.prompt}


def write_captions_jsonl(path: str | Path, results: Sequence[CaptionResult]) -> None:
    """Write one JSON line per result (:func:`caption_record`, what ``tipcap caption --out`` writes), to a
    temporary name renamed into place."""
    lines = [caption_record(r) for r in results]
    with atomic_path(Path(path)) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
