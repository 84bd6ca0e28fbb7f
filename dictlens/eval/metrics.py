"""Reconstruction and sparsity metrics, streamed over any number of held-out tokens.

  FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖²   (x̄ the mean vector of the evaluated set)
  explained variance = 1 − FVU;  MSE = Σ‖x − x̂‖² / (N·D)
  L0 = mean number of non-zero codes per token
  dead fraction = share of features never active on the N evaluated tokens
Sums are float64, so a streamed value equals the one computed in one batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from dictlens.errors import InputError
from dictlens.sae.model import SAE


@dataclass
class Metrics:
    n_tokens: int
    fvu: float
    explained_variance: float
    mse: float
    l0: float
    dead_fraction: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def evaluate(sae: SAE, batches: Iterable[torch.Tensor]) -> Metrics:
    """Metrics of ``sae`` on raw activation batches [B, D] (held out from training)."""
    n, err, s, sq, nnz = 0, 0.0, None, 0.0, 0
    fired = torch.zeros(sae.n_features, dtype=torch.bool, device=sae.device)
    for x in batches:
        x = x.to(sae.device, torch.float32)
        if x.ndim != 2 or x.shape[1] != sae.d_in:
            raise InputError(f"evaluation data: expected [batch, {sae.d_in}], found {list(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x).all(dim=1)).sum())
            raise InputError(f"evaluation data: {bad} rows hold NaN or Inf (after {n} good tokens)")
        p, vals = sae.encode_sparse(x)
        x_hat = sae.decode_sparse(p, vals)
        x64 = x.double()
        err += float((x64 - x_hat.double()).pow(2).sum())
        s = x64.sum(0) if s is None else s + x64.sum(0)
        sq += float(x64.pow(2).sum())
        nnz += p.nnz
        fired[p.cols] = True
        n += len(x)
    if n == 0 or s is None:
        raise InputError("evaluation data is empty")
    total = sq - float(s.pow(2).sum()) / n
    fvu = err / total if total > 0 else float("nan")
    return Metrics(n, fvu, 1 - fvu, err / (n * sae.d_in), nnz / n, 1 - float(fired.float().mean()))
