"""Per-feature statistics kept during one streaming pass, in bounded memory.

:class:`FeatureCollector` sees the SAE codes of one batch of contexts at a time, as
active pairs (token, feature, value), and keeps for every feature:

- firing count, sum and max of its activation;
- a histogram of log10(activation / scale) in fixed bins (``bins_per_decade`` per decade
  between 10^lo and 10^hi times ``scale``; values outside land in the end bins);
- its top-``top_k`` contexts, ranked by the feature's largest activation in the context,
  with the position of that peak;
- for every histogram bin, a uniform sample of ``reservoir`` firings (the ones with the
  smallest random keys, "bottom-k" reservoir sampling). The R smallest keys of a union of
  bins are among the R smallest of each bin, so a uniform sample of any range of bins (a
  quantile group, decided only at the end) is read off exactly.

Memory is O(F · (top_k + bins · reservoir)), whatever the number of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dictlens.errors import ConfigError


@dataclass
class CollectedStats:
    """What a pass collected, as numpy arrays (feature-major)."""

    n_tokens: int  # tokens seen (every kept position)
    count: np.ndarray  # [F] int64 firings
    total: np.ndarray  # [F] float64 sum of activations
    max: np.ndarray  # [F] float32
    hist: np.ndarray  # [F, nb] int64
    edges: np.ndarray  # [nb + 1] activation values of the bin edges (end bins are open)
    top_val: np.ndarray  # [F, K] float32, descending, 0 where unused
    top_pos: np.ndarray  # [F, K] int64 global position of the peak, -1 where unused
    res_key: np.ndarray  # [F, nb, R] float32 ascending, inf where unused
    res_pos: np.ndarray  # [F, nb, R] int64
    res_val: np.ndarray  # [F, nb, R] float32

    @property
    def density(self) -> np.ndarray:
        return self.count / max(1, self.n_tokens)

    @property
    def mean(self) -> np.ndarray:
        """Mean activation when firing (0 for a feature that never fired)."""
        return np.where(self.count > 0, self.total / np.maximum(self.count, 1), 0.0)

    def quantile_groups(self, feature: int, groups: int, examples: int) -> list[dict[str, Any]]:
        """``groups`` groups of about equal firing mass (bin resolution), each with a uniform
        sample of up to ``examples`` firings: [{lo, hi, fraction, positions, values}], from
        the lowest activations to the highest; empty groups are left out."""
        h = self.hist[feature]
        total = int(h.sum())
        if total == 0:
            return []
        before = np.cumsum(h) - h
        group_of = np.minimum((groups * (before + h / 2) / total).astype(np.int64), groups - 1)
        out = []
        for g in range(groups):
            bins = np.flatnonzero((group_of == g) & (h > 0))
            if len(bins) == 0:
                continue
            keys = self.res_key[feature, bins].reshape(-1)
            order = np.argsort(keys, kind="stable")[:examples]
            order = order[np.isfinite(keys[order])]
            pos = self.res_pos[feature, bins].reshape(-1)[order]
            val = self.res_val[feature, bins].reshape(-1)[order]
            by_value = np.argsort(-val, kind="stable")
            lo = float(self.edges[bins[0]]) if bins[0] > 0 else 0.0
            hi = float(self.edges[bins[-1] + 1]) if bins[-1] + 1 < len(self.edges) - 1 else float(self.max[feature])
            out.append({"lo": lo, "hi": min(hi, float(self.max[feature])), "fraction": float(h[bins].sum() / total),
                        "positions": pos[by_value].tolist(), "values": val[by_value].tolist()})
        return out


class FeatureCollector:
    """Streaming per-feature statistics of SAE codes (see the module docstring)."""

    def __init__(self, n_features: int, *, scale: float, top_k: int = 20, bins_per_decade: int = 8,
                 lo: float = -4.0, hi: float = 2.0, reservoir: int = 4, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if not scale > 0 or not math.isfinite(scale):
            raise ConfigError(f"FeatureCollector scale: expected a positive number, found {scale}")
        if hi <= lo or bins_per_decade < 1:
            raise ConfigError(f"FeatureCollector: expected lo < hi and bins_per_decade >= 1, found {lo}, {hi}, "
                              f"{bins_per_decade}")
        self.F, self.K, self.R = n_features, top_k, reservoir
        self.scale, self.lo, self.bpd = float(scale), float(lo), int(bins_per_decade)
        self.nb = int(round((hi - lo) * bins_per_decade))
        dev = torch.device(device)
        self.device = dev
        self.n_tokens = 0
        self.count = torch.zeros(n_features, dtype=torch.long, device=dev)
        self.total = torch.zeros(n_features, dtype=torch.float64, device=dev)
        self.max = torch.zeros(n_features, dtype=torch.float32, device=dev)
        self.hist = torch.zeros(n_features * self.nb, dtype=torch.long, device=dev)
        self.top_val = torch.zeros(n_features, top_k, dtype=torch.float32, device=dev)
        self.top_pos = torch.full((n_features, top_k), -1, dtype=torch.long, device=dev)
        cells = n_features * self.nb
        self.res_key = torch.full((cells, reservoir), math.inf, dtype=torch.float32, device=dev)
        self.res_pos = torch.full((cells, reservoir), -1, dtype=torch.long, device=dev)
        self.res_val = torch.zeros(cells, reservoir, dtype=torch.float32, device=dev)
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(seed)

    def bin_of(self, vals: torch.Tensor) -> torch.Tensor:
        b = torch.floor((torch.log10(vals / self.scale) - self.lo) * self.bpd)
        return b.clamp_(0, self.nb - 1).long()

    @torch.no_grad()
    def update(self, n_tokens: int, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
               positions: torch.Tensor, contexts: torch.Tensor) -> None:
        """One batch: ``n_tokens`` kept tokens; active pairs (``rows`` into those tokens,
        feature ``cols``, value ``vals`` > 0); ``positions`` [n_tokens] the global position
        of each token and ``contexts`` [n_tokens] its context's index within the batch."""
        self.n_tokens += int(n_tokens)
        if vals.numel() == 0:
            return
        F = self.F
        vals = vals.float()
        self.count += torch.bincount(cols, minlength=F)
        self.total += torch.bincount(cols, weights=vals.double(), minlength=F)
        self.max.scatter_reduce_(0, cols, vals, reduce="amax")
        bins = self.bin_of(vals)
        cell = cols * self.nb + bins
        self.hist += torch.bincount(cell, minlength=F * self.nb)
        pos = positions[rows]
        self._update_top(cols, vals, pos, contexts[rows])
        self._update_reservoir(cell, vals, pos)

    def _update_top(self, cols: torch.Tensor, vals: torch.Tensor, pos: torch.Tensor, ctx: torch.Tensor) -> None:
        n_ctx = int(ctx.max()) + 1
        key = ctx * self.F + cols
        ctx_max = torch.zeros(n_ctx * self.F, dtype=torch.float32, device=vals.device)
        ctx_max.scatter_reduce_(0, key, vals, reduce="amax")
        peak = torch.full((n_ctx * self.F,), -1, dtype=torch.long, device=vals.device)
        at_peak = vals == ctx_max[key]
        peak[key[at_peak]] = pos[at_peak]  # ties: any of the tied positions
        cand_val = ctx_max.view(n_ctx, self.F).T  # [F, n_ctx]
        cand_pos = peak.view(n_ctx, self.F).T
        all_val = torch.cat([self.top_val, cand_val], dim=1)
        all_pos = torch.cat([self.top_pos, cand_pos], dim=1)
        best = all_val.topk(self.K, dim=1).indices
        self.top_val = all_val.gather(1, best)
        self.top_pos = all_pos.gather(1, best)

    def _update_reservoir(self, cell: torch.Tensor, vals: torch.Tensor, pos: torch.Tensor) -> None:
        keys = torch.rand(cell.shape, generator=self.gen, device=cell.device)
        cand = keys < self.res_key[cell, -1]  # only keys below the cell's worst kept one can enter
        if not bool(cand.any()):
            return
        cell, keys, vals, pos = cell[cand], keys[cand], vals[cand], pos[cand]
        order = torch.argsort(keys)
        order = order[torch.argsort(cell[order], stable=True)]  # by cell, then key
        cell, keys, vals, pos = cell[order], keys[order], vals[order], pos[order]
        uniq, counts = torch.unique_consecutive(cell, return_counts=True)
        seg = torch.repeat_interleave(torch.arange(len(uniq), device=cell.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(cell), device=cell.device) - starts[seg]
        first = rank < self.R
        seg, rank = seg[first], rank[first]
        R, U = self.R, len(uniq)
        new_key = torch.full((U, R), math.inf, device=cell.device)
        new_pos = torch.full((U, R), -1, dtype=torch.long, device=cell.device)
        new_val = torch.zeros(U, R, device=cell.device)
        new_key[seg, rank] = keys[first]
        new_pos[seg, rank] = pos[first]
        new_val[seg, rank] = vals[first]
        k = torch.cat([self.res_key[uniq], new_key], dim=1)
        keep = k.argsort(dim=1)[:, :R]
        self.res_key[uniq] = k.gather(1, keep)
        self.res_pos[uniq] = torch.cat([self.res_pos[uniq], new_pos], dim=1).gather(1, keep)
        self.res_val[uniq] = torch.cat([self.res_val[uniq], new_val], dim=1).gather(1, keep)

    def result(self) -> CollectedStats:
        edges = self.scale * 10.0 ** (self.lo + np.arange(self.nb + 1) / self.bpd)
        shape = (self.F, self.nb, self.R)
        return CollectedStats(
            n_tokens=self.n_tokens, count=self.count.cpu().numpy(), total=self.total.cpu().numpy(),
            max=self.max.cpu().numpy(), hist=self.hist.view(self.F, self.nb).cpu().numpy(), edges=edges,
            top_val=self.top_val.cpu().numpy(), top_pos=self.top_pos.cpu().numpy(),
            res_key=self.res_key.view(shape).cpu().numpy(), res_pos=self.res_pos.view(shape).cpu().numpy(),
            res_val=self.res_val.view(shape).cpu().numpy())
