"""Token ids as every consumer feeds them to a model: one home for each of these jobs.

* which ids are special (BOS, EOS, padding...) and the ``keep`` mask that leaves them out;
* a text or prompt → ``[1, T]`` ids (BOS first when the tokenizer has one, as harvested);
* packed contexts → ``(ids [B, T], keep [B, T])`` batches, after skipping a text's first
  tokens (e.g. the part an SAE was trained on).

Harvesting, splicing, analysis, search, ablation, attribution and monitoring all call these,
so a position is "kept" by the same rule everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dictlens.data.packing import Context, pack_contexts, resolve_prepend_bos, special_token_ids
from dictlens.errors import ConfigError, InputError

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel


def special_ids(tokenizer: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """The special token ids of ``tokenizer`` as a sorted long tensor (for :func:`keep_mask`)."""
    return torch.tensor(sorted(special_token_ids(tokenizer)), dtype=torch.long, device=device)


def keep_mask(ids: torch.Tensor, special: torch.Tensor, n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Bool, shaped like ``ids`` [B, T]: True where a position is a real, non-special token.

    ``special``: from :func:`special_ids`; ``n_valid`` [B]: positions past it are padding."""
    keep = ~torch.isin(ids, special.to(ids.device))
    if n_valid is not None:
        keep &= torch.arange(ids.shape[-1], device=ids.device)[None] < n_valid.to(ids.device)[:, None]
    return keep


def not_special(tokenizer: Any, ids: torch.Tensor) -> torch.Tensor:
    """:func:`keep_mask` of ``ids`` with ``tokenizer``'s special tokens (no padding)."""
    return keep_mask(ids, special_ids(tokenizer))


def chat_ids(lm: LoadedModel, messages: Sequence[dict[str, str]]) -> list[int]:
    """The ids of ``messages`` (role, content) in ``lm``'s chat template, ready for the reply."""
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"chat: the tokenizer of {lm.name} has no chat template")
    out = tok.apply_chat_template(list(messages), add_generation_prompt=True)
    return list(out) if isinstance(out, list) else list(out["input_ids"])


def text_ids(lm: LoadedModel, text: str, *, max_tokens: int | None = None, new_tokens: int = 0,
             chat: bool = False, what: str = "text", truncate: bool = False) -> torch.Tensor:
    """[1, T] ids of one text on ``lm``'s device: BOS first when the tokenizer has one (as
    harvested), or the chat template with ``chat``. Refused when it is empty or, with
    ``new_tokens`` to generate, longer than ``max_tokens`` or the model's context (cut to fit
    instead with ``truncate``)."""
    if not text.strip():
        raise InputError(f"the {what} is empty")
    tok = lm.tokenizer
    if chat:
        ids = chat_ids(lm, [{"role": "user", "content": text}])
    else:
        ids = tok(text, add_special_tokens=False).input_ids
        if resolve_prepend_bos(tok, "auto"):
            ids = [tok.bos_token_id, *ids]
    limits = [n for n in (max_tokens, lm.max_context) if n is not None]
    limit = min(limits) if limits else None
    if truncate and limit is not None:
        ids = ids[:limit - new_tokens]
    if limit is not None and len(ids) + new_tokens > limit:
        if new_tokens:
            raise InputError(f"the {what} is {len(ids):,} tokens long; with {new_tokens} new tokens it exceeds "
                             f"{lm.name}'s context of {limit:,}")
        raise InputError(f"the {what} is {len(ids):,} tokens long; at most {limit:,} fit in one context")
    return torch.tensor([ids], device=lm.device)


def after_tokens(contexts: Iterable[Context], n_tokens: int) -> Iterator[Context]:
    """The contexts after those that hold a text's first ``n_tokens`` tokens."""
    skipped = 0
    for ctx in contexts:
        if skipped < n_tokens:
            skipped += len(ctx.ids)
            continue
        yield ctx


def context_batch(contexts: list[Context], special: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, T], keep [B, T])`` of packed contexts: padding and special tokens not kept."""
    ids = torch.from_numpy(np.stack([c.ids for c in contexts]).astype(np.int64))
    return ids, keep_mask(ids, special, torch.tensor([c.n_valid for c in contexts]))


def text_contexts(lm: LoadedModel, text: str, context: int, *, text_field: str = "text",
                  skip_tokens: int = 0) -> Iterator[Context]:
    """Packed contexts of a text source, as harvested (BOS first when the tokenizer has one),
    after its first ``skip_tokens`` tokens."""
    from dictlens.data.text import iter_documents

    contexts = pack_contexts(iter_documents(text, text_field), lm.tokenizer, context,
                             prepend_bos=resolve_prepend_bos(lm.tokenizer, "auto"))
    return after_tokens(contexts, skip_tokens)


def text_batches(lm: LoadedModel, text: str, *, tokens: int, context: int = 128, batch_size: int = 8,
                 text_field: str = "text", skip_tokens: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(ids, keep)`` batches of a text source's packed contexts with at least ``tokens`` kept
    positions in all, after its first ``skip_tokens`` tokens (e.g. the part an SAE was trained on)."""
    special = special_ids(lm.tokenizer)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    rows: list[Context] = []
    kept = 0
    for ctx in text_contexts(lm, text, context, text_field=text_field, skip_tokens=skip_tokens):
        rows.append(ctx)
        if len(rows) == batch_size:
            out.append(context_batch(rows, special))
            kept += int(out[-1][1].sum())
            rows = []
            if kept >= tokens:
                break
    if not out:
        raise InputError(f"{text!r} holds fewer than {batch_size} contexts of {context} tokens"
                         + (f" after the first {skip_tokens:,} tokens" if skip_tokens else ""))
    return out
