"""What the terminal shows a user of `tipcap train` and `tipcap caption`, run as a user runs them (a fresh
interpreter each, so that no warning was spent by an earlier test): tipcap's own lines, no third-party
noise."""

import os
import subprocess
import sys

import pytest
from conftest import TINY_CONFIG, write_images


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
