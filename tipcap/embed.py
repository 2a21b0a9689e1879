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
from tipcap.errors import TipcapError
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
    corpus: str | Path, split: str | None, period: PeriodPolicy, strict: bool
) -> tuple[CaptionCorpus, list[list[Any]]]:
    """A corpus's captions and the rows a text store encodes: ``[image id, caption]``."""
    captions = read_captions(corpus, split=split, period=period, strict=strict)
    return captions, [[c.image_id, c.text] for c in captions.captions]


def _image_rows(
    source: str | Path,
    image_root: str | Path | None,
    allow_outside: bool,
    split: str | None,
    limit: str | None,
    seed: int,
) -> tuple[list[ImageRef], list[list[Any]]]:
    """The images an image store encodes and its rows: ``[image id, path, size]``."""
    listed = list_images(source, image_root=image_root, split=split, allow_outside=allow_outside)
    images = subsample(listed, limit, seed)
    # Path and size identify the files without reading them; a changed file set rebuilds the store.
    rows = [
        [ref.image_id, str(ref.path.resolve()), ref.path.stat().st_size if ref.path.is_file() else -1]
        for ref in images
    ]
    return images, rows


def text_store_key(
    corpus: str | Path,
    config: EmbedConfig,
    *,
    split: str | None = None,
    period: PeriodPolicy = "add",
    strict: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """The provenance key of the store :func:`embed_texts` makes with these arguments (nothing encoded)."""
    _, rows = _caption_rows(corpus, split, period, strict)
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
    _, rows = _image_rows(source, image_root, allow_outside, split, limit, seed)
    return provenance.key(_record("image-store", config, device, rows))


def _reuse_or_rebuild(out: str | Path, record: dict[str, Any]) -> EmbeddingStore | None:
    """The finished store in ``out`` when its key is ``record``'s; else ``None``, saying why it rebuilds."""
    existing, previous = open_matching(out, provenance.key(record))
    if existing is None and previous is not None:
        changed = [k for k in record["config"] if previous.get("config", {}).get(k) != record["config"][k]]
        if previous.get("inputs") != record["inputs"]:
            changed.append("inputs")
        logger.warning("%s was built with other %s; rebuilding it.", out, ", ".join(changed) or "settings")
    return existing


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
) -> EmbedReport:
    """Embed the captions of a corpus file into a store at ``out`` (reused when already built alike).

    Each row's id is the id of the image its caption describes; ``captions.json`` keeps the text.
    """
    start = time.perf_counter()
    captions, rows = _caption_rows(corpus, split, period, strict)
    record = _record("text-store", config, device, rows)
    existing = _reuse_or_rebuild(out, record)
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
) -> EmbedReport:
    """Embed the images named by ``source`` (folder, Karpathy file, caption map or JSONL) into ``out``.

    Unreadable or corrupt images are skipped and listed in ``skipped.json`` (or, with ``strict``, stop
    the run). ``limit`` keeps a seeded random subset (``"500"`` or ``"1%"``). Image paths that lead
    outside ``image_root`` are refused unless ``allow_outside``.
    """
    start = time.perf_counter()
    images, rows = _image_rows(source, image_root, allow_outside, split, limit, seed)
    record = _record("image-store", config, device, rows)
    existing = _reuse_or_rebuild(out, record)
    if existing is not None:
        return EmbedReport(existing, True, time.perf_counter() - start)
    clip = clip_spec(config)
    encoder = ClipEncoder.load(clip, device=device, precision=config.precision)
    batch_size = config.batch_size or IMAGE_BATCH_SIZE
    timings = {"decoding": 0.0, "clip": 0.0}

    def encode(indices: range, advance: Callable[[int], object]) -> Shard:
        subset = [images[i] for i in indices]
        loader = iter(image_batches([ref.path for ref in subset], encoder.preprocess, batch_size, workers))
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
                skipped.append(
                    {"id": subset[position].image_id, "path": str(subset[position].path), "reason": reason}
                )
            if pixels is not None:
                begin = time.perf_counter()
                chunks.append(encoder.encode_images(pixels))
                timings["clip"] += time.perf_counter() - begin
                ids.extend(subset[p].image_id for p in positions)
            advance(len(positions) + len(failures))
        embeddings = torch.cat(chunks) if chunks else torch.empty(0, encoder.dim)
        return Shard(embeddings, ids, skipped)

    info = {
        "clip_spec": clip.to_dict(),
        "source": {"images": str(Path(source).resolve()), "split": split, "limit": limit, "seed": seed},
    }
    store = build_store(out, record, len(rows), encode, shard_size=shard_size, info=info, progress=progress)
    return EmbedReport(store, False, time.perf_counter() - start, timings=timings)
