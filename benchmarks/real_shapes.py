"""Real shapes, offline: each reproduction recipe's architecture run through every stage on CPU.

For one recipe per architecture (CapDec, DeCap, ViECap, TIPCap, CLOSE), ``tipcap reproduce`` runs the recipe
as written, except that the CLIP has random weights built from its open_clip config (``pretrained: none``:
``open_clip.create_model(name, pretrained=None)``), the decoder is GPT-2 base's shape from ``GPT2Config``
(12 layers, width 768, vocabulary 50,257; random weights; DeCap's recipe keeps its 4-layer decoder at that
vocabulary) with a word-level tokenizer (GPT-2's BPE files are not on an offline machine; its ids fit the
vocabulary), one seed, a few training steps of a small batch, and CLIP-S left out. The data are COCO-shaped:
generated 640×480 JPEGs named as COCO's, each with five real COCO captions of the Karpathy split
(``../shared/data/dataset_coco_sample.json.gz``; captions © COCO Consortium, CC BY 4.0: Lin et al. 2014,
Chen et al. 2015; the Karpathy split: Karpathy & Fei-Fei 2015). Every stage runs: prepare (decoding every
JPEG), image and caption embedding, the gap, training, captioning with the recipe's beam and scoring.

Reported per architecture, each in its own process: parameters (CLIP, decoder), the process's peak resident
memory, the FLOP of one CLIP image and caption and of a training step per caption token (counted by
``torch.utils.flop_counter.FlopCounterMode``, forward and backward, caption tokens of the word-level
tokenizer, prefix included in the step), seconds per training step (the median over the steps after the
first) and the wall time of each stage. Then, per recipe, an estimate of a full run on one GPU: FLOP of
embedding every image and caption, training every seed for the recipe's epochs, and captioning (2 FLOP per
decoder parameter per generated token, every beam, the full caption length: an upper bound), divided by the
stated share of the GPU's dense bf16 peak (``--utilisation``, ``--peak-tflops``). Beam search is bound by
latency more than by FLOP, so the captioning part is the least certain.

Usage: nice python benchmarks/real_shapes.py [--steps 3] [--batch-size 4] [--images 12]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image
from stores import DEFAULT_CORPUS, ROOT
from torch.utils.flop_counter import FlopCounterMode

from tipcap.io import load_json, write_json_atomic

ARCHITECTURES = {
    "capdec-coco": ("capdec", "CapDec: RN50x4, transformer mapper K = 40, GPT-2 base"),
    "decap-coco": ("decap", "DeCap: ViT-B/32, 4-layer decoder from scratch, K = 1, memory"),
    "viecap-coco": ("viecap", "ViECap: ViT-B/32, transformer mapper K = 10, hard prompt, GPT-2 base"),
    "tipcap-few-pairs-coco": ("tipcap", "TIPCap: ViT-B/32, MLP K = 10, PIM, GPT-2 base"),
    "close-coco": ("close", "CLOSE adapter: ViT-L/14, MLP K = 10, GPT-2 base"),
}
"""The recipe measured for each architecture; every other recipe shares one of these (by its cell kind)."""
SIZES = {
    "coco": {"train": 113_287, "val": 5_000, "test": 5_000},
    "flickr30k": {"train": 29_000, "val": 1_014, "test": 1_000},
    "nocaps": {"val": 4_500},
}
"""Images per split of the published data (Karpathy's COCO and Flickr30k splits; NoCaps validation)."""
CAPTIONS_PER_IMAGE = 5  # Flickr30k has five per image; COCO five for nearly all (a few have more)
GPT2_BASE = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024}


def write_data(folder: Path, images: int, seed: int = 0) -> Path:
    """A COCO-shaped Karpathy file: ``images`` train, a sixth of that val and test (at least 2), each a
    generated 640×480 JPEG under ``folder/images`` with five real COCO captions."""
    corpus = load_json(DEFAULT_CORPUS)["images"]
    rng = random.Random(seed)
    held_out = max(2, images // 6)
    entries = []
    for number, entry in enumerate(corpus[: images + 2 * held_out]):
        split = "train" if number < images else "val" if number < images + held_out else "test"
        path = folder / "images" / entry["filepath"] / entry["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = torch.rand(480, 640, 3, generator=torch.Generator().manual_seed(number))
        tint = torch.tensor([rng.random(), rng.random(), rng.random()])
        Image.fromarray(((0.5 * pixels + 0.5 * tint) * 255).byte().numpy()).save(path, quality=90)
        entries.append({**entry, "split": split, "sentences": entry["sentences"][:5]})
    write_json_atomic(folder / "dataset_coco.json", {"dataset": "coco", "images": entries})
    return folder / "dataset_coco.json"


def flops(work) -> int:
    """FLOP of ``work()`` as PyTorch's flop counter counts them (matrix products and convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter:
        work()
    return counter.get_total_flops()


def measure(recipe: str, steps: int, batch: int, images: int, out: Path) -> dict:
    """Run one recipe at real shapes through every stage; its measurements (see the module docstring)."""
    from tipcap.clip import ClipEncoder, ClipSpec
    from tipcap.config import load_config
    from tipcap.grid.recipe_inputs import Inputs
    from tipcap.grid.recipes import RECIPES_DIR, find_recipe
    from tipcap.grid.reproduce import Reproduction
    from tipcap.training.data import collate
    from tipcap.training.loop import Distributed, Trainer
    from tipcap.training.setup import build_training

    karpathy = write_data(out / "data", images)
    found = find_recipe(recipe)
    model = found.grid["decoder"]["model"]
    language = {**(model.get("language_model_config") or GPT2_BASE), "vocab_size": 50257}
    overrides = [
        "embed.pretrained=none", "seeds=[0]", "few_pairs=8", "eval.metrics=[bleu, rouge, cider]",
        f"decoder.model.language_model_config={json.dumps(language)}", "decoder.model.tokenizer=word-level",
        f"decoder.train.max_steps={steps}", f"decoder.train.batch_size={batch}", "decoder.train.log_every=1",
        f"decoder.train.checkpoint_every={steps}", "decoder.train.warmup_steps=1",
    ]  # fmt: skip
    inputs = Inputs(karpathy, out / "data" / "images")
    reproduction = Reproduction(found, RECIPES_DIR / f"{recipe}.yaml", inputs, out / "run", overrides, False)
    reproduction.run()
    run = out / "run" / "grid" / "runs" / f"{found.cell}-seed0"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]

    config = load_config(run / "config.yaml")
    env = Distributed(0, 1, torch.device("cpu"))
    trainer = Trainer(config, build_training(config, env.device), out / "probe", env, progress=False)
    data, decoder = trainer.train_data, trainer.model
    lengths = [len(ids) for ids in data.token_ids]
    mean_tokens = statistics.mean(lengths)
    embeddings, ids, mask = collate(data, list(range(batch)))

    def step() -> None:
        decoder(decoder.training_inputs(embeddings), ids, mask).loss.backward()

    step_flops = flops(step)
    spec = ClipSpec(found.grid["embed"]["model"], "none")
    encoder = ClipEncoder.load(spec, device="cpu")
    pixels = encoder.preprocess(Image.open(next((out / "data" / "images").rglob("*.jpg")))).unsqueeze(0)
    captions = [c for e in load_json(karpathy)["images"][:2] for c in (s["raw"] for s in e["sentences"])]
    return {
        "recipe": recipe,
        "clip": spec.model,
        "clip_parameters": sum(p.numel() for p in encoder.model.parameters()),
        "decoder_parameters": sum(p.numel() for p in decoder.parameters()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "image_flops": flops(lambda: encoder.encode_images(pixels)),
        "caption_flops": flops(lambda: encoder.encode_texts(captions)) / len(captions),
        "flops_per_token": step_flops / float(mask.sum()),
        "flops_per_caption": step_flops / batch,
        "mean_tokens": mean_tokens,
        "seconds_per_step": batch * mean_tokens / statistics.median(rates[1:] or rates),
        "stage_seconds": reproduction.times,
        "batch": batch,
        "steps": steps,
        "threads": torch.get_num_threads(),
    }


def estimate(recipe, measured: dict, utilisation: float, peak_tflops: float) -> float:
    """GPU-hours of a full run of ``recipe`` from the FLOP ``measured`` at its architecture."""
    data = recipe.data
    grid = recipe.grid
    train = SIZES[data.train]
    evaluated = SIZES[data.evaluated_on]
    captions = CAPTIONS_PER_IMAGE * (train["train"] + train["val"])
    images = sum(train.values()) + (sum(evaluated.values()) if data.eval else 0)
    seeds = len(grid.get("seeds", [0]))
    epochs = grid["decoder"]["train"]["epochs"]
    model = grid["decoder"]["model"]
    eval_images = evaluated[grid.get("eval_split", "test")]
    beams = grid["eval"].get("beams", 5)
    caption_tokens = model.get("max_caption_tokens", 40)
    total = (
        images * measured["image_flops"]
        + captions * measured["caption_flops"]
        + seeds * epochs * CAPTIONS_PER_IMAGE * train["train"] * measured["flops_per_caption"]
        + seeds * eval_images * beams * caption_tokens * 2 * measured["decoder_parameters"]
    )
    return total / (utilisation * peak_tflops * 1e12) / 3600


def table(results: dict[str, dict], utilisation: float, peak_tflops: float) -> str:
    """The Markdown tables: one row per architecture measured, then one per recipe with its estimate."""
    from tipcap.grid.recipes import load_recipe, recipe_paths

    lines = [
        "| architecture (recipe run) | CLIP | parameters: CLIP / decoder | peak RSS | GFLOP per image / "
        "caption (CLIP) | MFLOP per training token | s per step (batch) | prepare / grid / report (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for recipe, m in results.items():
        stages = " / ".join(f"{m['stage_seconds'][s]:.0f}" for s in ("prepare", "grid", "report"))
        lines.append(
            f"| {ARCHITECTURES[recipe][1]} ({recipe}) | {m['clip']} | {m['clip_parameters'] / 1e6:.1f}M / "
            f"{m['decoder_parameters'] / 1e6:.1f}M | {m['peak_rss_bytes'] / 2**30:.1f} GiB | "
            f"{m['image_flops'] / 1e9:.1f} / {m['caption_flops'] / 1e9:.2f} | "
            f"{m['flops_per_token'] / 1e6:.0f} | {m['seconds_per_step']:.1f} ({m['batch']}) | {stages} |"
        )
    lines += [
        "",
        f"| recipe | measured as | GPU-hours at {utilisation:.0%} of {peak_tflops:g} TFLOP/s (all seeds) |",
        "|---|---|---|",
    ]
    by_cell = {ARCHITECTURES[r][0]: r for r in results}
    for path in recipe_paths():
        recipe = load_recipe(path)
        measured_as = by_cell.get(recipe.cell)
        if measured_as is None:
            continue
        hours = estimate(recipe, results[measured_as], utilisation, peak_tflops)
        lines.append(f"| {recipe.name} | {measured_as} | {hours:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="Training steps per recipe.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=12, help="Training images (val, test: a sixth each).")
    parser.add_argument("--recipes", default=",".join(ARCHITECTURES), help="Comma-separated recipes to run.")
    parser.add_argument("--utilisation", type=float, default=0.3, help="Share of the GPU's bf16 peak.")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="Dense bf16 peak (H100: 989).")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure this recipe alone
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(args.one, args.steps, args.batch_size, args.images, Path(tmp))
        write_json_atomic(args.json, result)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            start = time.perf_counter()
            target = Path(tmp) / f"{recipe}.json"
            sizes = [f"--steps={args.steps}", f"--batch-size={args.batch_size}", f"--images={args.images}"]
            command = [sys.executable, __file__, "--one", recipe, "--json", str(target), *sizes]
            subprocess.run(command, check=True, cwd=ROOT)
            results[recipe] = load_json(target)
            print(f"{recipe}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(table(results, args.utilisation, args.peak_tflops))


if __name__ == "__main__":
    main()
