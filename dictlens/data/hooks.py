"""Hook points: one naming scheme for the activations of every transformer architecture.

Named hooks, with L the block index:

==============  =====================================================
``resid_pre.L``  the residual stream entering block L (its input)
``resid_post.L`` the residual stream leaving block L (its output)
``attn_out.L``   the attention sublayer's output, before it is added
``mlp_in.L``     the MLP's input: what the MLP itself receives (after the block's norm)
``mlp_hidden.L`` the MLP's hidden units (its neurons): the input of its output projection
``mlp_out.L``    the MLP sublayer's output, before it is added
==============  =====================================================

Any module path also works: ``model.layers.3.mlp.down_proj`` is that module's output,
``model.layers.3.mlp.down_proj:input`` its first input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dictlens.errors import HookError

Replace = Callable[[torch.Tensor], torch.Tensor]

NAMED_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_hidden", "mlp_out")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
# the MLP's output projection, whose input is the neurons (Llama, GPT-2, GPT-NeoX, OPT/Phi, T5-style)
MLP_OUT_PROJ = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "wo")
NAMED_HOOK = re.compile(r"^(" + "|".join(NAMED_KINDS) + r")\.(\d+)$")
# the order the named points of one block are computed in
FORWARD_ORDER = ("resid_pre", "attn_out", "mlp_in", "mlp_hidden", "mlp_out", "resid_post")


@dataclass(frozen=True)
class HookPoint:
    """A place to read activations: a module path and whether its input or output."""

    name: str
    module: str
    io: Literal["input", "output"]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and ModuleList of the transformer blocks (one per layer)."""
    config: Any = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise HookError(f"{type(model).__name__} has no config.num_hidden_layers: not a transformers LM")
    n_layers = int(config.num_hidden_layers)
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and "vision" not in name
    ]
    if not candidates:
        raise HookError(f"cannot find the {n_layers} transformer blocks of {type(model).__name__}")
    return candidates[0]


def _child(block: nn.Module, names: tuple[str, ...]) -> str | None:
    children = dict(block.named_children())
    return next((n for n in names if n in children), None)


def named_hooks(model: nn.Module) -> dict[str, HookPoint]:
    """Every named hook point of ``model``, in forward order."""
    path, blocks = find_blocks(model)
    hooks: dict[str, HookPoint] = {}
    for i, block in enumerate(blocks):
        prefix = f"{path}.{i}"
        hooks[f"resid_pre.{i}"] = HookPoint(f"resid_pre.{i}", prefix, "input")
        attn = _child(block, ATTN_NAMES)
        if attn is not None:
            hooks[f"attn_out.{i}"] = HookPoint(f"attn_out.{i}", f"{prefix}.{attn}", "output")
        mlp = _child(block, MLP_NAMES)
        if mlp is not None:
            hooks[f"mlp_in.{i}"] = HookPoint(f"mlp_in.{i}", f"{prefix}.{mlp}", "input")
            proj = _child(block.get_submodule(mlp), MLP_OUT_PROJ)
            if proj is not None:
                hooks[f"mlp_hidden.{i}"] = HookPoint(f"mlp_hidden.{i}", f"{prefix}.{mlp}.{proj}", "input")
            hooks[f"mlp_out.{i}"] = HookPoint(f"mlp_out.{i}", f"{prefix}.{mlp}", "output")
        hooks[f"resid_post.{i}"] = HookPoint(f"resid_post.{i}", prefix, "output")
    return hooks


def describe_valid(model: nn.Module) -> str:
    """A compact list of the valid hook names, for error messages."""
    hooks = named_hooks(model)
    parts = []
    for kind in NAMED_KINDS:
        layers = [int(h.split(".")[1]) for h in hooks if h.startswith(kind + ".")]
        if layers:
            parts.append(f"{kind}.{min(layers)}-{max(layers)}")
    example = next(iter(hooks.values())).module
    return ", ".join(parts) + f", or a module path such as {example}.mlp[:input]"


GLOB_CHARS = frozenset("*?[")


def expand_hooks(patterns: list[str], available: list[str], *, where: str = "this model") -> list[str]:
    """Hook names with shell-style patterns (``resid_post.*``, ``mlp_out.1[0-5]``) expanded against
    ``available`` (a pattern's matches in ``available``'s order, forward order: layer 2 before
    layer 10), without repeats; a name without pattern characters passes as it is (a module path is checked when it
    is resolved). A pattern that matches nothing is an error naming it."""
    import fnmatch

    out: list[str] = []
    for pattern in patterns:
        if GLOB_CHARS.isdisjoint(pattern):
            found = [pattern]
        else:
            found = [h for h in available if fnmatch.fnmatchcase(h, pattern)]
            if not found:
                shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
                raise HookError(f"hook pattern {pattern!r} matches no hook of {where} ({shown})")
        out.extend(h for h in found if h not in out)
    return out


def forward_position(name: str) -> tuple[int, int] | None:
    """(layer, place in the block) of a named hook, for ordering; None for a module path."""
    m = NAMED_HOOK.match(name)
    return (int(m.group(2)), FORWARD_ORDER.index(m.group(1))) if m else None


@dataclass(frozen=True)
class Wiring:
    """What one dictionary reads and what it writes (reconstructs): hooks of one forward pass.

    An SAE reads and writes one hook; a transcoder reads one (``mlp_in.L``) and writes another
    (``mlp_out.L``). The trainer gets the concatenation of the ``reads`` hooks' rows as its input and,
    when the dictionary writes something else, that of the ``writes`` hooks as its target."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]

    @classmethod
    def sae(cls, hook: str) -> Wiring:
        return cls((hook,), (hook,))

    @classmethod
    def transcoder(cls, reads: str, writes: str) -> Wiring:
        """A transcoder from ``reads`` to ``writes``; writing a hook computed before the one it reads is
        refused (it would predict the past from the future)."""
        before, after = forward_position(reads), forward_position(writes)
        if before is not None and after is not None and after < before:
            raise HookError(f"--writes {writes} is computed before --reads {reads}: a transcoder predicts a later "
                            "activation from an earlier one (e.g. --reads mlp_in.L --writes mlp_out.L)")
        return cls((reads,), (writes,))

    @classmethod
    def clt(cls, reads: list[str], writes: list[str]) -> Wiring:
        """A cross-layer transcoder: the i-th read hook's layer writes the i-th written hook and every later
        one. The layers must be consecutive and each written hook not computed before its read one."""
        if len(reads) != len(writes) or not reads:
            raise HookError(f"a cross-layer transcoder reads one hook per layer and writes one per layer: --reads "
                            f"names {len(reads)}, --writes {len(writes)}")
        for side, hooks in (("--reads", reads), ("--writes", writes)):
            layers = [m.group(2) for m in map(NAMED_HOOK.match, hooks) if m]
            kinds = {m.group(1) for m in map(NAMED_HOOK.match, hooks) if m}
            if len(layers) != len(hooks) or len(kinds) != 1:
                raise HookError(f"{side} of a cross-layer transcoder: one named hook kind at each layer, such as "
                                f"mlp_in.*; found {', '.join(hooks[:4])}")
            numbers = [int(n) for n in layers]
            if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
                raise HookError(f"{side} of a cross-layer transcoder: the layers must be consecutive, found "
                                f"{', '.join(map(str, numbers))}")
        for a, b in zip(reads, writes, strict=True):
            cls.transcoder(a, b)   # (refuses a write computed before its read)
        return cls(tuple(reads), tuple(writes))

    @classmethod
    def crosscoder(cls, hooks: list[str]) -> Wiring:
        """One dictionary over several hooks at once, reconstructing each (a crosscoder)."""
        if len(hooks) < 2:
            raise HookError(f"a crosscoder reads several hooks at once (--hook A --hook B ...); found "
                            f"{', '.join(hooks) or 'none'}")
        return cls(tuple(hooks), tuple(hooks))

    @classmethod
    def of_record(cls, hook_in: str, hook_out: str) -> Wiring:
        """The wiring a dictionary's provenance records (several hooks comma-joined)."""
        return cls(tuple(hook_in.split(",")), tuple(hook_out.split(",")))

    @property
    def autoencoder(self) -> bool:
        """Whether it writes what it reads (an SAE)."""
        return self.reads == self.writes

    @property
    def joint(self) -> bool:
        """Whether it is a crosscoder's (several hooks read and reconstructed together)."""
        return self.autoencoder and len(self.reads) > 1

    @property
    def cross_layer(self) -> bool:
        """Whether it is a cross-layer transcoder's (one read and one written hook per layer)."""
        return not self.autoencoder and len(self.reads) > 1

    @property
    def hooks(self) -> list[str]:
        """Every hook it needs, reads first, without repeats."""
        return list(dict.fromkeys(self.reads + self.writes))

    @property
    def name(self) -> str:
        """``resid_post.3`` for an SAE, ``mlp_in.3>mlp_out.3`` for a transcoder, ``mlp_in.0-29>mlp_out.0-29``
        for a cross-layer transcoder."""
        reads = _span(self.reads)
        return reads if self.autoencoder else f"{reads}>{_span(self.writes)}"

    def inputs(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Its input rows from a batch of aligned hooks (the concatenation of its ``reads``)."""
        return rows[self.reads[0]] if len(self.reads) == 1 else torch.cat([rows[h] for h in self.reads], dim=1)

    def targets(self, rows: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Its target rows (the concatenation of its ``writes``); None for an SAE, whose target is its input."""
        if self.autoencoder:
            return None
        return rows[self.writes[0]] if len(self.writes) == 1 else torch.cat([rows[h] for h in self.writes], dim=1)

    def written(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """The rows of what it writes (its target, or its input for an SAE)."""
        target = self.targets(rows)
        return self.inputs(rows) if target is None else target


def _span(hooks: tuple[str, ...]) -> str:
    """``mlp_in.0-29`` for one kind at consecutive layers, else the hooks joined by ``+``."""
    found = [NAMED_HOOK.match(h) for h in hooks]
    if len(hooks) > 1 and all(found) and len({m.group(1) for m in found if m}) == 1:
        layers = [int(m.group(2)) for m in found if m]
        if layers == list(range(layers[0], layers[0] + len(layers))):
            return f"{found[0].group(1) if found[0] else ''}.{layers[0]}-{layers[-1]}"
    return "+".join(hooks)


def wirings(hooks: list[str], reads: list[str], writes: list[str], available: list[str], *,
            where: str = "this model", arch: str = "auto") -> list[Wiring]:
    """The dictionaries that ``--hook`` (SAEs) and ``--reads`` / ``--writes`` (transcoders) name, patterns
    expanded against ``available`` (``expand_hooks``): the i-th hook ``--reads`` names is paired with the
    i-th ``--writes`` names (``--reads 'mlp_in.*' --writes 'mlp_out.*'``: one transcoder per layer).
    ``arch`` ``clt``: one cross-layer transcoder over every pair instead; ``crosscoder``: one dictionary
    over every ``--hook``."""
    if bool(reads) != bool(writes):
        raise HookError("--reads and --writes go together: a transcoder reads one hook and writes another "
                        "(an SAE: --hook)")
    if arch == "crosscoder":
        if reads or writes:
            raise HookError("--arch crosscoder reads and reconstructs the --hook hooks together; --reads/--writes "
                            "name transcoders")
        return [Wiring.crosscoder(expand_hooks(hooks, available, where=where))]
    if arch == "clt":
        if hooks or not reads:
            raise HookError("--arch clt reads --reads and writes --writes, one hook per layer each (--reads "
                            "'mlp_in.*' --writes 'mlp_out.*'); --hook names SAEs")
        return [Wiring.clt(expand_hooks(reads, available, where=where),
                           expand_hooks(writes, available, where=where))]
    out = [Wiring.sae(h) for h in expand_hooks(hooks, available, where=where)] if hooks else []
    if reads:
        ins, outs = expand_hooks(reads, available, where=where), expand_hooks(writes, available, where=where)
        if len(ins) != len(outs):
            raise HookError(f"--reads names {len(ins)} hooks ({', '.join(ins[:4])}{', ...' if len(ins) > 4 else ''}) "
                            f"and --writes {len(outs)} ({', '.join(outs[:4])}{', ...' if len(outs) > 4 else ''}); "
                            "they pair in order, one transcoder each")
        out.extend(Wiring.sae(a) if a == b else Wiring.transcoder(a, b) for a, b in zip(ins, outs, strict=True))
    names = [w.name for w in out]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated:
        raise HookError(f"{repeated} is named twice")
    return out


def resolve_hook(model: nn.Module, name: str) -> HookPoint:
    """The HookPoint for a named hook or a raw module path; a clear error otherwise."""
    hooks = named_hooks(model)
    if name in hooks:
        return hooks[name]
    if NAMED_HOOK.match(name):
        raise HookError(f"hook {name!r} does not exist on this model; valid: {describe_valid(model)}")
    module, _, io = name.partition(":")
    io = io or "output"
    modules = dict(model.named_modules())
    if io not in ("input", "output") or module not in modules or module == "":
        raise HookError(f"hook {name!r} does not exist on this model; valid: {describe_valid(model)}")
    return HookPoint(name, module, io)  # type: ignore[arg-type]


def first_tensor(value: Any) -> torch.Tensor:
    """The activation tensor inside a module's output (a tensor, or a tuple led by one)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "to_tuple"):
        return first_tensor(value.to_tuple())
    raise HookError(f"module output of type {type(value).__name__} holds no tensor to read")


def input_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A module's first input, whether it was passed by position or as ``hidden_states``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise HookError("module was called without a tensor input to read")


@contextmanager
def read_into(model: torch.nn.Module, point: HookPoint, cell: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, every forward pass leaves the activation at ``point`` in ``cell[point.name]``
    (the latest call's; a transcoder's splice reads its input there before it writes its output)."""
    module = dict(model.named_modules())[point.module]
    if point.io == "input":
        def pre_hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            cell[point.name] = input_tensor(args, kwargs)
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def post_hook(mod: Any, args: tuple[Any, ...], output: Any) -> None:
            cell[point.name] = first_tensor(output)
        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()
        cell.pop(point.name, None)


@contextmanager
def replaced(model: torch.nn.Module, point: HookPoint, fn: Replace) -> Iterator[None]:
    """Inside the block, the activation at ``point`` [B, T, D] is replaced by ``fn(it)``."""
    module = dict(model.named_modules())[point.module]
    if point.io == "input":
        def pre_hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            x = input_tensor(args, kwargs)
            if args and args[0] is x:
                return (fn(x), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(x)}
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def post_hook(mod: Any, args: tuple[Any, ...], output: Any) -> Any:
            x = first_tensor(output)
            if isinstance(output, torch.Tensor):
                return fn(x)
            if isinstance(output, tuple):
                return (fn(x), *output[1:])
            raise HookError(f"cannot replace the output of {point.module} ({type(output).__name__})")
        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()
