#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one go, under 8 minutes (device time is short):
# the CUDA tests, the training-speed table (bench/gpu.py) and SmolLM2's harvest rate on the GPU.
# Results go to $OUT (the device tool brings them back) or docs/; record them in docs/benchmarks.md.
#   run: bash bench/gpu.sh        (needs make setup's .venv; it installs nothing else)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-docs}"
export HF_HUB_OFFLINE=1
PY=.venv/bin/python
[ -x "$PY" ] || make setup >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_device.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
timeout 240 $PY bench/gpu.py --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu_train.txt"
timeout 90 $PY bench/harvest.py --device cuda --layers 15 --contexts 256 --batch 64 2>&1 | tail -12 \
    | tee "$OUT/gpu_harvest.txt"
