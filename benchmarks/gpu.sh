#!/usr/bin/env bash
# The README's GPU measurements in one run, on a machine with a CUDA GPU:
#   1. training GPT-2 base + K = 10 in bf16 at batch 80 and 256: bucketed, packed, packed + compile,
#      with the share of the bf16 peak (train_throughput.py; --peak-tflops: 989 for an H100 or H200);
#   2. caption encoding with ViT-B/32's text tower (embed_throughput.py);
#   3. beam search 5 over 5,000 caption embeddings with a decoder of GPT-2 base's shape trained 300 steps,
#      generate against tipcap's search (beam_search.py).
# Each benchmark's output goes to OUT (default gpu-results/), one file each, and to the terminal.
# The COCO captions are read from CORPUS (default ../shared/data/dataset_coco_sample.json.gz).
#
# Usage: bash benchmarks/gpu.sh [OUT]
set -euo pipefail
out=${1:-gpu-results}
corpus=${CORPUS:-$(dirname "$0")/../../shared/data/dataset_coco_sample.json.gz}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
here=$(dirname "$0")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
for batch in 80 256; do
    python "$here/train_throughput.py" --corpus "$corpus" --gpt2-base --batch-size "$batch" \
        --modes "bucketed,packed,packed + compile" 2>&1 | tee "$out/train-$batch.txt"
done
python "$here/embed_throughput.py" --corpus "$corpus" --device cuda 2>&1 | tee "$out/embed.txt"
python "$here/beam_search.py" --corpus "$corpus" --count 5000 --train-steps 300 --device cuda 2>&1 \
    | tee "$out/beam.txt"
