"""webdataset tar shards (img2dataset's output) as a source of images and captions.

A source is one ``.tar`` file or a brace pattern of them (``cc3m/{00000..00331}.tar``), expanded with
``braceexpand`` in pattern order. Each sample is the group of members sharing a key (``000000012.jpg``,
``000000012.txt``, ``000000012.json``); the key (webdataset's ``__key__``) is the row's id, so an image store
and a caption store built from the same shards pair row for row. Members are read with webdataset's tar
iteration. A shard that is missing, truncated or unreadable is refused with ``strict``; otherwise it is
skipped whole (none of its samples is kept, so the rows do not depend on where it breaks) and listed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_expander

from tipcap.data.captions import Caption, CaptionCorpus, PeriodPolicy, normalize_caption
from tipcap.data.images import ImageBytes
from tipcap.errors import TipcapError

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
"""The image members a sample may hold, in the order they are looked for."""

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_shard_source(source: str | Path) -> bool:
    """Whether ``source`` names webdataset shards: a ``.tar`` file or a brace pattern ending in ``.tar``."""
    return str(source).endswith(".tar")


def expand_shards(pattern: str | Path) -> list[Path]:
    """The shard files of a brace pattern, in pattern order."""
    return [Path(name) for name in braceexpand(str(pattern))]


class ShardError(TipcapError):
    """A shard that is missing, truncated or unreadable."""


def read_shard(path: Path, take: Callable[[dict[str, Any]], T]) -> list[T]:
    """``take`` of every sample of one shard, in tar order.

    A sample is webdataset's dict: ``__key__``, ``__url__`` and one entry of bytes per member suffix
    (lower case). Only what ``take`` returns is kept, so a listing need not hold the images.

    Raises:
        ShardError: naming the shard, when it is missing, truncated or not a tar file.
    """
    if not path.is_file():
        raise ShardError(f"{path}: no such shard")
    errors: list[Exception] = []

    def stop(exn: Exception) -> bool:  # webdataset's handler: record the failure, stop reading the shard
        errors.append(exn)
        return False

    try:
        with path.open("rb") as stream:
            members = tar_file_expander([{"url": str(path), "stream": stream}], handler=stop)
            taken = [take(sample) for sample in group_by_keys(members, handler=stop)]
    except OSError as e:  # opening or reading the file itself (webdataset's handler sees the tar's errors)
        errors.append(e)
    if errors:
        first = errors[0]
        if isinstance(first, OSError) and first.strerror:
            reason = first.strerror
        else:  # webdataset appends " @ <stream>" to the message
            reason = str(first.args[0]).partition(" @ ")[0] if first.args else type(first).__name__
        raise ShardError(f"{path}: truncated or unreadable shard ({reason})")
    return taken


@dataclass
class ShardListing:
    """What a set of shards holds.

    Attributes:
        shards: the readable shards, in pattern order.
        rows: per kept sample ``(key, index into shards, member)``: the image's suffix (images) or the
            normalised caption (captions).
        skipped: the shards that could not be read and the samples without an image or caption, as
            ``{"id", "path", "reason"}`` (``id`` is ``None`` for a shard).
    """

    shards: list[Path]
    rows: list[tuple[str, int, str]]
    skipped: list[dict[str, Any]]


def _list(
    pattern: str | Path, take: Callable[[dict[str, Any]], tuple[str, str | None, str]], strict: bool
) -> ShardListing:
    """Read every shard of ``pattern``; ``take`` gives a sample's key, member (``None``: skip) and the
    reason it is skipped."""
    paths = expand_shards(pattern)
    listing = ShardListing([], [], [])
    for path in paths:
        try:
            samples = read_shard(path, take)
        except ShardError as e:
            if strict:
                raise ShardError(f"{e}; replace it, or drop --strict to skip it.") from None
            log.warning("%s; skipped, and listed in the store's skipped.json.", e)
            listing.skipped.append({"id": None, "path": str(path), "reason": str(e)})
            continue
        listing.shards.append(path)
        for key, member, reason in samples:
            if member is None:
                if strict:
                    raise TipcapError(f"{path}: sample {key!r}: {reason} (drop --strict to skip it).")
                listing.skipped.append({"id": key, "path": str(path), "reason": reason})
            else:
                listing.rows.append((key, len(listing.shards) - 1, member))
    if not listing.rows:
        raise TipcapError(f"{pattern}: no samples could be read from its {len(paths):,} shard(s).")
    return listing


def list_shard_images(pattern: str | Path, strict: bool = False) -> ShardListing:
    """The samples of ``pattern`` that hold an image (:data:`IMAGE_MEMBERS`); each row's member is the
    image's suffix. Keys must be unique across the shards (they are the store's ids).

    Raises:
        TipcapError: a bad shard or a sample without an image when ``strict``; a key seen twice.
    """

    def take(sample: dict[str, Any]) -> tuple[str, str | None, str]:
        suffix = next((s for s in IMAGE_MEMBERS if s in sample), None)
        return sample["__key__"], suffix, f"no {'/'.join(IMAGE_MEMBERS)} member"

    listing = _list(pattern, take, strict)
    seen: dict[str, int] = {}
    for key, shard, _ in listing.rows:
        if key in seen:
            raise TipcapError(
                f"{pattern}: sample key {key!r} is in {listing.shards[seen[key]]} and in "
                f"{listing.shards[shard]}; keys must be unique across the shards (they are the store's ids)."
            )
        seen[key] = shard
    return listing


def read_shard_captions(
    pattern: str | Path, caption_key: str | None = None, period: PeriodPolicy = "add", strict: bool = False
) -> tuple[CaptionCorpus, list[dict[str, Any]]]:
    """The captions of ``pattern``, one per sample, normalised as a corpus's are, and what was skipped.

    Args:
        pattern: a shard or a brace pattern of shards.
        caption_key: read the caption from this key of the sample's ``.json`` member; ``None`` reads the
            ``.txt`` member.
        period: trailing-period policy (:func:`tipcap.data.normalize_caption`).
        strict: refuse a bad shard, a sample without a caption, or an empty caption.
    """
    member = "txt" if caption_key is None else "json"

    def take(sample: dict[str, Any]) -> tuple[str, str | None, str]:
        key, data = sample["__key__"], sample.get(member)
        if data is None:
            return key, None, f"no .{member} member"
        try:
            text = data.decode("utf-8")
            if caption_key is not None:
                document = json.loads(text)
                text = document.get(caption_key) if isinstance(document, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return key, None, f".{member} member unreadable ({e})"
        if not isinstance(text, str):
            return key, None, f".json member has no string {caption_key!r}"
        return key, normalize_caption(text, period), ""

    listing = _list(pattern, take, strict)
    captions = [Caption(key, text) for key, _, text in listing.rows if text]
    empty = len(listing.rows) - len(captions)
    if empty and strict:
        first = next(key for key, _, text in listing.rows if not text)
        raise TipcapError(f"{pattern}: sample {first!r} has an empty caption (drop --strict to skip it).")
    if not captions:
        raise TipcapError(f"{pattern}: no captions.")
    corpus = CaptionCorpus(Path(str(pattern)), "webdataset", None, period, captions, empty)
    return corpus, listing.skipped


def shard_images(listing: ShardListing, rows: range) -> Iterator[ImageBytes]:
    """The image bytes of ``listing.rows[rows]``, in row order, reading only the shards they lie in.

    Raises:
        ShardError: a shard that has become unreadable, or lost a sample, since it was listed.
    """
    wanted = listing.rows[rows.start : rows.stop]
    for shard in sorted({shard for _, shard, _ in wanted}):
        path = listing.shards[shard]
        members = {key: suffix for key, s, suffix in wanted if s == shard}

        def take(sample: dict[str, Any], members: dict[str, str] = members) -> tuple[str, bytes | None]:
            suffix = members.get(sample["__key__"])
            return sample["__key__"], None if suffix is None else sample[suffix]

        found = {key: data for key, data in read_shard(path, take) if data is not None}
        for key, suffix in members.items():
            if key not in found:
                raise ShardError(f"{path}: sample {key!r} has gone since the shards were listed; rerun")
            yield ImageBytes(f"{path}:{key}.{suffix}", found[key])
