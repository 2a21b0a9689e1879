"""Reading JSON, JSONL and text files (optionally gzip-compressed) with errors that name the place; writing
files whole (a temporary name, renamed); holding a folder against other processes (a lock file).

The ground floor of the package: it imports nothing of tipcap but its errors, so that every module,
the lightest included, can read and write files through it without import cycles.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import gzip
import hashlib
import json
import math
import os
import re
import secrets
import socket
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from tipcap.errors import TipcapError


def open_text(path: Path) -> IO[str]:
    """Open a UTF-8 text file for reading (a byte-order mark is dropped); ``.gz`` is decompressed."""
    if not path.exists():
        raise TipcapError(f"{path}: no such file.")
    if path.is_dir():
        raise TipcapError(f"{path}: is a directory, expected a file.")
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return path.open("r", encoding="utf-8-sig")


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Turn decoding failures (not UTF-8, broken gzip) into one message naming the file."""
    try:
        yield
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise TipcapError(f"{path}: cannot be read as UTF-8 text ({e}).") from None


def load_json(path: Path) -> Any:
    """Parse a whole JSON (or JSON.gz) file; a syntax error names the file, line and column."""
    try:
        with _readable(path), open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TipcapError(
            f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg}); "
            "the file may be truncated or not JSON at all."
        ) from None


def read_lines(path: Path) -> list[str]:
    """All lines of a text file, without line ends."""
    with _readable(path), open_text(path) as f:
        return f.read().splitlines()


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file (1-based numbers)."""
    with _readable(path), open_text(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise TipcapError(
                    f"{path}: line {number} is not valid JSON at column {e.colno} ({e.msg})."
                ) from None


_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files of ``path`` left by writers on this host that were killed mid-write."""
    for candidate in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
        pid, _, rest = candidate.name[len(path.name) + 1 : -len(".tmp")].partition("-")
        host = rest.partition("-")[0]
        if pid.isdigit() and host == _HOST and not _alive(int(pid)):
            candidate.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to, renamed to ``path`` when the block succeeds.

    Readers never see a half-written file; a failed write leaves no temporary file behind. Each call gets
    its own name (``<name>.<pid>-<host>-<random>.tmp``, created exclusively), so concurrent writers of one
    file never write into each other's temporary file: the last rename wins, whole. The process id and a
    hash of the host name let a later write of the same file delete what a killed writer left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{_HOST}-{secrets.token_hex(6)}.tmp")
    tmp.touch(exist_ok=False)  # O_EXCL, with the permissions the final file should get
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive_lock(lock: Path, busy: Callable[[], None]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``lock`` (created if need be) for the block.

    When another process holds it, ``busy`` is called: it raises to refuse, or returns to wait for the
    holder. The lock is the kernel's and dies with its process, so a killed holder leaves at most the file,
    which the next taker reuses. The holder deletes the file before it lets go, so that nothing is left
    behind; a waiter that then holds the lock of the deleted file takes the current one instead.
    """
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                busy()
            except BaseException:
                os.close(fd)
                raise
            fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file through :func:`atomic_path`.

    safetensors reports a failed write (a full disk, a read-only folder) as its own error type with the
    errno in the text; it is raised as the ``OSError`` it is, naming ``path``, so that the command line
    reports it as one line like any other.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:
            code = re.search(r"\(os error (\d+)\)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def _finite(value: Any) -> Any:
    """A copy of a JSON document with NaN and infinities as ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json_atomic(path: Path, document: Any, indent: int | None = 1) -> None:
    """Write JSON through :func:`atomic_path` (never a half-written file), a non-finite number (a metric that
    could not run) as null: strict JSON has no NaN, and other readers refuse it.

    ``indent=None`` writes compact JSON, for large documents.
    """
    separators = (",", ":") if indent is None else None

    def dump(data: Any, tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=indent, separators=separators, allow_nan=False)

    with atomic_path(path) as tmp:
        try:
            dump(document, tmp)
        except ValueError:
            # allow_nan=False met a non-finite number: written again from a copy with null in its place (a
            # copy every time would slow the large documents, which have none).
            dump(_finite(document), tmp)


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text``, if any: a code point UTF-8 cannot write, which JSON's
    ``\\ud800`` escapes and bytes that are not UTF-8 (on the command line) put into Python strings."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return text[e.start]
    return None
