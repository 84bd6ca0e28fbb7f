"""A grid of dictionaries: hooks × activations × k or penalty coefficient × width × seed.

``dictlens train`` with several ``--hook``, ``--k``, ``--n-features`` or ``--expansion``
trains the grid's points side by side from one pass over the data
(:mod:`dictlens.train.group`); ``dictlens sweep`` trains and judges a grid. A point's
:meth:`Point.name` is its run directory under the grid's.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from dictlens.config import to_dict
from dictlens.errors import ConfigError
from dictlens.sae import activations as registry


@dataclass
class Grid:
    hooks: list[str]
    activations: list[str] = dataclasses.field(default_factory=lambda: ["topk"])
    ks: list[int] = dataclasses.field(default_factory=list)           # TopK / BatchTopK
    coeffs: list[float] = dataclasses.field(default_factory=list)     # penalised SAEs (0: the default)
    activation_coeffs: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # per activation
    widths: list[int] = dataclasses.field(default_factory=list)       # n_features; empty: use expansions
    expansions: list[float] = dataclasses.field(default_factory=list)
    seeds: int = 1

    def __post_init__(self) -> None:
        if not self.hooks:
            raise ConfigError("sweep: name at least one --hook")
        unknown = [a for a in self.activations if a not in registry.NAMES]
        if unknown:
            raise ConfigError(f"activation: expected {', '.join(registry.NAMES)}, found {unknown[0]!r}")
        penalised = [a for a in self.activations if not uses_k(a)]
        if self.ks and len(penalised) == len(self.activations):
            raise ConfigError(f"sweep: --k is given but no --activation uses it ({', '.join(registry.with_k())})")
        if self.coeffs and not penalised:
            raise ConfigError("sweep: --coeff is given but no --activation uses it "
                              f"({', '.join(registry.penalised())})")
        for activation in self.activation_coeffs:
            if activation not in penalised:
                raise ConfigError(f"sweep: --coeff {activation}:... names an activation that is not a swept penalised "
                                  f"one ({', '.join(penalised) or 'none'})")
        all_coeffs = self.coeffs + [c for cs in self.activation_coeffs.values() for c in cs]
        if any(k < 1 for k in self.ks) or any(c < 0 for c in all_coeffs):
            raise ConfigError(f"sweep: k must be ≥ 1 and coefficients ≥ 0, found {self.ks} / {self.coeffs}")
        if self.widths and self.expansions:
            raise ConfigError("sweep: give --n-features or --expansion, not both")
        if self.seeds < 1:
            raise ConfigError(f"seeds: expected ≥ 1, found {self.seeds}")

    def points(self) -> list[Point]:
        sizes: list[tuple[str, float]] = ([("n_features", w) for w in unique(self.widths)]
                                          or [("expansion", e) for e in unique(self.expansions)] or [("", 0)])
        out = []
        for hook in unique(self.hooks):
            for activation in unique(self.activations):
                values: list[float | None] = (list(unique(self.ks)) or [None]) if uses_k(activation) \
                    else (list(unique(self.activation_coeffs.get(activation, self.coeffs))) or [None])
                for size_name, size in sizes:
                    for value in values:
                        for seed in range(self.seeds):
                            out.append(Point(hook, activation, value, size_name, size, seed))
        return out


def parse_coeffs(specs: list[str]) -> tuple[list[float], dict[str, list[float]]]:
    """``--coeff`` values: ``2`` (every penalised architecture) or ``relu:0.5,1,2`` (one of them)."""
    common: list[float] = []
    per: dict[str, list[float]] = {}
    for spec in specs:
        activation, sep, values = spec.rpartition(":")
        try:
            nums = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--coeff: expected a number or ARCH:N,N,..., found {spec!r}") from None
        if sep:
            per.setdefault(activation.strip(), []).extend(nums)
        else:
            common.extend(nums)
    return common, per


def uses_k(activation: str) -> bool:
    return registry.get(activation).uses_k


def unique(xs: list[Any]) -> list[Any]:
    return list(dict.fromkeys(xs))


@dataclass
class Point:
    hook: str
    activation: str
    value: float | None      # k or coefficient; None: the configuration's default
    size_name: str           # "n_features", "expansion" or "" (the configuration's default)
    size: float
    seed: int

    def name(self) -> str:
        tag = "" if self.value is None else (
            f"-k{int(self.value)}" if uses_k(self.activation) else f"-c{self.value:g}")
        size = {"n_features": f"-F{int(self.size)}", "expansion": f"-x{self.size:g}"}.get(self.size_name, "")
        return f"{safe_name(self.hook)}/{self.activation}{tag}{size}-s{self.seed}"

    def configs(self, sae_base: Any, train_base: Any) -> tuple[Any, Any]:
        sae = {**to_dict(sae_base), "activation": self.activation}
        train = {**to_dict(train_base), "seed": train_base.seed + self.seed}
        if self.value is not None:
            if uses_k(self.activation):
                sae["k"] = int(self.value)
            else:
                train["sparsity_coeff"] = float(self.value)
        if self.size_name == "n_features":
            sae["n_features"] = int(self.size)
        elif self.size_name == "expansion":
            sae["expansion"], sae["n_features"] = float(self.size), 0
        if not uses_k(self.activation):
            sae.pop("k", None)
        return sae, train


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
