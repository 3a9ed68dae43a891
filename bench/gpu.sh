#!/usr/bin/env bash
# GPU benchmark of issue 6: full-size BLIP-base and BLIP-large (random weights, bf16), paper and
# BLIP-2 recipes, bare model work and the shard pipeline, on one H100 or H200 (bench/README.md).
# Writes bench/results/gpu-<card>.json (after each configuration, so a stop keeps what finished)
# and prints the table. Stopped at 9 minutes whatever happens.
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
timeout --kill-after=15s 540s "$PYTHON" bench/gpu_pipeline.py "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "gpu.sh: stopped at 9 minutes; the JSON holds the configurations finished before" >&2
fi
exit "$status"
