#!/usr/bin/env bash
# The command a lent GPU machine runs (the working tree there, .whl/ carried: see gpu_wheels.sh):
# the CUDA tests, then the GPU benchmark, everything under $OUT (the JSON after every measurement).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/gpu_check.py --out "$OUT" --tests --budget-s "${BUDGET_S:-400}" 2>&1 | tee "$OUT/log.txt" | grep -v '^{"event'
