"""Experiment configuration: dataclasses, read from YAML/JSON, overridden from the command line, validated.

An experiment file has three sections, ``model``, ``data`` and ``train``; every key is checked against
the dataclasses below, so a misspelt key or a value of the wrong type is an error naming the key.
``--set train.lr=1e-4`` overrides one value (parsed as YAML: numbers, booleans, null, lists).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tipcap.data.files import atomic_path
from tipcap.errors import TipcapError


@dataclass
class ModelConfig:
    """Everything needed to rebuild a caption model (saved as the model directory's ``config.json``)."""

    clip_dim: int = 512
    language_model: str = "gpt2"
    language_model_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    prefix_length: int = 10
    projector: Literal["mlp", "transformer"] = "mlp"
    projector_layers: int = 8
    # Centre the projector's input on its training mean and scale it to unit RMS per dimension: an
    # affine map the first layer could learn, but CLIP embeddings share most of their length (cosine
    # ~0.5 between any two), so without it the projector reads their differences only slowly.
    standardize_input: bool = True
    freeze_language_model: bool = False
    prompt: Literal["none", "pim", "hard"] = "none"
    pim_layers: int = 2
    pim_heads: int = 8
    max_prompt_words: int = 8
    max_caption_tokens: int = 40
    vocabulary: str | None = None  # entity vocabulary JSON; None: the packaged COCO vocabulary


@dataclass
class DataConfig:
    """Which stores and gap a training run reads."""

    train_texts: str = ""
    val_texts: str | None = None
    gap: str | None = None
    train_images: str | None = None


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and prompt sampling."""

    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 80
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 500
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float = 1.0
    accumulate: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    kl_weight: float = 1.0
    prompt_drop_entity: float = 0.4
    prompt_drop_all: float = 0.5
    prompt_distractor: float = 0.1


@dataclass
class ExperimentConfig:
    """A training run: the model, its data and its optimisation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` (ints are accepted for floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _convert(value, option, key)
            except TipcapError:
                continue
    elif origin is Literal:
        if value in typing.get_args(hint):
            return value
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return from_dict(hint, value, key)
    elif hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (no decimal point) as a string.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(hint)
            return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, hint):
        return value
    raise TipcapError(f"config key '{key}': expected {_type_name(hint)}, got {value!r}.")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown keys and mistyped values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise TipcapError(f"config key '{path}' is unknown; known keys here: {', '.join(names)}.")
        values[key] = _convert(value, hints[key], path)
    return cls(**values)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``section.key=value`` overrides (values parsed as YAML) in a nested dict, in place."""
    for override in overrides:
        if "=" not in override:
            raise TipcapError(f"--set {override!r}: expected key=value, e.g. train.lr=1e-4.")
        path, raw = override.split("=", 1)
        keys = path.strip().split(".")
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise TipcapError(f"--set {override!r}: '{key}' is not a section.")
        target[keys[-1]] = yaml.safe_load(raw)
    return data


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
