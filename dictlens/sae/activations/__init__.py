"""The registry of activations: each kind of SAE is one file here and one entry below.

``get(name)`` returns the class; :class:`~dictlens.sae.activations.base.Activation` says
what a kind decides (selection, values, extra losses, parameters, the scale fold on save,
its default penalty and dead-feature method). Nothing outside this package compares an
activation's name against a string.
"""

from __future__ import annotations

from dictlens.errors import ConfigError
from dictlens.sae.activations.base import Activation, Codes, Form, Selection
from dictlens.sae.activations.batchtopk import BatchTopK
from dictlens.sae.activations.gated import Gated
from dictlens.sae.activations.groupmax import GroupMax
from dictlens.sae.activations.jumprelu import JumpReLU
from dictlens.sae.activations.relu import ReLU
from dictlens.sae.activations.topk import TopK

REGISTRY: dict[str, type[Activation]] = {a.name: a for a in (TopK, BatchTopK, ReLU, JumpReLU, Gated, GroupMax)}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def get(name: str) -> type[Activation]:
    """The activation class registered as ``name``; an unknown name is a ConfigError."""
    try:
        return REGISTRY[name]
    except KeyError:
        from dictlens.config import suggest

        raise ConfigError(f"activation: expected {' / '.join(NAMES)}, found {name!r}"
                          f"{suggest(name, list(NAMES))}") from None


def with_k() -> tuple[str, ...]:
    """The activations whose sparsity is set by k."""
    return tuple(n for n, a in REGISTRY.items() if a.uses_k)


def penalised() -> tuple[str, ...]:
    """The activations whose sparsity comes from a penalty coefficient."""
    return tuple(n for n, a in REGISTRY.items() if not a.uses_k)


__all__ = ["Activation", "Codes", "Form", "Selection", "REGISTRY", "NAMES", "get", "with_k", "penalised"]
