"""ReLU with an L1 penalty (Bricken et al. 2023, Cunningham et al. 2023): the original SAE."""

from __future__ import annotations

from dictlens.sae.activations.base import Activation


class ReLU(Activation):
    name = "relu"
    help = "every positive pre-activation; sparsity from an L1 penalty"
    default_penalty = "l1"
    shardable = True
    # bench/sweep_train.py (540k tokens): 5 left L0 4.4 and FVU 0.76; 2 gives L0 21.5, FVU 0.63.
    default_penalty_coeff = 2.0
