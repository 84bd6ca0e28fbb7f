"""SAEs spliced into a running model, with their features edited on the way.

Inside ``with Splice(lm, {"resid_post.15": sae}, edits=...)`` every forward pass of
``lm.model`` (a plain call, ``generate``, a serving stack's own loop) runs with each hooked
activation x [B, T, D] replaced, position by position, by

    with the error term (default):  x + Σ_i (f'_i − f_i) W_dec[i] + Σ_steer c · d_s
    without it:                      W_dec f' + b_dec           + Σ_steer c · d_s

where f = encode(x) are the SAE's codes, f' the codes after the feature edits (clamp,
scale, zero, mean) and d_s the unit decoder directions that steering adds. With the
error term and no edit the activation is exactly x (the model's outputs do not move);
an edit changes only what it touches. Without it the model runs on the SAE's
reconstruction, as in spliced evaluation (:mod:`dictlens.eval.splice`).

Positions holding a special token (SmolLM2's BOS, ~150× the median norm) or an
activation norm above ``max_norm`` are left exactly as they are, as they were left out of
training. Edits may start at a position (``start``): positions count from the first token
of the sequence, also while ``generate`` feeds one token at a time through its KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from dictlens.data.hooks import replaced, resolve_hook
from dictlens.data.tokens import keep_mask
from dictlens.errors import ConfigError, InputError

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE

EditKind = Literal["add", "clamp", "scale", "zero", "mean"]
KINDS: tuple[str, ...] = ("add", "clamp", "scale", "zero", "mean")


@dataclass(frozen=True)
class Edit:
    """One intervention on one feature.

    ``add``: add ``value`` × the feature's unit decoder direction (steering; raw activation
    units). ``clamp``: set the feature's code to ``value``. ``scale``: multiply it by
    ``value``. ``zero``: set it to 0 (zero ablation). ``mean``: set it to ``value``, its
    mean over some text (mean ablation). Only positions ≥ ``start`` are edited.
    """

    feature: int
    kind: EditKind
    value: float = 0.0
    start: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"edit kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if not math.isfinite(self.value):
            raise ConfigError(f"edit of feature {self.feature}: the value {self.value} is not a finite number")
        if self.start < 0:
            raise ConfigError(f"edit of feature {self.feature}: start position {self.start} is negative")


def parse_feature_spec(spec: str, what: str) -> tuple[int, str | None]:
    """``FEATURE[:NUMBER]`` → (feature, the number's text or None); ``what`` names the flag."""
    feature, sep, value = spec.partition(":")
    try:
        f = int(feature)
    except ValueError:
        raise ConfigError(f"{what} {spec!r}: the feature {feature!r} is not an integer index") from None
    return f, value if sep else None


def parse_number(spec: str, what: str, value: str) -> float:
    """A finite float from ``value``, or an error naming ``what`` and the ``spec``."""
    try:
        v = float(value)
    except ValueError:
        raise ConfigError(f"{what} {spec!r}: {value!r} is not a number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{what} {spec!r}: {value!r} is not a finite number")
    return v


def parse_edit(spec: str, kind: EditKind, start: int = 0) -> Edit:
    """``FEATURE:VALUE`` (``add``, ``clamp``, ``scale``) or ``FEATURE`` (``zero``, ``mean``)."""
    f, value = parse_feature_spec(spec, kind)
    if kind in ("add", "clamp", "scale"):
        if value is None:
            raise ConfigError(f"{kind} {spec!r}: expected FEATURE:{'COEFF' if kind == 'add' else 'VALUE'}")
        return Edit(f, kind, parse_number(spec, kind, value), start)
    if value is not None:
        raise ConfigError(f"{kind} {spec!r}: expected a feature index alone")
    return Edit(f, kind, 0.0, start)


def check_edits(sae: SAE, edits: Sequence[Edit], where: str = "") -> None:
    """Every edited feature exists in ``sae``."""
    F = sae.n_features
    for e in edits:
        if not 0 <= e.feature < F:
            raise InputError(f"feature {e.feature}{where} is out of range: the SAE has {F:,} features "
                             f"(0-{F - 1})")


class CallContext:
    """What the current forward pass of a model is on, read by a pre-hook on the model:
    the token ids [B, T] when given, which of them are not special tokens (``keep``), and
    the position of the first one (the KV cache's length: 0 for a fresh sequence, then
    growing while ``generate`` feeds one token at a time)."""

    def __init__(self, lm: LoadedModel):
        from dictlens.data.tokens import special_ids

        self.model = lm.model
        self.special = special_ids(lm.tokenizer)
        self.ids: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None
        self.offset = 0

    def _read(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        self.ids = ids if isinstance(ids, torch.Tensor) and ids.ndim == 2 else None
        self.keep = None if self.ids is None else keep_mask(self.ids, self.special)
        self.offset = _past_length(kwargs)

    def keep_rows(self, B: int, T: int, device: torch.device) -> torch.Tensor:
        """[B·T] bool: the positions of this call that are not special tokens."""
        if self.keep is not None and self.keep.shape == (B, T):
            return self.keep.reshape(-1).to(device).clone()   # callers narrow it; the next hook needs it whole
        return torch.ones(B * T, dtype=torch.bool, device=device)

    def positions(self, B: int, T: int, device: torch.device) -> torch.Tensor:
        """[B·T] position of each token of this call in its sequence."""
        return (self.offset + torch.arange(T, device=device)).repeat(B)

    def attach(self, stack: ExitStack) -> None:
        handle = self.model.register_forward_pre_hook(self._read, with_kwargs=True)
        stack.callback(handle.remove)


@dataclass
class Splice:
    """A context manager that splices ``saes`` ({hook: SAE}) into ``lm`` (a LoadedModel).

    ``edits`` ({hook: [Edit]}) change features of the SAE at that hook; ``error_term``
    keeps x − x̂ so that only the edits change the activation; ``max_norm`` ({hook: limit}
    or one limit for all) leaves positions above that activation norm untouched (pass the
    outlier limit of the SAE's training cache). Several hooks may be spliced at once.
    """

    lm: LoadedModel
    saes: Mapping[str, SAE]
    edits: Mapping[str, Sequence[Edit]] = field(default_factory=dict)
    error_term: bool = True
    max_norm: float | Mapping[str, float | None] | None = None
    _stack: ExitStack | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.saes:
            raise ConfigError("splice: give at least one SAE")
        for hook in self.edits:
            if hook not in self.saes:
                raise ConfigError(f"splice: edits at {hook}, where no SAE is spliced (SAEs at {', '.join(self.saes)})")
        for hook, sae in self.saes.items():
            resolve_hook(self.lm.model, hook)   # a missing hook is named now, not mid-forward
            check_edits(sae, self.edits.get(hook, ()), f" (at {hook})")
        self._call = CallContext(self.lm)

    def __enter__(self) -> Splice:
        stack = ExitStack()
        self._call.attach(stack)
        for hook, sae in self.saes.items():
            point = resolve_hook(self.lm.model, hook)
            stack.enter_context(replaced(self.lm.model, point, self._replacement(hook, sae)))
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    # ---- the replacement --------------------------------------------------------------
    def _limit(self, hook: str) -> float | None:
        if isinstance(self.max_norm, Mapping):
            return self.max_norm.get(hook)
        return self.max_norm

    def _replacement(self, hook: str, sae: SAE) -> Any:
        edits = list(self.edits.get(hook, ()))
        steer = [e for e in edits if e.kind == "add"]
        codes = [e for e in edits if e.kind != "add"]
        limit = self._limit(hook)
        dirs = {e.feature: (sae.W_dec[e.feature] / sae.W_dec[e.feature].norm()).detach().float() for e in steer}

        def fn(x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] != sae.d_in:
                raise InputError(f"splice at {hook}: the activation is {x.shape[-1]} wide, the SAE reads {sae.d_in}")
            B, T, D = x.shape
            flat = x.reshape(B * T, D).float().to(sae.device)
            pos = self._call.positions(B, T, flat.device)
            touch = self._call.keep_rows(B, T, flat.device)
            if limit is not None:
                touch = touch & (flat.norm(dim=1) <= limit)
            out = flat.clone()
            if codes or not self.error_term:
                out[touch] = _edit_codes(sae, flat[touch], pos[touch], codes, self.error_term)
            for e in steer:
                rows = touch & (pos >= e.start)
                out[rows] += e.value * dirs[e.feature]
            return out.reshape(B, T, D).to(device=x.device, dtype=x.dtype)
        return fn


def _edit_codes(sae: SAE, x: torch.Tensor, pos: torch.Tensor, edits: Sequence[Edit], error_term: bool
                ) -> torch.Tensor:
    """x [N, D] after the code edits: x + Σ (f'_i − f_i) W_dec[i] with the error term,
    W_dec f' + b_dec without it. Several edits of one feature apply in order (clamp to 3,
    then scale by 2: 6)."""
    if len(x) == 0:
        return x
    with sae.ranking("float32"):
        p, vals = sae.encode_sparse(x)
    out = x.clone() if error_term else sae.decode_sparse(p, vals)
    W = sae.W_dec.detach()
    for feature in dict.fromkeys(e.feature for e in edits):
        hit = p.cols == feature
        f = torch.zeros(len(x), device=x.device)
        f[p.rows[hit]] = vals[hit]
        new = f
        for e in (e for e in edits if e.feature == feature):
            edited = {"clamp": torch.full_like(f, e.value), "scale": new * e.value, "zero": torch.zeros_like(f),
                      "mean": torch.full_like(f, e.value)}[e.kind]
            new = torch.where(pos >= e.start, edited, new)
        out += (new - f)[:, None] * W[feature]
    return out


def _past_length(kwargs: dict[str, Any]) -> int:
    """How many tokens the model has already seen in this sequence (its KV cache's length)."""
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    # transformers 5 calls it ``cache``, 4.x ``past_key_values``
    past = next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and isinstance(past[0], (tuple, list)) and past[0]:
        return int(past[0][0].shape[-2])   # legacy (key, value) tuples: [B, heads, T, d]
    return 0
