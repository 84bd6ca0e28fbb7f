"""The SAE spliced into the model: next-token loss with the hooked activation replaced.

For each batch of token contexts the model runs four times: clean; with the hooked
activation replaced by the SAE's reconstruction; by zero; by its mean (over the
evaluated tokens, or given). Definitions (``docs/metrics.md``), with CE the mean
next-token cross-entropy in nats over the predicted positions:

  loss recovered vs ablation A = (CE_A − CE_SAE) / (CE_A − CE_clean)   (1: as good as clean)
  ΔLM loss = CE_SAE − CE_clean
  KL = mean over positions of KL(p_clean ‖ p_SAE) of the next-token distributions

Positions where ``keep`` is false (special tokens, padding) keep their clean activation
and are not scored, as they were left out of training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dictlens.data.hooks import HookPoint, first_tensor, input_tensor, resolve_hook
from dictlens.data.models import LoadedModel
from dictlens.errors import InputError

Replace = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def replaced(model: Any, point: HookPoint, fn: Replace) -> Iterator[None]:
    """Inside the block, the activation at ``point`` [B, T, D] is replaced by ``fn(it)``."""
    module = dict(model.named_modules())[point.module]
    if point.io == "input":
        def pre_hook(mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x = input_tensor(args, kwargs)
            if args and args[0] is x:
                return (fn(x), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(x)}
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def post_hook(mod: Any, args: tuple, output: Any) -> Any:
            x = first_tensor(output)
            if isinstance(output, torch.Tensor):
                return fn(x)
            if isinstance(output, tuple):
                return (fn(x), *output[1:])
            raise InputError(f"cannot replace the output of {point.module} ({type(output).__name__})")
        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class SpliceMetrics:
    n_tokens: int  # scored next-token predictions
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_mean: float
    kl_sae: float
    delta_lm_loss: float
    recovered_vs_zero: float
    recovered_vs_mean: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-12 else float("nan")


@torch.inference_mode()
def splice_metrics(lm: LoadedModel, hook: str, reconstruct: Replace,
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   mean: torch.Tensor | None = None) -> SpliceMetrics:
    """CE / KL with ``reconstruct`` (e.g. an SAE's forward on raw activations) spliced in at ``hook``.

    ``batches`` yields ``(input_ids [B, T], keep [B, T] bool)``; ``mean`` [D] is the
    activation used by mean ablation (default: the mean over the kept positions of
    these batches, from a first pass).
    """
    point = resolve_hook(lm.model, hook)
    data = [(ids.to(lm.device), keep.to(lm.device)) for ids, keep in batches]
    if not data or not any(bool(k[:, :-1].any()) for _, k in data):
        raise InputError("splice evaluation: no tokens to score")
    if mean is None:
        mean = _hook_mean(lm, point, data)
    mean = mean.to(lm.device)

    def logits(ids: torch.Tensor, fn: Replace | None, keep: torch.Tensor) -> torch.Tensor:
        if fn is None:
            return lm.model(input_ids=ids, use_cache=False).logits.float()

        def masked(x: torch.Tensor) -> torch.Tensor:
            new = fn(x).to(x.dtype)
            if new.shape != x.shape:
                raise InputError(f"splice at {hook}: replacement has shape {list(new.shape)}, "
                                 f"the activation {list(x.shape)}")
            return torch.where(keep.unsqueeze(-1), new, x)
        with replaced(lm.model, point, masked):
            return lm.model(input_ids=ids, use_cache=False).logits.float()

    variants: dict[str, Replace] = {"sae": lambda x: reconstruct(x.float()), "zero": torch.zeros_like,
                                    "mean": lambda x: mean.expand_as(x)}
    sums = dict.fromkeys(("clean", "sae", "zero", "mean", "kl"), 0.0)
    n = 0
    for ids, keep in data:
        labels = ids[:, 1:]
        scored = keep[:, :-1] & keep[:, 1:]  # predict a kept token from a kept position
        clean = logits(ids, None, keep)[:, :-1]
        logp_clean = clean.log_softmax(-1)
        sums["clean"] += float(F.nll_loss(logp_clean[scored], labels[scored], reduction="sum"))
        for name, fn in variants.items():
            logp = logits(ids, fn, keep)[:, :-1].log_softmax(-1)
            sums[name] += float(F.nll_loss(logp[scored], labels[scored], reduction="sum"))
            if name == "sae":
                kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
                sums["kl"] += float(kl[scored].sum())
        n += int(scored.sum())
    ce = {k: v / n for k, v in sums.items()}
    return SpliceMetrics(n_tokens=n, ce_clean=ce["clean"], ce_sae=ce["sae"], ce_zero=ce["zero"],
                         ce_mean=ce["mean"], kl_sae=ce["kl"], delta_lm_loss=ce["sae"] - ce["clean"],
                         recovered_vs_zero=_recovered(ce["zero"], ce["sae"], ce["clean"]),
                         recovered_vs_mean=_recovered(ce["mean"], ce["sae"], ce["clean"]))


def _hook_mean(lm: LoadedModel, point: HookPoint, data: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    from dictlens.data.tap import Tap

    tap = Tap(lm, [point.name])
    total, count = None, 0
    for ids, keep in data:
        acts = tap(ids)[point.name].double()[keep]
        total = acts.sum(0) if total is None else total + acts.sum(0)
        count += len(acts)
    assert total is not None
    return (total / max(1, count)).float()


def text_batches(lm: LoadedModel, text: str, *, tokens: int, context: int = 128, batch_size: int = 8,
                 text_field: str = "text", skip_tokens: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, keep)`` batches of packed contexts from a text source (as harvested:
    BOS prepended when the tokenizer has one; padding and special tokens not kept), with
    at least ``tokens`` kept positions in all, after skipping the contexts that hold the
    first ``skip_tokens`` (e.g. the part of the text an SAE was trained on)."""
    import numpy as np

    from dictlens.data.packing import pack_contexts, resolve_prepend_bos, special_token_ids
    from dictlens.data.text import iter_documents

    special = torch.tensor(sorted(special_token_ids(lm.tokenizer)), dtype=torch.long)
    contexts = pack_contexts(iter_documents(text, text_field), lm.tokenizer, context,
                             prepend_bos=resolve_prepend_bos(lm.tokenizer, "auto"))
    out, rows, kept, skipped = [], [], 0, 0
    for ctx in contexts:
        if skipped < skip_tokens:
            skipped += context
            continue
        rows.append(ctx)
        if len(rows) == batch_size:
            ids = torch.from_numpy(np.stack([c.ids for c in rows]).astype(np.int64))
            keep = torch.arange(context)[None] < torch.tensor([c.n_valid for c in rows])[:, None]
            keep &= ~torch.isin(ids, special)
            out.append((ids, keep))
            kept += int(keep.sum())
            rows = []
            if kept >= tokens:
                break
    if not out:
        raise InputError(f"splice evaluation: {text!r} holds fewer than {batch_size} contexts of {context} tokens"
                         + (f" after the first {skip_tokens:,} tokens" if skip_tokens else ""))
    return out


def sae_replacement(sae: Any) -> Replace:
    """The SAE's reconstruction of raw activations of any leading shape [..., D], ranked in float32."""
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        with sae.ranking("float32"):
            return sae(x.reshape(-1, x.shape[-1]).float()).reshape(x.shape)
    return reconstruct
