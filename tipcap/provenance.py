"""Provenance: one record format for every artifact (store, gap, training run, model, evaluation).

A record says what made an artifact::

    {"artifact": "text-store",                  what it is
     "config": {...},                            the resolved settings that determine its content
     "inputs": {"corpus": "<sha256>"},             content hashes of what it was made from
     "tipcap": "0.1.0", "versions": {...},       the software that made it
     "command": ["tipcap", "embed", ...]}        how it was asked for

Its *key* is the first three entries: two artifacts with equal keys have equal content. Embedding stores are
reused exactly when their keys match; the key of a store feeds, through its digest, the records of the gaps,
runs and evaluations made from it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

from tipcap import __version__
from tipcap.io import write_json_atomic

FILE_NAME = "provenance.json"
KEY_FIELDS = ("artifact", "config", "inputs")
_PACKAGES = ("torch", "transformers", "open_clip_torch", "pycocoevalcap", "numpy", "scipy")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """SHA-256 hex digest of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages results depend on."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def record(
    artifact: str, config: dict[str, Any], inputs: dict[str, str], command: list[str] | None = None
) -> dict[str, Any]:
    """A provenance record; ``command`` defaults to this process's ``sys.argv``."""
    return {
        "artifact": artifact,
        "config": config,
        "inputs": inputs,
        "tipcap": __version__,
        "versions": versions(),
        "command": list(sys.argv if command is None else command),
    }


def key(provenance: dict[str, Any]) -> dict[str, Any]:
    """The part of a record that determines the artifact's content."""
    return {name: provenance[name] for name in KEY_FIELDS}


def write(folder: Path, provenance: dict[str, Any]) -> Path:
    """Write ``provenance.json`` into ``folder`` (renamed into place); return its path."""
    path = Path(folder) / FILE_NAME
    write_json_atomic(path, provenance)
    return path
