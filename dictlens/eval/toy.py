"""Toy models of superposition (Elhage et al., 2022), as data with known features.

``n`` features x_i, each 0 with probability S (the sparsity) and U[0,1] otherwise, pass through
a bottleneck of ``m < n`` dimensions and back: x' = ReLU(WᵀW x + b), trained to minimise
Σ_i I_i (x_i − x'_i)² with importance I_i = importance_decay^i. When features are sparse
the model packs more than m of them into the m dimensions, in superposition. Its hidden
activations h = W x are then exactly sparse combinations of the columns of W: data whose
true features (the represented columns) are known, with the geometry superposition
produces rather than random directions.

Per-feature dimensionality D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)² is the fraction of a dimension
feature i gets: 1 for a feature with a dimension of its own, 1/2 for an antipodal pair, 2/5
for a pentagon, 0 for a feature the model ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dictlens.config import check, field
from dictlens.eval.synthetic import SyntheticData


@dataclass
class ToyConfig:
    toy_features: int = field(256, help="features n of the toy model")
    toy_dims: int = field(64, help="hidden dimensions m of the toy model")
    sparsity: float = field(0.98, help="probability S that a feature is zero (mean active = n·(1 − S))")
    importance_decay: float = field(1.0, help="importance I_i = decay^i (1: all features equally important)")
    toy_steps: int = field(6000, help="training steps of the toy model")
    toy_batch: int = field(1024, help="toy model batch size")
    toy_lr: float = field(3e-3, help="toy model learning rate (Adam)")
    represented: float = field(0.5, help="a feature counts as represented when ‖W_i‖ exceeds this")
    seed: int = field(0, help="random seed")

    def __post_init__(self) -> None:
        check(self.toy_features >= 1 and self.toy_dims >= 1, "toy_features/toy_dims", "≥ 1",
              (self.toy_features, self.toy_dims))
        check(0 <= self.sparsity < 1, "sparsity", "in [0, 1)", self.sparsity)
        check(0 < self.importance_decay <= 1, "importance_decay", "in (0, 1]", self.importance_decay)
        check(self.toy_steps >= 1 and self.toy_batch >= 1, "toy_steps/toy_batch", "≥ 1",
              (self.toy_steps, self.toy_batch))


@dataclass
class ToyModel:
    W: torch.Tensor   # [m, n]
    b: torch.Tensor   # [n]
    config: ToyConfig
    loss: float

    def sample_features(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return _sample(n, self.config, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W.T @ self.W + self.b)

    @property
    def norms(self) -> torch.Tensor:
        return self.W.norm(dim=0)

    def dimensionality(self) -> torch.Tensor:
        """D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)² for every feature i (0 where W_i is zero)."""
        return feature_dimensionality(self.W)

    def data(self, samples: int, seed: int = 1) -> SyntheticData:
        """Hidden activations h = W x of fresh samples; features are the represented unit columns
        of W and codes x_i·‖W_i‖, so that h = codes @ features exactly (plus the ignored features'
        small contribution, which is kept in h: it is what the model really computes)."""
        g = torch.Generator().manual_seed(seed)
        x = self.sample_features(samples, g)
        h = x @ self.W.T
        keep = self.norms > self.config.represented
        cols = self.W[:, keep].T
        return SyntheticData(h, cols / cols.norm(dim=1, keepdim=True), x[:, keep] * self.norms[keep])


def _sample(n: int, cfg: ToyConfig, g: torch.Generator) -> torch.Tensor:
    on = torch.rand(n, cfg.toy_features, generator=g) >= cfg.sparsity
    return torch.rand(n, cfg.toy_features, generator=g) * on


def feature_dimensionality(W: torch.Tensor) -> torch.Tensor:
    W = W.detach().double()
    norms2 = (W * W).sum(0)
    unit = W / norms2.sqrt().clamp_min(1e-12)
    overlap = ((unit.T @ W) ** 2).sum(1)
    return torch.where(norms2 > 1e-12, norms2 / overlap.clamp_min(1e-24), torch.zeros(())).float()


def train_toy_model(cfg: ToyConfig, progress: bool = False) -> ToyModel:
    """Fit the toy model with Adam; deterministic given ``cfg.seed``."""
    g = torch.Generator().manual_seed(cfg.seed)
    W = (torch.randn(cfg.toy_dims, cfg.toy_features, generator=g) * (2 / (cfg.toy_dims + cfg.toy_features)) ** 0.5)
    W.requires_grad_(True)
    b = torch.zeros(cfg.toy_features, requires_grad=True)
    importance = cfg.importance_decay ** torch.arange(cfg.toy_features, dtype=torch.float32)
    opt = torch.optim.Adam([W, b], lr=cfg.toy_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.toy_steps)
    steps = range(cfg.toy_steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="toy model", unit="step", leave=False)
    loss = torch.zeros(())
    for _ in steps:
        x = _sample(cfg.toy_batch, cfg, g)
        out = torch.relu(x @ W.T @ W + b)
        loss = ((out - x) ** 2 * importance).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return ToyModel(W.detach(), b.detach(), cfg, float(loss.detach()))


def dimensionality_summary(model: ToyModel) -> str:
    """One paragraph: how many features are represented, in how many dimensions, and the
    common per-feature dimensionalities (the sticky fractions of the paper)."""
    D = model.dimensionality()
    keep = model.norms > model.config.represented
    m, n = model.W.shape
    lines = [f"toy model: {n} features in {m} dimensions, sparsity {model.config.sparsity:g}, "
             f"loss {model.loss:.4f}; {int(keep.sum())} features represented (‖W_i‖ > {model.config.represented:g}), "
             f"Σ D_i = {float(D.sum()):.2f} of {m} dimensions, {int(keep.sum()) / m:.2f} features per dimension"]
    if keep.any():
        frac = torch.round(D[keep] * 20) / 20
        values, counts = torch.unique(frac, return_counts=True)
        order = counts.argsort(descending=True)[:6]
        common = ", ".join(f"{float(values[i]):.2f} ({int(counts[i])})" for i in order)
        lines.append(f"  per-feature dimensionality D_i (rounded to 0.05, count): {common}")
    return "\n".join(lines)


def plot_toy(model: ToyModel, path: str) -> str:
    """PNG: WᵀW (who interferes with whom) and D_i per feature, as in Elhage et al."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    from dictlens.eval.plots import save_figure

    D = model.dimensionality().numpy()
    gram = (model.W.T @ model.W).numpy()
    fig, (a, c) = plt.subplots(1, 2, figsize=(11, 4.5))
    lim = float(abs(gram).max()) or 1.0
    im = a.imshow(gram, cmap="RdBu_r", vmin=-lim, vmax=lim)
    a.set_title("WᵀW")
    a.set_xlabel("feature")
    a.set_ylabel("feature")
    fig.colorbar(im, ax=a, fraction=0.046)
    c.scatter(range(len(D)), D, s=6)
    for y in (1, 1 / 2, 2 / 5, 1 / 3, 1 / 4):
        c.axhline(y, color="grey", lw=0.5, ls=":")
    c.set_ylim(-0.05, 1.1)
    c.set_xlabel("feature (by importance)")
    c.set_ylabel("dimensionality D_i")
    c.set_title(f"{D.sum():.1f} of {model.W.shape[0]} dimensions used")
    fig.tight_layout()
    return str(save_figure(fig, Path(path), dpi=110))
