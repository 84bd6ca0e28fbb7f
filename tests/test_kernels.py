"""The sparse kernels agree with the dense reference, forward and every gradient, on the
compiled kernels (dictlens/sae/native.c) and on eager PyTorch alike."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dictlens.sae import native
from dictlens.sae.kernels import (
    Pattern,
    reference_decode,
    reference_encode,
    sparse_decode,
    sparse_encode,
    topk_select,
)


@pytest.fixture(autouse=True, params=["compiled", "eager"])
def backend(request):
    """Every test here twice: on the compiled kernels (built here: tests/test_native.py) and eager."""
    if request.param == "compiled":
        assert native.library() is not None, native.status()
    with native.disabled() if request.param == "eager" else contextlib.nullcontext():
        yield request.param


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run(fn_enc, fn_dec, x, W_enc, b_enc, W_dec, p, g):
    leaves = [t.detach().clone().requires_grad_() for t in (x, W_enc, b_enc, W_dec)]
    vals = fn_enc(leaves[0], leaves[1], leaves[2], p).relu()
    out = fn_dec(vals, leaves[3], p)
    (out * g).sum().backward()
    return out.detach(), vals.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("seed", range(6))
def test_topk_pattern_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, D, F = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 70), (3, 50), (8, 300)))
    K = int(torch.randint(1, min(F, 40) + 1, (1,), generator=g))
    x, W_enc, W_dec = torch.randn(B, D, generator=g), torch.randn(F, D, generator=g), torch.randn(F, D, generator=g)
    b_enc, grad = torch.randn(F, generator=g), torch.randn(B, D, generator=g)
    idx = (x @ W_enc.T + b_enc).topk(K, dim=1).indices
    p = Pattern.from_indices(idx, F)
    fast = _run(sparse_encode, sparse_decode, x, W_enc, b_enc, W_dec, p, grad)
    ref = _run(reference_encode, reference_decode, x, W_enc, b_enc, W_dec, p, grad)
    assert rel_err(fast[0], ref[0]) <= 1e-5 and rel_err(fast[1], ref[1]) <= 1e-5
    for a, b in zip(fast[2], ref[2], strict=True):
        assert rel_err(a, b) <= 1e-5


def test_mask_pattern_with_empty_rows_matches_reference():
    g = torch.Generator().manual_seed(0)
    B, D, F = 33, 17, 90
    x, W_enc, W_dec = torch.randn(B, D, generator=g), torch.randn(F, D, generator=g), torch.randn(F, D, generator=g)
    b_enc, grad = torch.randn(F, generator=g) - 3, torch.randn(B, D, generator=g)
    mask = (x @ W_enc.T + b_enc) > 2.0
    mask[5] = False  # a row with no active feature
    p = Pattern.from_mask(mask)
    assert p.nnz == int(mask.sum()) and torch.equal(p.rows, mask.nonzero()[:, 0])
    fast = _run(sparse_encode, sparse_decode, x, W_enc, b_enc, W_dec, p, grad)
    ref = _run(reference_encode, reference_decode, x, W_enc, b_enc, W_dec, p, grad)
    assert torch.equal(fast[0][5], torch.zeros(D))
    for a, b in zip([fast[0], fast[1], *fast[2]], [ref[0], ref[1], *ref[2]], strict=True):
        assert rel_err(a, b) <= 1e-5


def test_no_active_feature_at_all():
    p = Pattern.from_mask(torch.zeros(4, 10, dtype=torch.bool))
    W = torch.randn(10, 3, requires_grad=True)
    out = sparse_decode(torch.zeros(0, requires_grad=True), W, p)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(4, 3)) and torch.equal(W.grad, torch.zeros(10, 3))


def test_backward_saves_no_dense_activations():
    """Only the inputs and weights are saved: nothing of size B×F or B×K×D.

    The sizes are chosen so that B·K·D (8,192) exceeds both F·D (6,144) and B·D: a saved
    gather of the active decoder rows would break the bound."""
    B, D, F, K = 64, 16, 384, 8
    assert max(F * D, B * D) < B * K * D
    x, W = torch.randn(B, D), torch.randn(F, D, requires_grad=True)
    p = Pattern.from_indices((x @ W.T).topk(K, dim=1).indices, F)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        vals = sparse_encode(x, W, torch.zeros(F, requires_grad=True), p)
        sparse_decode(vals, W, p)
    assert max(saved) <= max(F * D, B * D) and B * F not in saved and B * K * D not in saved


@pytest.mark.parametrize(("n", "chunk", "F"), [(50, 7, 200), (2500, 1024, 200), (300, 128, 1024)],
                         ids=["ragged-chunks", "chunks", "grouped-prefilter"])
def test_topk_select_matches_a_full_sort(n, chunk, F):
    """Chunked selection (more rows than one chunk, a ragged last chunk) = the k largest of the
    whole dense product, and AuxK's picks = the k_aux largest among the dead columns, on the
    first aux_rows rows only."""
    g = torch.Generator().manual_seed(n)
    D, K, K_AUX = 24, 6, 5
    x, W, b = torch.randn(n, D, generator=g), torch.randn(F, D, generator=g), torch.randn(F, generator=g)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=g)[:40]] = True
    aux_rows = n - 3
    idx, aux, vals, aux_vals = topk_select(x, W, b, K, dtype=torch.float32, dead=dead, k_aux=K_AUX, aux_rows=aux_rows,
                                 chunk=chunk, values=True)
    pre = x @ W.T + b
    assert torch.equal(idx.sort(1).values, pre.topk(K, dim=1).indices.sort(1).values)
    assert vals is not None
    torch.testing.assert_close(vals, pre.gather(1, idx))   # the ranked values, for the shards' merge
    assert aux is not None and aux.shape == (aux_rows, K_AUX)
    dead_cols = dead.nonzero()[:, 0]
    expected = dead_cols[pre[:aux_rows, dead_cols].topk(K_AUX, dim=1).indices]
    assert torch.equal(aux.sort(1).values, expected.sort(1).values)
    assert bool(dead[aux].all())
    assert aux_vals is not None
    torch.testing.assert_close(aux_vals, pre.gather(1, aux))


def test_dense_path_matches_reference():
    """The production dense path (used for dense patterns) agrees with the reference too."""
    from dictlens.sae.kernels import dense_decode, dense_encode

    g = torch.Generator().manual_seed(1)
    B, D, F = 20, 9, 30
    x, W_enc, W_dec = torch.randn(B, D, generator=g), torch.randn(F, D, generator=g), torch.randn(F, D, generator=g)
    b_enc, grad = torch.randn(F, generator=g), torch.randn(B, D, generator=g)
    p = Pattern.from_mask((x @ W_enc.T + b_enc) > -0.5)  # most pairs active
    dense = _run(dense_encode, dense_decode, x, W_enc, b_enc, W_dec, p, grad)
    ref = _run(reference_encode, reference_decode, x, W_enc, b_enc, W_dec, p, grad)
    for a, b in zip([dense[0], dense[1], *dense[2]], [ref[0], ref[1], *ref[2]], strict=True):
        assert rel_err(a, b) <= 1e-5


def test_the_grouped_top_k_is_exact_on_ties_and_on_rows_whose_top_k_shares_a_slot():
    """The pre-filter's claim: every row's k largest values, even when they all sit in one slot
    (one column of the [G, F/G] view) or tie."""
    from dictlens.sae.kernels import grouped_topk

    g = torch.Generator().manual_seed(7)
    groups, width, k = 16, 64, 8
    block = torch.randn(40, groups * width, generator=g)
    block[0, torch.arange(groups) * width + 5] = 10 + torch.arange(groups, dtype=torch.float)  # one slot
    block[1] = block[1].round()                                                     # many ties
    block = block.bfloat16()
    vals, idx = grouped_topk(block, k, groups)
    expected = block.topk(k, dim=1).values
    assert torch.equal(vals.sort(1).values, expected.sort(1).values)
    assert torch.equal(block.gather(1, idx), vals) and all(len(set(r.tolist())) == k for r in idx)


def test_the_centre_gets_the_gradient_of_the_subtraction_without_the_per_row_one():
    """sparse_encode(x − c, ..., center=c), the inputs formed without gradient, gives c (b_dec) and
    the weights the gradients autograd gives through the subtraction."""
    g = torch.Generator().manual_seed(3)
    B, D, F = 30, 12, 40
    x, c0 = torch.randn(B, D, generator=g), torch.randn(D, generator=g)
    W0, b0 = torch.randn(F, D, generator=g), torch.randn(F, generator=g)
    p = Pattern.from_indices(torch.randn(B, F, generator=g).topk(5, dim=1).indices, F)
    up = torch.randn(p.nnz, generator=g)
    grads = []
    for trick in (False, True):
        c, W, b = (t.clone().requires_grad_() for t in (c0, W0, b0))
        out = sparse_encode((x - c).detach(), W, b, p, c) if trick else sparse_encode(x - c, W, b, p)
        (out * up).sum().backward()
        grads.append((out.detach(), c.grad, W.grad, b.grad))
    for a, b_ in zip(*grads, strict=True):
        torch.testing.assert_close(a, b_)
