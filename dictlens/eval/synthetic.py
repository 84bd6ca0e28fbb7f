"""Synthetic data with known features, to check that dictionary learning recovers them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SyntheticData:
    x: torch.Tensor          # [N, d] activations
    features: torch.Tensor   # [G, d] unit ground-truth directions
    codes: torch.Tensor      # [N, G] true coefficients (≥ 0)


def sparse_features(d: int, n_features: int, n: int, *, mean_active: float = 5.0, decay: float = 0.99,
                    seed: int = 0) -> SyntheticData:
    """Sharkey et al.'s setting: unit random features, firing probability ∝ decay^i scaled so
    ``mean_active`` fire per sample, coefficients U[0,1]·U[0,1]."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_features, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    p = decay ** torch.arange(n_features, dtype=torch.float32)
    p = (p * mean_active / p.sum()).clamp(max=1.0)
    active = torch.rand(n, n_features, generator=g) < p
    coeff = torch.rand(n, n_features, generator=g) * torch.rand(n, n_features, generator=g)
    codes = coeff * active
    return SyntheticData(codes @ feats, feats, codes)
