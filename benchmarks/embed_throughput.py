"""Caption-encoding throughput: batched, trimmed, prefix-sharing encoding against one caption at a time.

Published captioning code encodes each caption on its own, padded to CLIP's 77 tokens. This measures,
with a ViT-B-32-sized text tower (random weights: speed does not depend on the values) on real COCO
captions:

1. one caption at a time at 77 tokens, tokenisation included (the baseline);
2. batched at 77 tokens (the gain from batching alone);
3. batched and trimmed: each caption computed only up to its end-of-text token (the gain from trimming
   alone);
4. batched, trimmed, with the prefixes the captions of a batch share computed once (tipcap's path), in
   each precision asked for (on CPU: fp32, the default, and bf16 where the processor has bf16
   instructions);
5. a full ``embed_texts`` run into a store, then the same run again (reusing the store).

Batches hold captions sorted by length, then by token, as ``ClipEncoder.encode_texts`` forms them. On a
CPU every path is bound by the text tower's matrix products, so the benchmark also counts their
floating-point operations per caption, measures how fast this machine multiplies matrices of the
batches' shape in each precision (with the prepacked weights the tower uses), and prints the resulting
ceiling: the speed-up tipcap's path would reach if nothing but the matrix products took time.

Usage: python benchmarks/embed_throughput.py [--device cpu|cuda] [--captions N] [--single N] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from tipcap.clip import ClipEncoder, ClipSpec
from tipcap.config import EmbedConfig
from tipcap.data import read_captions
from tipcap.embed import embed_texts
from tipcap.prepacked import linear_map
from tipcap.text_tower import PrefixTrie, causal_text_tower, prefix_trie, token_batches

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dataset_coco_sample.json.gz"


def timed(function) -> float:
    """Seconds one call of ``function`` takes (CUDA work included)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def report(label: str, count: int, seconds: float) -> float:
    print(f"{label:<42}: {count / seconds:9.1f} captions/s  ({count} in {seconds:.2f} s)")
    return count / seconds


def tower_widths(tower: torch.nn.Module) -> tuple[int, int]:
    """The text transformer's width and its MLP's hidden width."""
    return tower.transformer.width, tower.transformer.resblocks[0].mlp.c_fc.out_features


def matmul_flops(tower: torch.nn.Module, batches: list[PrefixTrie], context: int) -> dict[str, float]:
    """FLOPs of the text tower's matrix products per caption, for one caption at a time at ``context``
    tokens (``"77 tokens"``), and for ``batches`` run trimmed (``"trimmed"``: every position up to each
    row's end) and with shared prefixes (``"shared"``: every node of the batches' tries).

    As :class:`~tipcap.text_tower.CausalTextTower` computes them: attention over each batch's longest
    row, and the last block at the pooled rows only.
    """
    width, hidden = tower_widths(tower)
    layers = tower.transformer.layers
    projection = 2 * width * tower.text_projection.shape[-1]
    per_position = 2 * (4 * width * width + 2 * width * hidden)  # q, k, v, out; MLP in and out
    keys_values = 2 * 2 * width * width

    def attention(rows: int, queries: int, keys: int) -> int:
        return rows * 2 * 2 * queries * keys * width  # scores and weighted values

    def batch(nodes: int, rows: int, length: int) -> int:
        earlier = (layers - 1) * (nodes * per_position + attention(rows, length, length))
        last = nodes * keys_values + rows * (per_position - keys_values) + attention(rows, 1, length)
        return earlier + last + rows * projection

    captions = sum(len(trie.lengths) for trie in batches)
    full = layers * (context * per_position + attention(1, context, context)) + projection
    trimmed = sum(batch(int(t.lengths.sum()), len(t.lengths), t.paths.shape[1]) for t in batches)
    shared = sum(batch(len(t.tokens), len(t.lengths), t.paths.shape[1]) for t in batches)
    return {"77 tokens": float(full), "trimmed": trimmed / captions, "shared": shared / captions}


def matmul_speed(rows: int, width: int, hidden: int, precision: str, device: str) -> float:
    """FLOP/s of one ``[rows, width] x [width, hidden]`` product in ``precision`` with a prepacked weight,
    as the text tower runs it (best of 5 runs of 10)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    inputs = torch.randn(rows, width, dtype=dtype, device=device)
    product = linear_map(torch.randn(hidden, width, dtype=dtype, device=device), rows=rows)
    product(inputs)
    seconds = min(timed(lambda: [product(inputs) for _ in range(10)]) for _ in range(5))
    return 10 * 2 * rows * width * hidden / seconds


def default_precisions(device: str) -> list[str]:
    if device.startswith("cuda"):
        return ["fp16", "bf16"]
    return (
        ["fp32", "bf16"]
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        else ["fp32"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="Karpathy JSON of real captions.")
    parser.add_argument("--captions", type=int, default=2000, help="Captions for the batched, trimmed runs.")
    parser.add_argument("--padded", type=int, default=320, help="Captions for the batched 77-token run.")
    parser.add_argument("--repeats", type=int, default=3, help="Rounds of every run; each keeps its best.")
    parser.add_argument("--single", type=int, default=100, help="Captions for the one-at-a-time run.")
    parser.add_argument("--batch-size", type=int, default=None, help="Default: 128 on CPU, 1024 on GPU.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precisions", default=None, help="Comma-separated; the first also runs the baseline."
    )
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model whose text tower is measured.")
    args = parser.parse_args()
    precisions = args.precisions.split(",") if args.precisions else default_precisions(args.device)

    texts = [c.text for c in read_captions(args.corpus, split="val").captions[: args.captions]]
    spec = ClipSpec(args.model, "none")
    encoders = {p: ClipEncoder.load(spec, device=args.device, precision=p) for p in precisions}
    baseline = encoders[precisions[0]]
    tokens, _ = baseline.tokenize(texts)
    lengths = baseline.token_lengths(tokens)
    print(f"model {args.model} (random weights) on {args.device}, CPU threads {torch.get_num_threads()}")
    mean = lengths.float().mean()
    print(f"{len(texts)} COCO captions, tokens per caption: mean {mean:.1f}, max {lengths.max()}")
    # Tokenising first also fills the tokenizer's word cache, so no later run pays for a cold one.
    report("tokenisation alone", len(texts), timed(lambda: baseline.tokenize(texts)))
    for encoder in encoders.values():
        encoder.encode_texts(texts[:128], batch_size=args.batch_size)  # warm-up

    def one_at_a_time() -> None:
        for text in texts[: args.single]:
            baseline.encode_tokens(baseline.tokenizer([text]), trim=False)

    padded_texts = texts[: args.padded]
    embeddings = {}

    def shared(encoder: ClipEncoder, precision: str) -> None:
        embeddings[precision] = encoder.encode_texts(texts, batch_size=args.batch_size).embeddings

    first = precisions[0]
    runs = {
        f"one at a time, 77 tokens [{first}]": (args.single, one_at_a_time),
        f"batched, 77 tokens [{first}]": (
            len(padded_texts),
            lambda: baseline.encode_texts(padded_texts, batch_size=args.batch_size, trim=False),
        ),
        f"batched, trimmed [{first}]": (
            len(texts),
            lambda: baseline.encode_texts(texts, batch_size=args.batch_size, share_prefixes=False),
        ),
        **{
            f"batched, trimmed, shared prefixes [{precision}]": (
                len(texts),
                partial(shared, encoder, precision),
            )
            for precision, encoder in encoders.items()
        },
    }
    # Rounds interleave the runs, and each keeps its fastest round, so that a passing slowdown of a
    # shared machine is not charged to one run only.
    seconds = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for label, (_, run) in runs.items():
            seconds[label] = min(seconds[label], timed(run))
    speeds = [report(label, count, seconds[label]) for label, (count, _) in runs.items()]
    single, padded, trimmed = speeds[:3]
    fastest = dict(zip(precisions, speeds[3:], strict=True))
    reference = embeddings[first]
    for precision in precisions[1:]:
        cosine = torch.nn.functional.cosine_similarity(embeddings[precision], reference).min().item()
        print(f"  {precision} vs {first}: min cosine {cosine:.6f}")

    for precision in precisions:
        speed_up = fastest[precision] / single
        print(f"speed-up over one at a time, batched, trimmed, shared [{precision}]: {speed_up:6.1f}x")
    print(f"  batching alone (77 tokens)                    : {padded / single:6.1f}x")
    print(f"  trimming alone (batched, trimmed vs 77)       : {trimmed / padded:6.1f}x")
    print(f"  sharing prefixes alone (vs batched, trimmed)  : {fastest[first] / trimmed:6.1f}x")

    batch_size = args.batch_size or baseline.text_batch_size
    batches = [
        prefix_trie(tokens[rows], lengths[rows]) for rows in token_batches(tokens, lengths, batch_size)
    ]
    tower = causal_text_tower(baseline.model)
    flops = matmul_flops(tower, batches, baseline.context_length)
    full, cut = flops["77 tokens"], flops["shared"]
    print(
        f"matrix products per caption: {full / 1e9:.2f} GFLOP at 77 tokens, {flops['trimmed'] / 1e9:.2f} "
        f"trimmed, {cut / 1e9:.2f} trimmed with shared prefixes ({full / cut:.1f}x fewer)"
    )
    print(f"  one at a time [{first}] ran at {single * full / 1e9:.0f} GFLOP/s")
    nodes = sum(len(trie.tokens) for trie in batches)
    print(f"  the batches' tries have {nodes} nodes for {int(lengths.sum())} positions")
    rows = round(nodes / len(batches))
    width, hidden = tower_widths(tower)
    for precision in precisions:
        peak = matmul_speed(rows, width, hidden, precision, args.device)
        achieved = fastest[precision] * cut
        print(
            f"  [{precision}] a [{rows}, {width}] x [{width}, {hidden}] product runs at {peak / 1e9:.0f} "
            f"GFLOP/s; tipcap's path ran at {achieved / 1e9:.0f} ({achieved / peak:.0%} of it)"
        )
        print(
            f"  [{precision}] ceiling if nothing but the products took time: {peak / cut:.0f} captions/s, "
            f"{peak / cut / single:.1f}x over one at a time"
        )

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "captions.txt"
        corpus.write_text("\n".join(texts) + "\n")
        embed = EmbedConfig(args.model, "none", precision=precisions[0], batch_size=args.batch_size)
        first = embed_texts(corpus, embed, Path(tmp) / "store", device=args.device, progress=False)
        again = embed_texts(corpus, embed, Path(tmp) / "store", device=args.device, progress=False)
    print(f"embed_texts into a store: {first.seconds:.2f} s; the same run again, reusing the store: "
          f"{again.seconds:.3f} s ({first.seconds / again.seconds:.0f}x faster)")  # fmt: skip


if __name__ == "__main__":
    main()
