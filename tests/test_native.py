"""The compiled CPU kernels (dictlens/sae/native.c): built here, exact where eager PyTorch is,
and dictlens still trains where they cannot be built."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dictlens.sae import native
from dictlens.sae.kernels import Pattern, decode_backward, sddmm, spmm, spmm_t


@pytest.fixture(autouse=True)
def built():
    """Every test here compares the compiled kernels with eager PyTorch: they must be built (the
    project's machines have gcc; without the library the comparisons would be eager to eager)."""
    assert native.library() is not None, native.status()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_the_library_is_built_with_the_machines_c_compiler():
    assert shutil.which("cc") or shutil.which("gcc")
    assert native.status().startswith("compiled kernels")
    with native.disabled():
        assert native.library() is None and native.status() == "eager PyTorch (disabled)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "F", "k", "groups"), [(64, 9216, 32, 0), (37, 1000, 7, 0), (20, 1000, 7, 3),
                                                        (9, 50, 50, 0), (9, 50, 1, 64), (33, 777, 16, 1)])
def test_topk_rows_finds_each_rows_k_largest(dtype, rows, F, k, groups):
    g = torch.Generator().manual_seed(rows + F + k)
    # a strided view into a wider buffer (the trainer ranks slices of its chunk buffer), with
    # negative values, infinities and ties (small integers) in it
    wide = torch.randn(rows, F + 5, generator=g).to(dtype)
    block = wide[:, 2:F + 2]
    block[0] = torch.randint(-3, 3, (F,), generator=g).to(dtype)
    block[1, : F // 2] = float("-inf")
    block[2, 5] = float("inf")
    idx, vals = torch.empty(rows, k, dtype=torch.long), torch.empty(rows, k)
    assert native.topk_rows(block, k, idx, vals, groups=groups)
    ref = block.float().topk(k, dim=1).values
    assert torch.equal(vals.sort(dim=1, descending=True).values, ref)
    assert torch.equal(block.gather(1, idx).float(), vals)
    assert all(len(set(r)) == k for r in idx.tolist())  # k distinct columns, ties or not
    assert int(idx[2].eq(5).sum()) == 1
    assert torch.equal(idx, idx.sort(dim=1).values)  # each row's columns ascending
    tied = sorted(range(F), key=lambda c: (float(block[0, c]), c), reverse=True)[:k]
    assert idx[0].tolist() == sorted(tied)  # ties at the k-th place: the highest columns


def test_topk_select_gives_ascending_columns_on_both_paths():
    from dictlens.sae.kernels import topk_select

    g = torch.Generator().manual_seed(5)
    x, W, b = torch.randn(300, 24, generator=g), torch.randn(1000, 24, generator=g), torch.randn(1000, generator=g)
    picks = topk_select(x, W, b, 9, dtype=torch.float32, chunk=128, values=True)
    with native.disabled():
        eager = topk_select(x, W, b, 9, dtype=torch.float32, chunk=128, values=True)
    assert torch.equal(picks.idx, picks.idx.sort(dim=1).values)
    assert torch.equal(picks.idx, eager.idx)
    assert picks.top is not None and eager.top is not None and torch.equal(picks.top, eager.top)
    assert torch.allclose(picks.top, torch.addmm(b, x, W.T).gather(1, picks.idx), rtol=1e-5, atol=1e-5)


def test_topk_rows_ranks_nan_first_like_torch():
    block = torch.randn(3, 300)
    block[1, 7] = float("nan")
    idx = torch.empty(3, 4, dtype=torch.long)
    assert native.topk_rows(block, 4, idx)
    assert 7 in idx[1].tolist() and 7 in block.topk(4, dim=1).indices[1].tolist()


def _pattern(g: torch.Generator, B: int, F: int, empty_rows: tuple[int, ...] = ()) -> Pattern:
    mask = torch.rand(B, F, generator=g) < 0.15
    for r in empty_rows:
        mask[r] = False
    mask[:, 0] = False  # a feature no row uses
    return Pattern.from_mask(mask)


@pytest.mark.parametrize("D", [37, 64])
def test_every_sparse_product_equals_eager_pytorch(D):
    g = torch.Generator().manual_seed(D)
    B, F = 70, 120
    p = _pattern(g, B, F, empty_rows=(3, 40))
    x, W, gy = torch.randn(B, D, generator=g), torch.randn(F, D, generator=g), torch.randn(B, D, generator=g)
    vals, bias = torch.randn(p.nnz, generator=g), torch.randn(F, generator=g)

    def all_products() -> list[torch.Tensor]:
        q = Pattern(p.crow, p.cols, p.n_rows, p.n_features)  # a fresh transpose on each backend
        gW_t, sums = spmm_t(q, vals, x, sums=True)
        gv, gW = decode_backward(q, vals, gy, W, need_gv=True)
        assert gv is not None and sums is not None
        return [sddmm(q, x, W), sddmm(q, x, W, bias), spmm(q, vals, W), gW_t, sums, gv, gW, *q._transpose()]

    fast = all_products()
    with native.disabled():
        ref = all_products()
    for a, b in zip(fast, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype == torch.long:
            assert torch.equal(a, b)  # the transposed pattern: the same stable order
        else:
            assert rel_err(a, b) <= 1e-6
    assert torch.equal(fast[2][3], torch.zeros(D)) and torch.equal(fast[6][0], torch.zeros(D))


@pytest.mark.parametrize("D", [37, 576])
def test_rows_renormalised_in_one_pass_equal_eager_pytorch(D):
    """(A zero row stays zero.)"""
    rows = torch.randn(50, D, generator=torch.Generator().manual_seed(D)) * 3
    rows[7] = 0
    fast = rows.clone()
    assert native.normalize_rows(fast)
    assert rel_err(fast, rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)) <= 1e-6
    assert torch.equal(fast[7], torch.zeros(D))


@pytest.mark.parametrize("D", [37, 64])
def test_the_backward_products_on_bfloat16_rows_equal_float32_ones_on_the_rounded_rows(D):
    """--backward-dtype bfloat16: the gathered rows are read as bfloat16 (widened exactly), everything
    else float32: the compiled kernels and eager PyTorch both equal the float32 products of the rows
    rounded once."""
    g = torch.Generator().manual_seed(D)
    B, F = 70, 120
    p = _pattern(g, B, F, empty_rows=(3,))
    x, W, gy = torch.randn(B, D, generator=g), torch.randn(F, D, generator=g), torch.randn(B, D, generator=g)
    vals = torch.randn(p.nnz, generator=g)
    xr, gr = x.bfloat16(), gy.bfloat16()
    ref_t, ref_sums = spmm_t(p, vals, xr.float(), sums=True)
    ref_gv, ref_gW = decode_backward(p, vals, gr.float(), W, need_gv=True)
    for ctx in (contextlib.nullcontext(), native.disabled()):
        with ctx:
            q = Pattern(p.crow, p.cols, p.n_rows, p.n_features)
            got_t, sums = spmm_t(q, vals, xr, sums=True)
            gv, gW = decode_backward(q, vals, gr, W, need_gv=True)
        assert got_t.dtype == gW.dtype == torch.float32 and sums is not None and gv is not None
        for a, b in ((got_t, ref_t), (sums, ref_sums), (gv, ref_gv), (gW, ref_gW)):
            assert rel_err(a, b) <= 1e-6
    assert rel_err(ref_t, spmm_t(p, vals, x)[0]) > 1e-4  # the rounding is real


def test_a_step_keeping_unit_rows_equals_projecting_stepping_and_renormalising():
    """ScheduleFreeAdam.keep_unit_rows (the decoder's constraint inside the step's pass), compiled and
    eager, against the three separate operations the trainer otherwise runs around the step."""
    from dictlens.sae.kernels import normalize_rows_, project_rows_
    from dictlens.train.optim import ScheduleFreeAdam

    def run(mode: str) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(2)
        W = torch.randn(40, 70, generator=g)
        W = torch.nn.Parameter(W / W.norm(dim=1, keepdim=True))
        opt = ScheduleFreeAdam([W], lr=1e-2)
        if mode != "separate":
            opt.keep_unit_rows(W)
        for _ in range(4):
            W.grad = torch.randn(W.shape, generator=g)
            if mode == "separate":
                project_rows_(W.detach(), W.grad)
            with native.disabled() if mode == "eager" else contextlib.nullcontext():
                opt.step()
            if mode == "separate":
                normalize_rows_(W.detach())
        return [W.detach().clone(), opt.state[W]["z"], opt.state[W]["exp_avg_sq"]]

    ref = run("separate")
    assert torch.allclose(ref[0].norm(dim=1), torch.ones(40), atol=1e-6)
    for mode in ("fused", "eager"):
        for a, b in zip(run(mode), ref, strict=True):
            assert rel_err(a, b) <= 1e-6, mode


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_compiled_schedule_free_step_rounds_like_the_eager_one(weight_decay):
    from dictlens.train.optim import ScheduleFreeAdam

    def run(compiled: bool) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(300, 70, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
        opt = ScheduleFreeAdam(ps, lr=3e-3, weight_decay=weight_decay)
        for _ in range(6):  # the first step averages with weight 1 (torch.lerp's other form)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            if compiled:
                opt.step()
            else:
                with native.disabled():
                    opt.step()
        return [t for p in ps for t in (p.detach(), opt.state[p]["z"], opt.state[p]["exp_avg_sq"])]

    for a, b in zip(run(True), run(False), strict=True):
        assert rel_err(a, b) <= 1e-6


def test_training_on_the_compiled_kernels_equals_training_on_eager_pytorch():
    from dictlens.data.store import ArraySource
    from dictlens.sae.config import SAEConfig
    from dictlens.train.config import TrainConfig
    from dictlens.train.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(2048, 48, generator=g) + 1.0).numpy()

    def run(backward_dtype: str = "float32") -> dict[str, torch.Tensor]:
        t = Trainer(SAEConfig(n_features=384, k=8, select_dtype="float32"),
                    TrainConfig(batch_size=256, tokens=2048, log_every=10**6, dead="auxk", dead_tokens=512,
                                backward_dtype=backward_dtype),
                    ArraySource(rows), progress=False)
        t.fit()
        return {k: v.detach().clone() for k, v in t.sae.state_dict().items()}

    fast, fast_bf16 = run(), run("bfloat16")
    with native.disabled():
        ref, ref_bf16 = run(), run("bfloat16")
    for k, v in ref.items():
        assert rel_err(fast[k], v) <= 1e-5, k
        assert rel_err(fast_bf16[k], ref_bf16[k]) <= 1e-5, k
    assert rel_err(fast_bf16["W_dec"], fast["W_dec"]) > 1e-5  # the bfloat16 rows changed the trajectory


def _child(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


STEP = ("import torch; from dictlens.sae import native; from dictlens.sae.kernels import Pattern, spmm; "
        "p = Pattern.from_indices(torch.tensor([[0, 2], [1, 2]]), 3); "
        "print(spmm(p, torch.ones(4), torch.eye(3)).tolist()); print(native.status())")


def test_without_a_compiler_dictlens_warns_once_and_runs_on_eager_pytorch(tmp_path):
    out = _child(STEP, CC=str(tmp_path / "no-such-cc"), DICTLENS_CACHE=str(tmp_path), DICTLENS_NATIVE="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]"
    assert out.stdout.splitlines()[1].startswith("eager PyTorch:")
    assert out.stderr.count("compiled CPU kernels unavailable") == 1
    off = _child(STEP, DICTLENS_NATIVE="0", DICTLENS_CACHE=str(tmp_path))
    assert off.returncode == 0 and "DICTLENS_NATIVE=0" in off.stdout.splitlines()[1]


def test_the_built_library_is_cached_and_reused(tmp_path):
    first = _child(STEP, DICTLENS_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    built = list((tmp_path / "native").glob("native-*.so"))
    assert len(built) == 1 and str(built[0]) in first.stdout
    stamp = built[0].stat().st_mtime_ns
    again = _child(STEP, DICTLENS_CACHE=str(tmp_path))
    assert again.returncode == 0 and built[0].stat().st_mtime_ns == stamp
    assert not [f for f in (tmp_path / "native").iterdir() if f.name.startswith(".native-")]  # no temp left


def test_the_decoder_gradient_projection_equals_eager_pytorch():
    from dictlens.sae.config import SAEConfig
    from dictlens.sae.model import SAE

    def projected() -> torch.Tensor:
        sae = SAE(SAEConfig(d_in=37, n_features=90), seed=3)
        sae.W_dec.grad = torch.randn(90, 37, generator=torch.Generator().manual_seed(11))
        sae.project_decoder_grad()
        assert sae.W_dec.grad is not None
        assert float((sae.W_dec.grad * sae.W_dec.detach()).sum(1).abs().max()) < 1e-5  # orthogonal to each row
        return sae.W_dec.grad

    fast = projected()
    with native.disabled():
        ref = projected()
    assert rel_err(fast, ref) <= 1e-6


def test_the_one_sum_finiteness_check_misses_nothing():
    from dictlens.train.trainer import all_finite

    x = torch.randn(64, 9)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[17, 3] = bad
        assert not all_finite(y)
    pair = x.clone()
    pair[0, 0], pair[1, 1] = float("inf"), float("-inf")  # their sum is NaN: still caught
    assert not all_finite(pair)
    huge = torch.full((64, 9), 3e38)  # finite values whose sum overflows: the full check says finite
    assert all_finite(huge)
