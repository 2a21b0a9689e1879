"""Models, language models and tokenizers by hub name, read through the Hugging Face cache.

``resolve_model`` turns ``owner/name`` (optionally ``owner/name@revision``) into a folder of the local
Hugging Face cache through ``snapshot_download``: what the cache holds is used as it is, without network;
what it lacks is downloaded. A local folder of that name always wins. ``load_named`` does the same for what
``transformers`` loads by name (a language model, a tokenizer).

Offline (``HF_HUB_OFFLINE`` set, or the hub's endpoint, ``HF_ENDPOINT`` when set, not answering an HTTP
request within a few seconds), both fail at once with one line saying what to do, instead of retrying or
waiting for minutes. Reading sits below the model, which loads by name (``TIPCap.from_pretrained``, its
language model and tokenizer); publishing, above it, is :mod:`tipcap.hub`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tipcap import __version__
from tipcap.errors import TipcapError
from tipcap.network import hub_unavailable

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
Loaded = TypeVar("Loaded")


def is_hub_name(name: str) -> bool:
    """Whether ``name`` reads as ``owner/name`` or ``owner/name@revision``."""
    return _HUB_NAME.fullmatch(name) is not None


def first_line(error: Exception) -> str:
    """An error's first line, for a one-line message (its type's name when it says nothing)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def resolve_model(name_or_path: str | Path, revision: str | None = None) -> Path:
    """The folder of a model given by path or by hub name (``owner/name``, ``owner/name@revision``).

    An existing path, or a name that is not a hub name, is returned as it is. A hub name is looked up in the
    Hugging Face cache (``HF_HUB_CACHE``) and downloaded when missing there.

    Raises:
        TipcapError: when the model is not cached and the hub cannot be used (within seconds), or the hub
            has no such model or revision.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    path = Path(name_or_path)
    name = str(name_or_path)
    if path.exists() or not is_hub_name(name):
        return path
    repo, _, pinned = name.partition("@")
    revision = revision or pinned or None
    where = f"{repo}" + (f" (revision {revision})" if revision else "")
    options = {"revision": revision, "library_name": "tipcap", "library_version": __version__}
    try:
        return Path(snapshot_download(repo, local_files_only=True, **options))
    except LocalEntryNotFoundError:
        pass  # not cached: download it below, when the hub can be reached
    except HFValidationError as e:
        raise TipcapError(f"{name}: no such folder, nor a valid hub name ({first_line(e)}).") from None
    reason = hub_unavailable()
    if reason is not None:
        from huggingface_hub import constants

        raise TipcapError(
            f"{name}: no such folder, and the hub model {where} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) while {reason}; download it where the hub can be reached "
            f"(`hf download {repo}`) and point HF_HUB_CACHE at that cache, or pass the model's folder."
        )
    try:
        return Path(snapshot_download(repo, **options))
    except RepositoryNotFoundError:
        raise TipcapError(
            f"{name}: no such folder, and no model {repo} on the hub (for a private one, log in with "
            "`hf auth login` or set HF_TOKEN)."
        ) from None
    except RevisionNotFoundError:
        raise TipcapError(f"{name}: the hub model {repo} has no revision {revision!r}.") from None
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        # huggingface_hub turns a failed request it cannot classify (a mirror's bare 404, a dropped
        # connection) into LocalEntryNotFoundError, whose first line names the request that failed.
        raise TipcapError(f"downloading {where} from the hub failed: {first_line(e)}") from None


def load_named(load: Callable[..., Loaded], name: str, key: str) -> Loaded:
    """``load(name)`` for a ``from_pretrained`` that takes a folder or a hub name (``gpt2``, ``owner/name``).

    A folder loads as it is, and a hub name from the Hugging Face cache without network. A name the cache
    lacks is downloaded only once the hub answers: ``transformers`` would retry an unreachable hub for
    about a minute before it failed. ``key`` names the config key in the messages
    (``model.language_model``).

    Raises:
        TipcapError: for a name that is neither a folder nor a hub name, or one neither cached nor
            downloadable now (at once, offline).
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(name).exists():
        return load(name)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise TipcapError(f"{key} {name!r}: no such folder, nor a hub name (gpt2, owner/name).") from None
    try:
        return load(name, local_files_only=True)
    except OSError:
        pass  # not cached: download it below, when the hub can be reached
    reason = hub_unavailable()
    if reason is not None:
        raise TipcapError(
            f"{key} {name!r}: no such folder, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"while {reason}; download it where the hub can be reached (`hf download {name}`) and point "
            "HF_HUB_CACHE at that cache, or give the folder of its files."
        )
    return load(name)
