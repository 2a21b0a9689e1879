"""Faults and mistakes found by probing the command line: each gives one line, never a traceback, a hang,
a silently wrong result or a half-written store."""

import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COCO_SLICE, run, write_images
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from serving import build_model

from tipcap.data import ImageError, load_image
from tipcap.data.prepare import prepare_dataset
from tipcap.errors import TipcapError
from tipcap.gap import Gap, Pairs, cholesky, estimate_web_pairs
from tipcap.io import atomic_path
from tipcap.store import EmbeddingStore

ROOT = Path(__file__).parent.parent


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise ``TimeoutError`` in this thread after ``seconds``, so that a hang fails the test."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line_error(result, *needles: str, exit_code: int = 1) -> None:
    """A clean refusal: the exit code, no traceback, one ``Error:`` line (after any warnings) holding every
    needle."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if exit_code == 1:
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("Error: ") and sum(line.startswith("Error") for line in lines) == 1
    for needle in needles:
        assert needle in result.stderr, result.stderr


def embed_texts(corpus, clip, out, *extra):
    return run("embed", "texts", "--corpus", corpus, "--clip", clip, "--pretrained", "none", "--out", out,
               "--no-progress", *extra)  # fmt: skip


def embed_images(source, clip, out, *extra):
    return run("embed", "images", "--images", source, "--clip", clip, "--pretrained", "none", "--out", out,
               "--workers", 0, "--no-progress", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_clip):
    """Caption and image stores of the COCO slice (120 captions of 24 images)."""
    root = tmp_path_factory.mktemp("stores")
    document = json.loads(COCO_SLICE.read_text())
    for number, image in enumerate(document["images"]):
        path = root / "coco" / image["filepath"] / image["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), ((53 * number) % 256, (97 * number) % 256, 31)).save(path)
    assert embed_texts(COCO_SLICE, tiny_clip, root / "texts").exit_code == 0
    result = embed_images(COCO_SLICE, tiny_clip, root / "images", "--image-root", root / "coco")
    assert result.exit_code == 0, result.output
    return root


def copy_store(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def poison_row(store: Path, row: int, value: float = math.nan) -> None:
    """Overwrite one row of a single-shard store in place (same size: as a fault on disk would)."""
    shard = store / "embeddings.safetensors"
    with safe_open(shard, framework="pt") as f:
        metadata, embeddings = f.metadata(), f.get_tensor("embeddings")
    embeddings[row] = value
    size = shard.stat().st_size
    save_file({"embeddings": embeddings}, shard, metadata=metadata)
    assert shard.stat().st_size == size


# --- 1. NaN and Inf never hang fit-gap and are never fitted ----------------------------------------------


@pytest.mark.parametrize("which", ["texts", "images"])
def test_fit_gap_names_a_store_with_a_nan_row(stores, tmp_path, which):
    paths = {"texts": stores / "texts", "images": stores / "images"}
    paths[which] = copy_store(paths[which], tmp_path / which)
    poison_row(paths[which], 3)
    out = tmp_path / "gap.safetensors"
    with deadline(60):
        result = run("fit-gap", "--setting", "few-pairs", "--texts", paths["texts"], "--images",
                     paths["images"], "--out", out)  # fmt: skip
    assert_one_line_error(result, f"--{which} {paths[which]}", "NaN")
    assert not out.exists()


@pytest.mark.parametrize(
    "matrix",
    [torch.full((4, 4), math.nan), torch.full((4, 4), math.inf), -torch.eye(4)],
    ids=["nan", "inf", "negative"],
)
def test_cholesky_gives_up_after_bounded_jitter(matrix):
    with deadline(10), pytest.raises(TipcapError, match="the covariance"):
        cholesky(matrix.to(torch.float64))


@pytest.mark.parametrize(
    ("args", "exit_code", "flag"),
    [
        (("--kind", "isotropic", "--sigma2", "nan"), 1, "--sigma2"),
        (("--kind", "gaussian", "--sigma2", "nan"), 1, "--sigma2"),
        (("--kind", "isotropic", "--sigma2", "-1"), 2, "--sigma2"),
        (("--kind", "isotropic", "--sigma2", "0"), 2, "--sigma2"),
        (("--kind", "memory", "--tau", "0"), 2, "--tau"),
        (("--kind", "memory", "--tau", "nan"), 1, "--tau"),
        (("--kind", "memory", "--memory-size", "0"), 2, "--memory-size"),
    ],
)
def test_fit_gap_refuses_meaningless_numbers(stores, tmp_path, args, exit_code, flag):
    out = tmp_path / "gap.safetensors"
    with deadline(60):
        result = run("fit-gap", "--setting", "text-only", "--texts", stores / "texts", "--out", out, *args)
    assert_one_line_error(result, flag, exit_code=exit_code)
    assert not out.exists()


def test_web_pairs_refuse_nan_pairs_instead_of_dropping_them():
    t = torch.nn.functional.normalize(torch.randn(50, 8, dtype=torch.float64), dim=-1)
    v = t + 0.1
    v[7] = math.nan
    with pytest.raises(TipcapError, match="NaN"):
        estimate_web_pairs(Pairs.of_tensors(v, t), drop_quantile=0.1)


@pytest.mark.parametrize("tensor", ["mu", "scale_tril"])
def test_gap_file_with_nan_is_refused_on_load(tmp_path, tensor):
    mu, scale_tril = torch.zeros(4), torch.eye(4)
    {"mu": mu, "scale_tril": scale_tril}[tensor][1] = math.nan
    path = tmp_path / "gap.safetensors"
    Gap("gaussian", mu, scale_tril).save(path)
    with pytest.raises(TipcapError, match=f"{path}.*NaN"):
        Gap.load(path)


# --- 2. two builds into one store -------------------------------------------------------------------------


def test_atomic_writes_never_share_a_temporary_file(tmp_path):
    with atomic_path(tmp_path / "a.json") as first, atomic_path(tmp_path / "a.json") as second:
        assert first != second
        first.write_text("first")
        second.write_text("second")
    assert (tmp_path / "a.json").read_text() in ("first", "second")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("inputs", ["different", "same"])
def test_two_writers_into_one_store_leave_one_clean_store(tmp_path, tiny_clip, inputs):
    corpora = [tmp_path / "a.txt", tmp_path / "b.txt"]
    corpora[0].write_text("".join(f"a photo of a red thing number {i}.\n" for i in range(200)))
    corpora[1].write_text("".join(f"a blue object, picture {i}.\n" for i in range(150)))
    if inputs == "same":
        corpora[1] = corpora[0]
    args = ["--clip", str(tiny_clip), "--pretrained", "none", "--shard-size", "10", "--no-progress"]
    references = []
    for number, corpus in enumerate(corpora):
        reference = tmp_path / f"reference{number}"
        assert run("embed", "texts", "--corpus", corpus, "--out", reference, *args).exit_code == 0
        references.append(store_bytes(reference))

    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tipcap.cli", "embed", "texts", "--out", str(out), *args]
    writers = [
        subprocess.Popen(
            [*command, "--corpus", str(corpus)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for corpus in corpora
    ]
    outcomes = [writer.communicate(timeout=300) for writer in writers]
    assert [writer.returncode for writer in writers] == [0, 0], outcomes
    assert store_bytes(out) in references


# --- 3. a damaged store ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("meta.json", "truncate"),
        ("ids.json", "truncate"),
        ("ids.json", "delete"),
        ("captions.json", "truncate"),
        ("captions.json", "delete"),
        ("embeddings.safetensors", "truncate"),
        ("embeddings.safetensors", "delete"),
    ],
)
def test_damaged_store_is_one_line_and_rebuilt(stores, tmp_path, tiny_clip, name, damage):
    store = copy_store(stores / "texts", tmp_path / "texts")
    path = store / name
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(TipcapError, match="rebuild") as error:
        EmbeddingStore.open(store)
    assert str(store) in str(error.value)
    result = run("fit-gap", "--setting", "text-only", "--texts", store, "--out", tmp_path / "gap.safetensors")
    assert_one_line_error(result, str(store))

    result = embed_texts(COCO_SLICE, tiny_clip, store)
    assert result.exit_code == 0 and result.stdout.startswith("wrote 120"), result.output
    assert store_bytes(store) == store_bytes(stores / "texts")


# --- 4. a failed build never looks finished ---------------------------------------------------------------


def test_no_readable_image_fails_again_on_rerun(tmp_path, tiny_clip):
    folder = tmp_path / "images"
    folder.mkdir()
    for number in range(3):
        (folder / f"bad_{number}.jpg").write_bytes(b"not a JPEG at all")
    out = tmp_path / "store"
    for _ in range(2):
        result = embed_images(folder, tiny_clip, out)
        assert_one_line_error(result, str(out), "skipped.json")
        assert not (out / "meta.json").exists()
        assert len(json.loads((out / "skipped.json").read_text())) == 3


# --- 5. decompression bombs ------------------------------------------------------------------------------


def test_decompression_bomb_is_skipped_with_a_reason(tmp_path, tiny_clip, monkeypatch):
    folder = tmp_path / "images"
    write_images(folder, 3)
    Image.new("RGB", (200, 200)).save(folder / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 200×200 is over twice the limit
    with pytest.raises(ImageError, match=r"bomb\.png"):
        load_image(folder / "bomb.png")
    result = embed_images(folder, tiny_clip, tmp_path / "store")
    assert result.exit_code == 0 and "1 unreadable images skipped" in result.stdout, result.output
    skipped = json.loads((tmp_path / "store" / "skipped.json").read_text())
    assert [s["id"] for s in skipped] == ["bomb.png"] and "pixels" in skipped[0]["reason"]


# --- 6. paths outside their roots ------------------------------------------------------------------------


def karpathy_entry(filename: str, filepath: str, cocoid: int) -> dict:
    return {"filepath": filepath, "filename": filename, "cocoid": cocoid, "split": "val",
            "sentences": [{"raw": "A dog on the grass."}]}  # fmt: skip


@pytest.mark.parametrize("source", ["karpathy", "jsonl"])
def test_image_paths_outside_the_root_are_refused(tmp_path, tiny_clip, source):
    root = tmp_path / "root"
    write_images(root / "val2014", 2)
    outside = write_images(tmp_path / "elsewhere", 2)
    names = ["val2014/img_000.jpg", "val2014/img_001.jpg", "../elsewhere/img_000.jpg", str(outside[1])]
    listing = tmp_path / f"images.{'json' if source == 'karpathy' else 'jsonl'}"
    if source == "karpathy":
        entries = [karpathy_entry(Path(n).name, str(Path(n).parent), i) for i, n in enumerate(names)]
        listing.write_text(json.dumps({"images": entries}))
    else:
        listing.write_text("".join(json.dumps({"image": n, "caption": "a dog."}) + "\n" for n in names))
    result = embed_images(listing, tiny_clip, tmp_path / "store", "--image-root", root)
    assert_one_line_error(result, str(root), "../elsewhere/img_000.jpg", str(outside[1]), "--allow-outside")
    assert not (tmp_path / "store").exists()
    result = embed_images(listing, tiny_clip, tmp_path / "store", "--image-root", root, "--allow-outside")
    assert result.exit_code == 0 and "wrote 4 image embeddings" in result.stdout, result.output


def test_prepare_reports_absolute_and_climbing_paths(tmp_path):
    root = tmp_path / "images"
    write_images(root / "val2014", 1)
    (root / "val2014" / "img_000.jpg").rename(root / "val2014" / "COCO_val2014_000000000001.jpg")
    elsewhere = tmp_path / "elsewhere"
    write_images(elsewhere, 3)  # img_002.jpg is named by no entry
    entries = [
        karpathy_entry("COCO_val2014_000000000001.jpg", "val2014", 1),
        karpathy_entry("img_000.jpg", str(elsewhere), 2),
        karpathy_entry("img_001.jpg", "../elsewhere", 3),
    ]
    karpathy = tmp_path / "k.json"
    karpathy.write_text(json.dumps({"images": entries}))
    result = run("prepare", "coco", "--karpathy", karpathy, "--images", root, "--out", tmp_path / "out",
                 "--workers", 0, "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = prepare_dataset("coco", karpathy, root, tmp_path / "out", workers=0, progress=False)
    outside = [p["path"] for p in report.problems["outside_root"]]
    assert outside == [f"{elsewhere}/img_000.jpg", "../elsewhere/img_001.jpg"]
    assert report.splits["val"].usable == 1 and report.unlisted["count"] == 0
    assert "outside root: 2" in result.stdout


@pytest.mark.parametrize("command", [("train", "--config"), ("ablate",)])
def test_config_that_is_not_utf8_is_one_line(tmp_path, command):
    config = tmp_path / "config.yaml"
    config.write_bytes("model:\n  prompt: caf\u00e9\n".encode("latin-1"))
    result = run(*command, config, "--out", tmp_path / "out")
    assert_one_line_error(result, str(config), "UTF-8")


# --- 7. sizes that must be positive -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("texts", "--shard-size", "0"),
        ("texts", "--shard-size", "-1"),
        ("texts", "--batch-size", "0"),
        ("texts", "--batch-size", "-1"),
        ("images", "--shard-size", "-1"),
        ("images", "--batch-size", "0"),
        ("images", "--workers", "-1"),
    ],
)
def test_embed_refuses_sizes_below_one(tmp_path, tiny_clip, image_folder, args):
    kind, *extra = args
    out = tmp_path / "store"
    if kind == "texts":
        result = embed_texts(COCO_SLICE, tiny_clip, out, *extra)
    else:
        result = embed_images(image_folder, tiny_clip, out, *extra)
    assert_one_line_error(result, extra[0], exit_code=2)
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["caption", "x.jpg", "--model", "m", "--beams", "0"], "--beams"),
        (["caption", "x.jpg", "--model", "m", "--batch-size", "-1"], "--batch-size"),
        (["evaluate", "--data", "d.json", "--out", "o", "--beams", "-1"], "--beams"),
        (["toyworld", "--out", "w", "--image-size", "0"], "--image-size"),
        (["toyworld", "--out", "w", "--web-mismatch", "1.5"], "--web-mismatch"),
        (["toyworld", "--out", "w", "--web-mismatch", "nan"], "--web-mismatch"),
    ],
)
def test_caption_evaluate_and_toyworld_refuse_out_of_range_numbers(command, flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*command)
    assert result.exit_code == 2 and f"Invalid value for '{flag}'" in result.output, result.output
    assert not any(tmp_path.iterdir())


def test_model_weights_with_nan_are_refused_on_load(tmp_path):
    from safetensors.torch import load_file

    from tipcap.config import ModelConfig
    from tipcap.model import TIPCap
    from tipcap.training.data import word_level_tokenizer

    tokenizer = word_level_tokenizer(["a red circle ."])
    language_model = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32,
                      "vocab_size": len(tokenizer)}  # fmt: skip
    config = ModelConfig(
        clip_dim=8, language_model_config=language_model, prefix_length=2, max_caption_tokens=8
    )
    model = TIPCap.build(config, tokenizer)
    model.save_pretrained(tmp_path / "model")
    TIPCap.from_pretrained(tmp_path / "model", device="cpu")  # whole weights load
    state = load_file(tmp_path / "model" / "model.safetensors")
    state["projector.net.0.weight"][0, 0] = float("nan")
    save_file(state, tmp_path / "model" / "model.safetensors")
    with pytest.raises(TipcapError, match=r"model\.safetensors: 1 tensors hold NaN or infinite values"):
        TIPCap.from_pretrained(tmp_path / "model", device="cpu")


@pytest.mark.parametrize("device", ["blah", "cuda:7"])
@pytest.mark.parametrize(
    "command", [("caption", "--model", "m", "x.png"), ("fit-gap", "--texts", "t", "--out", "g")]
)
def test_device_is_checked_by_name_before_any_work(command, device):
    result = run(*command, "--device", device)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Invalid value for '--device'" in result.output and "--pretrained" not in result.output


def test_prepare_refuses_negative_workers(tmp_path):
    result = run("prepare", "coco", "--karpathy", COCO_SLICE, "--images", tmp_path, "--out", tmp_path / "p",
                 "--workers", "-1")  # fmt: skip
    assert result.exit_code == 2 and "'--workers'" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("code", "advice"),
    [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permissions")],
)
def test_os_errors_while_writing_are_one_line(tmp_path, tiny_clip, monkeypatch, code, advice):
    def fail(source, target):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr("tipcap.io.os.replace", fail)
    result = embed_texts(COCO_SLICE, tiny_clip, tmp_path / "s")
    assert_one_line_error(result, str(tmp_path / "s"), advice)
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_output_below_a_file_is_one_line(tmp_path, tiny_clip):
    (tmp_path / "file").write_text("not a folder")
    result = embed_texts(COCO_SLICE, tiny_clip, tmp_path / "file" / "store")
    assert_one_line_error(result, str(tmp_path / "file"))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    target = tmp_path / "gap.png"
    with atomic_path(target) as tmp:
        token = tmp.name[len("gap.png.") : -len(".tmp")]
        tmp.write_bytes(b"first")
    host = token.split("-")[1]
    killed = tmp_path / f"gap.png.{int(dead.stdout)}-{host}-0123456789ab.tmp"
    live = tmp_path / f"gap.png.{os.getpid()}-{host}-ba9876543210.tmp"
    killed.write_bytes(b"half")
    live.write_bytes(b"being written")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"second"
    assert not killed.exists() and live.exists()


def test_evaluate_refuses_an_image_store_with_a_nan_row(stores, tmp_path):
    images = copy_store(stores / "images", tmp_path / "images")
    poison_row(images, 2)
    result = run("evaluate", "--data", COCO_SLICE, "--split", "val", "--method", "retrieval",
                 "--texts", stores / "texts", "--image-store", images, "--metrics", "bleu",
                 "--out", tmp_path / "eval")  # fmt: skip
    assert_one_line_error(result, f"--image-store {images}", "NaN")


def test_training_refuses_a_caption_store_with_a_nan_row(stores, tmp_path):
    texts = copy_store(stores / "texts", tmp_path / "texts")
    poison_row(texts, 7)
    result = run("train", "--config", ROOT / "experiments" / "tiny.yaml",
                 "--set", f"data.train_texts={texts}", "--out", tmp_path / "run")  # fmt: skip
    assert_one_line_error(result, f"data.train_texts {texts}", "row 7")


def test_a_missing_input_of_training_names_the_command_that_builds_it(stores, tmp_path, monkeypatch):
    """A shipped config run before its stores exist: the first missing input, and how to build it."""
    monkeypatch.chdir(tmp_path)
    config = ROOT / "experiments" / "coco" / "few_pairs.yaml"
    result = run("train", "--config", config, "--out", "runs/coco/few_pairs")
    assert_one_line_error(
        result, "data.train_texts stores/coco/train-text: no such folder",
        "`tipcap embed texts --corpus CAPTIONS --clip MODEL --pretrained TAG --out stores/coco/train-text`",
    )  # fmt: skip
    Path("stores/coco/train-text").mkdir(parents=True)
    result = run("train", "--config", config, "--out", "runs/coco/few_pairs")
    assert_one_line_error(result, "stores/coco/train-text: not an embedding store (no meta.json)")
    # The validation store and the gap are checked before the training data is read.
    shutil.rmtree("stores/coco/train-text")
    shutil.copytree(stores / "texts", "stores/coco/train-text")
    result = run("train", "--config", config, "--out", "runs/coco/few_pairs")
    assert_one_line_error(result, "data.val_texts stores/coco/val-text: no such folder", "tipcap embed texts")
    shutil.copytree(stores / "texts", "stores/coco/val-text")
    result = run("train", "--config", config, "--out", "runs/coco/few_pairs")
    assert_one_line_error(
        result, "data.gap gaps/coco/few-pairs.safetensors: no such gap file",
        "`tipcap fit-gap --setting SETTING --texts STORE [--images STORE] --out "
        "gaps/coco/few-pairs.safetensors`",
    )  # fmt: skip


def test_a_missing_store_of_fit_gap_or_evaluate_names_the_command_that_builds_it(stores, tmp_path):
    missing = tmp_path / "images-1pct"
    result = run("fit-gap", "--setting", "few-pairs", "--texts", stores / "texts", "--images", missing,
                 "--out", tmp_path / "gap.safetensors")  # fmt: skip
    assert_one_line_error(
        result, f"--images {missing}: no such folder", "`tipcap embed images --images IMAGES"
    )
    result = run("evaluate", "--data", COCO_SLICE, "--split", "val", "--method", "retrieval",
                 "--texts", tmp_path / "texts", "--image-store", stores / "images", "--metrics", "bleu",
                 "--out", tmp_path / "eval")  # fmt: skip
    assert_one_line_error(result, f"--texts {tmp_path / 'texts'}: no such folder", "`tipcap embed texts")


def test_template_without_a_clip_names_the_flags_that_give_one(stores, tmp_path):
    common = ("--data", COCO_SLICE, "--split", "val", "--method", "template", "--metrics", "bleu")
    result = run("evaluate", *common, "--images", stores / "coco", "--out", tmp_path / "eval")
    assert_one_line_error(
        result, "--method template: no CLIP to embed the images with", "--texts", "--image-store"
    )
    assert "--clip" not in result.stderr  # evaluate has no such flag
    # An image store records its CLIP, which then embeds the entities too.
    result = run("evaluate", *common, "--image-store", stores / "images", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output


def test_evaluate_warns_of_a_random_clip_once(stores, tmp_path):
    """The CLIP is loaded to embed the images and again to caption them: one warning all the same."""
    result = run("evaluate", "--data", COCO_SLICE, "--split", "val", "--method", "retrieval",
                 "--texts", stores / "texts", "--images", stores / "coco", "--metrics", "bleu",
                 "--out", tmp_path / "eval")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr.count("has random weights") == 1, result.stderr


def test_a_clip_dim_that_is_not_the_stores_names_the_override(stores, tmp_path):
    result = run("train", "--config", ROOT / "experiments" / "tiny.yaml", "--set", "model.clip_dim=128",
                 "--set", f"data.train_texts={stores / 'texts'}", "--out", tmp_path / "run")  # fmt: skip
    assert_one_line_error(result, "model.clip_dim is 128 but data.train_texts", "--set model.clip_dim=32")


def test_training_refuses_captions_that_do_not_cover_the_store(stores, tmp_path):
    texts = copy_store(stores / "texts", tmp_path / "texts")
    captions = json.loads((texts / "captions.json").read_text())
    (texts / "captions.json").write_text(json.dumps(captions[:-10]))
    result = run("train", "--config", ROOT / "experiments" / "tiny.yaml",
                 "--set", f"data.train_texts={texts}", "--out", tmp_path / "run")  # fmt: skip
    assert_one_line_error(result, str(texts), "captions.json")


# --- 8. damaged model folders, CLIP files and stores found by tools/bad_input_probe.py ---------------


def tiny_model(directory: Path, prefix_length: int = 2) -> Path:
    """Save an untrained tiny caption model (no CLIP) to ``directory``."""
    from tipcap.config import ModelConfig
    from tipcap.model import TIPCap
    from tipcap.training.data import word_level_tokenizer

    tokenizer = word_level_tokenizer(["a red circle ."])
    language_model = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32,
                      "vocab_size": len(tokenizer)}  # fmt: skip
    config = ModelConfig(clip_dim=8, language_model_config=language_model, prefix_length=prefix_length,
                         max_caption_tokens=8)  # fmt: skip
    TIPCap.build(config, tokenizer).save_pretrained(directory)
    return directory


def half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda m: half(m / "config.json"), "config.json: not valid JSON"),
        (lambda m: (m / "config.json").write_text("[1, 2]"), "config.json: not a tipcap model config"),
        (lambda m: (m / "config.json").write_bytes(b'{"format": "caf\xe9"}'), "UTF-8"),
        (lambda m: half(m / "model.safetensors"), "model.safetensors: not a readable safetensors file"),
        (lambda m: (m / "tokenizer.json").write_text("{not json"), "tokenizer files cannot be read"),
        (lambda m: (m / "tokenizer.json").write_text("{}"), "tokenizer files cannot be read"),
        (
            lambda m: (m / "model.safetensors").write_bytes(
                (tiny_model(m.parent / "other", prefix_length=3) / "model.safetensors").read_bytes()
            ),
            "weights do not fit the model its config.json describes",
        ),
        (
            lambda m: (m / "config.json").write_text(
                json.dumps({**json.loads((m / "config.json").read_text()), "entity_names": 5})
            ),
            "'entity_names' must be a list",
        ),
    ],
    ids=[
        "config-truncated",
        "config-a-list",
        "config-not-utf8",
        "weights-truncated",
        "tokenizer-bad-json",
        "tokenizer-empty",
        "weights-of-another-shape",
        "entity-names-a-number",
    ],
)
def test_damaged_model_folder_is_one_line(tmp_path, damage, needle):
    model = tiny_model(tmp_path / "model")
    damage(model)
    image = write_images(tmp_path / "images", 1)[0]
    result = run("caption", image, "--model", model, "--device", "cpu")
    assert_one_line_error(result, str(model), needle)


def test_clip_config_and_weights_that_cannot_build_a_clip_are_one_line(tmp_path, tiny_clip):
    config = json.loads(tiny_clip.read_text())
    (tmp_path / "zero.json").write_text(json.dumps({**config, "embed_dim": 0}))
    result = embed_texts(COCO_SLICE, tmp_path / "zero.json", tmp_path / "s1")
    assert_one_line_error(result, "--clip", "embed_dim must be a positive integer")
    for name, data in (("garbage.bin", b"not a checkpoint"), ("empty.bin", b"")):
        (tmp_path / name).write_bytes(data)
        result = run("embed", "texts", "--corpus", COCO_SLICE, "--clip", tiny_clip, "--pretrained",
                     tmp_path / name, "--out", tmp_path / "s2", "--no-progress")  # fmt: skip
        assert_one_line_error(result, f"--pretrained {tmp_path / name}")
    # No store is begun (nor left half-written) for a CLIP that cannot be built.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty.bin", "garbage.bin", "zero.json"]


def test_limit_above_one_hundred_percent_is_refused(tmp_path, tiny_clip, image_folder):
    result = embed_images(image_folder, tiny_clip, tmp_path / "store", "--limit", "200%")
    assert_one_line_error(result, "--limit '200%'", "at most 100%")


def test_a_store_whose_bytes_changed_at_the_same_size_is_rebuilt_not_reused(stores, tmp_path, tiny_clip):
    store = copy_store(stores / "texts", tmp_path / "texts")
    poison_row(store, 5)
    EmbeddingStore.open(store)  # the size is right: opening does not read every byte
    result = embed_texts(COCO_SLICE, tiny_clip, store)
    assert result.exit_code == 0 and result.stdout.startswith("wrote 120"), result.output
    assert "checksum" in result.stderr
    assert store_bytes(store) == store_bytes(stores / "texts")


@pytest.mark.parametrize(
    "args", [("--setting", "few-pairs"), ("--setting", "text-only", "--kind", "isotropic")]
)
def test_mu_from_where_it_would_be_ignored_is_refused(stores, tmp_path, args):
    gap = tmp_path / "source.safetensors"
    source = run("fit-gap", "--setting", "text-only", "--kind", "isotropic", "--texts", stores / "texts",
                 "--out", gap)  # fmt: skip
    assert source.exit_code == 0, source.output
    out = tmp_path / "gap.safetensors"
    result = run("fit-gap", *args, "--texts", stores / "texts", "--images", stores / "images",
                 "--mu-from", gap, "--out", out)  # fmt: skip
    assert_one_line_error(result, "--mu-from")
    assert not out.exists()


def test_a_full_disk_under_safetensors_is_one_line(stores, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    out = tmp_path / "gap.safetensors"
    result = run("fit-gap", "--setting", "text-only", "--kind", "isotropic", "--texts", stores / "texts",
                 "--out", out)  # fmt: skip
    assert_one_line_error(result, str(out), "the disk is full")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "value",
    ["{model_type: bogus}", "{model_type: gpt2, n_embd: 0, n_head: 2}", "{model_type: gpt2, n_layer: x}"],
)
def test_a_language_model_config_transformers_cannot_build_is_one_line(stores, tmp_path, value):
    result = run("train", "--config", ROOT / "experiments" / "tiny.yaml", "--set",
                 f"data.train_texts={stores / 'texts'}", "--set", f"model.language_model_config={value}",
                 "--out", tmp_path / "run")  # fmt: skip
    assert_one_line_error(result, "model.language_model_config")


def test_an_unused_vocabulary_is_warned_about(stores, tmp_path):
    result = run("train", "--config", ROOT / "experiments" / "tiny.yaml", "--set",
                 f"data.train_texts={stores / 'texts'}", "--set", "model.vocabulary=/nonexistent.json",
                 "--set", "train.max_steps=2", "--out", tmp_path / "run", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "model.vocabulary /nonexistent.json is not used: model.prompt is none" in result.stderr


def test_resume_passes_over_a_damaged_checkpoint_and_refuses_when_all_are(stores, tmp_path):
    args = ["train", "--config", ROOT / "experiments" / "tiny.yaml", "--no-progress",
            "--set", f"data.train_texts={stores / 'texts'}", "--set", "train.max_steps=6",
            "--set", "train.checkpoint_every=2", "--set", "train.log_every=2",
            "--set", "train.warmup_steps=0", "--set", "train.keep_checkpoints=3"]  # fmt: skip
    assert run(*args, "--out", tmp_path / "whole").exit_code == 0
    reference = (tmp_path / "whole" / "model" / "model.safetensors").read_bytes()
    checkpoints = sorted((tmp_path / "whole" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-00000002", "step-00000004", "step-00000006"]

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.yaml", "run.json", "metrics.jsonl"):
        (damaged / name).write_bytes((tmp_path / "whole" / name).read_bytes())
    for checkpoint in checkpoints[:2]:  # as if the run had been killed after step 4
        shutil.copytree(checkpoint, damaged / "checkpoints" / checkpoint.name)
    half(damaged / "checkpoints" / "step-00000004" / "model.safetensors")
    result = run(*args, "--resume", "--out", damaged)
    assert result.exit_code == 0, result.output
    assert "step-00000004 cannot be loaded" in result.stderr
    # Resumed from step 2, the run draws what the uninterrupted run drew.
    assert (damaged / "model" / "model.safetensors").read_bytes() == reference

    for checkpoint in (damaged / "checkpoints").iterdir():
        half(checkpoint / "trainer.pt")
    result = run(*args, "--resume", "--out", damaged)
    assert_one_line_error(result, "--resume", str(damaged / "checkpoints"), "damaged")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"seeds": []}, "config key 'seeds'"),
        ({"vocabulary": "missing-entities.json"}, "config key 'vocabulary'"),
        (
            {
                "web_pairs": "missing.jsonl",
                "cells": [{"name": "w", "kind": "gaussian", "setting": "web-pairs"}],
            },
            "config key 'web_pairs'",
        ),
        ({"karpathy": "typo.json"}, "config key 'karpathy'"),
        ({"image_root": "no-such-folder"}, "config key 'image_root'"),
    ],
)
def test_ablate_checks_its_inputs_before_it_records_the_grid(tmp_path, tiny_clip, change, needle):
    grid = {"karpathy": str(COCO_SLICE), "embed": {"model": str(tiny_clip), "pretrained": "none"},
            "cells": [{"name": "none", "kind": "none"}], **change}  # fmt: skip
    config = tmp_path / "grid.yaml"
    config.write_text(json.dumps(grid))
    with contextlib.chdir(tmp_path):  # relative paths in the grid are relative to here
        result = run("ablate", config, "--plan", "--out", tmp_path / "out")
    assert_one_line_error(result, needle)
    assert not (tmp_path / "out" / "grid.json").exists()


# --- 9. lengths past the language model's positions, seeds past torch's, booleans for numbers -----------


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["model.prefix_length=120"],
            "model.prefix_length 120 + model.max_caption_tokens 30 = 150 positions, more than the 128 of "
            "model.language_model_config.n_positions",
        ),
        (["model.max_caption_tokens=500"], "model.max_caption_tokens 500"),
        (["model.prefix_length=100000"], "model.prefix_length 100000"),  # a projector of 327 TB
        (
            ["model.prompt=pim", "model.pim_tokens=true", "model.prefix_length=91"],
            "model.max_prompt_words 8 (one position each with pim_tokens)",
        ),
        (
            ["train.seed=99999999999999999999"],
            "config key 'train.seed': input should be less than 4294967296",
        ),
        (
            ["train.max_steps=true"],
            "config key 'train.max_steps': input should be a number, not true or false",
        ),
    ],
)
def test_train_refuses_lengths_seeds_and_booleans_before_any_work(stores, tmp_path, overrides, needle):
    result = run("train", "--config", ROOT / "experiments" / "tiny.yaml", "--set",
                 f"data.train_texts={stores / 'texts'}", *(x for o in overrides for x in ("--set", o)),
                 "--out", tmp_path / "run", "--no-progress")  # fmt: skip
    assert_one_line_error(result, needle)
    assert not (tmp_path / "run").exists()


def tiny_settings(tokenizer, **extra) -> dict:
    """A one-layer GPT-2 of width 8 for ``tokenizer``."""
    return {
        "model_type": "gpt2",
        "n_layer": 1,
        "n_head": 2,
        "n_embd": 8,
        "vocab_size": len(tokenizer),
        **extra,
    }


def test_a_prefix_past_the_language_models_own_positions_is_refused_before_it_is_allocated():
    from tipcap.config import ModelConfig
    from tipcap.model import TIPCap
    from tipcap.training.data import word_level_tokenizer

    tokenizer = word_level_tokenizer(["a red circle ."])
    # No n_positions in the settings: GPT-2's default, 1024, is known once the language model is built.
    config = ModelConfig(clip_dim=8, language_model_config=tiny_settings(tokenizer), prefix_length=1100,
                         max_caption_tokens=8)  # fmt: skip
    message = "model.prefix_length 1100 + model.max_caption_tokens 8 = 1108 positions, more than the 1024"
    with pytest.raises(TipcapError, match=re.escape(message)):
        TIPCap.build(config, tokenizer)


def test_a_hard_prompt_model_counts_the_longest_prompt_of_its_vocabulary():
    from tipcap.config import ModelConfig
    from tipcap.model import TIPCap
    from tipcap.training.data import word_level_tokenizer

    tokenizer = word_level_tokenizer(["a red circle ."])
    vocabulary = ["red", "small red circle one", "small red circle two", "small red circle three",
                  "small red circle four"]  # fmt: skip
    settings = tiny_settings(tokenizer, n_positions=32)

    def build(words: int) -> TIPCap:
        config = ModelConfig(clip_dim=8, language_model_config=settings, prompt="hard", prefix_length=2,
                             max_caption_tokens=8, max_prompt_words=words)  # fmt: skip
        return TIPCap.build(config, tokenizer, entity_names=vocabulary)

    # "there are w w w w , w w w w , w w w w in image ." is 19 tokens: 2 + 19 + 8 positions fit in 32.
    build(3)
    message = "a hard prompt of 24 tokens (its model.max_prompt_words 4 longest vocabulary words)"
    with pytest.raises(TipcapError, match=re.escape(message)):
        build(4)


def test_caption_refuses_a_model_whose_captions_would_run_past_its_positions(tmp_path, tiny_clip):
    model = build_model(tmp_path / "model", tiny_clip, "none", seed=0)
    document = json.loads((model / "config.json").read_text())
    document["model"]["max_caption_tokens"] = 500  # as a run trained with that setting saved it
    (model / "config.json").write_text(json.dumps(document))
    write_images(tmp_path / "images", 1)
    result = run("caption", tmp_path / "images", "--model", model, "--device", "cpu", "--beams", 1)
    assert_one_line_error(
        result,
        f"{model / 'config.json'}: model.prefix_length 2 + model.max_caption_tokens 500 = 502 positions, "
        "more than the 64 of model.language_model_config.n_positions",
    )
