#!/usr/bin/env bash
# The GPU check, ready to run on a CUDA machine with no internet, in under 8 minutes (each step has its own time
# limit, so one slow step cannot eat the others'):
#   1. the tests marked `cuda` (training with / without torch.compile, fp32 / bf16, DDP over NCCL, the disk feature
#      cache, predict and export from a CUDA-trained model);
#   2. speed of the paper's architecture (ViT-B/14-reg at 392, random weights offline): training s/step at batch
#      16, inference images/s at batch 1 and 16, peak GPU memory;
#   3. the embedded ViT-S/14 trained at 448 -> 392 with the paper's schedule (200 epochs, batch 16) on
#      magnetic_tile, and its metrics table.
# Usage: benchmarks/gpu_check.sh [DATASETS_DIR]   (default ../shared/datasets; needs `make install` first)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${1:-../shared/datasets}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
status=0

step() {  # step SECONDS TITLE COMMAND...: runs COMMAND under a time limit; a failure is reported, the rest goes on
    local seconds=$1 title=$2
    shift 2
    echo "=== $title (limit ${seconds} s)"
    local start=$SECONDS
    timeout "$seconds" "$@" || { echo "=== FAILED or timed out: $title (exit $?)"; status=1; }
    echo "=== $title: $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
step 150 "CUDA tests" "$PY" -m pytest -q -m cuda tests/test_cuda.py
step 120 "speed, paper preset" "$PY" benchmarks/speed.py --preset paper --device cuda --batches 1,16
echo "    (the official code reports ~28 images/s and ~12 GB on an RTX 4090 for this architecture)"
step 240 "train ViT-S/14 at 448 -> 392, 200 epochs, batch 16, magnetic_tile" \
    "$PY" -m inpformer train --data "$DATA/magnetic_tile" --preset paper --backbone dinov2_vits14 --device cuda \
    --out "$OUT/magnetic_tile" --quiet
step 60 "test" "$PY" -m inpformer test "$OUT/magnetic_tile" --quiet
exit $status
