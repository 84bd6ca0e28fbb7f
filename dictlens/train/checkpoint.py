"""Training checkpoints: one safetensors file, written atomically; never pickled.

Tensors (SAE weights, optimiser moments, RNG state) go into the safetensors body; every
other value of the nested optimiser/trainer state goes into its JSON metadata, with
tensors replaced by references.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dictlens.errors import CheckpointError
from dictlens.io import atomic_write_bytes

_REF = "__tensor__"


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().cpu()
        return {_REF: prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and _REF in obj:
        return tensors[obj[_REF]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        items = [_unflatten(v, tensors) for v in obj["__list__"]]
        return tuple(items) if obj["tuple"] else items
    return obj


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts/lists of tensors and JSON values) to ``path`` atomically."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    atomic_write_bytes(path, save(tensors, metadata={"dictlens_checkpoint": json.dumps(skeleton)}))


def load_checkpoint(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or damaged ({e})") from None
    if "dictlens_checkpoint" not in meta:
        raise CheckpointError(f"{path} is not a dictlens training checkpoint")
    state: dict[str, Any] = _unflatten(json.loads(meta["dictlens_checkpoint"]), tensors)
    return state
