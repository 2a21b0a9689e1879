"""The caption model's language model and tokenizer, built from its config or loaded by name or folder.

A fresh causal LM comes from ``model.language_model_config``, pretrained weights and tokenizers by hub name
or local folder through the Hugging Face cache (:func:`tipcap.hub_cache.load_named`): offline, a name that
is not cached fails at once. Problems become one :class:`~tipcap.errors.TipcapError` naming the config key.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from tipcap.config import ModelConfig
from tipcap.errors import TipcapError
from tipcap.hub_cache import load_named


def language_model_from(config: ModelConfig) -> nn.Module:
    """The causal LM: a fresh one from ``language_model_config``, else pretrained weights by name or path."""
    model = _load_language_model(config)
    # transformers picks the loss from the class name, which names none for GPT-2 (GPT2LMHeadModel), and
    # warns that it falls back to the causal-LM loss; the decoder is a causal LM, so that loss is the one.
    model.loss_type = "ForCausalLM"
    return model


def language_model_for(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """:func:`language_model_from`, refused when ``tokenizer`` has more tokens than its vocabulary."""
    model = language_model_from(config)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise TipcapError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the language model's vocabulary."
        )
    return model


def _load_language_model(config: ModelConfig) -> nn.Module:
    """The language model as ``config`` names it (see :func:`language_model_from`)."""
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


def configured_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer ``model.tokenizer`` names, else the language model's own, loaded by its name."""
    if config.tokenizer is not None:
        return load_tokenizer(config.tokenizer, "model.tokenizer")
    return load_tokenizer(config.language_model, "model.language_model")


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
def padding_warning_filtered() -> Iterator[None]:
    """:class:`_PaddingWarningFilter` on transformers' model logger, for the time of a ``generate`` call."""
    log, warning = logging.getLogger("transformers.modeling_utils"), _PaddingWarningFilter()
    log.addFilter(warning)
    try:
        yield
    finally:
        log.removeFilter(warning)
