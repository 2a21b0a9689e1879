"""Embedding stores: L2-normalised fp16 CLIP embeddings on disk, with the ids they were built from.

A store is a directory::

    meta.json                      what was encoded, by which CLIP, and the size and SHA-256 of every
                                   other file (the commit point)
    ids.json                       one image id per row (a caption store: the captioned image's id)
    captions.json                  caption stores only: the normalised caption of each row
    embeddings.safetensors         [N, d] float16, or shards embeddings-00000-of-00004.safetensors, ...
    skipped.json                   when some inputs could not be read (images; webdataset shards)
    provenance.json                the store's provenance record (:mod:`tipcap.provenance`)

A store is identified by its *key*, the key of its provenance record: the store kind, the CLIP's identity,
the encoder's resolved precision, device type and batch size, and a fingerprint of the rows encoded. It is
reused only when the key and the store format match and its files have the sizes and checksums ``meta.json``
records (opening a store checks the sizes only); otherwise it is rebuilt from scratch, never mixed. The
same inputs give the same bytes, so stores can be compared by checksum. Shards are written to a temporary
name and renamed, so a shard file that exists is complete; a build that is interrupted resumes from the
first missing shard (``building.json`` records the key it was started with). One build at a time holds the
folder's ``build.lock``: a second writer waits, then reuses the store if it has the key it wanted, or
rebuilds it. Under torchrun, rank r of N encodes the shards i with i % N == r and rank 0 (which holds the
lock) writes the index once every rank is done, so the store has the bytes one process would write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tipcap import __version__, provenance
from tipcap.errors import TipcapError
from tipcap.io import exclusive_lock, save_safetensors, write_json_atomic
from tipcap.progress import progress_bar
from tipcap.provenance import sha256_json
from tipcap.ranks import ONE_PROCESS, Ranks

STORE_FORMAT = 3
META = "meta.json"
IDS = "ids.json"
BUILDING = "building.json"
LOCK = "build.lock"
_OWNED = (META, IDS, BUILDING, "captions.json", "skipped.json", provenance.FILE_NAME)
_TENSOR = "embeddings"
_SHARD_METADATA = "tipcap_shard"

log = logging.getLogger(__name__)


_BUILD_ARGUMENTS = {
    "texts": "--corpus CAPTIONS --clip MODEL --pretrained TAG",
    "images": "--images IMAGES --clip MODEL --pretrained TAG",
}


def build_command(path: str | Path, content: str | None) -> str:
    """The ``tipcap embed`` command that builds a store of ``content`` (``texts``, ``images``) at ``path``,
    with placeholders for its inputs."""
    if content not in _BUILD_ARGUMENTS:
        return f"`tipcap embed texts` or `tipcap embed images` (--out {path})"
    return f"`tipcap embed {content} {_BUILD_ARGUMENTS[content]} --out {path}`"


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
    def open(cls, path: str | Path, name: str | None = None, content: str | None = None) -> EmbeddingStore:
        """Open a finished store.

        Args:
            path: the store's folder.
            name: the flag or config key that gave ``path`` (``--texts``, ``data.train_texts``), named in
                the messages.
            content: ``texts`` or ``images``, what the store should hold: a missing store's message gives
                the command that builds it.

        Raises:
            TipcapError: when ``path`` holds no finished store, one of another format, or a damaged one (a
                file missing, of another size than ``meta.json`` records, or unreadable).
        """
        path = Path(path)
        if not (path / META).is_file():
            where = f"{name} {path}" if name else str(path)
            if (path / BUILDING).exists():
                raise TipcapError(
                    f"{where}: an interrupted build of an embedding store (no {META} yet); rerun the command "
                    "that began it to finish it."
                )
            what = "no such folder" if not path.exists() else f"not an embedding store (no {META})"
            raise TipcapError(f"{where}: {what}; build the store with {build_command(path, content)}.")
        try:
            meta = _read_json(path / META)
            if meta.get("format") != STORE_FORMAT:
                found = meta.get("format")
                raise TipcapError(
                    f"{path}: store format {found!r}, this tipcap reads {STORE_FORMAT}; rebuild it."
                )
            for name, record in meta["files"].items():
                if not (path / name).is_file():
                    raise ValueError(f"{name} is missing")
                if (path / name).stat().st_size != record["bytes"]:
                    raise ValueError(f"{name} is not the size {META} records")
            ids = _read_json(path / IDS)
            shards = []
            for name in meta["shards"]:
                with safe_open(path / name, framework="pt") as f:
                    shards.append(f.get_tensor(_TENSOR))
            if len(ids) != meta["count"] or sum(len(s) for s in shards) != meta["count"]:
                raise ValueError(f"ids, shards and {META} disagree on the row count")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as e:
            raise TipcapError(
                f"{path}: damaged embedding store ({e}); rebuild it: delete the folder, or rerun "
                "'tipcap embed' with this --out."
            ) from None
        return cls(path, meta, ids, shards)

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def dim(self) -> int:
        """The embedding width ``d``."""
        return self.meta["dim"]

    @property
    def key(self) -> dict[str, Any]:
        """What determines the store's content: the key of its provenance record."""
        return self.meta["key"]

    @property
    def kind(self) -> str:
        """``texts`` (a caption store) or ``images``."""
        return "texts" if self.key["artifact"] == "text-store" else "images"

    @property
    def clip(self) -> dict[str, Any]:
        """The identity of the CLIP that made the store (:meth:`tipcap.clip.ClipSpec.identity`)."""
        return self.key["config"]["clip"]

    @property
    def digest(self) -> str:
        """A content hash of the store: the digest of its key, which determines its content."""
        return sha256_json(self.key)

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

    def check_finite(self, what: str) -> None:
        """Refuse a store holding NaN or infinite values (damaged on disk, or written before builds checked).

        Raises:
            TipcapError: naming ``what`` (e.g. ``--texts <path>``) and the first such row.
        """
        start = 0
        for chunk in self.iter_chunks(65536):
            bad = (~torch.isfinite(chunk)).any(dim=1).nonzero()
            if len(bad):
                row = start + int(bad[0])
                raise TipcapError(
                    f"{what}: row {row} (id {self.ids[row]!r}) holds NaN or infinite values; rebuild the "
                    "store (delete it and rerun 'tipcap embed')."
                )
            start += len(chunk)

    def captions(self) -> list[str]:
        """The caption of each row (caption stores only)."""
        path = self.path / "captions.json"
        if not path.is_file():
            raise TipcapError(f"{self.path}: a {self.kind} store has no captions.")
        try:
            captions = _read_json(path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise TipcapError(f"{path}: {e}; rebuild the store (delete it, rerun 'tipcap embed').") from None
        if (
            not isinstance(captions, list)
            or len(captions) != len(self)
            or not all(isinstance(c, str) for c in captions)
        ):
            raise TipcapError(
                f"{path}: does not hold one caption per row of the store ({len(self)}); rebuild the store "
                "(delete it and rerun 'tipcap embed')."
            )
        return captions


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise ValueError(f"{path.name} is not valid JSON") from None


def _owned(name: str) -> bool:
    """Whether ``name`` is a file a build writes, or a temporary file of one (``<name>[.<random>].tmp``)."""
    base = name.removesuffix(".tmp")
    names = {name} if base == name else {base, base.rpartition(".")[0]}
    return any(n in _OWNED or (n.startswith(_TENSOR) and n.endswith(".safetensors")) for n in names)


def _clear(out: Path, temporary_only: bool) -> None:
    """Remove the files of an earlier store in ``out`` (and nothing else), or only the temporary files that
    a killed writer left (safe under the build lock: no other writer is at work)."""
    for path in out.iterdir():
        if path.is_file() and _owned(path.name) and (path.name.endswith(".tmp") or not temporary_only):
            path.unlink()


def open_matching(
    out: str | Path, key: dict[str, Any]
) -> tuple[EmbeddingStore | None, dict[str, Any] | None]:
    """The finished store in ``out`` if it was built with exactly this key and is whole, else ``None``; and
    the key of the finished store found there (``None`` when there is none), to say why it is rebuilt.

    A store of another key or an older format, and a damaged one, are rebuilt rather than refused.
    """
    try:
        meta = _read_json(Path(out) / META)
    except (OSError, ValueError):
        return None, None
    if not isinstance(meta, dict):
        return None, None
    previous = meta.get("key") if isinstance(meta.get("key"), dict) else None
    if meta.get("key") != key or meta.get("format") != STORE_FORMAT:
        return None, previous
    try:
        store = EmbeddingStore.open(out)
    except TipcapError:
        return None, previous
    # Opening checks sizes only; what is reused must also have the bytes it was written with (a bit flip
    # or a NaN written over a row keeps the size).
    for name, record in store.meta["files"].items():
        if _file_record(Path(out) / name)["sha256"] != record.get("sha256"):
            log.warning("%s: %s does not match the checksum in %s; rebuilding the store.", out, name, META)
            return None, previous
    return store, previous


def _locked(out: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the exclusive build lock of the store folder ``out``; a second writer waits here for the first
    (:func:`~tipcap.io.exclusive_lock`: a finished store holds no lock file)."""

    def busy() -> None:
        log.warning("%s: another tipcap is building this store; waiting for it to finish.", out)

    return exclusive_lock(out / LOCK, busy)


def build_store(
    out: str | Path,
    record: dict[str, Any],
    num_rows: int,
    encode: Callable[[range, Callable[[int], object]], Shard],
    shard_size: int = 100_000,
    extra_files: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    skipped: Sequence[dict[str, Any]] = (),
    ranks: Ranks = ONE_PROCESS,
) -> EmbeddingStore:
    """Build the store in ``out``, resuming an interrupted build of the same key and plan.

    Whatever else ``out`` held as a store is removed first, except a whole store of this key, which is
    returned as it is (another writer may have built it while this one waited for the folder's lock).
    Check :func:`open_matching` first to reuse a finished store without taking the lock.

    Args:
        out: store directory (created).
        record: the store's provenance record (:mod:`tipcap.provenance`), written to
            ``provenance.json``; its key identifies the store's content.
        num_rows: number of input rows; shard ``i`` encodes rows ``[i*shard_size, (i+1)*shard_size)``.
        encode: encodes a range of input rows into a :class:`Shard` (rows may be skipped), calling
            its second argument with the number of rows done as it goes (for the progress bar).
        extra_files: JSON documents written beside the embeddings when the build finishes.
        info: informational entries for ``meta.json`` (not part of the key).
        progress: show a progress bar over rows.
        skipped: inputs dropped before encoding (e.g. unreadable webdataset shards), listed first in
            ``skipped.json``.
        ranks: the processes building this store together; every rank calls this function.

    Returns:
        The finished store.

    Raises:
        TipcapError: when no row could be encoded (``skipped.json`` lists why); the store stays unfinished.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TipcapError(f"--out {out}: exists and is not a directory.")
    out.mkdir(parents=True, exist_ok=True)
    key = provenance.key(record)
    with _locked(out) if ranks.main else contextlib.nullcontext():
        existing = open_matching(out, key)[0] if ranks.main else None
        if ranks.agree(existing is not None):
            return existing if existing is not None else EmbeddingStore.open(out)
        files = {**(extra_files or {}), provenance.FILE_NAME: record}
        return _build(out, key, num_rows, encode, shard_size, files, info or {}, progress, skipped, ranks)


def _build(
    out: Path,
    key: dict[str, Any],
    num_rows: int,
    encode: Callable[[range, Callable[[int], object]], Shard],
    shard_size: int,
    extra_files: dict[str, Any],
    info: dict[str, Any],
    progress: bool,
    dropped: Sequence[dict[str, Any]],
    ranks: Ranks,
) -> EmbeddingStore:
    """:func:`build_store`, under the folder's lock (held by rank 0)."""
    num_shards = max(1, -(-num_rows // shard_size))
    plan = {"format": STORE_FORMAT, "key": key, "num_rows": num_rows, "shard_size": shard_size}
    building = out / BUILDING
    resuming = False
    if ranks.main:
        try:
            resuming = _read_json(building) == plan
        except (OSError, ValueError):  # none, or damaged: start afresh
            resuming = False
        _clear(out, temporary_only=resuming)
        if not resuming:
            write_json_atomic(building, plan)
    # The other ranks start once rank 0 has cleared what an earlier build left.
    resuming = ranks.agree(resuming)
    digest = sha256_json(plan)

    shard_rows = [range(i * shard_size, min(num_rows, (i + 1) * shard_size)) for i in range(num_shards)]
    bar = progress_bar(total=sum(len(shard_rows[i]) for i in range(ranks.rank, num_shards, ranks.world)),
                       unit="row", disable=not progress, desc=f"embedding {key['artifact']}")  # fmt: skip
    for index in range(ranks.rank, num_shards, ranks.world):
        path = out / shard_name(index, num_shards)
        if resuming and _shard_digest(path) == digest:
            bar.update(len(shard_rows[index]))
        else:
            _write_shard(path, encode(shard_rows[index], bar.update), digest)
    bar.close()
    ranks.barrier()
    if not ranks.main:
        ranks.barrier()  # while rank 0 writes the index
        return EmbeddingStore.open(out)

    ids: list[Any] = []
    skipped: list[dict[str, Any]] = list(dropped)
    counts: dict[str, int] = {}
    dim = None
    shards = [shard_name(i, num_shards) for i in range(num_shards)]
    for name in shards:
        with safe_open(out / name, framework="pt") as f:
            metadata = json.loads(f.metadata()[_SHARD_METADATA])
            dim = f.get_slice(_TENSOR).get_shape()[1]
        ids.extend(metadata["ids"])
        skipped.extend(metadata["skipped"])
        for event, count in metadata["counts"].items():
            counts[event] = counts.get(event, 0) + count
    if skipped:
        write_json_atomic(out / "skipped.json", skipped)
    if not ids:
        # No meta.json: an empty store would be reused as a success by the next run.
        reasons = f"; {out / 'skipped.json'} says why" if skipped else ""
        raise TipcapError(f"{out}: none of the {num_rows:,} inputs could be encoded{reasons}.")
    for name, document in extra_files.items():
        write_json_atomic(out / name, document)
    write_json_atomic(out / IDS, ids)
    names = [IDS, *extra_files, *(["skipped.json"] if skipped else []), *shards]
    meta = {
        "format": STORE_FORMAT,
        "key": key,
        "count": len(ids),
        "dim": dim,
        "dtype": "float16",
        "normalized": True,
        "shards": shards,
        "skipped": len(skipped),
        "counts": counts,
        "tipcap_version": __version__,
        "files": {name: _file_record(out / name) for name in sorted(names)},
        **info,
    }
    write_json_atomic(out / META, meta)
    building.unlink()
    ranks.barrier()
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


def _file_record(path: Path) -> dict[str, Any]:
    """The size (checked on every open) and SHA-256 (checked before a store is reused) of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _write_shard(path: Path, shard: Shard, digest: str) -> None:
    """Write one shard as fp16, L2-normalised rows, atomically; refuse NaN or infinite rows."""
    embeddings = torch.nn.functional.normalize(shard.embeddings.float(), dim=-1).to(torch.float16)
    bad = (~torch.isfinite(embeddings)).any(dim=1).nonzero()
    if len(bad):
        raise TipcapError(
            f"{path.parent}: the encoder gave NaN or infinite values for id {shard.ids[int(bad[0])]!r}; "
            "try --precision fp32."
        )
    metadata = {"build": digest, "ids": shard.ids, "skipped": shard.skipped, "counts": shard.counts}
    # One metadata entry holding sorted JSON: safetensors writes several entries in no fixed order, and
    # the same rows must give the same bytes.
    document = json.dumps(metadata, sort_keys=True, ensure_ascii=False)
    save_safetensors({_TENSOR: embeddings.contiguous()}, path, metadata={_SHARD_METADATA: document})
