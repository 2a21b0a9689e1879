"""What prompt guidance costs at decoding: one model, the same inputs and prompt words, with and without it.

The baseline is the same decoder decoding the same prompted inputs unguided (``prompt_guidance=0``); the
ceiling is that baseline's time, since guidance only adds work. What limits it: ``tipcap.guide.PromptGuide``
walks each beam's generated tokens in Python at every step (for every form of every prompt word), so its
cost grows with batch × beams × words × caption length, against the language model's cost, which on a GPU
does not.

Usage (a prompt-trained model directory, a caption store of its CLIP whose captions' entities become the
prompt words, e.g. a toy world's test scenes):
    python benchmarks/prompt_guidance.py MODEL_DIR TEXT_STORE [--rows 256] [--beams 3] [--repeats 3]

Prints the seconds per guided and unguided pass (interleaved, best of ``--repeats``) and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from tipcap.model import TIPCap
from tipcap.prompts import EntityVocabulary
from tipcap.store import EmbeddingStore


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("texts")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = TIPCap.from_pretrained(args.model, device="cpu").eval()
    store = EmbeddingStore.open(args.texts)
    vocabulary = EntityVocabulary([(name, forms) for name, forms in model.entity_forms.items()])
    rows = min(args.rows, len(store))
    inputs = model.gap.text_side(store.gather(torch.arange(rows)).float()) if model.gap else None
    prompts = [vocabulary.extract(caption) for caption in store.captions()[:rows]]
    seconds: dict[float, float] = {}
    for _ in range(args.repeats):
        for guidance in (0.0, args.guidance):
            start = time.perf_counter()
            model.decode_text_side(inputs, prompts, num_beams=args.beams, prompt_guidance=guidance)
            seconds[guidance] = min(seconds.get(guidance, float("inf")), time.perf_counter() - start)
    words = sum(map(len, prompts)) / rows
    print(
        f"{rows} inputs, {words:.1f} prompt words each, beam {args.beams}, {torch.get_num_threads()} threads"
    )
    print(f"unguided {seconds[0.0]:.2f} s, guided ({args.guidance:g}) {seconds[args.guidance]:.2f} s: "
          f"{seconds[args.guidance] / seconds[0.0]:.2f}×")  # fmt: skip


if __name__ == "__main__":
    main()
