"""Building embedding stores from corpora and image sets with a CLIP encoder.

Reusing a finished store costs only reading the inputs and hashing them: the CLIP is loaded only when
the store has to be built, and before anything is written, so a CLIP that cannot be loaded leaves the
output untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tipcap import provenance
from tipcap.clip import ENCODER_VERSION, ClipEncoder, ClipSpec, resolve_device, resolve_precision
from tipcap.clip_images import image_batches
from tipcap.config import EmbedConfig
from tipcap.data import ImageRef, list_images, read_captions, subsample
from tipcap.data.captions import CaptionCorpus, PeriodPolicy
from tipcap.data.images import ImageBytes
from tipcap.data.shards import (
    ShardListing,
    is_shard_source,
    list_shard_images,
    read_shard_captions,
    shard_images,
)
from tipcap.errors import TipcapError
from tipcap.ranks import ONE_PROCESS, Ranks
from tipcap.store import EmbeddingStore, Shard, build_store, fingerprint, open_matching

logger = logging.getLogger(__name__)

IMAGE_BATCH_SIZE = 64


@dataclass
class EmbedReport:
    """What an embedding run produced."""

    store: EmbeddingStore
    reused: bool
    seconds: float
    empty_skipped: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # images: seconds waiting for decoding, in CLIP

    def summary(self) -> str:
        """One line for the user: rows, width, shards, skips, where, how long."""
        meta = self.store.meta
        kind = "caption" if self.store.kind == "texts" else "image"
        what = f"{meta['count']:,} {kind} embeddings (d={meta['dim']}, {len(meta['shards'])} shard(s))"
        if self.reused:
            return (
                f"reused {self.store.path}: {what} built earlier from the same inputs, CLIP and precision "
                f"({self.seconds:.1f} s)"
            )
        notes = []
        if kind == "caption":
            notes.append(f"{self.empty_skipped} empty captions skipped")
            notes.append(f"{meta['counts'].get('truncated', 0)} truncated to the CLIP context")
        else:
            notes.append(f"{meta['skipped']} unreadable images skipped")
            if meta["skipped"]:
                notes.append(f"list in {self.store.path / 'skipped.json'}")
        return f"wrote {what} to {self.store.path} in {self.seconds:.1f} s; " + "; ".join(notes)


def _record(artifact: str, config: EmbedConfig, device: str | None, rows: list[list[Any]]) -> dict[str, Any]:
    """The store's provenance record: its key holds the CLIP, the encoder's version, the resolved precision
    and device type (a GPU-fp16 store is not a CPU-fp32 one), the batch size, and a fingerprint of the rows
    encoded."""
    torch_device = resolve_device(device)
    settings = {
        "clip": clip_spec(config).identity(),
        "encoder": ENCODER_VERSION,
        "precision": resolve_precision(config.precision, torch_device),
        "device": torch_device.type,
        "batch_size": config.batch_size,
    }
    # No command: stores are shared by every command that asks for the same key, and equal stores must be
    # equal byte for byte.
    return provenance.record(artifact, settings, {"rows": fingerprint(rows)}, command=[])


def _caption_rows(
    corpus: str | Path, split: str | None, period: PeriodPolicy, strict: bool, caption_key: str | None
) -> tuple[CaptionCorpus, list[list[Any]], list[dict[str, Any]]]:
    """A corpus's captions, the rows a text store encodes (``[image id, caption]``) and what was skipped
    before encoding (unreadable webdataset shards, samples without a caption)."""
    if is_shard_source(corpus):
        if split is not None:
            raise TipcapError(f"--split applies to Karpathy split files only; {corpus} names shards.")
        captions, skipped = read_shard_captions(corpus, caption_key, period, strict)
    else:
        if caption_key is not None:
            raise TipcapError(f"--caption-key applies to webdataset shards (.tar) only, not to {corpus}.")
        captions, skipped = read_captions(corpus, split=split, period=period, strict=strict), []
    return captions, [[c.image_id, c.text] for c in captions.captions], skipped


def _image_rows(
    source: str | Path,
    image_root: str | Path | None,
    allow_outside: bool,
    split: str | None,
    limit: str | None,
    seed: int,
    strict: bool = False,
) -> tuple[list[ImageRef] | ShardListing, list[list[Any]], list[dict[str, Any]]]:
    """The images an image store encodes, its rows (``[image id, path, size]``; for webdataset shards
    ``[key, shard, shard's size]``) and what was skipped before encoding (unreadable shards)."""
    if is_shard_source(source):
        for flag, value in (("--split", split), ("--limit", limit), ("--image-root", image_root)):
            if value is not None:
                raise TipcapError(f"{flag} applies to image folders and files, not to the shards {source}.")
        listing = list_shard_images(source, strict)
        sizes = [shard.stat().st_size for shard in listing.shards]
        names = [str(shard.resolve()) for shard in listing.shards]
        return listing, [[key, names[shard], sizes[shard]] for key, shard, _ in listing.rows], listing.skipped
    listed = list_images(source, image_root=image_root, split=split, allow_outside=allow_outside)
    images = subsample(listed, limit, seed)
    # Path and size identify the files without reading them; a changed file set rebuilds the store.
    rows = [
        [ref.image_id, str(ref.path.resolve()), ref.path.stat().st_size if ref.path.is_file() else -1]
        for ref in images
    ]
    return images, rows, []


def text_store_key(
    corpus: str | Path,
    config: EmbedConfig,
    *,
    split: str | None = None,
    period: PeriodPolicy = "add",
    strict: bool = False,
    device: str | None = None,
    caption_key: str | None = None,
) -> dict[str, Any]:
    """The provenance key of the store :func:`embed_texts` makes with these arguments (nothing encoded)."""
    _, rows, _ = _caption_rows(corpus, split, period, strict, caption_key)
    return provenance.key(_record("text-store", config, device, rows))


def image_store_key(
    source: str | Path,
    config: EmbedConfig,
    *,
    image_root: str | Path | None = None,
    allow_outside: bool = False,
    split: str | None = None,
    limit: str | None = None,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """The provenance key of the store :func:`embed_images` makes with these arguments (nothing encoded)."""
    _, rows, _ = _image_rows(source, image_root, allow_outside, split, limit, seed)
    return provenance.key(_record("image-store", config, device, rows))


def _reuse_or_rebuild(out: str | Path, record: dict[str, Any], ranks: Ranks) -> EmbeddingStore | None:
    """The finished store in ``out`` when its key is ``record``'s; else ``None``, saying why it rebuilds.
    Rank 0 decides for every rank."""
    existing, previous = open_matching(out, provenance.key(record)) if ranks.main else (None, None)
    if existing is None and previous is not None:
        changed = [k for k in record["config"] if previous.get("config", {}).get(k) != record["config"][k]]
        if previous.get("inputs") != record["inputs"]:
            changed.append("inputs")
        logger.warning("%s was built with other %s; rebuilding it.", out, ", ".join(changed) or "settings")
    if ranks.agree(existing is not None):
        return existing if existing is not None else EmbeddingStore.open(out)
    return None


def _rank_device(device: str | None, ranks: Ranks) -> str | None:
    """``device``; by default, under torchrun with GPUs, the GPU of this rank's local rank."""
    if device is None and ranks.world > 1 and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return device


def clip_spec(config: EmbedConfig) -> ClipSpec:
    """The CLIP an embedding config names."""
    return ClipSpec(config.model, config.pretrained, config.init_seed)


def embed_texts(
    corpus: str | Path,
    config: EmbedConfig,
    out: str | Path,
    *,
    split: str | None = None,
    period: PeriodPolicy = "add",
    strict: bool = False,
    shard_size: int = 100_000,
    device: str | None = None,
    progress: bool = True,
    caption_key: str | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> EmbedReport:
    """Embed the captions of a corpus file, or of webdataset shards, into a store at ``out`` (reused when
    already built alike).

    Each row's id is the id of the image its caption describes (a shard sample's key); ``captions.json``
    keeps the text. Shards' captions are their ``.txt`` members, or the ``caption_key`` of their
    ``.json`` members. Under torchrun every rank calls this with its ``ranks``.
    """
    start = time.perf_counter()
    device = _rank_device(device, ranks)
    captions, rows, skipped = _caption_rows(corpus, split, period, strict, caption_key)
    record = _record("text-store", config, device, rows)
    existing = _reuse_or_rebuild(out, record, ranks)
    if existing is not None:
        return EmbedReport(existing, True, time.perf_counter() - start, captions.empty_skipped)
    clip = clip_spec(config)
    encoder = ClipEncoder.load(clip, device=device, precision=config.precision)
    batch_size = config.batch_size

    def encode(indices: range, advance: Callable[[int], object]) -> Shard:
        texts = [rows[i][1] for i in indices]
        result = encoder.encode_texts(texts, batch_size=batch_size, on_batch=advance)
        return Shard(result.embeddings, [rows[i][0] for i in indices], counts={"truncated": result.truncated})

    info = {
        "clip_spec": clip.to_dict(),
        "source": {
            "corpus": str(Path(corpus).resolve()),
            "format": captions.format,
            "split": split,
            "period": period,
            "empty_skipped": captions.empty_skipped,
            **({"caption_key": caption_key} if caption_key is not None else {}),
        },
    }
    store = build_store(
        out,
        record,
        len(rows),
        encode,
        shard_size=shard_size,
        extra_files={"captions.json": [text for _, text in rows]},
        info=info,
        progress=progress,
        skipped=skipped,
        ranks=ranks,
    )
    return EmbedReport(store, False, time.perf_counter() - start, captions.empty_skipped)


def embed_images(
    source: str | Path,
    config: EmbedConfig,
    out: str | Path,
    *,
    image_root: str | Path | None = None,
    allow_outside: bool = False,
    split: str | None = None,
    limit: str | None = None,
    seed: int = 0,
    strict: bool = False,
    workers: int | None = None,
    shard_size: int = 50_000,
    device: str | None = None,
    progress: bool = True,
    ranks: Ranks = ONE_PROCESS,
) -> EmbedReport:
    """Embed the images named by ``source`` (folder, Karpathy file, caption map, JSONL, or webdataset
    shards: a ``.tar`` or a brace pattern of them) into ``out``.

    Unreadable or corrupt images, and unreadable shards, are skipped and listed in ``skipped.json`` (or,
    with ``strict``, stop the run). ``limit`` keeps a seeded random subset (``"500"`` or ``"1%"``). Image
    paths that lead outside ``image_root`` are refused unless ``allow_outside``. Under torchrun every rank
    calls this with its ``ranks``; a store shard's image bytes are held in memory while it is encoded.
    """
    start = time.perf_counter()
    device = _rank_device(device, ranks)
    images, rows, dropped = _image_rows(source, image_root, allow_outside, split, limit, seed, strict)
    record = _record("image-store", config, device, rows)
    existing = _reuse_or_rebuild(out, record, ranks)
    if existing is not None:
        return EmbedReport(existing, True, time.perf_counter() - start)
    clip = clip_spec(config)
    encoder = ClipEncoder.load(clip, device=device, precision=config.precision)
    batch_size = config.batch_size or IMAGE_BATCH_SIZE
    timings = {"decoding": 0.0, "clip": 0.0}

    def encode(indices: range, advance: Callable[[int], object]) -> Shard:
        inputs: list[Path] | list[ImageBytes]
        if isinstance(images, ShardListing):
            inputs, names = list(shard_images(images, indices)), [images.rows[i][0] for i in indices]
        else:
            inputs, names = [images[i].path for i in indices], [images[i].image_id for i in indices]
        loader = image_batches(inputs, encoder.preprocess, batch_size, workers)
        chunks, ids, skipped = [], [], []
        while True:
            begin = time.perf_counter()
            batch = next(loader, None)
            timings["decoding"] += time.perf_counter() - begin
            if batch is None:
                break
            positions, pixels, failures = batch
            for position, reason in failures:
                if strict:
                    raise TipcapError(f"{reason} (drop --strict to skip unreadable images).")
                where = inputs[position]
                path = where.name if isinstance(where, ImageBytes) else str(where)
                skipped.append({"id": names[position], "path": path, "reason": reason})
            if pixels is not None:
                begin = time.perf_counter()
                chunks.append(encoder.encode_images(pixels))
                timings["clip"] += time.perf_counter() - begin
                ids.extend(names[p] for p in positions)
            advance(len(positions) + len(failures))
        embeddings = torch.cat(chunks) if chunks else torch.empty(0, encoder.dim)
        return Shard(embeddings, ids, skipped)

    info = {
        "clip_spec": clip.to_dict(),
        "source": {"images": str(Path(source).resolve()), "split": split, "limit": limit, "seed": seed},
    }
    store = build_store(out, record, len(rows), encode, shard_size=shard_size, info=info, progress=progress,
                        skipped=dropped, ranks=ranks)  # fmt: skip
    return EmbedReport(store, False, time.perf_counter() - start, timings=timings)
