"""Straight-through pieces of the JumpReLU (Rajamanoharan et al., Gemma Scope).

JumpReLU(z) = z·H(z − θ) with a learned threshold θ per feature. H has no useful
gradient, so θ gets a pseudo-derivative through a rectangle kernel of bandwidth ε:
  ∂JumpReLU/∂θ = −(θ/ε)·K((z − θ)/ε),   ∂H(z − θ)/∂θ = −(1/ε)·K((z − θ)/ε),
with K(u) = 1[|u| < ½]; z gets the ordinary gradient of z·H(z − θ) and none from H.
Both act elementwise on the active pairs of a Pattern (plus those within ε/2 below θ).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import Function


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


class _Step(Function):
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
    return _JumpReLU.apply(z, theta, eps)


def step(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """H(z − θ), elementwise, with the straight-through gradient for θ (the L0 count)."""
    return _Step.apply(z, theta, eps)
