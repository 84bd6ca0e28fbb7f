"""Reconstruction and sparsity metrics, streamed over any number of held-out tokens.

Every definition is written out in ``docs/metrics.md``; in short, over N evaluated
tokens x_t ∈ R^D with reconstructions x̂_t and codes f_t:

  FVU = Σ_t‖x_t − x̂_t‖² / Σ_t‖x_t − x̄‖²   (x̄ the mean vector of all N tokens)
  explained variance = 1 − FVU
  legacy explained variance = mean_t 1 − ‖x_t − x̂_t‖² / ‖x_t − x̄_B‖²  (x̄_B the batch mean;
      SAELens's former formula, kept only to compare with numbers published with it)
  MSE = Σ_t‖x_t − x̂_t‖² / (N·D);  MSE per token = Σ_t‖x_t − x̂_t‖² / N
  uncentred normalised MSE = Σ_t‖x_t − x̂_t‖² / Σ_t‖x_t‖²
  L0 = mean_t #{i: f_ti ≠ 0};  L1 = mean_t Σ_i |f_ti|
  dead fraction = share of features never active on the N tokens;
  dense fraction = share of features active on more than 10% of them
  cosine = mean_t cos(x_t, x̂_t);  L2 ratio = mean_t ‖x̂_t‖/‖x_t‖
  relative reconstruction bias = Σ_t‖x̂_t‖² / Σ_t x_t·x̂_t   (Gated SAE paper, eq. 10: 1 is unbiased,
      below 1 is shrinkage)

Sums are float64 and taken about a fixed reference point (the first batch's mean), so
the total variance does not cancel catastrophically and a streamed value equals the
one computed in one batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dictlens.errors import InputError
from dictlens.sae.clt import Dictionary
from dictlens.sae.kernels import Pattern
from dictlens.sae.model import SAE

DENSE_ABOVE = 0.1  # a feature active on more than this share of tokens counts as dense


@dataclass
class Metrics:
    n_tokens: int
    fvu: float
    explained_variance: float
    explained_variance_legacy: float
    mse: float
    mse_per_token: float
    nmse_uncentred: float
    l0: float
    l1: float
    dead_fraction: float
    dense_fraction: float
    cosine: float
    l2_ratio: float
    relative_reconstruction_bias: float
    # per-feature count of tokens it fired on (not in to_dict: F numbers)
    feature_counts: torch.Tensor | None = field(default=None, repr=False)
    # a dictionary that writes several hooks (a CLT's layers): each one's reconstruction, by hook
    by_output: dict[str, dict[str, float]] | None = None
    # a crosscoder's: how its live features divide among its hooks (:func:`hook_shares`)
    hook_shares: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("feature_counts")
        for key in ("by_output", "hook_shares"):
            if d[key] is None:
                d.pop(key)
        return d

    def feature_density(self) -> torch.Tensor:
        """Share of the evaluated tokens each feature fired on [F]."""
        if self.feature_counts is None:
            raise InputError("these metrics were computed without codes: no feature density")
        return self.feature_counts.double() / max(1, self.n_tokens)


class ReconstructionStats:
    """Streamed sums behind :class:`Metrics`; feed ``update(x, x_hat, pattern, vals)``."""

    def __init__(self, n_features: int | None = None):
        self.n = 0
        self.d = 0
        self.ref: torch.Tensor | None = None
        self.sum_c: torch.Tensor | None = None  # Σ (x − ref), float64 [D]
        self.sq_c = 0.0  # Σ ‖x − ref‖²
        self.sq = 0.0  # Σ ‖x‖²
        self.err = 0.0  # Σ ‖x − x̂‖²
        self.dot = 0.0  # Σ x·x̂
        self.hat_sq = 0.0  # Σ ‖x̂‖²
        self.cos = 0.0  # Σ cos(x, x̂)
        self.ratio = 0.0  # Σ ‖x̂‖/‖x‖
        self.legacy = 0.0  # Σ per-token legacy EV
        self.nnz = 0
        self.l1 = 0.0
        self.counts = torch.zeros(n_features, dtype=torch.long) if n_features else None

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, pattern: Pattern | None = None,
               vals: torch.Tensor | None = None) -> None:
        if x.ndim != 2 or x_hat.shape != x.shape:
            raise InputError(f"metrics: x {list(x.shape)} and x̂ {list(x_hat.shape)} must both be [batch, d]")
        if len(x) == 0:
            return
        x64, h64 = x.double(), x_hat.double()
        if self.ref is None:
            self.ref = x64.mean(0)
            self.d = x.shape[1]
            self.sum_c = torch.zeros_like(self.ref)
        assert self.sum_c is not None
        xc = x64 - self.ref
        self.sum_c += xc.sum(0)
        self.sq_c += float(xc.pow(2).sum())
        x_sq = x64.pow(2).sum(1)
        h_sq = h64.pow(2).sum(1)
        e_sq = (x64 - h64).pow(2).sum(1)
        dot = (x64 * h64).sum(1)
        self.sq += float(x_sq.sum())
        self.err += float(e_sq.sum())
        self.dot += float(dot.sum())
        self.hat_sq += float(h_sq.sum())
        norms = x_sq.sqrt().clamp_min(1e-12) * h_sq.sqrt().clamp_min(1e-12)
        self.cos += float((dot / norms).sum())
        self.ratio += float((h_sq.sqrt() / x_sq.sqrt().clamp_min(1e-12)).sum())
        batch_var = (x64 - x64.mean(0)).pow(2).sum(1)
        self.legacy += float((1 - e_sq / batch_var.clamp_min(1e-30)).sum())
        self.n += len(x)
        if pattern is not None and vals is not None:
            active = vals != 0
            self.nnz += int(active.sum())
            self.l1 += float(vals.double().abs().sum())
            if self.counts is not None:
                # one count per (token, feature): patterns hold each pair once
                self.counts += torch.bincount(pattern.cols[active].cpu(), minlength=len(self.counts))

    def result(self) -> Metrics:
        if self.n == 0 or self.sum_c is None:
            raise InputError("evaluation data is empty")
        n = self.n
        total = self.sq_c - float(self.sum_c.pow(2).sum()) / n
        fvu = self.err / total if total > 0 else float("nan")
        counts = self.counts
        dead = 1 - float((counts > 0).double().mean()) if counts is not None else float("nan")
        dense = float((counts > DENSE_ABOVE * n).double().mean()) if counts is not None else float("nan")
        return Metrics(
            n_tokens=n, fvu=fvu, explained_variance=1 - fvu, explained_variance_legacy=self.legacy / n,
            mse=self.err / (n * self.d), mse_per_token=self.err / n,
            nmse_uncentred=self.err / self.sq if self.sq > 0 else float("nan"),
            l0=self.nnz / n, l1=self.l1 / n, dead_fraction=dead, dense_fraction=dense,
            cosine=self.cos / n, l2_ratio=self.ratio / n,
            relative_reconstruction_bias=self.hat_sq / self.dot if self.dot != 0 else float("nan"),
            feature_counts=counts)


Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]   # inputs, or (inputs, a transcoder's targets)


@torch.no_grad()
def evaluate(sae: Dictionary, batches: Iterable[Batch], outputs: Sequence[str] | None = None) -> Metrics:
    """Metrics of ``sae`` on raw activation batches [B, D] (held out from training); a transcoder's
    batches are (inputs, targets) pairs, and its metrics are those of its prediction of the targets.
    ``outputs``: the hooks its targets hold side by side (a CLT's layers), each then measured on its
    own too (``Metrics.by_output``: FVU, explained variance, MSE, cosine of each).

    Features are ranked in float32, so the figures do not depend on the hardware's fast
    low-precision ranking (``select_dtype``).
    """
    stats = ReconstructionStats(sae.n_features)
    parts = [ReconstructionStats() for _ in outputs or ()]
    if parts and sae.d_out % len(parts):
        raise InputError(f"evaluation: {sae.d_out} output columns do not split into {len(parts)} equal hooks")
    with sae.ranking("float32"):
        for batch in batches:
            x, y = batch if isinstance(batch, tuple) else (batch, None)
            x = x.to(sae.device, torch.float32)
            if x.ndim != 2 or x.shape[1] != sae.d_in:
                raise InputError(f"evaluation data: expected [batch, {sae.d_in}], found {list(x.shape)}")
            if sae.cfg.transcoder and y is None:
                raise InputError("evaluation data: a transcoder is measured on (inputs, targets) pairs")
            target = x if y is None else y.to(sae.device, torch.float32)
            if target.shape != (len(x), sae.d_out):
                raise InputError(f"evaluation targets: expected [{len(x)}, {sae.d_out}], found {list(target.shape)}")
            if not bool(torch.isfinite(x).all() & torch.isfinite(target).all()):
                bad = int((~(torch.isfinite(x).all(dim=1) & torch.isfinite(target).all(dim=1))).sum())
                raise InputError(f"evaluation data: {bad} rows hold NaN or Inf (after {stats.n} good tokens)")
            p, vals = sae.encode_sparse(x)
            pred = sae.decode_sparse(p, vals, x)
            stats.update(target, pred, p, vals)
            if parts:
                for part, t, h in zip(parts, target.chunk(len(parts), 1), pred.chunk(len(parts), 1), strict=True):
                    part.update(t, h)
    m = stats.result()
    if outputs:
        m.by_output = {hook: {k: getattr(r, k) for k in ("fvu", "explained_variance", "mse", "cosine")}
                       for hook, r in zip(outputs, (part.result() for part in parts), strict=True)}
        if isinstance(sae, SAE) and sae.cfg.crosscoder == len(outputs):
            m.hook_shares = hook_shares(sae, outputs, m.feature_counts)
    return m


EXCLUSIVE_AT = 0.9   # a feature with this share of its decoder norm in one hook is exclusive to that hook


def relative_norms(sae: SAE) -> torch.Tensor:
    """A crosscoder's share of each feature's decoder norm in each hook [F, H] (rows sum to 1; trained
    units, so a hook's raw size does not tilt it): 1/H for a feature written to every hook alike, near 1
    in one hook for a feature only that hook has."""
    norms = sae.hook_decoder_norms().float().cpu()
    return norms / norms.sum(1, keepdim=True).clamp_min(1e-12)


def hook_shares(sae: SAE, hooks: Sequence[str], counts: torch.Tensor | None = None) -> dict[str, Any]:
    """How a crosscoder's live features (those that fired on the evaluated tokens, ``counts``; all of
    them without) divide among its hooks: the share exclusive to each hook (at least ``EXCLUSIVE_AT`` of
    the feature's decoder norm there) and the share shared by several; for two hooks also the
    histogram of the first hook's relative norm (20 bins over [0, 1]), the figure of model diffing."""
    rel = relative_norms(sae)
    if rel.shape[1] != len(hooks):
        raise InputError(f"hook shares: the crosscoder writes {rel.shape[1]} hooks, {len(hooks)} named")
    alive = counts.cpu() > 0 if counts is not None else torch.ones(len(rel), dtype=torch.bool)
    n = int(alive.sum())
    top, which = rel.max(1)
    exclusive = alive & (top >= EXCLUSIVE_AT)
    out: dict[str, Any] = {
        "live_features": n, "exclusive_at": EXCLUSIVE_AT,
        "shared": float((alive & ~exclusive).sum()) / max(1, n),
        "exclusive": {h: float((exclusive & (which == i)).sum()) / max(1, n) for i, h in enumerate(hooks)}}
    if len(hooks) == 2:
        out["relative_norm_histogram"] = [int(c) for c in torch.histc(rel[alive, 0], bins=20, min=0, max=1)]
    return out
