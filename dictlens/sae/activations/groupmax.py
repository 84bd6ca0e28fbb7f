"""Group-max: the features fall into k equal groups of adjacent indices, and each token
activates the largest pre-activation of every group (ReLU'd).

Like TopK it fixes the number of active features (at most k), but the competition is
local: a feature only has to beat the F/k others of its group, not all F, so a rare
feature with a small pre-activation is not crowded out by frequent ones elsewhere, and
each group acts as a small mixture-of-experts router over one concept slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dictlens.config import check
from dictlens.sae.activations.base import Activation, Form, Selection
from dictlens.sae.kernels import Pattern

if TYPE_CHECKING:
    from dictlens.sae.config import SAEConfig
    from dictlens.sae.model import SAE

# rows of the dense product formed at a time: the B×F matrix never exists whole
CHUNK = 1024


class GroupMax(Activation):
    name = "groupmax"
    form = Form.GROUPMAX
    help = "k groups of F/k adjacent features; each token activates the largest of every group"
    uses_k = True
    default_dead = "boost"

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        if cfg.d_in and cfg.k:
            check(cfg.n_features % cfg.k == 0, "n_features", f"a multiple of k = {cfg.k} for groupmax "
                  "(k groups of equal size)", cfg.n_features)

    @torch.no_grad()
    def select(self, sae: SAE, x_c: torch.Tensor, *, dead: torch.Tensor | None = None, k_aux: int = 0,
               aux_rows: int = 0) -> Selection:
        assert sae.cfg.k is not None
        k, n = sae.cfg.k, len(x_c)
        size = sae.n_features // k
        offsets = torch.arange(0, sae.n_features, size, device=x_c.device)
        idx = torch.empty(n, k, dtype=torch.long, device=x_c.device)
        for s in range(0, n, CHUNK):
            pre = sae.dense_pre(x_c[s:s + CHUNK], sae.ranking_dtype())
            idx[s:s + CHUNK] = pre.view(len(pre), k, size).argmax(dim=2) + offsets
        return Selection(Pattern.from_indices(idx, sae.n_features))
