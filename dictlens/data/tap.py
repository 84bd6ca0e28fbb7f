"""The model tap: run a causal LM and read the activations at some hook points.

The forward pass stops as soon as every requested hook has fired, so reading
``resid_post.4`` of a 30-layer model costs about 5 blocks, not 30.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dictlens.data.hooks import HookPoint, first_tensor, input_tensor, resolve_hook
from dictlens.data.models import LoadedModel
from dictlens.errors import ConfigError, HookError


class _StopForward(Exception):
    """Raised inside a hook once every activation we need has been read."""


class Tap:
    """Reads activations at ``hooks`` from one forward pass of ``lm``.

    ``tap(input_ids)`` returns ``{hook name: acts_BTD}`` for ``input_ids`` of shape [B, T]
    (activations on the model's device, in the model's dtype).
    """

    def __init__(self, lm: LoadedModel, hooks: Sequence[str], *, stop_early: bool = True):
        if not hooks:
            raise ConfigError("hooks: Tap needs at least one hook, found none")
        self.lm = lm
        self.points: list[HookPoint] = [resolve_hook(lm.model, h) for h in dict.fromkeys(hooks)]
        self.stop_early = stop_early
        self.stopped_early = False

    @property
    def hooks(self) -> list[str]:
        return [p.name for p in self.points]

    def _make_hook(self, point: HookPoint, store: dict[str, torch.Tensor]) -> Any:
        def capture(tensor: torch.Tensor) -> None:
            if point.name not in store:  # a module reused in one pass: its first call counts
                store[point.name] = tensor.detach()
            if self.stop_early and len(store) == len(self.points):
                raise _StopForward

        if point.io == "input":
            def pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                capture(input_tensor(args, kwargs))
            return pre_hook

        def post_hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            capture(first_tensor(output))
        return post_hook

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        model = self.lm.model
        modules = dict(model.named_modules())
        store: dict[str, torch.Tensor] = {}
        handles = []
        try:
            for point in self.points:
                hook = self._make_hook(point, store)
                module = modules[point.module]
                if point.io == "input":
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(hook))
            self.stopped_early = False
            try:
                model(input_ids=input_ids.to(self.lm.device),
                      attention_mask=None if attention_mask is None else attention_mask.to(self.lm.device),
                      use_cache=False)
            except _StopForward:
                self.stopped_early = True
        finally:
            for h in handles:
                h.remove()
        missing = [p.name for p in self.points if p.name not in store]
        if missing:
            raise HookError(f"hooks {missing} did not fire during the forward pass of {self.lm.name} "
                            "(their modules are not used by its forward)")
        return {p.name: store[p.name] for p in self.points}
