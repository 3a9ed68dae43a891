#!/usr/bin/env bash
# GPU benchmark of issue 6: full-size BLIP-base and BLIP-large (random weights, bf16), paper and
# BLIP-2 recipes, bare model work and the shard pipeline, on one H100 or H200 (bench/README.md).
# Writes bench/results/gpu-<card>.json (after each configuration, so a stop keeps what finished)
# and prints the table; then pre-training images/s (bench/gpu_train.py, gpu-train-<card>.json,
# in $OUT when set). Stopped at 9 minutes whatever happens.
#
#   bash bench/gpu.sh                     # batch 256, 1 warm-up + 5 timed batches, 16-batch shard
#   bash bench/gpu.sh --sizes base --batch 256 1024   # extra flags go to bench/gpu_pipeline.py
#   PYTHON=/path/to/python bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version \
    --format=csv || true
fi
status=0
timeout --kill-after=15s 380s "$PYTHON" bench/gpu_pipeline.py "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "gpu.sh: CapFilt stopped at 380 s; the JSON holds the configurations finished before" >&2
fi
# Pre-training: BLIP-base at 224 px, bf16, momentum queue, streamed (bench/gpu_train.py).
train_status=0
timeout --kill-after=10s 140s "$PYTHON" bench/gpu_train.py || train_status=$?
if [ "$train_status" -ne 0 ]; then
  echo "gpu.sh: pre-training benchmark exited $train_status" >&2
fi
exit $(( status != 0 ? status : train_status ))
