"""Embedding stores: layout, reuse only on an equal key, rebuild otherwise, resume after interruption."""

import json

import pytest
import torch

from tipcap import provenance
from tipcap.errors import TipcapError
from tipcap.store import EmbeddingStore, Shard, build_store, fingerprint, open_matching

DIM = 8


def rows_to_embed(n: int) -> list[list]:
    return [[i // 5, f"caption {i}"] for i in range(n)]


class FakeEncoder:
    """Deterministic embeddings per row; records which rows it was asked for; can fail on a call."""

    def __init__(self, rows, fail_on_call: int | None = None):
        self.rows = rows
        self.calls: list[range] = []
        self.fail_on_call = fail_on_call

    def __call__(self, indices: range, advance) -> Shard:
        self.calls.append(indices)
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt
        generator = torch.Generator().manual_seed(indices.start)
        advance(len(indices))
        return Shard(torch.randn(len(indices), DIM, generator=generator), [self.rows[i][0] for i in indices])


def key_for(rows, model: str = "tiny") -> dict:
    return provenance.record(
        "text-store", {"clip": {"model": model}}, {"rows": fingerprint(rows)}, command=[]
    )


def build(out, rows, encoder, model="tiny", shard_size=10):
    return build_store(out, key_for(rows, model), len(rows), encoder, shard_size=shard_size, progress=False)


def test_layout_and_contents(tmp_path):
    rows = rows_to_embed(25)
    store = build(tmp_path / "s", rows, FakeEncoder(rows))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "embeddings-00000-of-00003.safetensors",
        "embeddings-00001-of-00003.safetensors",
        "embeddings-00002-of-00003.safetensors",
        "ids.json",
        "meta.json",
        "provenance.json",
    ]
    assert len(store) == 25 and store.dim == DIM
    assert store.ids == [r[0] for r in rows]
    embeddings = store.embeddings()
    assert embeddings.dtype == torch.float16 and embeddings.shape == (25, DIM)
    assert torch.allclose(embeddings.float().norm(dim=-1), torch.ones(25), atol=1e-3)
    assert sum(len(c) for c in store.iter_chunks(4)) == 25
    assert store.meta["normalized"] is True and store.meta["dtype"] == "float16"


def test_single_shard_is_named_embeddings_safetensors(tmp_path):
    rows = rows_to_embed(5)
    store = build(tmp_path / "s", rows, FakeEncoder(rows))
    assert store.meta["shards"] == ["embeddings.safetensors"]


def test_matching_store_only_for_an_equal_key(tmp_path):
    rows = rows_to_embed(25)
    assert open_matching(tmp_path / "s", provenance.key(key_for(rows)))[0] is None
    build(tmp_path / "s", rows, FakeEncoder(rows))
    store, _ = open_matching(tmp_path / "s", provenance.key(key_for(rows)))
    assert store is not None and len(store) == 25
    assert open_matching(tmp_path / "s", provenance.key(key_for(rows, model="other")))[0] is None
    assert open_matching(tmp_path / "s", provenance.key(key_for(rows[:-1])))[0] is None
    # A store written by an older format is not opened (an error) but rebuilt, like a different key.
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    (tmp_path / "s" / "meta.json").write_text(json.dumps({**meta, "format": meta["format"] - 1}))
    assert open_matching(tmp_path / "s", provenance.key(key_for(rows)))[0] is None


def test_rebuild_removes_the_earlier_store(tmp_path):
    rows = rows_to_embed(25)
    build(tmp_path / "s", rows, FakeEncoder(rows))
    fewer = rows_to_embed(7)
    other = FakeEncoder(fewer)
    store = build(tmp_path / "s", fewer, other, model="other")
    assert len(other.calls) == 1
    # The three old shards are gone: nothing of the earlier store is mixed in.
    assert sorted(p.name for p in (tmp_path / "s").glob("*.safetensors")) == ["embeddings.safetensors"]
    assert len(store) == 7 and store.clip == {"model": "other"}


def test_interrupted_build_resumes_to_the_same_store(tmp_path):
    rows = rows_to_embed(45)
    reference = build(tmp_path / "reference", rows, FakeEncoder(rows))

    interrupted = FakeEncoder(rows, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "s", rows, interrupted)
    with pytest.raises(TipcapError, match="interrupted build"):
        EmbeddingStore.open(tmp_path / "s")

    resumed = FakeEncoder(rows)
    store = build(tmp_path / "s", rows, resumed)
    assert [r.start for r in resumed.calls] == [20, 30, 40]  # shards 0 and 1 were kept
    assert torch.equal(store.embeddings(), reference.embeddings())
    assert store.ids == reference.ids


def test_partial_shard_is_never_read(tmp_path):
    rows = rows_to_embed(30)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "s", rows, FakeEncoder(rows, fail_on_call=2))
    # A kill during a write leaves a temporary file, or (on odd file systems) a damaged shard.
    (tmp_path / "s" / "embeddings-00001-of-00003.safetensors.tmp").write_bytes(b"half a shard")
    (tmp_path / "s" / "embeddings-00002-of-00003.safetensors").write_bytes(b"\x08garbage")
    resumed = FakeEncoder(rows)
    store = build(tmp_path / "s", rows, resumed)
    assert [r.start for r in resumed.calls] == [10, 20]
    assert len(store) == 30 and not list((tmp_path / "s").glob("*.tmp"))


def test_changed_plan_restarts_instead_of_resuming(tmp_path):
    rows = rows_to_embed(30)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "s", rows, FakeEncoder(rows, fail_on_call=2))
    resumed = FakeEncoder(rows)
    build_store(tmp_path / "s", key_for(rows), len(rows), resumed, shard_size=15, progress=False)
    assert [r.start for r in resumed.calls] == [0, 15]


def test_skips_and_counts_are_collected(tmp_path):
    def encode(indices, advance):
        return Shard(
            torch.ones(len(indices) - 1, DIM),
            list(indices)[1:],
            skipped=[{"id": indices.start, "path": f"{indices.start}.jpg", "reason": "corrupt"}],
            counts={"truncated": 1},
        )

    record = provenance.record("image-store", {"clip": {}}, {}, command=[])
    store = build_store(tmp_path / "s", record, 20, encode, shard_size=10, progress=False)
    assert len(store) == 18 and store.meta["skipped"] == 2 and store.meta["counts"] == {"truncated": 2}
    assert [s["id"] for s in json.loads((tmp_path / "s" / "skipped.json").read_text())] == [0, 10]


def test_open_rejects_a_directory_without_store(tmp_path):
    with pytest.raises(TipcapError, match="not an embedding store"):
        EmbeddingStore.open(tmp_path)
