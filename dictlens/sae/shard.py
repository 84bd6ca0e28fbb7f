"""Latent parallel: one dictionary's features split across ranks (``--shard-latents``).

    torchrun --nproc-per-node 4 -m dictlens train --acts runs/acts --n-features 1048576 --shard-latents ...

Rank r of N holds features [r·F/N, (r+1)·F/N): its rows of ``W_enc``, ``W_dec``, ``b_enc`` and of
every per-feature parameter its activation owns (JumpReLU's thresholds), with their optimiser
state and dead-feature counters; ``b_dec`` and the input scale are replicated. Every rank reads
the same whole batch. A step then goes:

* each rank forms the encoder product of its own features only (B × F/N) and selects on it: an
  elementwise activation (ReLU, JumpReLU) needs nothing more; TopK takes each row's top k of
  the shard, gathers every shard's candidates (B × k values and global indices each) and keeps
  its share of the global top k, the same features one process picks;
* each rank decodes its active pairs into a partial reconstruction, and the partials are summed
  across ranks (:meth:`World.sum_shared`, whose backward is the identity: every rank computes the
  same reconstruction loss from the same sum). ``b_dec`` enters that sum as b_dec/N from each rank,
  so its gradient from the decoder is split among the ranks and the all-reduce of its gradient
  (:meth:`LatentShard.reduce_grads`) adds the encoder side's per-shard parts to exactly one copy;
* per-feature penalties (sparsity, L0, the pre-activation loss, the dead-feature decoder
  penalty) are sums over features: each rank differentiates its own part, and the logged value is
  their sum across ranks.

Checkpoints and the saved SAE hold the whole dictionary in the ordinary layout, gathered into
rank 0's host memory (:meth:`LatentShard.gather`), so one process loads them and a run resumes
under any N that divides F. Initialisation does not depend on N (``initial_directions`` draws
fixed blocks of rows from seeds of their own), so N shards train to the weights one process
reaches. BatchTopK's batch-wide cut is found from every shard's candidates as data parallel
finds it from every rank's rows, and its calibration merges each row's candidates. Groups of
features (GroupMax), the Gated SAE's gate loss, the per-token Hoyer penalty and decoder
diversity are refused with a one-line error (``check``). AuxK's dead features are merged like
the top k (from the selection's pass, however few are dead), and the auxiliary reconstruction
is summed like the main one, and so is each Matryoshka prefix's (every shard decodes its
features below the prefix size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dictlens.distributed import World
from dictlens.errors import CheckpointError, ConfigError
from dictlens.sae.kernels import Pattern

if TYPE_CHECKING:
    from dictlens.sae.config import SAEConfig
    from dictlens.sae.model import SAE


@dataclass
class LatentShard:
    """This rank's features ``[lo, hi)`` of a dictionary of ``n_total``, among ``world``'s ranks."""

    world: World
    n_total: int
    lo: int
    hi: int

    @classmethod
    def of(cls, world: World, cfg: SAEConfig) -> LatentShard:
        """This rank's equal share of ``cfg``'s features; F must divide among the ranks."""
        F, n = cfg.n_features, world.size
        if F % n:
            raise ConfigError(f"shard_latents: {F} features do not divide among {n} ranks (choose "
                              f"--n-features a multiple of {n})")
        if not cfg.kind.shardable:
            from dictlens.sae import activations

            able = [name for name, a in activations.REGISTRY.items() if a.shardable]
            raise ConfigError(f"shard_latents: {cfg.activation} SAEs cannot be split across ranks yet "
                              f"(these can: {', '.join(able)})")
        per = F // n
        return cls(world, F, world.rank * per, (world.rank + 1) * per)

    @property
    def n_local(self) -> int:
        return self.hi - self.lo

    # ---- the forward pass ---------------------------------------------------------------
    def count(self, mask: torch.Tensor | None) -> int:
        """How many of the whole dictionary's features a per-feature ``mask`` marks (a collective)."""
        device = mask.device if mask is not None else torch.device("cpu")
        mine = torch.tensor([float(mask.sum()) if mask is not None else 0.0], device=device)
        return int(self.world.sum_(mine, "counting features across shards").item())

    def gather_columns(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Every shard's [n, c] side by side, in rank order: [n, N·c] on every rank."""
        n, world = len(t), self.world
        return world.gather_rows(t, what).view(world.size, n, -1).permute(1, 0, 2).reshape(n, -1)

    def merge_topk(self, vals_BK: torch.Tensor | None, idx_BK: torch.Tensor | None, k: int, n: int,
                   device: torch.device) -> Pattern:
        """This shard's share of each of ``n`` rows' global top ``k``, from every shard's own top
        candidates (``vals_BK`` and this shard's ``idx_BK`` [n, ≤k]; None: it has none, as a
        shard without dead features for AuxK): a pattern over its features."""
        what = "merging the shards' top-k"
        vals = torch.full((n, k), -torch.inf, device=device)   # padded: every shard sends [n, k]
        idx = torch.full((n, k), -1, dtype=torch.long, device=device)
        if vals_BK is not None and idx_BK is not None and vals_BK.shape[1]:
            vals[:, :vals_BK.shape[1]] = vals_BK
            idx[:, :idx_BK.shape[1]] = idx_BK + self.lo
        vals, idx = self.gather_columns(vals, what), self.gather_columns(idx, what)
        chosen = idx.gather(1, vals.topk(k, dim=1, sorted=False).indices).sort(dim=1).values
        mine = (chosen >= self.lo) & (chosen < self.hi)
        rows = torch.arange(n, device=chosen.device).repeat_interleave(k).view(n, k)
        return Pattern.from_pairs(rows[mine], chosen[mine] - self.lo, n, self.n_local)

    # ---- gradients ------------------------------------------------------------------------
    def reduce_grads(self, sae: SAE) -> None:
        """Sum the replicated parameters' gradients across ranks (each holds its features' part)."""
        shared = [p for name, p in sae.named_parameters() if name not in sae.per_feature_keys]
        self.world.sum_grads(shared, "summing the shared gradients")

    def clip_grad_norm_(self, sae: SAE, max_norm: float) -> float:
        """``torch.nn.utils.clip_grad_norm_`` over the whole dictionary's gradients."""
        local, shared = torch.zeros((), device=sae.device), torch.zeros((), device=sae.device)
        for name, p in sae.named_parameters():
            if p.grad is not None:
                sq = p.grad.detach().float().pow(2).sum()
                if name in sae.per_feature_keys:
                    local += sq
                else:
                    shared += sq
        total = (self.world.sum_(local, "summing the gradient norm") + shared).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in sae.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return float(total)

    def sync_replicated(self, sae: SAE) -> None:
        """Give every rank rank 0's replicated parameters and buffers (against drift between
        machines whose arithmetic differs in the last bit)."""
        for name, t in sae.state_dict().items():
            if name not in sae.per_feature_keys:
                self.world.broadcast_(t, f"sharing {name}")

    # ---- whole-dictionary views ---------------------------------------------------------
    def all_features(self, t: torch.Tensor, what: str = "gathering per-feature values") -> torch.Tensor:
        """Every shard's rows of a per-feature tensor [F/N, ...] as the whole [F, ...], on every rank."""
        dtype = t.dtype
        out = self.world.gather_rows(t.to(torch.uint8) if dtype == torch.bool else t, what)
        return out.to(dtype)

    def gather(self, t: torch.Tensor, what: str = "gathering a checkpoint") -> torch.Tensor | None:
        """A per-feature tensor's whole [F, ...] in rank 0's host memory (None on the other ranks)."""
        return self.world.gather_to_first(t, what)

    def slice(self, full: torch.Tensor, name: str, source: str) -> torch.Tensor:
        """This shard's rows of a whole per-feature tensor [F, ...] (a checkpoint's)."""
        if full.ndim == 0 or full.shape[0] != self.n_total:
            raise CheckpointError(f"{source}: {name} has shape {list(full.shape)}, not {self.n_total} rows "
                                  "(one per feature)")
        return full[self.lo:self.hi]

    def gather_optimizer(self, state: dict[str, Any], names: list[str], per_feature: tuple[str, ...]
                         ) -> dict[str, Any] | None:
        """An optimiser's ``state_dict()`` with every per-feature parameter's state gathered whole
        (rank 0; None elsewhere). ``names``: the parameters' names in the optimiser's order."""
        def each(t: torch.Tensor, name: str) -> torch.Tensor | None:
            return self.gather(t, f"gathering {name}'s optimiser state")
        return _map_optimizer(state, names, per_feature, self.n_local, each)

    def slice_optimizer(self, state: dict[str, Any], names: list[str], per_feature: tuple[str, ...],
                        source: str) -> dict[str, Any]:
        """A whole optimiser ``state_dict()`` (a checkpoint's) cut to this shard's rows."""
        out = _map_optimizer(state, names, per_feature, self.n_total,
                             lambda t, name: self.slice(t, f"{name}'s optimiser state", source))
        assert out is not None
        return out


def _map_optimizer(state: dict[str, Any], names: list[str], per_feature: tuple[str, ...], rows: int,
                   fn: Any) -> dict[str, Any] | None:
    """``state`` with ``fn`` applied to the row-per-feature tensors of per-feature parameters (the
    moments; not a scalar step count); None when ``fn`` gave None (a rank that holds nothing)."""
    out: dict[int, Any] = {}
    empty = False
    for index, entries in state["state"].items():
        name = names[int(index)]
        new = {}
        for key, value in entries.items():
            if (name in per_feature and isinstance(value, torch.Tensor) and value.ndim > 0
                    and value.shape[0] == rows):
                value = fn(value, name)
                empty = empty or value is None
            new[key] = value
        out[index] = new
    return None if empty else {**state, "state": out}


def initial_directions(n_features: int, d_in: int, seed: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Rows ``lo:hi`` of the F×D random initial decoder (unnormalised): drawn in blocks of
    ``INIT_BLOCK`` rows, block b from a generator seeded by ``seed + b·2³²``, so that a shard draws
    its own rows alone and every N gives the same dictionary (block 0 alone is the whole of any
    dictionary up to 16,384 features: one draw seeded by ``seed``)."""
    hi = n_features if hi is None else hi
    parts = []
    for b in range(lo // INIT_BLOCK, (hi + INIT_BLOCK - 1) // INIT_BLOCK):
        start = b * INIT_BLOCK
        g = torch.Generator().manual_seed(seed + (b << 32))
        block = torch.randn(min(INIT_BLOCK, n_features - start), d_in, generator=g)
        parts.append(block[max(lo - start, 0):hi - start])
    return torch.cat(parts) if parts else torch.empty(0, d_in)


INIT_BLOCK = 16384

__all__ = ["LatentShard", "initial_directions", "INIT_BLOCK"]
