"""JumpReLU (Rajamanoharan et al. 2024, Gemma Scope): z·H(z − θ) with a learned θ per feature.

H has no useful gradient, so θ gets a pseudo-derivative through a rectangle kernel of
bandwidth ε:
  ∂JumpReLU/∂θ = −(θ/ε)·K((z − θ)/ε),   ∂H(z − θ)/∂θ = −(1/ε)·K((z − θ)/ε),
with K(u) = 1[|u| < ½]; z gets the ordinary gradient of z·H(z − θ) and none from H.
Both act elementwise on the active pairs of a Pattern (plus those within ε/2 below θ).
The threshold is stored as ``log_threshold`` so that it stays positive.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.autograd import Function

from dictlens.sae.activations.base import Activation, Codes, Form, Selection
from dictlens.sae.kernels import Pattern

if TYPE_CHECKING:
    from dictlens.sae.model import SAE
    from dictlens.train.config import TrainConfig


def _kernel(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return ((z - theta).abs() < eps / 2).to(z.dtype) / eps


class _JumpReLU(Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        z, theta = ctx.saved_tensors
        gz = g * (z > theta).to(z.dtype)
        gtheta = -(theta * _kernel(z, theta, ctx.eps)) * g
        return gz, gtheta, None


class _Heaviside(Function):
    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        z, theta = ctx.saved_tensors
        return torch.zeros_like(z), -_kernel(z, theta, ctx.eps) * g, None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """z·H(z − θ), elementwise, with the straight-through gradient for θ."""
    out: torch.Tensor = _JumpReLU.apply(z, theta, eps)  # type: ignore[no-untyped-call]
    return out


def heaviside(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """H(z − θ), elementwise, with the straight-through gradient for θ (the L0 count)."""
    out: torch.Tensor = _Heaviside.apply(z, theta, eps)  # type: ignore[no-untyped-call]
    return out


class JumpReLU(Activation):
    name = "jumprelu"
    form = Form.THRESHOLD

    def inference_threshold(self, state: dict[str, torch.Tensor], n_features: int) -> torch.Tensor:
        return state["log_threshold"].exp()
    help = "pre-activations above a learned per-feature threshold; sparsity from an L0 penalty"
    default_penalty = "l0"
    supports_l0 = True
    supports_pre_act = True
    owned_keys = ("log_threshold",)
    per_feature_keys = ("log_threshold",)
    shardable = True

    def add_parameters(self, sae: SAE) -> None:
        sae.register_parameter("log_threshold", nn.Parameter(
            torch.full((sae.n_features,), math.log(sae.cfg.jumprelu_threshold))))

    def select(self, sae: SAE, x_c: torch.Tensor, *, dead: torch.Tensor | None = None, k_aux: int = 0,
               aux_rows: int = 0) -> Selection:
        theta = sae.log_threshold.detach().exp()
        # Pairs within ε/2 below θ carry θ's straight-through gradient.
        return Selection(Pattern.from_mask(sae.dense_pre(x_c) > theta - sae.cfg.jumprelu_bandwidth / 2))

    def values(self, sae: SAE, pre: torch.Tensor, p: Pattern) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        theta = sae.log_threshold.exp()[p.cols]
        eps = sae.cfg.jumprelu_bandwidth
        return jumprelu(pre, theta, eps), {"l0": heaviside(pre, theta, eps).sum()}

    def l0_surrogate(self, codes: Codes) -> torch.Tensor:
        return codes.extra["l0"]

    def extra_losses(self, sae: SAE, codes: Codes, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig
                     ) -> dict[str, torch.Tensor]:
        if cfg.pre_act_coeff <= 0:
            return {}
        return {"pre_act": cfg.pre_act_coeff * pre_activation_loss(sae, x)}

    def fold_scale(self, state: dict[str, torch.Tensor], scale: float) -> None:
        state["log_threshold"] -= math.log(scale)


def pre_activation_loss(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Σ_f ReLU(θ_f − z_f)·‖W_dec[f]‖, averaged over rows (dense: costs a matmul). It pulls
    features that never reach their threshold up towards it (Conerly et al. 2025)."""
    x_c = sae.centring(x)[0]
    z = x_c @ sae.W_enc.T + sae.b_enc
    theta = sae.log_threshold.exp()
    return ((theta - z).relu() * sae.penalty_norms()).sum(1).mean()
