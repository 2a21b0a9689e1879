"""The config tree: one dataclass per pipeline stage, read from YAML or JSON, validated, overridable by key.

Stages and where they are used:

- :class:`EmbedConfig`: which CLIP encodes captions and images, in which precision (``tipcap embed``);
- :class:`GapConfig`: how the modality gap is fitted (``tipcap fit-gap``);
- :class:`ModelConfig`, :class:`DataConfig`, :class:`TrainConfig`: the caption decoder and its training
  (``tipcap train``; together an :class:`ExperimentConfig`);
- :class:`EvalConfig`: how captions are decoded and scored (``tipcap evaluate``);
- :class:`SyntheticGapConfig`: a known gap for synthetic image embeddings (a grid's ``synthetic_gap``).

A grid cell (:mod:`tipcap.grid`) may override any field of any stage by a dotted key (``gap.renorm``,
``eval.beams``), as ``--set train.lr=1e-4`` does for training. Validation is pydantic's, over these plain
dataclasses: it checks types and ranges and refuses unknown keys, and each mistake becomes one
:class:`TipcapError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from tipcap.errors import TipcapError
from tipcap.evaluation.registry import prompt_modes
from tipcap.io import atomic_path

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _not_boolean(value: Any) -> Any:
    """Refuse ``true``/``false`` where a number is expected: pydantic's lax mode reads them as 1 and 0, so
    ``train.max_steps: true`` would train one step."""
    if isinstance(value, bool):
        raise PydanticCustomError("number_not_boolean", "input should be a number, not true or false")
    return value


Int = Annotated[int, BeforeValidator(_not_boolean)]
"""An integer config value (every one: a boolean is no integer here)."""
Float = Annotated[float, BeforeValidator(_not_boolean)]
"""A real config value (every one: a boolean is no number here)."""
Positive = Annotated[Int, Field(ge=1)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Probability = Annotated[Float, Field(ge=0, le=1)]
Seed = Annotated[Int, Field(ge=0, lt=2**32)]
"""A seed below 2³² (numpy's legacy seeding), so that the seeds derived from it (a training step's, a
synthetic block's) stay within the 64 bits of ``torch.manual_seed``."""

Precision = Literal["auto", "fp32", "fp16", "bf16"]
GapKind = Literal[
    "none", "isotropic", "mean-shift", "mean-shift-isotropic", "capdec-offset", "mean-isotropic-matched",
    "norm-matched", "diagonal", "rotated", "gaussian", "close", "cov-noise", "memory",
]  # fmt: skip
Setting = Literal["few-pairs", "web-pairs", "unpaired", "text-only"]
VarianceMatch = Literal["total", "tangential"]
WebEstimator = Literal["mixture", "trim"]
PromptMode = Literal["none", "pim", "hard"]
Search = Literal["tipcap", "transformers"]
"""Which search decodes captions: :mod:`tipcap.beam_search`'s, or ``transformers``' ``generate``."""


def _prompt_mode(value: str) -> str:
    """An evaluation prompt mode: built in, or an installed world's prompt source (the toy worlds' oracle)."""
    if value not in (modes := prompt_modes()):
        listed = ", ".join(map(repr, modes[:-1])) + f" or {modes[-1]!r}"
        raise PydanticCustomError("prompt_mode", "input should be {modes}", {"modes": listed})
    return value


EvalPrompt = Annotated[str, AfterValidator(_prompt_mode)]
Metric = Literal["bleu", "meteor", "rouge", "cider", "spice"]

GAP_KINDS: tuple[str, ...] = typing.get_args(GapKind)
_NEEDS_COVARIANCE = {
    "mean-isotropic-matched", "norm-matched", "diagonal", "rotated", "gaussian", "close", "cov-noise"
}  # fmt: skip
_TEXT_ONLY_EQUIVALENT = {
    "mean-shift": "none",
    "mean-shift-isotropic": "isotropic",
    "capdec-offset": "isotropic",
}
SOURCE_CONSTANT_KINDS = ("isotropic", "mean-shift-isotropic", "capdec-offset", "close")
"""Kinds whose noise holds a constant set for another CLIP (CapDec's σ₀², CLOSE's 0.12), which
``gap.scale_to_dim`` carries to the embedding's width."""
SETTINGS: tuple[str, ...] = typing.get_args(Setting)
METRICS: tuple[str, ...] = typing.get_args(Metric)
CAPDEC_SIGMA2 = 0.016
"""CapDec's noise variance per axis (``--noise_variance 0.016`` in its README's training command)."""
CAPDEC_DIM = 640
"""The width of CapDec's default CLIP, RN50x4 (``prefix_dim`` 640 in CapDec's ``train.py``; 512 for ViT)."""


def described(default: Any = dataclasses.MISSING, text: str = "", **kwargs: Any) -> Any:
    """A dataclass field with help ``text``, which the command line shows for its option."""
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class EmbedConfig:
    """Which CLIP embeds captions and images, and how: part of every embedding store's key."""

    __pydantic_config__ = _STRICT

    model: str = described("", "open_clip model name (ViT-B-32) or path of an open_clip model-config JSON.")
    pretrained: str = described("none", "open_clip tag (openai, ...), weights file, or none (random).")
    init_seed: Seed = described(0, "Seed of random CLIP weights.")
    precision: Precision = described("auto", "Encoder precision; auto is fp16 on CUDA and fp32 on CPU.")
    batch_size: Positive | None = described(None, "Rows per pass [default: the encoder's for the device].")


@dataclass
class GapConfig:
    """How the modality gap is fitted from embedding stores (see :mod:`tipcap.gap`)."""

    __pydantic_config__ = _STRICT

    kind: GapKind = described("gaussian", "How the gap is bridged: the Gaussian, a control, or a baseline.")
    setting: Setting = described("text-only", "Which data besides the captions estimate the gap.")
    shrinkage: bool = described(True, "Ledoit-Wolf shrinkage of the covariance (else the sample covariance).")
    renorm: bool = described(True, "Rescale mapped embeddings to unit length.")
    web_estimator: WebEstimator = described(
        "mixture",
        "web-pairs: weight each pair by its probability of being matched (a two-component mixture "
        "on cos(v, t)), or trim: drop the least similar share drop_quantile.",
    )
    drop_quantile: Annotated[Float, Field(ge=0, lt=1)] = described(0.1, "web-pairs, trim: share to discard.")
    sigma2: PositiveFloat = described(CAPDEC_SIGMA2, "isotropic kinds, text-only: noise variance per axis.")
    noise_scale: PositiveFloat = described(1.0, "Multiplies the training-noise covariance of any kind.")
    match: VarianceMatch = described("total", "mean-isotropic-matched: tr Sigma, or its part tangent to t.")
    scale_to_dim: bool = described(
        False,
        "Carry sigma2 (CapDec's, at d = 640) and CLOSE's 0.12 (d = 768) to the embeddings' width at the same "
        "expected cosine between noised and clean embeddings: sigma^2 * d0 / d.",
    )
    learnable: bool = described(False, "Train mu and L with a KL term to this estimate (train.kl_weight).")
    mu_from: str | None = described(None, "text-only: import mu from this gap file.")
    tau: PositiveFloat = described(0.01, "memory: softmax temperature.")
    memory_size: Positive | None = described(None, "memory: keep a seeded subset of this many captions.")
    seed: Seed = described(0, "Seed of memory subsets, web-pairs' null draw and the rotated kind's rotation.")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a caption model (saved in the model directory's ``config.json``)."""

    __pydantic_config__ = _STRICT

    clip_dim: Positive = 512
    language_model: str = "gpt2"
    language_model_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    prefix_length: Positive = 10
    projector: Literal["mlp", "transformer"] = "mlp"
    projector_layers: Positive = 8
    # Centre the projector's input and scale it to unit RMS per dimension: CLIP embeddings share most of
    # their length (cosine ~0.5 between any two), so without it the projector reads their differences slowly.
    standardize_input: bool = True
    freeze_language_model: bool = False
    prompt: PromptMode = "none"
    pim_layers: Positive = 2
    pim_heads: Positive = 8
    # pim: also place each prompt word, projected, after the prefix as one context vector of its own, so
    # that the language model attends to a whole entity ("brown diamond") whose binding of attribute to
    # object no cross-attention into the prefix has blurred.
    pim_tokens: bool = False
    # Prompt guidance at decoding (tipcap/guide.py): added to the log-probability of a token that begins or
    # continues a prompted entity not yet mentioned; 0: plain decoding. Trains nothing.
    prompt_guidance: NonNegativeFloat = 0.0
    max_prompt_words: Positive = 8
    max_caption_tokens: Positive = 40
    vocabulary: str | None = None  # entity vocabulary JSON; None: the packaged COCO vocabulary

    def check(self, where: str) -> None:
        """The lengths against the positions that ``language_model_config`` gives the language model, when
        it names them (a model's own default is checked when it is built, :class:`tipcap.model.TIPCap`)."""
        settings = self.language_model_config or {}
        for name in ("n_positions", "max_position_embeddings"):  # GPT-2's name, most others'
            value = settings.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                check_positions(self, value, f"{_key(where, 'language_model_config')}.{name}", where)
                return


@dataclass
class DataConfig:
    """Which stores and gap a training run reads."""

    __pydantic_config__ = _STRICT

    train_texts: str = ""
    val_texts: str | None = None
    gap: str | None = None
    train_images: str | None = None  # supervised: condition on these image embeddings instead
    val_images: str | None = None  # supervised: the validation captions' image embeddings


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and prompt sampling."""

    __pydantic_config__ = _STRICT

    epochs: Positive = 10
    max_steps: Positive | None = None  # None: epochs × steps per epoch
    batch_size: Positive = 80
    lr: NonNegativeFloat = 2e-5  # 0 keeps the weights: a control run
    weight_decay: NonNegativeFloat = 0.01
    warmup_steps: Annotated[Int, Field(ge=0)] = 500
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: NonNegativeFloat = 1.0  # 0: no clipping
    accumulate: Positive = 1
    # Pack each batch's sequences into rows of pack_length positions (tipcap/packing.py); false: pad.
    packing: bool = False
    pack_length: Positive = 256
    compile: bool = False  # torch.compile the language model (compiled on the first steps)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: Seed = 0
    # A trained (prompt-free) model folder whose weights the run starts from (training.setup.start_from).
    init_from: str | None = None
    # With init_from: keep the weights copied from it fixed and train the prompt module alone, so that rows
    # without words decode exactly as the decoder it started from.
    freeze_init: bool = False
    checkpoint_every: Positive = 1000
    keep_checkpoints: Positive = 2
    log_every: Positive = 50
    kl_weight: NonNegativeFloat = 1.0  # weight of KL(gap ‖ its estimate) when the gap is learnable
    prompt_drop_entity: Probability = 0.4
    prompt_drop_all: Probability = 0.5
    prompt_distractor: Probability = 0.1
    # Rows with prompt words get the gap's training noise scaled by this (its standard deviation), so that
    # the decoder learns to take the binding of colour to shape, or attribute to object, from the words.
    prompt_noise_scale: PositiveFloat = 1.0


@dataclass
class EvalConfig:
    """How captions are decoded, prompted and scored."""

    __pydantic_config__ = _STRICT

    beams: Positive = described(5, "Beam width (1: greedy).")
    max_tokens: Positive | None = described(None, "Longest caption [default: model.max_caption_tokens].")
    prompt: EvalPrompt = described(
        "none",
        "auto: CLIP zero-shot entities; the other modes are installed worlds' prompt sources, drawn from the "
        "data's ground truth (the toy worlds': oracle, oracle-one, oracle-missing, wrong).",
    )
    prompt_guidance: NonNegativeFloat | None = described(None, "Prompt guidance [default: the model's].")
    top_k: Positive = described(3, "auto prompts: at most this many entities.")
    threshold: Probability | None = described(0.2, "auto prompts: least probability (ViECap's); null: top_k.")
    prompt_seed: Seed = described(0, "oracle-one, oracle-missing and wrong prompts: seed of the draw.")
    metrics: list[Metric] = described(text="Caption metrics.", default_factory=lambda: list(METRICS))
    batch_size: Positive = described(64, "Images per beam search.")
    search: Search = described("tipcap", "Beam search: tipcap's, or transformers' generate (the reference).")
    score_clip: str = described("ViT-B-32", "CLIP of CLIP-S and RefCLIP-S: open_clip name or config JSON.")
    score_pretrained: str = described("openai", "The scorer's pretrained tag or weights file.")


@dataclass
class SyntheticGapConfig:
    """A known gap N(μ*, Σ*) for synthetic image embeddings (:mod:`tipcap.synthgap`), and the seed of the
    held-out captions and of the draws."""

    __pydantic_config__ = _STRICT

    truth: str | None = None  # a gaussian gap file whose μ and Σ are the truth; None: the spiked spectrum
    mu_norm: NonNegativeFloat | None = None  # ‖μ*‖, required without truth (a CLIP's ‖mean(v) − mean(t)‖)
    trace: PositiveFloat | None = None  # tr Σ*, required without truth (a CLIP's few-pairs fit's)
    spikes: Positive = 8
    spike_share: Annotated[Float, Field(gt=0, le=1)] = 0.8
    tail_df: Annotated[Int, Field(ge=3)] | None = None  # heavy tails: δ a multivariate t of this many df
    seed: Seed = 0

    def check(self, where: str) -> None:
        """Without ``truth``, the spiked spectrum needs its ``mu_norm`` and ``trace``."""
        if missing := [n for n in ("mu_norm", "trace") if self.truth is None and getattr(self, n) is None]:
            raise TipcapError(f"config key '{_key(where, missing[0])}' is missing: the spiked spectrum needs "
                              "mu_norm and trace (or give truth, a gaussian gap file).")  # fmt: skip


@dataclass
class ExperimentConfig:
    """A training run: the model, its data and its optimisation."""

    __pydantic_config__ = _STRICT

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self, where: str) -> None:
        """Rules across keys: the model's (:meth:`ModelConfig.check`)."""
        self.model.check(_key(where, "model"))


def _key(where: str, name: str) -> str:
    """The dotted key of ``name`` in the section ``where`` (``""``: the top level)."""
    return f"{where}.{name}" if where else name


def check_positions(
    config: ModelConfig, positions: int, limit: str, where: str = "model", hard_prompt_tokens: int = 0
) -> None:
    """Refuse a model whose longest sequence would not fit the ``positions`` of its language model (named
    ``limit`` in the message), before anything is built: a position past them has no embedding.

    The sequence is the ``prefix_length`` prefix vectors, then the prompt (with ``pim_tokens``, one vector
    per prompt word, of which a model reads ``max_prompt_words``; for a hard prompt ``hard_prompt_tokens``,
    the tokens of its longest, which only the tokenizer can count), then up to ``max_caption_tokens``.
    ``where`` is the section whose keys the message names.
    """
    parts = [f"{_key(where, 'prefix_length')} {config.prefix_length}"]
    prompt = 0
    if config.prompt == "pim" and config.pim_tokens:
        prompt = config.max_prompt_words
        parts.append(f"{_key(where, 'max_prompt_words')} {prompt} (one position each with pim_tokens)")
    elif config.prompt == "hard" and hard_prompt_tokens:
        prompt = hard_prompt_tokens
        parts.append(
            f"a hard prompt of {prompt} tokens (its {_key(where, 'max_prompt_words')} "
            f"{config.max_prompt_words} longest vocabulary words)"
        )
    parts.append(f"{_key(where, 'max_caption_tokens')} {config.max_caption_tokens}")
    needed = config.prefix_length + prompt + config.max_caption_tokens
    if needed > positions:
        raise TipcapError(
            f"{' + '.join(parts)} = {needed} positions, more than the {positions} of {limit}; lower these "
            "keys or give the language model more positions."
        )


def check_gap_kind(kind: str, setting: str, mu_from: str | None, where: str) -> None:
    """Refuse a gap kind whose inputs the setting lacks, or one that text-only makes another kind.

    Text-only has no fitted Σ, so the kinds that need one are refused there; ``mean-shift``,
    ``mean-shift-isotropic`` and ``capdec-offset`` are refused there without ``mu_from``, since with μ = 0
    they are ``none`` and ``isotropic``. ``where`` names the config section in the message (``gap``,
    ``cells[3]``).
    """
    if setting != "text-only":
        return
    if kind in _NEEDS_COVARIANCE:
        raise TipcapError(
            f"{where}: gap kind {kind!r} needs a covariance fitted on images, which the text-only setting "
            "has not (its noise would be sigma2·I: kind isotropic, or mean-shift-isotropic with "
            "gap.mu_from); use another setting or kind."
        )
    if kind in _TEXT_ONLY_EQUIVALENT and mu_from is None:
        raise TipcapError(
            f"{where}: gap kind {kind!r} in the text-only setting has mu = 0 unless gap.mu_from "
            f"(--mu-from) imports one, which makes it kind {_TEXT_ONLY_EQUIVALENT[kind]!r}; set gap.mu_from "
            "or use that kind."
        )


def default_gap_kind(setting: str, mu_from: str | None = None) -> tuple[str, str]:
    """The gap kind of a setting when none is named, and why: the Gaussian N(μ, Σ) where images give a Σ
    to fit; in text-only, which has none, its isotropic form σ₀²I (TIPCap's text-only setting), with μ when
    ``mu_from`` imports one.
    """
    if setting != "text-only":
        return "gaussian", f"N(mu, Sigma) fitted in the {setting} setting"
    if mu_from is not None:
        return "mean-shift-isotropic", "text-only's Gaussian N(mu, sigma2·I), mu from --mu-from"
    return "isotropic", "text-only's Gaussian N(0, sigma2·I): no images to fit a covariance on"


def check_gap_config(config: GapConfig, where: str) -> None:
    """:func:`check_gap_kind`, then refuse options that the config's kind would ignore: ``match:
    tangential`` outside ``mean-isotropic-matched``, and ``scale_to_dim`` for a kind without a source
    constant (:data:`SOURCE_CONSTANT_KINDS`)."""
    check_gap_kind(config.kind, config.setting, config.mu_from, where)
    if config.match != "total" and config.kind != "mean-isotropic-matched":
        raise TipcapError(
            f"{where}: gap.match {config.match} (--match) applies to kind mean-isotropic-matched only, not "
            f"{config.kind!r}; drop it (total is the default) or use that kind."
        )
    if config.scale_to_dim and config.kind not in SOURCE_CONSTANT_KINDS:
        raise TipcapError(
            f"{where}: gap.scale_to_dim (--scale-to-dim) rescales the published noise constants of kinds "
            f"{', '.join(SOURCE_CONSTANT_KINDS)}; kind {config.kind!r} has none and would ignore it. Drop it "
            "or change the kind."
        )


def _message(error: dict[str, Any], prefix: str) -> str:
    """One line for one pydantic error: the dotted key, what was expected, what was given."""
    path = prefix
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "lax-", "tagged-union")):
            path = f"{path}.{part}" if path else str(part)
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"config key '{path}' is unknown."
    return f"config key '{path}': {error['msg'][0].lower()}{error['msg'][1:]} (given: {error['input']!r})."


_ADAPTERS: dict[type, TypeAdapter] = {}


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown keys, mistyped and out-of-range values, then
    what breaks a rule across keys (the dataclass's ``check``, given the section's dotted key)."""
    if not isinstance(data, dict):
        raise TipcapError(f"config key '{prefix}': expected a mapping, got {data!r}.")
    adapter = _ADAPTERS.setdefault(cls, TypeAdapter(cls))
    try:
        config = adapter.validate_python(data)
    except ValidationError as e:
        raise TipcapError(_message(e.errors()[0], prefix)) from None
    if hasattr(config, "check"):
        config.check(prefix)
    return config


def apply_overrides(data: dict[str, Any], overrides: list[str], flag: str = "--set") -> dict[str, Any]:
    """Set ``section.key=value`` overrides (values parsed as YAML) in a nested dict, in place."""
    for override in overrides:
        if "=" not in override:
            raise TipcapError(f"{flag} {override!r}: expected key=value, e.g. train.lr=1e-4.")
        path, raw = override.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise TipcapError(f"{flag} {override!r}: the value is not valid YAML.") from None
        set_dotted(data, path.strip(), value, f"{flag} {override!r}")
    return data


def set_dotted(data: dict[str, Any], path: str, value: Any, where: str) -> None:
    """Set ``data[a][b][c] = value`` for ``path`` ``a.b.c``, creating sections as needed."""
    keys = path.split(".")
    target = data
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise TipcapError(f"{where}: '{key}' is not a section.")
    target[keys[-1]] = value


def read_yaml_mapping(path: Path, missing: str, expected: str) -> dict[str, Any]:
    """The mapping a YAML file holds; a missing file (``missing`` is the message), text that is not UTF-8,
    invalid YAML or another type of document is a one-line :class:`TipcapError` naming the file."""
    if not path.is_file():
        raise TipcapError(missing)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise TipcapError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    except yaml.YAMLError as e:
        raise TipcapError(f"{path}: not valid YAML ({str(e).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise TipcapError(f"{path}: expected {expected}.")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment config (YAML or JSON), apply ``--set`` overrides, and validate it."""
    path = Path(path)
    data = read_yaml_mapping(
        path, f"--config {path}: no such file.", "a mapping with model, data and train sections"
    )
    apply_overrides(data, overrides or [])
    return from_dict(ExperimentConfig, data)


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain, JSON- and YAML-ready data."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as YAML (``.yaml``/``.yml``) or JSON, to a temporary name and then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_dict(config)
    text = (
        yaml.safe_dump(data, sort_keys=False)
        if path.suffix in (".yaml", ".yml")
        else json.dumps(data, indent=2)
    )
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
