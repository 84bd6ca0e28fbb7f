"""An SAE run and the model it belongs to, loaded together and checked against each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dictlens.errors import InputError


@dataclass
class Loaded:
    """A trained SAE, its hook, and the model it reads (``max_norm``: the outlier limit of
    the SAE's training cache at that hook, when the cache is still there)."""

    sae: Any
    lm: Any
    hook: str
    max_norm: float | None


def outlier_limit_of(sae: Any, hook: str) -> float | None:
    """The norm above which the SAE's training cache dropped activations: recorded in the
    run by training, or else read from the cache's manifest if it is still there (None: no
    filter, or it cannot be known)."""
    from dictlens.eval.splice import outlier_limit
    from dictlens.io import read_json

    if "outlier_limit" in sae.metadata:
        limit = sae.metadata["outlier_limit"]
        return None if limit is None else float(limit)
    acts = sae.metadata.get("acts")
    manifest = Path(acts) / "manifest.json" if acts else None
    if manifest is None or not manifest.is_file():
        if acts:
            import warnings

            warnings.warn(f"the SAE's training cache {acts} is not here: its outlier limit is unknown, so "
                          "attention-sink positions will be encoded too", stacklevel=2)
        return None
    return outlier_limit(read_json(manifest), hook)


def check_model(sae: Any, run: str | Path, lm: Any, hook: str) -> None:
    """Refuse a model or hook other than the SAE's: by name when the run records them, and
    by the width of the activation at ``hook``."""
    from dictlens.data.tap import Tap

    trained_hook, trained_model = sae.metadata.get("hook"), sae.metadata.get("model")
    if trained_hook and hook != trained_hook:
        raise InputError(f"the SAE in {run} was trained on {trained_hook}, not {hook}")
    if trained_model and lm.name != trained_model:
        raise InputError(f"the SAE in {run} was trained on activations of {trained_model}, not {lm.name}: "
                         f"its features mean nothing there")
    probe = torch.tensor([[lm.tokenizer.eos_token_id or 0] * 2])
    width = int(Tap(lm, [hook])(probe)[hook].shape[-1])
    if width != sae.d_in:
        raise InputError(f"{hook} of {lm.name} is {width} wide; the SAE in {run} reads {sae.d_in}")


@dataclass
class LoadedRuns:
    """SAE runs at distinct hooks of one model: ``saes`` and ``max_norm`` by hook."""

    lm: Any
    saes: dict[str, Any]
    max_norm: dict[str, float | None]
    runs: dict[str, str]


def load_runs(runs: list[str | Path], model: str | None = None, device: str | None = None,
              check: Callable[[dict[str, Any]], None] | None = None) -> LoadedRuns:
    """Load the SAEs in ``runs`` (one per hook) and the model they were trained on, on one
    device. ``check(saes)`` runs before the model loads (e.g. that edited features exist)."""
    from dictlens.data.models import default_device, load_model
    from dictlens.errors import ConfigError
    from dictlens.sae.model import SAE

    if not runs:
        raise ConfigError("give at least one SAE run")
    device = device or str(default_device())
    saes: dict[str, Any] = {}
    paths: dict[str, str] = {}
    for run in runs:
        sae = SAE.load(run, device=device)
        hook = sae.metadata.get("hook")
        if not hook:
            raise InputError(f"the SAE in {run} does not record its hook")
        if hook in saes:
            raise ConfigError(f"two SAEs at {hook} ({paths[hook]} and {run}); give one per hook")
        saes[hook], paths[hook] = sae, str(run)
    if check is not None:
        check(saes)
    first = next(iter(saes.values()))
    name = model or first.metadata.get("model")
    if not name:
        raise InputError(f"the SAE in {runs[0]} does not record its model; pass --model")
    lm = load_model(name, device=device)
    for hook, sae in saes.items():
        check_model(sae, paths[hook], lm, hook)
    return LoadedRuns(lm, saes, {h: outlier_limit_of(s, h) for h, s in saes.items()}, paths)


def load_run(run: str | Path, model: str | None = None, device: str | None = None,
             check: Callable[[Any], None] | None = None) -> Loaded:
    """Load the SAE in ``run`` and its model (``model`` defaults to the one it was trained on).
    ``check(sae)`` runs before the model loads."""
    r = load_runs([run], model, device, None if check is None else lambda saes: check(next(iter(saes.values()))))
    hook, sae = next(iter(r.saes.items()))
    return Loaded(sae, r.lm, hook, r.max_norm[hook])
