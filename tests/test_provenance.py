"""One provenance record beside every artifact, cache keys taken from it, and training that conditions as
it claims: the precision in a store's key, supervised validation on image embeddings, the TensorBoard
writer closed."""

import json
import sys
import types

import pytest
import torch
from conftest import COCO_260, TINY_CONFIG, run
from safetensors import safe_open

from tipcap import provenance
from tipcap.config import load_config
from tipcap.model import TIPCap
from tipcap.store import EmbeddingStore
from tipcap.training.data import collate, load_caption_set
from tipcap.training.loop import train

RECORD_FIELDS = {"artifact", "config", "inputs", "tipcap", "versions", "command"}


def test_another_precision_rebuilds_the_store_and_says_so(tiny_clip, tmp_path):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a dog on the grass.\na cat on a mat.\na red bus on the street.\n")
    common = ["embed", "texts", "--corpus", corpus, "--clip", tiny_clip, "--pretrained", "none",
              "--out", tmp_path / "store", "--no-progress"]  # fmt: skip
    first = run(*common, "--precision", "fp32")
    assert first.exit_code == 0 and "wrote" in first.output, first.output
    again = run(*common, "--precision", "fp32")
    assert again.exit_code == 0 and "reused" in again.output, again.output
    second = run(*common, "--precision", "bf16")
    assert second.exit_code == 0, second.output
    assert "built with other precision; rebuilding it" in second.output and "wrote" in second.output
    store = EmbeddingStore.open(tmp_path / "store")
    assert store.key["config"]["precision"] == "bf16" and store.key["config"]["device"] == "cpu"
    record = json.loads((tmp_path / "store" / "provenance.json").read_text())
    assert set(record) == RECORD_FIELDS and provenance.key(record) == store.key


def test_a_store_encoded_by_other_encoder_code_is_rebuilt(tiny_clip, tmp_path, monkeypatch):
    """A store kept from a version whose encoder rounded differently is not reused: a prompt vocabulary
    encoded by the current code would not match it (what made cached demos give other prompt cells)."""
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a dog on the grass.\na cat on a mat.\n")
    command = ["embed", "texts", "--corpus", corpus, "--clip", tiny_clip, "--pretrained", "none",
               "--out", tmp_path / "store", "--no-progress"]  # fmt: skip
    assert run(*command).exit_code == 0
    monkeypatch.setattr("tipcap.embed.ENCODER_VERSION", -1)
    again = run(*command)
    assert again.exit_code == 0 and "built with other encoder; rebuilding it" in again.output, again.output
    assert EmbeddingStore.open(tmp_path / "store").key["config"]["encoder"] == -1


def test_gap_training_run_and_model_carry_the_same_record_format(prompt_model):
    root, _, model_dir = prompt_model
    with safe_open(root / "gap.safetensors", framework="pt") as f:
        gap_record = json.loads(f.metadata()["provenance"])
    assert set(gap_record) == RECORD_FIELDS and gap_record["artifact"] == "gap"
    assert gap_record["config"]["kind"] == "isotropic" and gap_record["config"]["sigma2"] == 0.05
    assert gap_record["inputs"] == {"texts": EmbeddingStore.open(root / "train").digest}

    run_record = json.loads((model_dir.parent / "provenance.json").read_text())
    model_record = json.loads((model_dir / "provenance.json").read_text())
    # A training run also names its captions' data set, outside the key, for the model card (None here).
    assert run_record == model_record and set(run_record) == RECORD_FIELDS | {"dataset"}
    assert run_record["dataset"] is None
    assert (
        run_record["config"]["model"]["prompt"] == "pim" and run_record["config"]["train"]["max_steps"] == 800
    )
    assert run_record["inputs"]["train_texts"] == EmbeddingStore.open(root / "train").digest
    assert run_record["inputs"]["gap"] == provenance.sha256_file(root / "gap.safetensors")


@pytest.fixture(scope="module")
def coco_stores(tmp_path_factory, tiny_clip, coco_tree):
    """Caption and image stores of the 260-image COCO slice's train split, joined on image id."""
    root = tmp_path_factory.mktemp("supervised")
    clip = ["--clip", tiny_clip, "--pretrained", "none", "--no-progress"]
    texts = run("embed", "texts", "--corpus", COCO_260, "--split", "train", "--out", root / "texts", *clip)
    assert texts.exit_code == 0, texts.output
    images = run("embed", "images", "--images", COCO_260, "--image-root", coco_tree[0], "--split", "train",
                 "--workers", 0, "--out", root / "images", *clip)  # fmt: skip
    assert images.exit_code == 0, images.output
    return root / "texts", root / "images"


def test_supervised_validation_reads_the_captions_image_embeddings(coco_stores, tmp_path):
    texts, images = coco_stores
    overrides = [f"data.train_texts={texts}", f"data.train_images={images}", f"data.val_texts={texts}",
                 f"data.val_images={images}", "train.batch_size=64", "train.epochs=1",
                 "train.max_steps=null", "train.warmup_steps=0"]  # fmt: skip
    model_dir = train(load_config(TINY_CONFIG, overrides), tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (logged,) = [r["val_loss"] for r in records if "val_loss" in r]

    model = TIPCap.from_pretrained(model_dir, device="cpu")
    rows = load_caption_set(
        EmbeddingStore.open(texts), model.tokenizer, 30, None, EmbeddingStore.open(images)
    )
    text_rows = load_caption_set(EmbeddingStore.open(texts), model.tokenizer, 30, None)

    def loss(data) -> float:
        with torch.no_grad():
            embeddings, ids, mask = collate(data, list(range(len(data))))
            return float(model(model.training_inputs(embeddings), ids, mask).loss)

    assert logged == pytest.approx(loss(rows), abs=1e-4)
    assert abs(logged - loss(text_rows)) > 1e-3  # what was logged before: the captions' text embeddings


def test_supervised_validation_needs_the_image_store(coco_stores, tmp_path):
    texts, images = coco_stores
    overrides = [f"data.train_texts={texts}", f"data.train_images={images}", f"data.val_texts={texts}"]
    with pytest.raises(Exception, match=r"data\.val_images goes with data\.train_images"):
        train(load_config(TINY_CONFIG, overrides), tmp_path / "run", progress=False)


def test_the_tensorboard_writer_is_closed(prompt_model, tmp_path, monkeypatch):
    writers = []

    class Writer:
        def __init__(self, folder):
            self.closed = False
            writers.append(self)

        def add_scalar(self, *args) -> None:
            pass

        def close(self) -> None:
            self.closed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    root = prompt_model[0]
    overrides = [f"data.train_texts={root / 'train'}", "train.max_steps=4", "train.log_every=2"]
    train(load_config(TINY_CONFIG, overrides), tmp_path / "run", progress=False)
    assert len(writers) == 1 and writers[0].closed
