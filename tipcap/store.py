"""Embedding stores: L2-normalised fp16 CLIP embeddings on disk, with the ids they were built from.

A store is a directory::

    meta.json                      what was encoded, by which CLIP, and the shard files (the commit point)
    ids.json                       one image id per row (a caption store: the captioned image's id)
    captions.json                  caption stores only: the normalised caption of each row
    embeddings.safetensors         [N, d] float16, or shards embeddings-00000-of-00004.safetensors, ...
    skipped.json                   image stores only, when some images could not be read

A store is identified by its *key* (store kind, CLIP identity, a fingerprint of the inputs, dtype). It is
reused only when the key and the store format match; otherwise it is rebuilt from scratch, never mixed.
The same inputs give the same bytes, so stores can be compared by checksum. Shards are written
to a temporary name and renamed, so a shard file that exists is complete; a build that is interrupted
resumes from the first missing shard (``building.json`` records the key it was started with).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tipcap import __version__
from tipcap.data.files import atomic_path, write_json_atomic
from tipcap.errors import TipcapError
from tipcap.progress import progress_bar

STORE_FORMAT = 2
META = "meta.json"
IDS = "ids.json"
BUILDING = "building.json"
_TENSOR = "embeddings"
_SHARD_METADATA = "tipcap_shard"


def fingerprint(rows: Sequence[Any]) -> str:
    """SHA-256 of a JSON-serialisable sequence, row by row (what was encoded, in order)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def shard_name(index: int, count: int) -> str:
    """``embeddings.safetensors`` for a single shard, else ``embeddings-00003-of-00010.safetensors``."""
    return f"{_TENSOR}.safetensors" if count == 1 else f"{_TENSOR}-{index:05d}-of-{count:05d}.safetensors"


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass
class Shard:
    """The encoded rows of one shard.

    Attributes:
        embeddings: ``[n, d]``, any float dtype (stored L2-normalised in fp16).
        ids: the id of each of the ``n`` rows.
        skipped: inputs of this shard that could not be encoded, as ``{"id", "path", "reason"}``.
        counts: event counts (e.g. truncated captions), summed over shards into ``meta.json``.
    """

    embeddings: torch.Tensor
    ids: list[Any]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


class EmbeddingStore:
    """A finished store, memory-mapped: ``shards`` are fp16 tensors ``[n_i, d]`` read lazily from disk."""

    def __init__(self, path: Path, meta: dict[str, Any], ids: list[Any], shards: list[torch.Tensor]):
        self.path = path
        self.meta = meta
        self.ids = ids
        self.shards = shards

    @classmethod
    def open(cls, path: str | Path) -> EmbeddingStore:
        """Open a finished store.

        Raises:
            TipcapError: when ``path`` holds no finished store or its files disagree with ``meta.json``.
        """
        path = Path(path)
        meta_path = path / META
        if not meta_path.is_file():
            hint = (
                " (an interrupted build: rerun the same command to finish it)"
                if (path / BUILDING).exists()
                else ""
            )
            raise TipcapError(f"{path}: not an embedding store, no {META}{hint}.")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != STORE_FORMAT:
            raise TipcapError(
                f"{path}: store format {meta.get('format')!r}, this tipcap reads {STORE_FORMAT}; rebuild it."
            )
        ids = json.loads((path / IDS).read_text(encoding="utf-8"))
        shards = []
        for name in meta["shards"]:
            with safe_open(path / name, framework="pt") as f:
                shards.append(f.get_tensor(_TENSOR))
        if len(ids) != meta["count"] or sum(len(s) for s in shards) != meta["count"]:
            raise TipcapError(f"{path}: ids, shards and {META} disagree on the row count; rebuild the store.")
        return cls(path, meta, ids, shards)

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def dim(self) -> int:
        """The embedding width ``d``."""
        return self.meta["dim"]

    @property
    def key(self) -> dict[str, Any]:
        return self.meta["key"]

    def embeddings(self) -> torch.Tensor:
        """All rows as one ``[N, d]`` fp16 tensor (a view for a single shard, a copy for several)."""
        return self.shards[0] if len(self.shards) == 1 else torch.cat(self.shards)

    def iter_chunks(self, rows: int) -> Iterator[torch.Tensor]:
        """Yield consecutive fp16 chunks of at most ``rows`` rows, without loading the whole store."""
        for shard in self.shards:
            yield from shard.split(rows)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The fp16 rows ``[len(rows), d]`` at the given indices, read shard by shard."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if len(self.shards) == 1:
            return self.shards[0][rows]
        out = torch.empty(len(rows), self.dim, dtype=torch.float16)
        start = 0
        for shard in self.shards:
            inside = (rows >= start) & (rows < start + len(shard))
            out[inside] = shard[rows[inside] - start]
            start += len(shard)
        return out

    def captions(self) -> list[str]:
        """The caption of each row (caption stores only)."""
        path = self.path / "captions.json"
        if not path.is_file():
            raise TipcapError(f"{self.path}: a {self.meta['key']['kind']} store has no captions.")
        return json.loads(path.read_text(encoding="utf-8"))


def _clear(out: Path) -> None:
    """Remove the files of any earlier store in ``out`` (and nothing else)."""
    for path in out.iterdir():
        name = path.name.removesuffix(".tmp")
        owned = name in (META, IDS, BUILDING, "captions.json", "skipped.json") or (
            name.startswith(_TENSOR) and name.endswith(".safetensors")
        )
        if owned and path.is_file():
            path.unlink()


def open_matching(out: str | Path, key: dict[str, Any]) -> EmbeddingStore | None:
    """The finished store in ``out`` if it was built with exactly this key, else ``None``."""
    meta_path = Path(out) / META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    # A store of an older format is rebuilt, like one of another key.
    matches = meta.get("key") == key and meta.get("format") == STORE_FORMAT
    return EmbeddingStore.open(out) if matches else None


def build_store(
    out: str | Path,
    key: dict[str, Any],
    num_rows: int,
    encode: Callable[[range, Callable[[int], object]], Shard],
    shard_size: int = 100_000,
    extra_files: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = True,
) -> EmbeddingStore:
    """Build the store in ``out``, resuming an interrupted build of the same key and plan.

    Whatever else ``out`` held as a store is removed first. Check :func:`open_matching` before
    calling this to reuse a finished store.

    Args:
        out: store directory (created).
        key: what identifies the store's content.
        num_rows: number of input rows; shard ``i`` encodes rows ``[i*shard_size, (i+1)*shard_size)``.
        encode: encodes a range of input rows into a :class:`Shard` (rows may be skipped), calling
            its second argument with the number of rows done as it goes (for the progress bar).
        extra_files: JSON documents written beside the embeddings when the build finishes.
        info: informational entries for ``meta.json`` (not part of the key).
        progress: show a progress bar over rows.

    Returns:
        The finished store.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TipcapError(f"--out {out}: exists and is not a directory.")
    out.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, -(-num_rows // shard_size))
    plan = {"format": STORE_FORMAT, "key": key, "num_rows": num_rows, "shard_size": shard_size}
    building = out / BUILDING
    resuming = building.is_file() and json.loads(building.read_text(encoding="utf-8")) == plan
    if not resuming:
        _clear(out)
        write_json_atomic(building, plan)
    digest = _key_digest(plan)

    bar = progress_bar(total=num_rows, unit="row", disable=not progress, desc=f"embedding {key['kind']}")
    for index in range(num_shards):
        rows = range(index * shard_size, min(num_rows, (index + 1) * shard_size))
        path = out / shard_name(index, num_shards)
        if resuming and _shard_digest(path) == digest:
            bar.update(len(rows))
        else:
            _write_shard(path, encode(rows, bar.update), digest)
    bar.close()

    ids: list[Any] = []
    skipped: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    dim = None
    for index in range(num_shards):
        with safe_open(out / shard_name(index, num_shards), framework="pt") as f:
            metadata = json.loads(f.metadata()[_SHARD_METADATA])
            dim = f.get_slice(_TENSOR).get_shape()[1]
        ids.extend(metadata["ids"])
        skipped.extend(metadata["skipped"])
        for name, count in metadata["counts"].items():
            counts[name] = counts.get(name, 0) + count
    for name, document in (extra_files or {}).items():
        write_json_atomic(out / name, document)
    if skipped:
        write_json_atomic(out / "skipped.json", skipped)
    write_json_atomic(out / IDS, ids)
    meta = {
        "format": STORE_FORMAT,
        "key": key,
        "count": len(ids),
        "dim": dim,
        "dtype": "float16",
        "normalized": True,
        "shards": [shard_name(i, num_shards) for i in range(num_shards)],
        "skipped": len(skipped),
        "counts": counts,
        "tipcap_version": __version__,
        **(info or {}),
    }
    write_json_atomic(out / META, meta)
    building.unlink()
    return EmbeddingStore.open(out)


def _shard_digest(path: Path) -> str | None:
    """The build digest recorded in a shard, or ``None`` when the shard is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            return json.loads(f.metadata()[_SHARD_METADATA])["build"]
    except Exception:  # a damaged shard, or one of an older format, is simply re-encoded
        return None


def _write_shard(path: Path, shard: Shard, digest: str) -> None:
    """Write one shard as fp16, L2-normalised rows, atomically."""
    embeddings = torch.nn.functional.normalize(shard.embeddings.float(), dim=-1).to(torch.float16)
    metadata = {"build": digest, "ids": shard.ids, "skipped": shard.skipped, "counts": shard.counts}
    # One metadata entry holding sorted JSON: safetensors writes several entries in no fixed order, and
    # the same rows must give the same bytes.
    document = json.dumps(metadata, sort_keys=True, ensure_ascii=False)
    with atomic_path(path) as tmp:
        save_file({_TENSOR: embeddings.contiguous()}, tmp, metadata={_SHARD_METADATA: document})
