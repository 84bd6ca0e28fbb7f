"""Optimisers and learning-rate schedules.

Adam and AdamW come from torch; signed SGD with momentum and the schedule-free versions
of signSGD and AdamW (Defazio et al. 2024; sparsify trains with the first) are below,
checked against the ``schedulefree`` package in the tests.
The schedule is a pure function of the step (plus the plateau state), so a resumed run
follows exactly the same learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dictlens.sae import native
from dictlens.sae.kernels import normalize_rows_, project_rows_
from dictlens.train.config import TrainConfig


class SignSGD(torch.optim.Optimizer):
    """p ← p − lr·sign(m), m ← β·m + (1 − β)·g: each coordinate moves by exactly lr."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.9):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            beta = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m = state["momentum_buffer"]
                m.mul_(beta).add_(p.grad, alpha=1 - beta)
                p.add_(m.sign(), alpha=-group["lr"])
        return None


class _ScheduleFree(torch.optim.Optimizer):
    """What both schedule-free optimisers share: y in the parameters, z in the state,
    x = the average, recovered from y and z; ``eval()`` puts x in the parameters and
    ``train()`` puts y back."""

    def _beta(self, group: dict[str, Any]) -> float:
        raise NotImplementedError

    def _swap(self, to_train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] != to_train:
                beta = self._beta(group)
                for p in group["params"]:
                    if "z" in self.state[p]:
                        p.lerp_(self.state[p]["z"], 1 - beta if to_train else 1 - 1 / beta)
                group["train_mode"] = to_train

    @torch.no_grad()
    def eval(self) -> None:
        self._swap(to_train=False)  # y → x

    @torch.no_grad()
    def train(self) -> None:
        self._swap(to_train=True)  # x → y

    @staticmethod
    def _average_weight(group: dict[str, Any], lr: float, empty: float) -> float:
        """The weight c of this step's z in the running average (∝ lr_max^power)."""
        group["lr_max"] = max(group["lr_max"], lr)
        weight = group["lr_max"] ** group["weight_lr_power"]
        group["weight_sum"] += weight
        return weight / group["weight_sum"] if group["weight_sum"] > 0 else empty


class ScheduleFreeSignSGD(_ScheduleFree):
    """Schedule-free signed SGD (Defazio et al. 2024 around a sign step), as sparsify trains.

    z takes the sign steps; x is their running average (weights ∝ lr_max², as in
    schedulefree); the parameter holds y = (1 − β)·z + β·x, where gradients are taken.
    Only z is stored: x is recovered from y and z, so an in-place change of the
    parameter (decoder renormalisation, resampling) carries into x, exactly as with
    schedulefree's ScheduleFreeWrapper, but without its in-place xor swaps.
    ``eval()`` puts x in the parameters; ``train()`` puts y back.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.95,
                 weight_lr_power: float = 2.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_lr_power": weight_lr_power,
                                  "lr_max": 0.0, "weight_sum": 0.0, "train_mode": True})

    def _beta(self, group: dict[str, Any]) -> float:
        return float(group["momentum"])

    def _z(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        for p in params:
            if "z" not in self.state[p]:
                self.state[p]["z"] = p.detach().clone()
        return [self.state[p]["z"] for p in params]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError("ScheduleFreeSignSGD.step() in eval mode: call train() first")
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            zs, beta, lr = self._z(ps), group["momentum"], group["lr"]
            c = self._average_weight(group, lr, empty=1.0)
            # y → x, z' = z − lr·sign(g), x' = lerp(x, z', c), y' = lerp(x', z', 1 − β) collapse
            # to y' = lerp(y, z, c) − (1 − β(1 − c))·lr·sign(g): four passes over the
            # weights instead of six, the same numbers up to rounding.
            signs = torch._foreach_sign([p.grad for p in ps])
            torch._foreach_lerp_(ps, zs, c)
            torch._foreach_add_(ps, signs, alpha=-(1 - beta * (1 - c)) * lr)
            torch._foreach_add_(zs, signs, alpha=-lr)
        return None


class ScheduleFreeAdam(_ScheduleFree):
    """Schedule-free AdamW (Defazio et al. 2024), the same numbers as ``schedulefree``'s
    ``AdamWScheduleFree`` (a test checks) in fewer passes over the weights.

    The parameters hold y, the iterate z and the second moment live in the state under
    the package's names ('z', 'exp_avg_sq'), x is recovered from y and z. The step
    reuses one scratch tensor per parameter instead of allocating the normalised
    gradient: 8 passes instead of 10, and no fresh pages to fault in every step; on CPU the
    compiled kernel does all of it in one pass.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, weight_lr_power: float = 2.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "weight_lr_power": weight_lr_power, "k": 0, "lr_max": 0.0, "weight_sum": 0.0,
                                  "train_mode": True})
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}
        # parameters [rows, D] whose rows are held at unit norm (an SAE's decoder): the step
        # projects their gradient off the rows first and renormalises the rows after, in its own
        # pass over them (see keep_unit_rows)
        self.unit_rows: list[torch.Tensor] = []

    def keep_unit_rows(self, p: torch.Tensor) -> None:
        """Hold ``p``'s rows at unit norm from now on: each step removes the gradient's component
        along each row before the update and renormalises the rows after it (what
        ``SAE.project_decoder_grad`` and ``SAE.normalize_decoder`` do around a step, here in the
        step's own pass on CPU). Only where nothing must see the projected gradient in between
        (gradient clipping does)."""
        if p.ndim != 2:
            raise ValueError(f"keep_unit_rows: expected a matrix, found shape {list(p.shape)}")
        self.unit_rows.append(p)

    def _beta(self, group: dict[str, Any]) -> float:
        return float(group["betas"][0])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError("ScheduleFreeAdam.step() in eval mode: call train() first")
            beta1, beta2 = group["betas"]
            k, lr = group["k"], group["lr"]
            root_bc2 = math.sqrt(1 - beta2 ** (k + 1))
            c = self._average_weight(group, lr, empty=0.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                    state["exp_avg_sq"] = torch.zeros_like(p)
                z, v, g = state["z"], state["exp_avg_sq"], p.grad
                a, b = root_bc2 * lr * (beta1 * (1 - c) - 1), root_bc2 * lr
                rows = any(p is q for q in self.unit_rows)
                if native.sfadam_step(p, z, v, g, beta2=beta2, eps_bc=group["eps"] * root_bc2,
                                      wd=group["weight_decay"] / root_bc2, c=c, a=a, b=b, unit_rows=rows):
                    continue  # the same operations in one pass over the weights (dictlens/sae/native.c)
                if rows:
                    project_rows_(p, g)
                u = self._scratch.get(p)
                if u is None or u.shape != p.shape:
                    u = self._scratch[p] = torch.empty_like(p)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                # g/(√(v/bc2) + eps) = √bc2 · g/(√v + eps·√bc2)
                torch.sqrt(v, out=u)
                u.add_(group["eps"] * root_bc2)
                torch.div(g, u, out=u)
                if group["weight_decay"]:
                    u.add_(p, alpha=group["weight_decay"] / root_bc2)
                p.lerp_(z, c)
                p.add_(u, alpha=a)
                z.sub_(u, alpha=b)
                if rows:
                    normalize_rows_(p)
            group["k"] = k + 1
        return None


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.schedule_free and cfg.optimizer in ("adam", "adamw"):
        return ScheduleFreeAdam(params, lr, betas=(cfg.beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "signsgd":
        if cfg.schedule_free:
            return ScheduleFreeSignSGD(params, lr, momentum=0.95)
        return SignSGD(params, lr, momentum=cfg.beta1)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr, betas=(cfg.beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr, betas=(cfg.beta1, cfg.adam_beta2))


@dataclass
class Plateau:
    """Reduce-on-plateau state: halve the rate after ``patience`` logs without a 1% improvement."""

    best: float = math.inf
    bad: int = 0
    factor: float = 1.0
    patience: int = 5

    def update(self, loss: float) -> None:
        if loss < self.best * 0.99:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                self.factor, self.bad = self.factor * 0.5, 0


def lr_factor(cfg: TrainConfig, step: int, plateau: Plateau) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule_free or cfg.schedule == "constant":
        return 1.0
    total = cfg.steps
    if cfg.schedule == "plateau":
        return plateau.factor
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    decay_start = int(total * (1 - cfg.decay_fraction))
    if step < decay_start:
        return 1.0
    return max(0.0, (total - step) / max(1, total - decay_start))
