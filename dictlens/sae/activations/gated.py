"""Gated SAE (Rajamanoharan et al. 2024): a gate decides which features fire, a magnitude
path (sharing W_enc, rescaled per feature by exp(r_mag)) decides how strongly.

    π_gate = W_enc (x − b_dec) + b_enc,   f = 1[π_gate > 0] · ReLU(exp(r_mag) ⊙ W_enc (x − b_dec) + b_mag)

The sparsity penalty acts on ReLU(π_gate), and an auxiliary loss reconstructs x from the
gate with the decoder frozen, so the gate path learns although H has no gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dictlens.sae.activations.base import Activation, Codes, Form
from dictlens.sae.kernels import Pattern

if TYPE_CHECKING:
    from dictlens.sae.model import SAE
    from dictlens.train.config import TrainConfig


class Gated(Activation):
    name = "gated"
    form = Form.GATED
    help = "a gate picks the active features, a rescaled magnitude path their values; L1 on the gate"
    default_penalty = "l1"
    owned_keys = ("r_mag", "b_mag")
    per_feature_keys = ("r_mag", "b_mag")

    def add_parameters(self, sae: SAE) -> None:
        sae.register_parameter("r_mag", nn.Parameter(torch.zeros(sae.n_features)))
        sae.register_parameter("b_mag", nn.Parameter(torch.zeros(sae.n_features)))

    def values(self, sae: SAE, pre: torch.Tensor, p: Pattern) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mag = pre - sae.b_enc[p.cols]
        vals = (mag * sae.r_mag.exp()[p.cols] + sae.b_mag[p.cols]).relu()
        return vals, {"gate": pre.relu()}

    def sparsity_values(self, codes: Codes) -> torch.Tensor:
        return codes.extra["gate"]

    def extra_losses(self, sae: SAE, codes: Codes, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig
                     ) -> dict[str, torch.Tensor]:
        """‖y − (W_dec_frozen·ReLU(π_gate) + b_dec_frozen)‖² (y: the target, x for an SAE; a skip
        transcoder's frozen skip added): trains the gate path."""
        y_hat = sae.decode_values(codes.extra["gate"], codes.pattern, sae.W_dec.detach(), sae.b_dec.detach())
        if codes.skip is not None:
            y_hat = y_hat + codes.skip.detach()
        return {"gated_aux": (y - y_hat).pow(2).sum(1).mean()}

    def fold_scale(self, state: dict[str, torch.Tensor], scale: float) -> None:
        state["b_mag"] /= scale
