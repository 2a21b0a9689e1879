"""webdataset shards as a source of `tipcap embed`, and stores built by two processes under torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import pytest
import torch
import webdataset
from click.testing import CliRunner
from PIL import Image

from tipcap.cli import main
from tipcap.gap import Gap
from tipcap.store import EmbeddingStore

WORDS = ["a dog", "two cats", "a red bus", "a kite", "three birds", "a boat", "a pizza", "a horse"]
GOOD_SHARDS = 3  # written whole; a fourth is truncated
PER_SHARD = 4
CORRUPT_KEY = "s0005"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def image_bytes(i: int) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", (40, 30), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buffer, format="JPEG")
    return buffer.getvalue()


def sample(i: int) -> dict:
    key = f"s{i:04d}"
    caption = f"{WORDS[i % len(WORDS)]} in picture {i}"
    data = image_bytes(i)
    if key == CORRUPT_KEY:
        data = data[: len(data) // 3]
    return {"__key__": key, "jpg": data, "txt": caption, "json": {"caption": caption, "url": f"u{i}"}}


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> dict:
    """Four shards written by webdataset's ShardWriter (the fourth truncated mid-member, one corrupt JPEG in
    the second), and the same good samples as an image folder and a JSONL corpus."""
    root = tmp_path_factory.mktemp("web")
    shards = root / "shards"
    shards.mkdir()
    count = (GOOD_SHARDS + 1) * PER_SHARD
    with webdataset.ShardWriter(str(shards / "%05d.tar"), maxcount=PER_SHARD, verbose=0) as writer:
        for i in range(count):
            writer.write(sample(i))
    truncated = shards / f"{GOOD_SHARDS:05d}.tar"
    truncated.write_bytes(truncated.read_bytes()[:2500])
    folder = root / "folder"
    folder.mkdir()
    lines = []
    for i in range(GOOD_SHARDS * PER_SHARD):
        s = sample(i)
        (folder / f"{s['__key__']}.jpg").write_bytes(s["jpg"])
        lines.append(json.dumps({"image": s["__key__"], "caption": s["txt"]}))
    corpus = root / "pairs.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    return {"pattern": shards / f"{{00000..{GOOD_SHARDS:05d}}}.tar", "truncated": truncated, "folder": folder,
            "corpus": corpus, "root": root}  # fmt: skip


def embed(kind: str, source, out: Path, clip: Path, *extra) -> None:
    flag = "--images" if kind == "images" else "--corpus"
    workers = ("--workers", "0") if kind == "images" else ()
    result = run("embed", kind, flag, source, "--clip", clip, "--pretrained", "none", "--out", out,
                 "--no-progress", *workers, *extra)  # fmt: skip
    assert result.exit_code == 0, result.output
    return result


def test_image_shards_embed_as_the_same_images_from_a_folder(web, tiny_clip, tmp_path):
    result = embed("images", web["pattern"], tmp_path / "shards", tiny_clip, "--shard-size", "5")
    embed("images", web["folder"], tmp_path / "folder", tiny_clip, "--shard-size", "5")
    assert f"{web['truncated']}: truncated or unreadable shard" in result.stderr
    shards, folder = EmbeddingStore.open(tmp_path / "shards"), EmbeddingStore.open(tmp_path / "folder")
    keys = [f"s{i:04d}" for i in range(GOOD_SHARDS * PER_SHARD)]
    assert folder.ids == [f"{key}.jpg" for key in keys if key != CORRUPT_KEY]
    assert shards.ids == [name.removesuffix(".jpg") for name in folder.ids]
    assert torch.equal(shards.embeddings(), folder.embeddings())
    skipped = json.loads((tmp_path / "shards" / "skipped.json").read_text())
    assert [(s["id"], s["path"]) for s in skipped] == [
        (None, str(web["truncated"])),
        (CORRUPT_KEY, f"{web['pattern'].parent / '00001.tar'}:{CORRUPT_KEY}.jpg"),
    ]
    assert "unreadable or corrupt image" in skipped[1]["reason"]


def test_caption_shards_embed_as_the_same_jsonl_corpus(web, tiny_clip, tmp_path):
    embed("texts", web["pattern"], tmp_path / "txt", tiny_clip)
    embed("texts", web["pattern"], tmp_path / "json", tiny_clip, "--caption-key", "caption")
    embed("texts", web["corpus"], tmp_path / "jsonl", tiny_clip)
    jsonl = EmbeddingStore.open(tmp_path / "jsonl")
    assert len(jsonl) == GOOD_SHARDS * PER_SHARD
    for name in ("txt", "json"):
        store = EmbeddingStore.open(tmp_path / name)
        assert store.ids == jsonl.ids and store.captions() == jsonl.captions()
        assert torch.equal(store.embeddings(), jsonl.embeddings())
        skipped = json.loads((tmp_path / name / "skipped.json").read_text())
        assert [(s["id"], s["path"]) for s in skipped] == [(None, str(web["truncated"]))]


def test_shard_stores_pair_row_for_row_in_web_pairs(web, tiny_clip, tmp_path):
    embed("images", web["pattern"], tmp_path / "images", tiny_clip)
    embed("texts", web["pattern"], tmp_path / "texts", tiny_clip)
    result = run("fit-gap", "--setting", "web-pairs", "--texts", tmp_path / "texts", "--images",
                 tmp_path / "images", "--out", tmp_path / "gap.safetensors")  # fmt: skip
    assert result.exit_code == 0, result.output
    gap = Gap.load(tmp_path / "gap.safetensors")
    assert gap.info["pairs_used"] + gap.info["pairs_discarded"] == GOOD_SHARDS * PER_SHARD - 1  # no corrupt
    images, texts = EmbeddingStore.open(tmp_path / "images"), EmbeddingStore.open(tmp_path / "texts")
    paired = texts.embeddings()[[texts.ids.index(i) for i in images.ids]]
    delta = images.embeddings().double() - paired.double()
    assert torch.allclose(gap.mu.double(), delta.mean(0), atol=1e-6)
    for setting in ("few-pairs", "unpaired"):
        result = run("fit-gap", "--setting", setting, "--texts", tmp_path / "texts", "--images",
                     tmp_path / "images", "--out", tmp_path / f"{setting}.safetensors")  # fmt: skip
        assert result.exit_code == 0, result.output
    assert torch.allclose(Gap.load(tmp_path / "few-pairs.safetensors").mu.double(), delta.mean(0), atol=1e-6)


def test_strict_stops_at_the_bad_shard_and_a_missing_shard_is_listed(web, tiny_clip, tmp_path):
    result = run("embed", "texts", "--corpus", web["pattern"], "--clip", tiny_clip, "--pretrained", "none",
                 "--out", tmp_path / "strict", "--strict")  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: {web['truncated']}: truncated or unreadable shard")
    assert "--strict" in lines[0] and not (tmp_path / "strict" / "meta.json").exists()
    folder = web["pattern"].parent
    missing = folder / "00009.tar"
    embed("texts", folder / "{00000..00002}.tar", tmp_path / "gap", tiny_clip)
    result = embed("texts", folder / "{00000,00001,00002,00009}.tar", tmp_path / "missing", tiny_clip)
    assert f"{missing}: no such shard" in result.stderr
    skipped = json.loads((tmp_path / "missing" / "skipped.json").read_text())
    assert skipped == [{"id": None, "path": str(missing), "reason": f"{missing}: no such shard"}]
    assert torch.equal(EmbeddingStore.open(tmp_path / "missing").embeddings(),
                       EmbeddingStore.open(tmp_path / "gap").embeddings())  # fmt: skip


def test_a_changed_shard_rebuilds_the_image_store(web, tiny_clip, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        (shards / f"{i:05d}.tar").write_bytes((web["pattern"].parent / f"{i:05d}.tar").read_bytes())
    pattern = shards / "{00000..00001}.tar"
    embed("images", pattern, tmp_path / "store", tiny_clip)
    assert "reused" in embed("images", pattern, tmp_path / "store", tiny_clip).output
    # Same keys and members, other images: the shard's size changes (tar pads members to 512 bytes, so by
    # more than that), and the store is rebuilt.
    with webdataset.TarWriter(str(shards / "00000.tar")) as writer:
        for i in range(PER_SHARD):
            writer.write({**sample(i), "jpg": image_bytes(i + 50) + b"\0" * 2048})
    result = embed("images", pattern, tmp_path / "store", tiny_clip)
    assert "reused" not in result.output and "rebuilding" in result.stderr
    store = EmbeddingStore.open(tmp_path / "store")
    embed("images", shards / "00000.tar", tmp_path / "first", tiny_clip)
    assert torch.equal(store.embeddings()[:PER_SHARD], EmbeddingStore.open(tmp_path / "first").embeddings())


def _torchrun(port: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(port), "-m", "tipcap.cli", *map(str, args)]  # fmt: skip


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.name != "build.lock"}


def test_two_processes_build_the_one_process_image_store(web, tiny_clip, tmp_path):
    args = ["embed", "images", "--images", web["pattern"], "--clip", tiny_clip, "--pretrained", "none",
            "--workers", "0", "--shard-size", "3", "--no-progress"]  # fmt: skip
    assert run(*args, "--out", tmp_path / "one").exit_code == 0
    port = 29500 + (os.getpid() + 311) % 1000
    two = subprocess.run(_torchrun(port, *args, "--out", tmp_path / "two"), env=ENV, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote 11 image embeddings") == 1
    assert two.stderr.count(f"{web['truncated']}: truncated or unreadable shard") == 1
    assert len(EmbeddingStore.open(tmp_path / "two").shards) == 4
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


@pytest.mark.slow  # about 25 s: two torchrun launches, the first killed once six store shards exist
def test_two_processes_resume_after_sigkill_redoing_only_unfinished_shards(coco_slice, tiny_clip, tmp_path):
    args = ["embed", "texts", "--corpus", coco_slice, "--clip", tiny_clip, "--pretrained", "none",
            "--shard-size", "2", "--batch-size", "2", "--no-progress"]  # fmt: skip
    assert run(*args, "--out", tmp_path / "one").exit_code == 0
    out = tmp_path / "two"
    port = 29500 + (os.getpid() + 617) % 1000
    process = subprocess.Popen(_torchrun(port, *args, "--out", out), env=ENV, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while len(list(out.glob("embeddings-*.safetensors"))) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "meta.json").exists(), "the build finished before it could be killed"
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("embeddings-*.safetensors")}
    assert len(finished) >= 6
    rerun = subprocess.run(_torchrun(port + 1, *args, "--out", out), env=ENV, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("embeddings-*.safetensors")}
    assert {name: after[name] for name in finished} == finished
    assert len(after) == len(EmbeddingStore.open(out).shards) > len(finished)
    assert _files(out) == _files(tmp_path / "one")


def test_samples_without_an_image_or_a_caption_are_listed(tiny_clip, tmp_path):
    shard = tmp_path / "odd.tar"
    with webdataset.TarWriter(str(shard)) as writer:
        writer.write(sample(0))
        writer.write({"__key__": "text-only", "txt": "a caption alone", "json": {"url": "u"}})
        writer.write({"__key__": "image-only", "png": image_bytes(3)})
    embed("images", shard, tmp_path / "images", tiny_clip)
    embed("texts", shard, tmp_path / "texts", tiny_clip, "--caption-key", "caption")
    assert EmbeddingStore.open(tmp_path / "images").ids == ["s0000", "image-only"]
    assert EmbeddingStore.open(tmp_path / "texts").ids == ["s0000"]
    images = json.loads((tmp_path / "images" / "skipped.json").read_text())
    texts = json.loads((tmp_path / "texts" / "skipped.json").read_text())
    assert images == [{"id": "text-only", "path": str(shard), "reason": "no jpg/jpeg/png/webp member"}]
    assert texts == [
        {"id": "text-only", "path": str(shard), "reason": ".json member has no string 'caption'"},
        {"id": "image-only", "path": str(shard), "reason": "no .json member"},
    ]
