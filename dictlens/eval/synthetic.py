"""Synthetic data with known features, to check that dictionary learning recovers them.

One generator covers the settings of the literature: ``G`` unit feature directions in ``d``
dimensions; each feature fires with its own probability (geometric decay as in Sharkey et
al., or Zipfian), scaled so that ``mean_active`` fire per sample on average; firing can be
correlated (a Gaussian copula with a low-rank correlation, which keeps every marginal
probability exact) and hierarchical (children fire only with their parent and exclude each
other, as in SynthSAEBench, which is what provokes feature absorption); each active feature
gets a magnitude; isotropic Gaussian noise can be added on top.

``x = codes @ features + noise``: ``codes`` [N, G] are the true coefficients, zero where a
feature is off, so recovery can be scored both on directions and on firing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from dictlens.config import check, field
from dictlens.errors import ConfigError

FIRING = ("geometric", "zipf")
MAGNITUDES = ("product", "uniform", "constant", "normal")


@dataclass
class SyntheticData:
    x: torch.Tensor          # [N, d] activations
    features: torch.Tensor   # [G, d] unit ground-truth directions
    codes: torch.Tensor      # [N, G] true coefficients (≥ 0)

    @property
    def mean_active(self) -> float:
        return float((self.codes > 0).sum(1).float().mean())


@dataclass
class SyntheticConfig:
    d: int = field(256, help="data dimension")
    features: int = field(512, help="true features G")
    samples: int = field(200_000, help="samples generated")
    firing: str = field("geometric", help="firing probabilities: geometric (p_i ∝ decay^i) or zipf "
                        "(p_i ∝ (i+1)^-zipf_exponent)")
    decay: float = field(0.99, help="geometric decay of the firing probability")
    zipf_exponent: float = field(1.0, help="exponent of the Zipfian firing probabilities")
    mean_active: float = field(5.0, help="features active per sample on average (before the hierarchy "
                               "thins children)")
    magnitude: str = field("product", help="magnitude of an active feature: product (U[0,1]·U[0,1], Sharkey), "
                           "uniform (U[0,1]), constant (1), normal (|N(1, magnitude_std)|)")
    magnitude_std: float = field(0.5, help="standard deviation for --magnitude normal")
    correlation: float = field(0.0, help="strength ρ in [0, 1) of correlated firing (Gaussian copula "
                               "with ρ·AᵀA + (1 − ρ)·I, A random unit columns)")
    correlation_rank: int = field(16, help="rank of the correlation structure")
    parents: int = field(0, help="hierarchy: number of parent features, each with --children children")
    children: int = field(4, help="children per parent (mutually exclusive, fire only with the parent)")
    noise: float = field(0.0, help="standard deviation of isotropic Gaussian noise per dimension")
    seed: int = field(0, help="random seed")

    def __post_init__(self) -> None:
        check(self.d >= 1, "d", "≥ 1", self.d)
        check(self.features >= 1, "features", "≥ 1", self.features)
        check(self.samples >= 1, "samples", "≥ 1", self.samples)
        check(self.firing in FIRING, "firing", " or ".join(FIRING), self.firing)
        check(0 < self.decay <= 1, "decay", "in (0, 1]", self.decay)
        check(self.zipf_exponent >= 0, "zipf_exponent", "≥ 0", self.zipf_exponent)
        check(0 < self.mean_active <= self.features, "mean_active", f"in (0, features={self.features}]",
              self.mean_active)
        check(self.magnitude in MAGNITUDES, "magnitude", " / ".join(MAGNITUDES), self.magnitude)
        check(self.magnitude_std >= 0, "magnitude_std", "≥ 0", self.magnitude_std)
        check(0 <= self.correlation < 1, "correlation", "in [0, 1)", self.correlation)
        check(self.correlation_rank >= 1, "correlation_rank", "≥ 1", self.correlation_rank)
        check(self.parents >= 0 and self.children >= 1, "parents/children", "parents ≥ 0, children ≥ 1",
              (self.parents, self.children))
        check(self.parents * (1 + self.children) <= self.features, "parents",
              f"parents × (1 + children) ≤ features ({self.features})", self.parents * (1 + self.children))
        check(self.noise >= 0, "noise", "≥ 0", self.noise)

    def describe(self) -> str:
        parts = [f"d {self.d}", f"{self.features} true features",
                 f"{self.firing} firing" + (f" (decay {self.decay})" if self.firing == "geometric"
                                            else f" (exponent {self.zipf_exponent})"),
                 f"{self.mean_active:g} active on average", f"{self.magnitude} magnitudes"]
        if self.correlation:
            parts.append(f"correlation {self.correlation:g} (rank {self.correlation_rank})")
        if self.parents:
            parts.append(f"{self.parents} parents × {self.children} exclusive children")
        if self.noise:
            parts.append(f"noise σ {self.noise:g}")
        return ", ".join(parts) + f", {self.samples:,} samples"


def firing_probabilities(cfg: SyntheticConfig) -> torch.Tensor:
    """Per-feature probabilities [G] with the requested shape, summing to ``mean_active``
    (clipped at 1: the scale is found by bisection so that clipping does not lose mass)."""
    i = torch.arange(cfg.features, dtype=torch.float64)
    shape = cfg.decay ** i if cfg.firing == "geometric" else (i + 1) ** -cfg.zipf_exponent
    lo, hi = 0.0, cfg.mean_active / float(shape.min())
    for _ in range(100):
        mid = (lo + hi) / 2
        if float((shape * mid).clamp(max=1).sum()) < cfg.mean_active:
            lo = mid
        else:
            hi = mid
    return (shape * hi).clamp(max=1).float()


def _hierarchy(cfg: SyntheticConfig) -> list[tuple[int, list[int]]]:
    """(parent, children) index groups: the ``parents`` most frequent features are parents; their
    children are spread over the rest of the list so that they are not all rare."""
    if cfg.parents == 0:
        return []
    rest = list(range(cfg.parents, cfg.features))
    stride = len(rest) // (cfg.parents * cfg.children)
    kids = rest[::stride][: cfg.parents * cfg.children]
    return [(p, kids[p * cfg.children:(p + 1) * cfg.children]) for p in range(cfg.parents)]


def generate(cfg: SyntheticConfig) -> SyntheticData:
    """Draw ``cfg.samples`` samples; deterministic given ``cfg.seed``."""
    g = torch.Generator().manual_seed(cfg.seed)
    feats = torch.randn(cfg.features, cfg.d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    p = firing_probabilities(cfg)
    n, G = cfg.samples, cfg.features
    if cfg.correlation > 0:
        A = torch.randn(cfg.correlation_rank, G, generator=g)
        A /= A.norm(dim=0, keepdim=True)
        z = (math.sqrt(1 - cfg.correlation) * torch.randn(n, G, generator=g)
             + math.sqrt(cfg.correlation) * torch.randn(n, cfg.correlation_rank, generator=g) @ A)
        active = z < torch.special.ndtri(p.double()).float()   # each z_i ~ N(0, 1): P(active_i) = p_i
    else:
        active = torch.rand(n, G, generator=g) < p
    for parent, kids in _hierarchy(cfg):
        # a child fires only with its parent, with probability min(1, p_child / p_parent) then;
        # of several drawn together one is kept at random (mutual exclusion)
        cond = (p[kids] / p[parent]).clamp(max=1)
        drawn = (torch.rand(n, len(kids), generator=g) < cond) & active[:, parent:parent + 1]
        keep = torch.where(drawn, torch.rand(n, len(kids), generator=g), torch.zeros(()))
        winner = keep.argmax(1, keepdim=True)
        only = torch.zeros_like(drawn).scatter_(1, winner, True) & drawn
        active[:, kids] = only
    if cfg.magnitude == "product":
        mag = torch.rand(n, G, generator=g) * torch.rand(n, G, generator=g)
    elif cfg.magnitude == "uniform":
        mag = torch.rand(n, G, generator=g)
    elif cfg.magnitude == "constant":
        mag = torch.ones(n, G)
    else:
        mag = (1 + cfg.magnitude_std * torch.randn(n, G, generator=g)).abs()
    codes = mag * active
    x = codes @ feats
    if cfg.noise > 0:
        x += cfg.noise * torch.randn(n, cfg.d, generator=g)
    return SyntheticData(x, feats, codes)


def sparse_features(d: int, n_features: int, n: int, *, mean_active: float = 5.0, decay: float = 0.99,
                    seed: int = 0) -> SyntheticData:
    """Sharkey et al.'s setting: unit random features, firing probability ∝ decay^i scaled so
    ``mean_active`` fire per sample, coefficients U[0,1]·U[0,1]."""
    return generate(SyntheticConfig(d=d, features=n_features, samples=n, mean_active=mean_active, decay=decay,
                                    seed=seed))


# Named settings for ``dictlens synth --setting``: overrides of the defaults (Sharkey's setting).
SETTINGS: dict[str, dict[str, object]] = {
    "sharkey": {},
    "zipf": {"firing": "zipf", "zipf_exponent": 1.0},
    "correlated": {"correlation": 0.5},
    "hierarchy": {"parents": 64, "children": 4, "magnitude": "uniform"},
    "noisy": {"noise": 0.01},
}


def setting(name: str, **overrides: object) -> SyntheticConfig:
    """A named setting with some fields overridden (``None`` values are ignored)."""
    if name not in SETTINGS:
        from dictlens.config import suggest

        raise ConfigError(f"setting: expected one of {', '.join(SETTINGS)} or toy, found {name!r}"
                          + suggest(name, [*SETTINGS, "toy"]))
    values = {**SETTINGS[name], **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in dataclasses.fields(SyntheticConfig)}
    return SyntheticConfig(**{k: v for k, v in values.items() if k in names})  # type: ignore[arg-type]
