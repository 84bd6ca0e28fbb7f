"""What a feature's decoder direction means: logit lens, nearest features, co-activation.

Logit lens: the direct effect of adding feature f's unit decoder direction d_f to the
residual stream on the next-token logits, W_U (γ ⊙ d_f), where γ is the gain of the
model's final norm (the linear part of RMSNorm / LayerNorm; the normalisation itself
depends on the whole residual and is left out, as in the usual logit lens). Only the
ranking and the relative sizes matter: the top entries are the tokens the feature
promotes, the bottom ones those it suppresses.

A dictionary that reads a hook narrower or wider than the residual stream (the MLP's
neurons, ``mlp_hidden.L``) writes into the residual through the module that hook feeds:
:func:`residual_directions` carries its directions there, and the lens and the nearest
features use those.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dictlens.data.hooks import find_blocks
from dictlens.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm applied to the residual stream before the unembedding: the last module
    outside the transformer blocks whose class name says it is a norm (model.norm in
    Llama, transformer.ln_f in GPT-2, gpt_neox.final_layer_norm), or None."""
    blocks_path, _ = find_blocks(model)
    found = None
    for name, module in model.named_modules():
        if name.startswith(blocks_path + ".") or name == blocks_path:
            continue
        if "norm" in type(module).__name__.lower():
            found = module
    return found


def unembedding(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_U [V, D] and the final norm's gain γ [D] (None when there is none)."""
    out = model.get_output_embeddings()
    if out is None or getattr(out, "weight", None) is None:
        raise InputError("logit lens: the model has no output embedding (lm_head)")
    norm = final_norm(model)
    gain = getattr(norm, "weight", None) if norm is not None else None
    if gain is not None and gain.shape != out.weight.shape[1:]:
        gain = None
    return out.weight.detach(), None if gain is None else gain.detach()


@torch.no_grad()
def logit_lens(directions: torch.Tensor, W_U: torch.Tensor, gain: torch.Tensor | None, n: int = 10,
               chunk: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-``n`` boosted and suppressed tokens per direction [F, D]: (top ids [F, n], their
    logits, bottom ids [F, n] (most negative first), their logits)."""
    W = W_U.float()
    if directions.shape[1] != W.shape[1]:
        raise InputError(f"logit lens: decoder width {directions.shape[1]} differs from the model's "
                         f"hidden size {W.shape[1]} (is the SAE from this model?)")
    g = gain.float() if gain is not None else None
    tops, topv, bots, botv = [], [], [], []
    for s in range(0, len(directions), chunk):
        d = directions[s:s + chunk].float().to(W.device)
        if g is not None:
            d = d * g
        logits = d @ W.T
        t = logits.topk(n, dim=1)
        b = logits.topk(n, dim=1, largest=False)
        tops.append(t.indices.cpu())
        topv.append(t.values.cpu())
        bots.append(b.indices.cpu())
        botv.append(b.values.cpu())
    return (torch.cat(tops).numpy(), torch.cat(topv).numpy(), torch.cat(bots).numpy(), torch.cat(botv).numpy())


@torch.no_grad()
def residual_directions(directions: torch.Tensor, model: torch.nn.Module, hook: str) -> torch.Tensor | None:
    """``directions`` [F, W] of a dictionary at ``hook``, as directions in the residual stream
    [F, D]: themselves when the hook is as wide as the residual; when the hook is a module's
    input (``mlp_hidden.L`` is the MLP's output projection's), their image under that
    module's linear part, module(d) − module(0); None when neither applies."""
    from dictlens.data.hooks import resolve_hook

    d_model = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "n_embd", 0))
    if directions.shape[1] == d_model:
        return directions
    point = resolve_hook(model, hook)
    if point.io != "input":
        return None
    module = model.get_submodule(point.module)
    p = next(module.parameters(), None)
    if p is None:
        return None
    d = directions.to(device=p.device, dtype=p.dtype)
    try:
        out: torch.Tensor = module(d) - module(torch.zeros_like(d[:1]))
    except (RuntimeError, TypeError, ValueError):      # not a map of vectors of this width
        return None
    if out.ndim != 2 or out.shape[1] != d_model:
        return None
    return out.float()


@torch.no_grad()
def nearest(directions: torch.Tensor, n: int = 10, chunk: int = 1024,
            others: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``directions`` [F, D], the ``n`` most similar rows (cosine) of
    ``others`` (default: the same set, itself excluded): (ids [F, n], cosines [F, n])."""
    a = torch.nn.functional.normalize(directions.float(), dim=1)
    b = a if others is None else torch.nn.functional.normalize(others.float(), dim=1)
    n = min(n, len(b) - (1 if others is None else 0))
    ids, cos = [], []
    for s in range(0, len(a), chunk):
        sim = a[s:s + chunk] @ b.T
        if others is None:
            sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = -2.0
        t = sim.topk(max(n, 0), dim=1)
        ids.append(t.indices.cpu())
        cos.append(t.values.cpu())
    return torch.cat(ids).numpy(), torch.cat(cos).numpy()


def coactivation(token_features: Any, n: int = 10, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` features that fire most often together with each feature, by Jaccard index
    |A∩B| / |A∪B| over tokens, from a scipy CSR [tokens, F]: (ids [F, n], Jaccard [F, n]),
    -1 / 0 where fewer than n features ever co-fire."""
    from scipy import sparse

    A = sparse.csc_matrix(token_features, dtype=np.float32)
    A.data[:] = 1.0
    F = A.shape[1]
    count = np.asarray(A.sum(axis=0)).ravel()
    At = A.T.tocsr()
    ids = np.full((F, n), -1, np.int64)
    jac = np.zeros((F, n), np.float32)
    for s in range(0, F, chunk):
        both = (At[s:s + chunk] @ A).toarray()  # [chunk, F] co-firing counts
        rows = np.arange(both.shape[0])
        both[rows, s + rows] = 0
        union = count[s:s + chunk, None] + count[None, :] - both
        j = np.divide(both, union, out=np.zeros_like(both), where=union > 0)
        m = min(n, F - 1)
        top = np.argpartition(-j, m - 1, axis=1)[:, :m] if m > 0 else np.zeros((len(j), 0), np.int64)
        tv = np.take_along_axis(j, top, 1)
        order = np.argsort(-tv, axis=1, kind="stable")
        top, tv = np.take_along_axis(top, order, 1), np.take_along_axis(tv, order, 1)
        ids[s:s + chunk, :m] = np.where(tv > 0, top, -1)
        jac[s:s + chunk, :m] = tv
    return ids, jac
