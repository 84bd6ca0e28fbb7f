"""BatchTopK (Bussmann et al. 2024): the k·B largest pre-activations of the whole batch.

In training the batch shares one budget of k active features per token; at inference a
token is coded on its own, by a threshold: every pre-activation above it is active.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from dictlens.sae.activations.base import Activation, Codes, Form, Selection
from dictlens.sae.kernels import Pattern

if TYPE_CHECKING:
    from dictlens.distributed import World
    from dictlens.sae.model import SAE


class BatchTopK(Activation):
    name = "batchtopk"
    form = Form.THRESHOLD
    scalar_threshold = True

    def inference_threshold(self, state: dict[str, torch.Tensor], n_features: int) -> torch.Tensor:
        return torch.full((n_features,), max(float(state["threshold"]), 0.0))   # ≤ 0: unset, plain ReLU
    help = "the k·B largest pre-activations of the batch in training, a learned threshold at inference"
    uses_k = True
    default_dead = "boost"
    owned_keys = ("threshold",)
    shardable = True

    def add_parameters(self, sae: SAE) -> None:
        # -1: not set yet (the first training batch sets it; training ends by calibrating it)
        sae.register_buffer("threshold", torch.tensor(-1.0))

    def select(self, sae: SAE, x_c: torch.Tensor, *, dead: torch.Tensor | None = None, k_aux: int = 0,
               aux_rows: int = 0) -> Selection:
        if not sae.training:  # thresholds are decided in float32 so no small activation is lost
            return Selection(Pattern.from_mask(sae.dense_pre(x_c) > sae.threshold.clamp_min(0)))
        assert sae.cfg.k is not None
        pre_BF = sae.dense_pre(x_c, sae.ranking_dtype())
        world, rows = _splitting(sae, pre_BF.shape[0])
        if not world.alone:
            # data parallel (the ranks split the rows) or latent shards (the features): the k·B
            # largest of the whole batch. A rank's share of them is among its own k·B largest;
            # their union, gathered, gives the global cut. Values tied at the cut (frequent when
            # ranking in bfloat16) fill the budget exactly: rank by rank, each rank's first in
            # its own order
            budget = sae.cfg.k * rows
            flat = pre_BF.flatten()
            mine = flat.topk(min(budget, flat.numel()), sorted=False).values
            everyone = world.gather_rows(mine, "selecting the batch top-k across ranks")
            cut = everyone.topk(min(budget, len(everyone)), sorted=False).values.min()
            above, tied = flat > cut, flat == cut
            counts = world.gather_rows(torch.stack([above.sum(), tied.sum()]).reshape(1, 2),
                                       "counting the batch top-k across ranks")
            room = budget - int(counts[:, 0].sum()) - int(counts[:world.rank, 1].sum())
            take = max(0, min(int(counts[world.rank, 1]), room))
            keep = above.clone()
            keep[tied.nonzero()[:take, 0]] = True
            return Selection(Pattern.from_mask(keep.view_as(pre_BF) & (pre_BF > 0)))
        n = min(sae.cfg.k * pre_BF.shape[0], pre_BF.numel())
        flat = pre_BF.flatten().topk(n, sorted=False).indices
        mask = torch.zeros(pre_BF.numel(), dtype=torch.bool, device=pre_BF.device)
        mask[flat] = True
        return Selection(Pattern.from_mask(mask.view_as(pre_BF) & (pre_BF > 0)))

    @torch.no_grad()
    def after_forward(self, sae: SAE, codes: Codes) -> None:
        """While training, a running mean of the smallest kept activation (a first estimate)."""
        if not sae.training or codes.pattern.nnz == 0:
            return
        vals = codes.vals.detach()
        big = torch.finfo(vals.dtype).max
        smallest = vals[vals > 0].min() if bool((vals > 0).any()) else vals.new_tensor(big)
        world, _ = _splitting(sae, 0)
        smallest = -world.max_(-smallest.reshape(1), "the smallest kept activation across ranks")[0]
        smallest = torch.where(smallest == big, torch.zeros_like(smallest), smallest)
        if float(sae.threshold) < 0:
            sae.threshold.copy_(smallest)
        else:
            sae.threshold.mul_(0.99).add_(0.01 * smallest)

    @torch.no_grad()
    def finish_training(self, sae: SAE, sample: Iterable[torch.Tensor]) -> None:
        self.calibrate(sae, sample)

    @torch.no_grad()
    def calibrate(self, sae: SAE, batches: Iterable[torch.Tensor]) -> float:
        """Set the inference threshold from normalised inputs so that tokens get k active
        features on average: the (k·N)-th largest pre-activation over all N rows, i.e.
        exactly the batch top-k over the whole sample. The running mean kept during training
        remembers the first steps (0.99^132 = 27% weight after a 540k-token run), which left
        L0 at 9 for k = 16 and a quarter of the features silent at inference."""
        k, rows, pres = int(sae.cfg.k or 0), 0, []
        for x in batches:
            pre = sae.dense_pre(sae.centring(x)[0]).relu()
            # a row's 4k largest bound its share of the top k·N (memory: [N, 4k], not [N, F])
            top = pre.topk(min(4 * k, sae.n_features), dim=1, sorted=False).values
            if sae.shard is not None:   # each row's 4k largest of the whole dictionary, from every shard's
                top = sae.shard.gather_columns(top, "gathering the calibration values")
                top = top.topk(min(4 * k, sae.cfg.n_features), dim=1, sorted=False).values
            pres.append(top.flatten())
            rows += len(x)
        values = torch.cat(pres)
        n = min(k * rows, len(values))
        if n > 0:
            sae.threshold.fill_(float(values.topk(n, sorted=True).values[-1]))
        return float(sae.threshold)

    def fold_scale(self, state: dict[str, torch.Tensor], scale: float) -> None:
        if float(state["threshold"]) > 0:
            state["threshold"] /= scale


def _splitting(sae: SAE, rows: int) -> tuple[World, int]:
    """The ranks that split the batch's B×F pre-activations, and how many rows the whole batch
    has (``rows`` this rank's): data parallel splits the rows, latent shards the features."""
    if sae.shard is not None:
        return sae.shard.world, rows
    return sae.world, rows * sae.world.size
