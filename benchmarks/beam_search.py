"""Beam search at GPT-2 base's shape: tipcap's search against ``transformers``' ``generate``, on any device.

A decoder of GPT-2 base's shape (12 layers, width 768, vocabulary 50,257 of which the word-level tokenizer
uses the first ids; K = 10 prefix positions from d = 512 embeddings) captions ``--count`` caption embeddings
of real COCO captions (a tiny random CLIP of width 512) with beam search, in batches: ``generate``
(``search="transformers"``) against tipcap's search, ``--runs`` times interleaved. It prints each run's
seconds, captions/s, the speed-up of the best runs and how many captions agree token for token, with
the captions' mean length, then the share of ``generate``'s time spent in the language model's forward
passes (one more run, timed by synchronising hooks), which bounds what any search running the same passes
can gain over it. The decoder has random weights, then ``--train-steps`` training steps on the
captions (on a GPU a few hundred, so that it ends its captions; with none, every caption runs to
``--max-tokens``, the search's worst case). It measures the search alone: no image is decoded or encoded.

What limits it: on a CPU the language model's forward passes (matrix products at width 768 and the
50,257-wide output layer), which both searches run, so the gain is what tipcap's search saves beside them:
the key-value cache's copies, the context run once per input instead of once per beam, and inputs that
are done leaving the batch. On a GPU, kernel launches and the host as well.

Usage: python benchmarks/beam_search.py [--count 5000] [--beams 5] [--batch-size 64] [--runs 3]
    [--train-steps 0] [--max-tokens 20] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from stores import DEFAULT_CORPUS, ROOT, caption_store, coco_captions
from transformers import LogitsProcessorList

from tipcap.beam_search import decode
from tipcap.config import load_config
from tipcap.model import TIPCap
from tipcap.store import EmbeddingStore
from tipcap.training.loop import train
from tipcap.training.setup import build_training

GPT2_BASE = "{model_type: gpt2, vocab_size: 50257, n_positions: 1024}"  # GPT2Config's defaults otherwise


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decoder(store: Path, folder: Path, steps: int, device: torch.device) -> TIPCap:
    """GPT-2 base's shape, K = 10, on ``store``'s captions: random, or trained for ``steps`` steps."""
    settings = [f"data.train_texts={store}", f"model.language_model_config={GPT2_BASE}",
                "model.prefix_length=10", "model.clip_dim=512", f"train.max_steps={max(steps, 1)}",
                "train.batch_size=64", "train.lr=3e-4", "train.warmup_steps=0",
                "train.checkpoint_every=1000000", "train.precision=auto"]  # fmt: skip
    config = load_config(ROOT / "experiments" / "tiny.yaml", settings)
    if steps == 0:
        return build_training(config, device).model.eval()
    return TIPCap.from_pretrained(train(config, folder, progress=False), device=device).eval()


class ForwardClock:
    """Seconds spent in a module's forward passes while the clock is held (``with``), the device
    synchronised at each pass's start and end so that a GPU's queued work is counted where it runs."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.seconds = 0.0
        self._start = 0.0

    def _started(self, *_: object) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _ended(self, *_: object) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start

    def __enter__(self) -> ForwardClock:
        self.seconds = 0.0
        self._hooks = [self.module.register_forward_pre_hook(self._started),
                       self.module.register_forward_hook(self._ended)]  # fmt: skip
        return self

    def __exit__(self, *_: object) -> None:
        for hook in self._hooks:
            hook.remove()


@torch.inference_mode()
def search_all(
    model: TIPCap, inputs: torch.Tensor, batch_size: int, beams: int, max_tokens: int, search: str
) -> tuple[float, list[list[int]]]:
    """Seconds to search captions for ``inputs`` ``[N, d]`` in batches with ``search``, and each caption's
    tokens up to its end of text. Tokens, not text: an untrained decoder's ids mostly lie past the word-level
    tokenizer's words, which decode to nothing. The path is ``decode_text_side``'s without prompts."""
    device = model.device
    eos = model.tokenizer.eos_token_id
    found: list[list[int]] = []
    synchronize(device)
    start = time.perf_counter()
    for batch in inputs.split(batch_size):
        context = model.prefix(batch.to(device))
        mask = torch.ones(context.shape[:2], dtype=torch.long, device=device)
        tokens = decode(
            model.language_model,
            model.tokenizer,
            context,
            mask,
            beams,
            max_tokens,
            LogitsProcessorList(),
            search,
        )
        found += tokens.tolist()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, [row[: row.index(eos) + 1] if eos in row else row for row in found]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--count", type=int, default=5000, help="Caption embeddings to caption.")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="Runs of each search, interleaved.")
    parser.add_argument("--train-steps", type=int, default=0, help="Training steps before captioning.")
    parser.add_argument("--max-tokens", type=int, default=20, help="Most tokens per caption.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = caption_store(tmp, coco_captions(args.corpus, args.count), 512)
        model = decoder(store, tmp / "run", args.train_steps, device)
        # The decoder reads caption embeddings as they cross to the text side: the store's, unchanged.
        inputs = EmbeddingStore.open(store).embeddings()[: args.count].float()
        print(f"{len(inputs)} caption embeddings, beam {args.beams}, batches of {args.batch_size}, at most "
              f"{args.max_tokens} tokens; decoder of GPT-2 base's shape "
              f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters), "
              f"{args.train_steps} training steps; device {device}"
              + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""))  # fmt: skip
        search_all(model, inputs[: args.batch_size], args.batch_size, args.beams, args.max_tokens, "tipcap")
        times: dict[str, list[float]] = {"transformers": [], "tipcap": []}
        captions: dict[str, list[list[int]]] = {}
        for run in range(args.runs):
            for search in times:
                seconds, captions[search] = search_all(
                    model, inputs, args.batch_size, args.beams, args.max_tokens, search
                )
                times[search].append(seconds)
                rate = len(inputs) / seconds
                print(f"  run {run + 1} {search:12s}: {seconds:8.2f} s ({rate:8.1f} captions/s)")
        # A last run of generate with its forward passes timed apart (the synchronising hooks slow it).
        with ForwardClock(model.language_model, device) as clock:
            seconds, _ = search_all(
                model, inputs, args.batch_size, args.beams, args.max_tokens, "transformers"
            )
        share = clock.seconds / seconds
    same = sum(a == b for a, b in zip(captions["transformers"], captions["tipcap"], strict=True))
    length = sum(len(c) for c in captions["tipcap"]) / len(inputs)
    best = {search: min(values) for search, values in times.items()}
    rates = {search: len(inputs) / seconds for search, seconds in best.items()}
    print(f"generate {rates['transformers']:.1f} captions/s, tipcap {rates['tipcap']:.1f} "
          f"(best of {args.runs}): tipcap {best['transformers'] / best['tipcap']:.2f}x generate; captions "
          f"identical {same}/{len(inputs)} (tokens), {length:.1f} tokens on average, end of text "
          "included")  # fmt: skip
    print(f"{share:.0%} of generate's time is the language model's forward passes (one more run, timed "
          f"apart), so a search that runs the same passes is at most {1 / share:.2f}x generate")  # fmt: skip


if __name__ == "__main__":
    main()
