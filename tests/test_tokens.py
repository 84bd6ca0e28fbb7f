"""One home for token ids: the special-token mask, texts → ids, (ids, keep) batches."""

from __future__ import annotations

import pytest
import torch

from dictlens.data.activations import TokenFilter
from dictlens.data.packing import special_token_ids
from dictlens.data.tokens import (
    after_tokens,
    context_batch,
    keep_mask,
    not_special,
    special_ids,
    text_batches,
    text_contexts,
    text_ids,
)
from dictlens.errors import InputError


def test_keep_mask_leaves_out_special_tokens_and_padding(llama):
    tok = llama.tokenizer
    special = special_ids(tok)
    assert set(special.tolist()) == special_token_ids(tok) and tok.bos_token_id in special.tolist()
    ids = torch.tensor([[tok.bos_token_id, 5, 6, tok.eos_token_id, 7], [8, 9, 10, 11, 12]])
    keep = keep_mask(ids, special, torch.tensor([5, 3]))
    assert keep.tolist() == [[False, True, True, False, True], [True, True, True, False, False]]
    assert not_special(tok, ids).tolist() == [[False, True, True, False, True], [True] * 5]


def test_text_ids_put_bos_first_and_refuse_what_does_not_fit(llama):
    ids = text_ids(llama, "hello world")
    assert ids.shape[0] == 1 and int(ids[0, 0]) == llama.tokenizer.bos_token_id
    assert ids[0, 1:].tolist() == llama.tokenizer("hello world", add_special_tokens=False).input_ids
    with pytest.raises(InputError, match="the prompt is empty"):
        text_ids(llama, "  ", what="prompt")
    with pytest.raises(InputError, match="at most 8 fit in one context"):
        text_ids(llama, "word " * 20, max_tokens=8)
    with pytest.raises(InputError, match="with 10 new tokens it exceeds"):
        text_ids(llama, "word " * (llama.max_context - 5), new_tokens=10)


def test_batches_keep_exactly_what_harvest_keeps(llama, corpus):
    """The (ids, keep) batches of splicing and analysis mask as the harvest's filter does."""
    contexts = list(text_contexts(llama, str(corpus), 32))
    ids, keep = context_batch(contexts[:4], special_ids(llama.tokenizer))
    harvest = TokenFilter(special_token_ids(llama.tokenizer)).valid_mask(ids, torch.tensor([c.n_valid for c in
                                                                                           contexts[:4]]))
    assert torch.equal(keep, harvest) and not bool(keep[:, 0].any())  # BOS is never kept
    later = list(after_tokens(iter(contexts), 64))
    assert [c.ids.tolist() for c in later] == [c.ids.tolist() for c in contexts[2:]]
    batches = text_batches(llama, str(corpus), tokens=40, context=32, batch_size=2, skip_tokens=64)
    assert torch.equal(batches[0][0], context_batch(contexts[2:4], special_ids(llama.tokenizer))[0])
