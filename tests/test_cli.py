"""The command line, end to end on real COCO captions with a tiny CLIP."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import write_images
from PIL import Image

from tipcap import __version__
from tipcap.cli import main
from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.store import EmbeddingStore


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def embed_texts_args(corpus, clip, out, *extra):
    return ("embed", "texts", "--corpus", corpus, "--clip", clip, "--pretrained", "none", "--out", out,
            "--no-progress", *extra)  # fmt: skip


def test_version_and_help():
    assert run("--version").output.strip() == f"tipcap, version {__version__}"
    result = run("--help")
    assert result.exit_code == 0 and "embed" in result.output
    result = run("embed", "images", "--help")
    assert "--image-root" in result.output and "--limit" in result.output and "--strict" in result.output


def test_threads_option_sets_torchs_threads_before_torch_loads():
    # In a fresh interpreter: a thread count set and reset in this one changes how later encodings round.
    code = (
        "import os, torch; from click.testing import CliRunner; from tipcap.cli import main; "
        "assert CliRunner().invoke(main, ['--threads', '1', 'train', '--help']).exit_code == 0; "
        "print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], os.environ.get('GOMP_SPINCOUNT'), "
        "os.environ.get('OMP_WAIT_POLICY'))"
    )
    unset = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TIPCAP_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    # Read by OpenMP when torch loads in a fresh process: the command sets it before loading it. One
    # thread waits for no other, so no wait policy is set (tests/test_threads.py tests the policies).
    assert found.stdout.split() == ["1", "1", "None", "None"]
    result = run("--threads", "0", "train", "--help")
    assert result.exit_code != 0 and "--threads" in result.output


def test_embed_texts_writes_store_with_image_ids(tmp_path, coco_slice, tiny_clip):
    out = tmp_path / "store"
    result = run(*embed_texts_args(coco_slice, tiny_clip, out, "--split", "val"))
    assert result.exit_code == 0, result.output
    assert "wrote 60 caption embeddings" in result.output
    store = EmbeddingStore.open(out)
    document = json.loads(coco_slice.read_text())
    val = [image for image in document["images"] if image["split"] == "val"]
    assert store.ids == [image["cocoid"] for image in val for _ in image["sentences"]]
    captions = store.captions()
    assert captions[0] == val[0]["sentences"][0]["raw"].strip().rstrip(".") + "."
    encoder = ClipEncoder.load(ClipSpec(str(tiny_clip), "none"), device="cpu")
    expected = encoder.encode_texts(captions).embeddings
    assert (store.embeddings().float() - expected).abs().max().item() < 2e-3  # fp16 storage


def test_second_run_reuses_and_other_clip_rebuilds(tmp_path, coco_slice, tiny_clip, other_clip):
    out = tmp_path / "store"
    assert run(*embed_texts_args(coco_slice, tiny_clip, out)).exit_code == 0
    result = run(*embed_texts_args(coco_slice, tiny_clip, out))
    assert result.exit_code == 0 and result.stdout.startswith("reused")
    result = run(*embed_texts_args(coco_slice, other_clip, out))
    assert result.exit_code == 0 and result.stdout.startswith("wrote 120")
    assert EmbeddingStore.open(out).clip["model"] == "other-clip"
    result = run(*embed_texts_args(coco_slice, tiny_clip, out, "--period", "keep"))
    assert result.stdout.startswith("wrote 120"), "a different caption policy must rebuild"


def test_interrupted_run_resumes_to_identical_store(tmp_path, coco_slice, tiny_clip, monkeypatch):
    reference = tmp_path / "reference"
    assert run(*embed_texts_args(coco_slice, tiny_clip, reference, "--shard-size", "25")).exit_code == 0

    calls = []
    original = ClipEncoder.encode_texts

    def dies_on_third_shard(self, texts, **kwargs):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, texts, **kwargs)

    monkeypatch.setattr(ClipEncoder, "encode_texts", dies_on_third_shard)
    out = tmp_path / "store"
    result = run(*embed_texts_args(coco_slice, tiny_clip, out, "--shard-size", "25"))
    assert result.exit_code != 0 and not (out / "meta.json").exists()

    calls.clear()
    monkeypatch.setattr(ClipEncoder, "encode_texts", original)
    assert run(*embed_texts_args(coco_slice, tiny_clip, out, "--shard-size", "25")).exit_code == 0
    assert len(EmbeddingStore.open(out).shards) == 5
    # Byte for byte: shards, ids, captions and meta.
    files = sorted(path.name for path in reference.iterdir())
    assert sorted(path.name for path in out.iterdir()) == files and "meta.json" in files
    assert all((out / name).read_bytes() == (reference / name).read_bytes() for name in files)


@pytest.mark.parametrize(
    ("corpus_text", "message"),
    [
        ('{"images": [{"filename": "a.jpg", "split": "val", "sente', "not valid JSON at line 1, column"),
        ('{"images": [{"filename": "a.jpg", "split": "val"}]}', "images[0] (a.jpg) has no 'sentences' field"),
    ],
)
def test_bad_corpus_gives_one_line_error(tmp_path, tiny_clip, corpus_text, message):
    corpus = tmp_path / "corpus.json"
    corpus.write_text(corpus_text)
    result = run(*embed_texts_args(corpus, tiny_clip, tmp_path / "out"))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and message in result.stderr and str(corpus) in result.stderr
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_empty_captions_skipped_or_strict(tmp_path, tiny_clip):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("A dog runs.\n   \nA cat sleeps\n")
    result = run(*embed_texts_args(corpus, tiny_clip, tmp_path / "out"))
    assert result.exit_code == 0 and "wrote 2 caption embeddings" in result.output
    assert "1 empty captions skipped" in result.output
    result = run(*embed_texts_args(corpus, tiny_clip, tmp_path / "strict", "--strict"))
    assert result.exit_code == 1 and f"{corpus}: line 2 is empty" in result.output


def embed_images_args(source, clip, out, *extra):
    return ("embed", "images", "--images", source, "--clip", clip, "--pretrained", "none", "--out", out,
            "--workers", "0", "--no-progress", *extra)  # fmt: skip


def test_embed_images_skips_corrupt_file_and_lists_it(tmp_path, image_folder, tiny_clip):
    out = tmp_path / "store"
    result = run(*embed_images_args(image_folder, tiny_clip, out))
    assert result.exit_code == 0, result.output
    assert "wrote 6 image embeddings" in result.output and "1 unreadable images skipped" in result.output
    assert "Traceback" not in result.output
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["id"] for s in skipped] == ["broken_000.jpg"] and "corrupt" in skipped[0]["reason"]
    store = EmbeddingStore.open(out)
    assert store.ids == [f"img_{i:03d}.jpg" for i in range(6)]

    result = run(*embed_images_args(image_folder, tiny_clip, tmp_path / "strict", "--strict"))
    assert result.exit_code == 1 and "broken_000.jpg" in result.output and "Traceback" not in result.output


def test_embed_images_skips_an_image_too_thin_for_clip(tmp_path, image_folder, tiny_clip):
    Image.new("RGB", (1, 500)).save(image_folder / "thin.png")
    out = tmp_path / "store"
    result = run(*embed_images_args(image_folder, tiny_clip, out))
    assert result.exit_code == 0 and "wrote 6 image embeddings" in result.output, result.output
    skipped = {s["id"]: s["reason"] for s in json.loads((out / "skipped.json").read_text())}
    assert skipped["thin.png"] == (
        f"{image_folder / 'thin.png'}: 1×500 pixels, more than 20 times as high as it is wide; CLIP sees "
        "only the centre square of an image, so crop it to that part first"
    )


def test_embed_images_from_karpathy_file(tmp_path, coco_slice, tiny_clip):
    document = json.loads(coco_slice.read_text())
    root = tmp_path / "coco"
    for image in document["images"]:
        path = root / image["filepath"] / image["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 36), (image["cocoid"] % 256, 90, 30)).save(path)
    out = tmp_path / "store"
    result = run(*embed_images_args(coco_slice, tiny_clip, out, "--image-root", root, "--split", "train"))
    assert result.exit_code == 0, result.output
    restval = [image["cocoid"] for image in document["images"] if image["split"] == "restval"]
    assert EmbeddingStore.open(out).ids == restval

    result = run(*embed_images_args(coco_slice, tiny_clip, tmp_path / "few", "--image-root", root,
                                    "--limit", "25%", "--seed", "3"))  # fmt: skip
    ids = EmbeddingStore.open(tmp_path / "few").ids
    assert len(ids) == 6 and set(ids) <= {image["cocoid"] for image in document["images"]}


def test_image_store_rebuilds_when_files_change(tmp_path, tiny_clip):
    folder = tmp_path / "images"
    write_images(folder, 4)
    out = tmp_path / "store"
    assert run(*embed_images_args(folder, tiny_clip, out)).exit_code == 0
    assert run(*embed_images_args(folder, tiny_clip, out)).stdout.startswith("reused")
    shutil.copy(folder / "img_000.jpg", folder / "img_new.jpg")
    result = run(*embed_images_args(folder, tiny_clip, out))
    assert result.stdout.startswith("wrote 5 image embeddings")
    first, copy = EmbeddingStore.open(out).embeddings()[[0, 4]]
    assert torch.equal(first, copy)


def test_evaluate_help_lists_every_eval_config_field():
    from dataclasses import fields

    from tipcap.config import EvalConfig

    result = run("evaluate", "--help")
    assert result.exit_code == 0
    missing = [f.name for f in fields(EvalConfig) if f"--{f.name.replace('_', '-')} " not in result.output]
    assert not missing, missing
    assert "--config FILE" in result.output and "--set KEY=VALUE" in result.output


def test_embed_takes_its_clip_from_a_config_file(tmp_path, coco_slice, tiny_clip):
    config = tmp_path / "embed.yaml"
    config.write_text(json.dumps({"embed": {"model": str(tiny_clip), "pretrained": "none"}}))
    args = ("embed", "texts", "--corpus", coco_slice, "--no-progress", "--config", config)
    result = run(*args, "--out", tmp_path / "store")
    assert result.exit_code == 0 and "wrote 120 caption embeddings" in result.output, result.output
    assert EmbeddingStore.open(tmp_path / "store").clip["model"] == "tiny-clip"
    result = run(*args, "--out", tmp_path / "other", "--set", "embed.init_seed=-1")
    assert result.exit_code == 1 and "config key 'embed.init_seed'" in result.stderr, result.output
    result = run("embed", "texts", "--corpus", coco_slice, "--out", tmp_path / "none")
    assert (
        result.exit_code == 1 and "--clip is required (or embed.model in --config or --set)" in result.stderr
    )


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seeds_outside_what_the_stages_take_are_refused_by_their_flag(tmp_path, seed):
    # 2**32 would reach torch.manual_seed only after the world is drawn; -1 numpy's seeding.
    commands = [
        ("toyworld", "--out", tmp_path / "world"),
        ("demo", "--quick", "--out", tmp_path / "demo", "--cache", tmp_path / "cache"),
        ("gap-atlas", "--texts", tmp_path / "t", "--images", tmp_path / "i", "--out", tmp_path / "atlas"),
    ]
    for command in commands:
        result = run(*command, "--seed", seed)
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '--seed': {seed} is not in the range 0<=x<=4294967295" in result.output
        assert "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def test_caption_sets_decoding_keys_only():
    result = run("caption", "x.jpg", "--model", "m", "--set", "eval.metrics=bleu")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--set 'eval.metrics=bleu': tipcap caption reads beams, max_tokens" in result.stderr, result.stderr
