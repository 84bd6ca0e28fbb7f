"""TopK (Makhzani & Frey; Gao et al. 2024): the k largest pre-activations of each row."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dictlens.sae.activations.base import Activation, Form, Selection
from dictlens.sae.kernels import Pattern, topk_select

if TYPE_CHECKING:
    from dictlens.sae.model import SAE


class TopK(Activation):
    name = "topk"
    form = Form.TOPK
    help = "the k largest pre-activations of each token (ReLU'd)"
    uses_k = True
    default_dead = "boost"
    shardable = True

    def select(self, sae: SAE, x_c: torch.Tensor, *, dead: torch.Tensor | None = None, k_aux: int = 0,
               aux_rows: int = 0) -> Selection:
        assert sae.cfg.k is not None
        n_dead = int(dead.sum()) if dead is not None else 0
        # the selection runs in chunks and never holds the B×F product, so AuxK's dead
        # features are ranked in the same pass
        k, shard = sae.cfg.k, sae.shard
        if shard is not None:   # this shard's candidates, merged into the global top k (and AuxK's)
            # (the trainer asks for dead features only when the whole dictionary has some, and for at
            # most k_aux of them; a shard with fewer of its own offers what it has)
            k_aux = k_aux if dead is not None else 0
            mine = min(k_aux, n_dead)
            picks = topk_select(x_c, sae.W_enc, sae.b_enc, min(k, sae.n_features), dtype=sae.ranking_dtype(),
                                dead=dead if mine else None, k_aux=mine, aux_rows=aux_rows, values=True)
            n_aux = min(len(x_c), aux_rows) if aux_rows > 0 else len(x_c)
            aux = shard.merge_topk(picks.aux_top, picks.aux, k_aux, n_aux, x_c.device) if k_aux else None
            return Selection(shard.merge_topk(picks.top, picks.idx, k, len(x_c), x_c.device), aux)
        picks = topk_select(x_c, sae.W_enc, sae.b_enc, k, dtype=sae.ranking_dtype(),
                            dead=dead if n_dead else None, k_aux=min(k_aux, n_dead), aux_rows=aux_rows)
        aux = Pattern.from_indices(picks.aux, sae.n_features) if picks.aux is not None else None
        return Selection(Pattern.from_indices(picks.idx, sae.n_features, ascending=True), aux)
