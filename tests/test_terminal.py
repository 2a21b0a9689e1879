"""What the terminal shows a user of `tipcap train` and `tipcap caption`, run as a user runs them (a fresh
interpreter each, so that no warning was spent by an earlier test): tipcap's own lines, no third-party
noise."""

import os
import subprocess
import sys

import pytest
from conftest import TINY_CONFIG, write_images

from tipcap.config import load_config
from tipcap.training.loop import train


def tipcap(*args) -> subprocess.CompletedProcess:
    """``tipcap ARGS`` in a fresh interpreter, offline."""
    command = [sys.executable, "-m", "tipcap.cli", *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_training_and_captioning_print_no_third_party_warnings(coco_texts, tmp_path):
    """transformers warned of an unrecognised ``loss_type`` at the first training step; captioning a batch
    must not warn of padding either, since the attention mask is passed."""
    trained = tipcap("train", "--config", TINY_CONFIG, "--set", f"data.train_texts={coco_texts}",
                     "--set", "train.max_steps=5", "--set", "model.prompt=hard", "--out", tmp_path / "run",
                     "--no-progress")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert trained.stderr == ""
    images = write_images(tmp_path / "images", 3)
    captioned = tipcap("caption", "--model", tmp_path / "run" / "model", *images, "--beams", 3,
                       "--prompt", "dog, frisbee")  # fmt: skip
    assert captioned.returncode == 0, captioned.stderr
    assert len(captioned.stdout.strip().splitlines()) == 3
    lines = captioned.stderr.strip().splitlines()
    # The tiny CLIP's random weights, warned once, and the timings: nothing else.
    assert lines[0] == "warning: CLIP tiny-clip has random weights (--pretrained none, seed 0)."
    assert len(lines) == 2 and lines[1].startswith("time: "), captioned.stderr


CAPTION_EMBEDDINGS = """
import sys, torch
from tipcap import TIPCap
model = TIPCap.from_pretrained(sys.argv[1], device="cpu")
v = torch.nn.functional.normalize(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
for result in model.caption(embeddings=v, num_beams=1, max_new_tokens=30):
    print(len(model.tokenizer(result.caption)["input_ids"]))
"""


@pytest.mark.slow
def test_captioning_a_batch_does_not_warn_of_padding(coco_texts, tmp_path):
    """generate drops an attention mask of all ones, then the language model sees the pad token (the
    end-of-text token) fed to rows that finished their caption, and warned that input ids may be padded."""
    # Trained long enough that its captions end, at different lengths.
    config = load_config(TINY_CONFIG, [f"data.train_texts={coco_texts}", "train.max_steps=100"])
    model = train(config, tmp_path / "run", progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", CAPTION_EMBEDDINGS, str(model)], env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lengths = [int(line) for line in result.stdout.split()]
    assert len(set(lengths)) > 1  # some captions ended while others went on: the case that warned
    assert "attention_mask" not in result.stderr, result.stderr
