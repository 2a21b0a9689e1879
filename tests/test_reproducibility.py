"""Same resolved cell config and seed, same bytes on a CPU: whichever process, hash seed or command runs it
(``demo``, ``ablate``, or ``train`` then ``evaluate``), and whoever built the toy world and CLIP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run, tiny_clip_config

import tipcap.demo
from tipcap.demo import DemoScale
from tipcap.toy.world1 import write_toyworld

DECODER = {
    "model": {
        "clip_dim": 32,
        "language_model_config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 64,
                                  "n_positions": 64},
        "tokenizer": "word-level",
        "prefix_length": 2,
        "pim_heads": 2,
        "pim_layers": 1,
        "max_caption_tokens": 24,
    },
    "train": {"max_steps": 20, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "log_every": 10,
              "checkpoint_every": 20},
}  # fmt: skip
# A prompt-trained cell: what differed between runs of the quick demo.
CELLS = [{"name": "prompts", "kind": "gaussian", "setting": "few-pairs", "prompt": "pim",
          "eval_prompts": ["none", "oracle"]}]  # fmt: skip
EVALUATIONS = ("prompts-seed0-none", "prompts-seed0-oracle")
# The demo's world and CLIP made again by another code path, in a fresh interpreter, then ablated there.
OWN_WORLD = """
import json, sys
from pathlib import Path
from tipcap.cli import main
from tipcap.toy.clip import train_toyclip
from tipcap.toy.world1 import write_toyworld
root, grid, out = map(Path, sys.argv[1:4])
karpathy = write_toyworld(root / "world", seed=0, train=80, val=5, test=12)
spec, _ = train_toyclip(karpathy, root / "clip", steps=2, batch_size=16, seed=0,
                        config=json.loads(sys.argv[4]), progress=False)
overrides = [f"karpathy={karpathy}", f"web_pairs={root / 'world' / 'web_pairs.jsonl'}",
             f"vocabulary={root / 'world' / 'entities.json'}", f"embed.model={spec.model}",
             f"embed.pretrained={spec.pretrained}", "seeds=[0]"]
main(["ablate", str(grid), "--out", str(out), "--no-progress", *[x for o in overrides for x in ("--set", o)]])
"""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo on a tiny world and CLIP (its scale patched), one prompt-trained cell, seed 0."""
    root = tmp_path_factory.mktemp("demo")
    grid = root / "grid.yaml"
    evaluation = {"beams": 1, "metrics": ["bleu", "rouge", "cider"]}
    grid.write_text(yaml.safe_dump({"few_pairs": 20, "decoder": DECODER, "cells": CELLS, "eval": evaluation}))
    scale = DemoScale(80, 5, 12, 2, 16, tiny_clip_config(), str(grid))  # an absolute grid path wins
    # A world rendered earlier in this process must not change the demo's (PIL's effect_noise drew the
    # grain from the process-wide C rand()).
    write_toyworld(root / "earlier", seed=0, train=3, val=0, test=1)
    patch = pytest.MonkeyPatch()
    patch.setattr(tipcap.demo, "demo_scale", lambda quick, version=1: scale)
    try:
        tipcap.demo.run_demo(root / "out", root / "cache", seed=0, progress=False, version=1)
    finally:
        patch.undo()
    (world,) = (root / "cache").glob("toyworld-*")
    (clip,) = world.glob("clip-*")
    overrides = [
        f"karpathy={world / 'toyworld.json'}", f"web_pairs={world / 'web_pairs.jsonl'}",
        f"vocabulary={world / 'entities.json'}", f"embed.model={clip / 'toyclip.json'}",
        f"embed.pretrained={clip / 'toyclip.safetensors'}", "seeds=[0]",
    ]  # fmt: skip
    return root, grid, overrides


@pytest.mark.slow
def test_demo_and_ablate_in_other_processes_give_the_same_bytes(demo_run):
    """The demo's cell, rerun by ``tipcap ablate`` in two fresh interpreters with other hash seeds, on a
    world, CLIP and stores they made themselves: identical models and predictions."""
    root, grid, _ = demo_run
    for hash_seed in ("1", "2"):
        own, out = root / f"own-{hash_seed}", root / f"ablate-{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        command = [
            sys.executable,
            "-c",
            OWN_WORLD,
            str(own),
            str(grid),
            str(out),
            json.dumps(tiny_clip_config()),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        for name in EVALUATIONS:
            expected = (root / "out" / "eval" / name / "predictions.json").read_bytes()
            assert (out / "eval" / name / "predictions.json").read_bytes() == expected, (hash_seed, name)
        model = "runs/prompts-seed0/model/model.safetensors"
        assert (out / model).read_bytes() == (root / "out" / model).read_bytes()


@pytest.mark.slow
def test_train_then_evaluate_gives_the_grid_s_bytes(demo_run, tmp_path):
    """The config the grid trained its decoder with, run by ``tipcap train`` and ``tipcap evaluate``."""
    root, _, overrides = demo_run
    grid_run = root / "out" / "runs" / "prompts-seed0"
    trained = run("train", "--config", grid_run / "config.yaml", "--out", tmp_path / "run", "--no-progress")
    assert trained.exit_code == 0, trained.output
    model = "model/model.safetensors"
    assert (tmp_path / "run" / model).read_bytes() == (grid_run / model).read_bytes()
    karpathy = next(o.split("=", 1)[1] for o in overrides if o.startswith("karpathy="))
    stores = (
        Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("embed.model="))).parent / "stores"
    )
    evaluated = run("evaluate", "--data", karpathy, "--split", "test", "--model", tmp_path / "run" / "model",
                    "--image-store", stores / "test-images", "--beams", "1", "--metrics", "bleu,rouge,cider",
                    "--out", tmp_path / "eval")  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    expected = root / "out" / "eval" / "prompts-seed0-none" / "predictions.json"
    assert (tmp_path / "eval" / "predictions.json").read_bytes() == expected.read_bytes()
    assert json.loads(expected.read_text())  # not trivially equal: the test split was captioned
