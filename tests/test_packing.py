"""Padding-free packed training: the packed loss and gradients equal the padded batch's; packed runs train."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tipcap.config import load_config
from tipcap.errors import TipcapError
from tipcap.training.data import collate
from tipcap.training.loop import train
from tipcap.training.setup import build_training

TINY = Path(__file__).parent.parent / "experiments" / "tiny.yaml"
PROMPTS = [["dog"], [], ["dog", "frisbee"], ["person", "surfboard", "wave"], [], ["bus"]]


def loss_and_gradients(model, batch, prompts, pack_length):
    """The model's caption loss on ``batch`` and the gradient of every trained parameter."""
    model.zero_grad(set_to_none=True)
    loss = model(*batch, prompts, pack_length).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("prompt", ["none", "hard", "pim", "pim-tokens"])
@pytest.mark.parametrize("pack_length", [48, 256])
def test_packed_loss_and_gradients_equal_the_padded_batch(coco_texts, prompt, pack_length):
    tokens = prompt == "pim-tokens"
    prompt = "pim" if tokens else prompt
    overrides = [f"data.train_texts={coco_texts}", f"model.prompt={prompt}", f"model.pim_tokens={tokens}"]
    config = load_config(TINY, overrides)
    setup = build_training(config, torch.device("cpu"))
    model, data = setup.model.train(), setup.train_data
    # Captions of different lengths, so that the padded batch holds padding to drop.
    rows = sorted(range(len(data)), key=lambda r: len(data.token_ids[r]))[::20]
    embeddings, ids, mask = collate(data, rows)
    assert (mask == 0).any()
    batch = (model.training_inputs(embeddings), ids, mask)
    prompts = PROMPTS[: len(rows)] if prompt != "none" else None

    padded_loss, padded = loss_and_gradients(model, batch, prompts, None)
    packed_loss, packed = loss_and_gradients(model, batch, prompts, pack_length)
    assert abs(float(packed_loss) - float(padded_loss)) < 1e-5
    assert packed.keys() == padded.keys() and len(padded) > 4
    for name, gradient in padded.items():
        assert (packed[name] - gradient).norm() <= 1e-4 * gradient.norm() + 1e-12, name


def test_packed_sequences_do_not_attend_to_each_other(coco_texts):
    """Each caption's logits in a packed row equal its logits computed alone."""
    config = load_config(TINY, [f"data.train_texts={coco_texts}"])
    setup = build_training(config, torch.device("cpu"))
    model, data = setup.model.eval(), setup.train_data
    rows = [0, 1, 2]
    embeddings, ids, mask = collate(data, rows)
    with torch.no_grad():
        packed = model(embeddings, ids, mask, pack_length=128).logits
        lengths = [config.model.prefix_length + len(data.token_ids[r]) for r in rows]
        assert packed.shape[0] == 1  # all three share one row
        # First fit, longest first: the row holds the sequences by decreasing length.
        start = 0
        for row in sorted(range(3), key=lambda i: (-lengths[i], i)):
            alone = model(*collate(data, [rows[row]])).logits[0]
            assert torch.allclose(packed[0, start : start + lengths[row]], alone, atol=1e-5)
            start += lengths[row]


def test_a_pack_length_shorter_than_a_sequence_is_refused(coco_texts, tmp_path):
    overrides = ["train.packing=true", "train.pack_length=8", "train.max_steps=1"]
    config = load_config(TINY, [f"data.train_texts={coco_texts}", *overrides])
    with pytest.raises(TipcapError, match=r"train\.pack_length 8 is shorter"):
        train(config, tmp_path / "run", progress=False)


def test_packed_training_learns_like_bucketed_training(coco_texts, tmp_path):
    losses = {}
    for packing in ("false", "true"):
        overrides = [f"data.train_texts={coco_texts}", f"train.packing={packing}", "train.max_steps=60"]
        out = tmp_path / f"packing-{packing}"
        train(load_config(TINY, overrides), out, progress=False)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[packing] = [r["train_loss"] for r in records if "train_loss" in r]
    # The same captions and optimiser; only the batches' composition differs, which moves each logged
    # loss (the mean over 20 steps) by under 7% (5.09 against 5.18 first, 2.38 against 2.55 last).
    assert losses["true"][0] > 3.0 and losses["true"][-1] < 0.5 * losses["true"][0]
    assert len(losses["true"]) == len(losses["false"]) == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=0.1)


@pytest.mark.slow
def test_compiled_training_matches_uncompiled_and_keeps_parameter_names(coco_texts, tmp_path):
    weights, losses = {}, {}
    for compiled in ("false", "true"):
        overrides = [f"data.train_texts={coco_texts}", "train.packing=true", f"train.compile={compiled}",
                     "train.max_steps=3", "train.log_every=1", "train.warmup_steps=0"]  # fmt: skip
        out = tmp_path / f"compile-{compiled}"
        train(load_config(TINY, overrides), out, progress=False)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["train_loss"] for r in records if "train_loss" in r]
        weights[compiled] = load_file(out / "model" / "model.safetensors")
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    assert weights["true"].keys() == weights["false"].keys()
    for name, tensor in weights["false"].items():
        assert torch.allclose(weights["true"][name], tensor, atol=1e-4), name


def test_prompt_word_vectors_follow_the_prefix_and_their_padding_changes_nothing(coco_texts):
    """With ``pim_tokens`` each row's context is [padding | prefix | its words' vectors]: a row's logits are
    the same alone and in a batch whose other rows hold more words (padding), a row without words reads
    the prompt-free context, and each word's vector reaches the caption."""
    overrides = [f"data.train_texts={coco_texts}", "model.prompt=pim", "model.pim_tokens=true"]
    setup = build_training(load_config(TINY, overrides), torch.device("cpu"))
    model = setup.model.eval()
    embeddings, ids, mask = collate(setup.train_data, [0, 1, 2])
    prompts = [["dog"], [], ["person", "surfboard", "wave"]]
    with torch.no_grad():
        batch = model(embeddings, ids, mask, prompts).logits
        for row, words in enumerate(prompts):
            alone = model(embeddings[row : row + 1], ids[row : row + 1], mask[row : row + 1], [words]).logits
            # The batch's context is longer by its padding: compare the caption's positions.
            length = int(mask[row].sum())
            assert torch.allclose(batch[row, -ids.shape[1] :][:length], alone[0, -ids.shape[1] :][:length],
                                  atol=1e-5), row  # fmt: skip
        plain = model(embeddings, ids, mask).logits
        assert torch.allclose(batch[1, -ids.shape[1] :], plain[1, -ids.shape[1] :], atol=1e-5)
        other = model(embeddings[:1], ids[:1], mask[:1], [["cat"]]).logits
    assert (other[0, -ids.shape[1] :] - batch[0, -ids.shape[1] :]).abs().max() > 1e-3
