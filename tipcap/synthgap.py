"""A known-truth gap: synthetic image embeddings built from captions, v = normalise(t + δ), δ ~ N(μ*, Σ*).

For every image of a Karpathy file with at least two captions, one caption (drawn with the seed) is held
out: its CLIP text embedding t plus a draw δ of the known gap N(μ*, Σ*), renormalised, is that image's
"image embedding". The image keeps its other captions, which are its training captions and the
references it is scored against, so no reference is the caption its embedding was made from. Here the
Gaussian model of the gap holds by construction: the grid's few-pairs and unpaired settings estimate μ and
Σ from synthetic pairs drawn the same way, and the kinds that keep only part of the gap (its mean, total
variance or diagonal) can be measured against the truth.

Σ* is a spiked spectrum (``spikes`` random orthonormal directions holding ``spike_share`` of the trace,
the rest spread evenly) with ‖μ*‖ = ``mu_norm`` along a random direction, or μ and Σ of a fitted
``gaussian`` gap file (``truth``), e.g. the toy CLIP's few-pairs fit. With ``tail_df`` = ν, δ is a
multivariate t instead, μ* + L·z·√((ν − 2)/χ²_ν), of the same mean and covariance: a gap with heavy tails
(excess kurtosis 6/(ν − 4) along every direction for ν > 4), which no Gaussian kind models exactly.

:func:`build_synthetic_world` writes, into one folder: ``karpathy.json`` (the file without the held-out
captions), ``held_out.json`` (only them), ``held-out-text`` (their caption store) and ``images`` (the
synthetic image store of every image). :func:`synthetic_image_store` cuts from it the store of any image
list a grid asks for (a split, a seeded subset, one half of the unpaired split).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tipcap import provenance
from tipcap.config import EmbedConfig, SyntheticGapConfig, to_dict
from tipcap.data import list_images
from tipcap.data.images import subsample
from tipcap.embed import embed_texts
from tipcap.errors import TipcapError
from tipcap.gap.model import Gap
from tipcap.io import load_json, write_json_atomic
from tipcap.store import EmbeddingStore, Shard, build_store, fingerprint, open_matching

_SHARD_ROWS = 50_000


@dataclass
class SyntheticWorld:
    """What :func:`build_synthetic_world` wrote: the Karpathy file without the held-out captions, the
    store of every image's synthetic embedding, and the truth ``mu`` ``[d]``, ``covariance`` ``[d, d]``."""

    karpathy: Path
    images: Path
    mu: torch.Tensor
    covariance: torch.Tensor


def synthetic_truth(config: SyntheticGapConfig, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """μ* ``[d]`` and Σ* ``[d, d]`` (float64) of ``config`` at width ``dim``.

    Raises:
        TipcapError: when the truth file is not a gaussian gap of width ``dim``, or ``spikes`` ≥ ``dim``, or
            (without a truth file) ``mu_norm`` or ``trace`` is not set.
    """
    config.check("synthetic_gap")
    if config.truth is not None:
        gap = Gap.load(config.truth)
        if gap.kind != "gaussian" or gap.dim != dim:
            raise TipcapError(
                f"synthetic_gap.truth {config.truth}: needs a gaussian gap of width {dim} "
                f"(it holds a {gap.kind} gap of width {gap.dim})."
            )
        return gap.mu.detach().double(), gap.covariance.detach().double()
    if config.spikes >= dim:
        raise TipcapError(f"synthetic_gap.spikes {config.spikes}: must be below the width {dim}.")
    generator = torch.Generator().manual_seed(config.seed)
    direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    mu = config.mu_norm * direction / direction.norm()
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    spectrum = torch.full((dim,), (1 - config.spike_share) * config.trace / (dim - config.spikes))
    spectrum[: config.spikes] = config.spike_share * config.trace / config.spikes
    spectrum = spectrum.double()
    return mu, (basis * spectrum) @ basis.T


def _split_captions(document: dict[str, Any], seed: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(the document without each image's held-out caption, one with only those, images left out)."""
    rng = random.Random(seed)
    kept, held, skipped = [], [], 0
    for entry in document.get("images", []):
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        if not isinstance(sentences, list) or len(sentences) < 2:
            skipped += 1  # an image needs a caption to be made from and one to be scored against
            continue
        index = rng.randrange(len(sentences))
        rest = [s for i, s in enumerate(sentences) if i != index]
        kept.append({**entry, "sentences": rest, "sentids": [s.get("sentid") for s in rest]})
        held.append({**entry, "sentences": [sentences[index]], "sentids": [sentences[index].get("sentid")]})
    header = {key: value for key, value in document.items() if key != "images"}
    return {**header, "images": kept}, {**header, "images": held}, skipped


def build_synthetic_world(
    karpathy: str | Path,
    embed: EmbedConfig,
    config: SyntheticGapConfig,
    out: str | Path,
    progress: bool = True,
) -> SyntheticWorld:
    """Hold out one caption per image, embed the held-out captions, and write every image's synthetic
    embedding normalise(t + δ), δ ~ N(μ*, Σ*), into ``out`` (each part reused when already built alike).

    Raises:
        TipcapError: when the file has no image with two captions, or the truth does not fit.
    """
    out = Path(out)
    document = load_json(Path(karpathy))
    if not isinstance(document, dict):
        raise TipcapError(f"{karpathy}: expected a Karpathy split file (an object with 'images').")
    kept, held, _ = _split_captions(document, config.seed)
    if not held["images"]:
        raise TipcapError(f"{karpathy}: no image has two captions; a synthetic gap needs two per image.")
    write_json_atomic(out / "karpathy.json", kept, indent=None)
    write_json_atomic(out / "held_out.json", held, indent=None)
    texts = embed_texts(out / "held_out.json", embed, out / "held-out-text", progress=progress).store
    mu, covariance = synthetic_truth(config, texts.dim)
    scale_tril = torch.linalg.cholesky(covariance)
    truth = {"mu": [float(x) for x in mu], "covariance_sha256": provenance.sha256_json(covariance.tolist())}
    settings = {"clip": texts.clip, "synthetic_gap": to_dict(config), "truth": truth}
    record = provenance.record("image-store", settings, {"held_out_texts": texts.digest}, command=[])
    images = out / "images"
    existing, _ = open_matching(images, provenance.key(record))
    if existing is None:

        def encode(rows: range, advance: Any) -> Shard:
            # Seeded per block of rows, so that a resumed build draws what an uninterrupted one drew.
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rows.start)
            t = texts.gather(torch.arange(rows.start, rows.stop)).double()
            z = torch.randn(len(rows), texts.dim, generator=generator, dtype=torch.float64)
            if config.tail_df is not None:  # a χ²_ν draw per row, from ν normals of the same generator
                chi2 = torch.randn(len(rows), config.tail_df, generator=generator, dtype=torch.float64)
                z = z * ((config.tail_df - 2) / chi2.square().sum(-1, keepdim=True)).sqrt()
            v = torch.nn.functional.normalize(t + mu + z @ scale_tril.T, dim=-1)
            advance(len(rows))
            return Shard(v.float(), [texts.ids[i] for i in rows])

        info = {"source": {"karpathy": str(Path(karpathy).resolve())}, "synthetic_gap": to_dict(config)}
        build_store(images, record, len(texts), encode, shard_size=_SHARD_ROWS, info=info, progress=progress)
    return SyntheticWorld(out / "karpathy.json", images, mu, covariance)


def _cut(
    whole: EmbeddingStore, source: str | Path, split: str | None, limit: str | None, seed: int
) -> tuple[list[int], dict[str, Any]]:
    """The rows of the world's image store that ``source`` lists, and the provenance record of their store."""
    row_of = {image_id: row for row, image_id in enumerate(whole.ids)}
    listed = subsample(list_images(source, split=split, allow_outside=True), limit, seed)
    rows = [row_of[ref.image_id] for ref in listed if ref.image_id in row_of]
    if not rows:
        raise TipcapError(f"{source}: none of its images (split {split}) has a synthetic embedding.")
    settings = {"clip": whole.clip, "cut_from": whole.digest}
    ids = [whole.ids[row] for row in rows]
    return rows, provenance.record("image-store", settings, {"rows": fingerprint(ids)}, command=[])


def synthetic_store_key(
    world: SyntheticWorld,
    source: str | Path,
    *,
    split: str | None = None,
    limit: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The provenance key of the store :func:`synthetic_image_store` cuts with these arguments."""
    return provenance.key(_cut(EmbeddingStore.open(world.images), source, split, limit, seed)[1])


def synthetic_image_store(
    world: SyntheticWorld,
    source: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    limit: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> EmbeddingStore:
    """The store of the images ``source`` lists (a Karpathy file of the world, a split, a seeded subset
    ``limit`` as :func:`tipcap.embed.embed_images` draws it), cut from the world's image store.

    Raises:
        TipcapError: when none of the listed images has a synthetic embedding.
    """
    whole = EmbeddingStore.open(world.images)
    rows, record = _cut(whole, source, split, limit, seed)
    ids = [whole.ids[row] for row in rows]
    existing, _ = open_matching(out, provenance.key(record))
    if existing is not None:
        return existing

    def encode(block: range, advance: Any) -> Shard:
        advance(len(block))
        return Shard(
            whole.gather(torch.tensor(rows[block.start : block.stop])), ids[block.start : block.stop]
        )

    return build_store(out, record, len(rows), encode, shard_size=_SHARD_ROWS, progress=progress)
