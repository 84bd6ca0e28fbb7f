"""Tokenize documents and pack them into fixed-length contexts.

Documents are joined into one token stream with the tokenizer's end-of-sequence token
between them; the stream is cut into contexts of ``context`` tokens. When the model
expects a beginning-of-sequence token, every context starts with it (so each context
looks like the start of a sequence, as in training). The last, partial context is padded;
pad positions are marked invalid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
from transformers.utils import logging as hf_logging

from dictlens.errors import ConfigError


@dataclass
class Context:
    """One packed context: ``ids`` [context] and how many leading positions are real text."""

    ids: np.ndarray
    n_valid: int


def resolve_prepend_bos(tokenizer: Any, prepend_bos: str | bool) -> bool:
    """'auto' means: prepend BOS when the tokenizer has one."""
    if isinstance(prepend_bos, bool):
        return prepend_bos
    if prepend_bos == "auto":
        return tokenizer.bos_token_id is not None
    if prepend_bos in ("yes", "true"):
        return True
    if prepend_bos in ("no", "false"):
        return False
    raise ConfigError(f"prepend_bos: expected auto, yes or no, found {prepend_bos!r}")


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What token ids mean: the vocabulary size and a sha256 of the (token, id) table with the
    special tokens. Two tokenizers with the same fingerprint turn text into the same ids."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(special_token_ids(tokenizer))
    digest = hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode()).hexdigest()
    return {"vocab_size": len(tokenizer), "sha256": digest}


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any, model: str, cache: Any) -> None:
    """InputError unless ``tokenizer`` gives token ids the same meaning as the cache's (caches
    written before dictlens recorded the fingerprint have nothing to compare and pass)."""
    from dictlens.errors import InputError

    saved = manifest.get("tokenizer")
    if not saved:
        return
    now = tokenizer_fingerprint(tokenizer)
    if now != saved:
        raise InputError(f"{model}'s tokenizer ({now['vocab_size']:,} tokens, sha256 {now['sha256'][:12]}) is not "
                         f"the one {cache} was harvested with ({saved['vocab_size']:,} tokens, sha256 "
                         f"{saved['sha256'][:12]}): the cache's token ids would name other tokens")


def special_token_ids(tokenizer: Any) -> set[int]:
    """BOS, EOS, padding and every other special token id of ``tokenizer``."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.add(value)
    ids.discard(getattr(tokenizer, "unk_token_id", None))  # unknown text is still text
    return ids


def _token_batches(docs: Iterable[str], tokenizer: Any, batch_docs: int) -> Iterator[list[int]]:
    eos = tokenizer.eos_token_id
    it = iter(docs)
    verbosity = hf_logging.get_verbosity()
    while batch := list(islice(it, batch_docs)):
        # Long documents exceed model_max_length by design: we pack, never feed them whole.
        hf_logging.set_verbosity_error()
        try:
            encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        finally:
            hf_logging.set_verbosity(verbosity)
        for ids in encoded:
            yield list(ids) + ([eos] if eos is not None else [])


def pack_contexts(docs: Iterable[str], tokenizer: Any, context: int, *,
                  prepend_bos: bool, batch_docs: int = 64) -> Iterator[Context]:
    """Pack the token stream of ``docs`` into contexts of length ``context``."""
    if context < 2:
        raise ConfigError(f"context: expected at least 2 tokens, found {context}")
    bos = tokenizer.bos_token_id
    body = context - 1 if prepend_bos else context
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    buf: list[int] = []
    for ids in _token_batches(docs, tokenizer, batch_docs):
        buf.extend(ids)
        while len(buf) >= body:
            chunk, buf = buf[:body], buf[body:]
            yield Context(np.asarray(([bos] if prepend_bos else []) + chunk, dtype=np.int64), context)
    if buf:
        n_valid = len(buf) + (1 if prepend_bos else 0)
        ids = ([bos] if prepend_bos else []) + buf + [pad] * (body - len(buf))
        yield Context(np.asarray(ids, dtype=np.int64), n_valid)
