"""From packed contexts to clean activation rows: masking, NaN checks, outliers, statistics.

This is shared by the disk cache (``harvest``) and by streaming, so both see exactly the
same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch

from dictlens.data.packing import Context
from dictlens.data.tap import Tap
from dictlens.errors import ActivationError


@dataclass
class Chunk:
    """Activation rows of several hooks for the same tokens.

    ``acts[hook]`` is [N, D] float32 on CPU; ``token_ids``, ``positions`` (within the
    context) and ``contexts`` (global context index) are [N] integer arrays.
    """

    acts: dict[str, torch.Tensor]
    token_ids: np.ndarray
    positions: np.ndarray
    contexts: np.ndarray
    n_contexts: int = 0  # contexts this chunk consumed (whether or not any row was kept)

    def __len__(self) -> int:
        return len(self.token_ids)

    def head(self, n: int) -> Chunk:
        return Chunk({h: a[:n] for h, a in self.acts.items()}, self.token_ids[:n],
                     self.positions[:n], self.contexts[:n], self.n_contexts)


def _array(v: list[float] | None) -> np.ndarray | None:
    return None if v is None else np.asarray(v, dtype=np.float64)


@dataclass
class Moments:
    """Streamed sums of a set of rows, in float64, so any number of tokens works."""

    count: int = 0
    sum: np.ndarray | None = None
    sum_sq: np.ndarray | None = None  # per dimension
    sum_norm: float = 0.0

    def add(self, x: torch.Tensor, chunk: int = 1 << 15) -> None:
        """Add rows; float64 copies are made ``chunk`` rows at a time, so memory stays small."""
        for part in x.split(chunk):
            x64 = part.double()
            s, sq = x64.sum(0).cpu().numpy(), (x64 * x64).sum(0).cpu().numpy()
            self.sum = s if self.sum is None else self.sum + s
            self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
            self.sum_norm += float(x64.norm(dim=1).sum())
            self.count += len(part)

    def merge(self, other: Moments) -> Moments:
        out = Moments(self.count, self.sum, self.sum_sq, self.sum_norm)
        if other.count:
            out.count += other.count
            out.sum = other.sum if out.sum is None else out.sum + other.sum
            out.sum_sq = other.sum_sq if out.sum_sq is None else out.sum_sq + other.sum_sq
            out.sum_norm += other.sum_norm
        return out

    def squared_deviation(self, mu: np.ndarray) -> float:
        """Σ‖x − μ‖² over the rows, from the sums."""
        if not self.count:
            return 0.0
        assert self.sum is not None and self.sum_sq is not None
        return float(self.sum_sq.sum() - 2 * mu @ self.sum + self.count * mu @ mu)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "sum_norm": self.sum_norm,
                "sum": None if self.sum is None else self.sum.tolist(),
                "sum_sq": None if self.sum_sq is None else self.sum_sq.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Moments:
        return cls(int(d["count"]), _array(d["sum"]), _array(d["sum_sq"]), float(d["sum_norm"]))


@dataclass
class NormStats:
    """Normalisation statistics of one hook: mean vector, mean norm, per-dim variance."""

    count: int
    mean: np.ndarray
    mean_norm: float
    var: np.ndarray

    @classmethod
    def from_moments(cls, m: Moments) -> NormStats:
        if not m.count or m.sum is None or m.sum_sq is None:
            raise ActivationError("the activations hold no rows (every token filtered out?): their statistics "
                                  "are undefined")
        mean = m.sum / m.count
        var = np.maximum(m.sum_sq / m.count - mean * mean, 0.0)
        return cls(m.count, mean, m.sum_norm / m.count, var)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "mean_norm": self.mean_norm,
                "total_variance": float(self.var.sum()),
                "mean": self.mean.tolist(), "var": self.var.tolist()}


def outlier_limit(manifest: dict[str, Any], hook: str) -> float | None:
    """The norm above which a cache's harvest dropped activations at ``hook`` (None: no filter):
    the outlier factor times the median norm fixed from the harvest's first batch."""
    f = manifest.get("filter") or {}
    factor, median = f.get("outlier_factor"), (f.get("median_norm") or {}).get(hook)
    return float(factor) * float(median) if factor and median else None


@dataclass
class FilterState:
    """What the filters dropped so far, and the fixed outlier thresholds of this run."""

    hooks: list[str]
    outlier_factor: float | None = None
    median_norm: dict[str, float] = field(default_factory=dict)
    kept: dict[str, Moments] = field(default_factory=dict)
    outliers: dict[str, Moments] = field(default_factory=dict)
    dropped_special: int = 0
    dropped_outlier: int = 0
    dropped_nonfinite: int = 0

    def __post_init__(self) -> None:
        for h in self.hooks:
            self.kept.setdefault(h, Moments())
            self.outliers.setdefault(h, Moments())

    def outlier_variance_share(self, hook: str) -> float:
        """Share of the total variance (kept + outliers, about their joint mean) held by outliers."""
        both = self.kept[hook].merge(self.outliers[hook])
        if not both.count or both.sum is None:
            return 0.0
        mu = both.sum / both.count
        total = both.squared_deviation(mu)
        return self.outliers[hook].squared_deviation(mu) / total if total > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "outlier_factor": self.outlier_factor, "median_norm": self.median_norm,
            "dropped_special": self.dropped_special, "dropped_outlier": self.dropped_outlier,
            "dropped_nonfinite": self.dropped_nonfinite,
            "kept": {h: m.to_json() for h, m in self.kept.items()},
            "outliers": {h: m.to_json() for h, m in self.outliers.items()},
        }

    @classmethod
    def from_json(cls, hooks: list[str], d: dict[str, Any]) -> FilterState:
        return cls(hooks, d["outlier_factor"], dict(d["median_norm"]),
                   {h: Moments.from_json(m) for h, m in d["kept"].items()},
                   {h: Moments.from_json(m) for h, m in d["outliers"].items()},
                   d["dropped_special"], d["dropped_outlier"], d["dropped_nonfinite"])


@dataclass
class TokenFilter:
    """Which tokens to keep: special tokens, non-finite activations and norm outliers."""

    special_ids: set[int]
    keep_special: bool = False
    drop_nonfinite: bool = False

    def valid_mask(self, ids_BT: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        from dictlens.data.tokens import keep_mask

        ids = sorted(self.special_ids) if not self.keep_special else []
        return keep_mask(ids_BT, torch.tensor(ids, dtype=torch.long), torch.as_tensor(n_valid))

    def check_finite(self, acts: dict[str, torch.Tensor], ctx: np.ndarray, pos: np.ndarray,
                     state: FilterState) -> torch.Tensor:
        """Rows to keep; raises :class:`ActivationError` on NaN/Inf unless dropping them."""
        keep = torch.ones(len(ctx), dtype=torch.bool)
        for hook, a in acts.items():
            bad = ~torch.isfinite(a).all(dim=1)
            n_bad = int(bad.sum())
            if n_bad and not self.drop_nonfinite:
                where = ", ".join(f"context {ctx[i]} position {pos[i]}"
                                  for i in bad.nonzero()[:3, 0].tolist())
                raise ActivationError(
                    f"hook {hook}: {n_bad} activation rows contain NaN or Inf (first at {where}); "
                    "pass --drop-nonfinite to drop them")
            keep &= ~bad
        state.dropped_nonfinite += int((~keep).sum())
        return keep

    def drop_outliers(self, acts: dict[str, torch.Tensor], keep: torch.Tensor,
                      state: FilterState) -> torch.Tensor:
        """Drop rows whose norm exceeds factor × median norm at any hook."""
        if state.outlier_factor is None:
            return keep
        norms = {h: a.norm(dim=1) for h, a in acts.items()}
        for h, n in norms.items():
            if h not in state.median_norm and bool(keep.any()):
                # The threshold is fixed from the first batch so the whole cache shares it.
                state.median_norm[h] = float(n[keep].median())
        outlier = torch.zeros_like(keep)
        for h, n in norms.items():
            outlier |= n > state.outlier_factor * state.median_norm.get(h, float("inf"))
        outlier &= keep
        for h, a in acts.items():
            state.outliers[h].add(a[outlier])
        state.dropped_outlier += int(outlier.sum())
        return keep & ~outlier


def iter_chunks(tap: Tap, contexts: Iterable[Context], *, batch_size: int, token_filter: TokenFilter,
                state: FilterState, first_context: int = 0) -> Iterator[Chunk]:
    """Run ``tap`` over batches of ``contexts`` and yield the filtered activation rows.

    ``first_context`` is the global index of the first context (for resuming); every
    yielded chunk holds whole contexts, in order. The consumer adds the rows it uses to
    ``state.kept`` (a cache trims its last chunk to the exact token count).
    """
    it = iter(contexts)
    index = first_context
    while batch := list(islice(it, batch_size)):
        ids = torch.from_numpy(np.stack([c.ids for c in batch]))
        n_valid = torch.tensor([c.n_valid for c in batch])
        mask = token_filter.valid_mask(ids, n_valid)
        state.dropped_special += int((torch.arange(ids.shape[1])[None] < n_valid[:, None]).sum() - mask.sum())
        raw = tap(ids)
        acts = {h: a[mask.to(a.device)].float().cpu() for h, a in raw.items()}
        ctx_idx = (torch.arange(len(batch))[:, None] + index).expand_as(ids)[mask].numpy()
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)[mask].numpy()
        keep = token_filter.check_finite(acts, ctx_idx, pos, state)
        keep = token_filter.drop_outliers(acts, keep, state)
        acts = {h: a[keep] for h, a in acts.items()}
        k = keep.numpy()
        yield Chunk(acts, ids[mask].numpy()[k].astype(np.int32), pos[k].astype(np.int32),
                    ctx_idx[k].astype(np.int64), len(batch))
        index += len(batch)
