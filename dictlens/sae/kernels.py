"""The hot path: sparse encode and decode with custom autograd, and their dense reference.

An SAE step must compute the dense encoder product once (2·B·D·F FLOPs) to find which
features are active. Everything after that touches only the active (row, feature)
pairs, held as a :class:`Pattern` in CSR form:

* ``sparse_encode``: the exact pre-activations of the active pairs,
  ``vals[n] = x[b]·W_enc[f] + b_enc[f]`` (a sampled dense-dense product, SDDMM);
* ``sparse_decode``: ``x̂[b] = Σ_n vals[n]·W_dec[f]`` (a sparse-dense product).

Their backward passes are again SDDMMs and sparse-dense products (``S @ W`` and
``Sᵀ @ X``), so no step materialises a dense B×F tensor for the backward pass or a
B×K×D gather. Only the pattern and the inputs are saved. The dense reference functions
at the bottom compute the same things the obvious way; tests check they agree.

Weights are stored feature-major: ``W_enc`` and ``W_dec`` are both [F, D], so feature f's
encoder and decoder directions are the contiguous rows ``W_enc[f]`` and ``W_dec[f]``.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd import Function

from dictlens.sae import native

# torch warns that CSR support is "beta" and that invariant checks are off: we build the
# patterns ourselves (sorted, in-range indices), so both are noise here.
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")


class Pattern:
    """Which features are active in each row: CSR ``crow`` [B+1] and sorted ``cols`` [nnz]."""

    def __init__(self, crow: torch.Tensor, cols: torch.Tensor, n_rows: int, n_features: int):
        self.crow, self.cols = crow, cols
        self.n_rows, self.n_features = n_rows, n_features
        self._rows: torch.Tensor | None = None
        self._t: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_indices(cls, idx_BK: torch.Tensor, n_features: int, ascending: bool = False) -> Pattern:
        """K active features per row (e.g. from top-k); sorted here unless ``ascending`` says
        each row's already are."""
        n_rows, k = idx_BK.shape
        cols = (idx_BK if ascending else idx_BK.sort(dim=1).values).reshape(-1)
        crow = torch.arange(0, n_rows * k + 1, k, device=idx_BK.device)
        return cls(crow, cols, n_rows, n_features)

    @classmethod
    def from_mask(cls, mask_BF: torch.Tensor) -> Pattern:
        """Active where ``mask_BF`` is true (any number per row)."""
        rows, cols = mask_BF.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=mask_BF.shape[0])
        crow = torch.zeros(mask_BF.shape[0] + 1, dtype=torch.long, device=mask_BF.device)
        crow[1:] = counts.cumsum(0)
        p = cls(crow, cols, mask_BF.shape[0], mask_BF.shape[1])
        p._rows = rows
        return p

    @classmethod
    def from_pairs(cls, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_features: int) -> Pattern:
        """The pairs ``(rows[n], cols[n])``, sorted by row and by column within a row."""
        crow = torch.zeros(n_rows + 1, dtype=torch.long, device=cols.device)
        crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
        p = cls(crow, cols, n_rows, n_features)
        p._rows = rows
        return p

    def subset(self, keep: torch.Tensor) -> Pattern:
        """The pattern of the pairs where ``keep`` [nnz] is true (order preserved)."""
        return Pattern.from_pairs(self.rows[keep], self.cols[keep], self.n_rows, self.n_features)

    @property
    def nnz(self) -> int:
        return int(self.cols.numel())

    @property
    def rows(self) -> torch.Tensor:
        """Row index of every active pair [nnz]."""
        if self._rows is None:
            counts = self.crow[1:] - self.crow[:-1]
            self._rows = torch.repeat_interleave(torch.arange(self.n_rows, device=self.cols.device), counts)
        return self._rows

    def csr(self, vals: torch.Tensor) -> torch.Tensor:
        """The B×F sparse matrix with ``vals`` at the active pairs."""
        return torch.sparse_csr_tensor(self.crow, self.cols, vals, size=(self.n_rows, self.n_features),
                                       check_invariants=False)

    def _transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pattern by feature: (perm, crow_t, rows_t); a feature's pairs in row order."""
        if self._t is None:
            self._t = native.transpose(self.crow, self.cols, self.n_features)
        if self._t is None:
            perm = torch.argsort(self.cols, stable=True)
            counts = torch.bincount(self.cols, minlength=self.n_features)
            crow_t = torch.zeros(self.n_features + 1, dtype=torch.long, device=self.cols.device)
            crow_t[1:] = counts.cumsum(0)
            self._t = (perm, crow_t, self.rows[perm])
        return self._t

    def select(self, vals: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The active pairs of ``features`` [W]: (row, index into ``features``, value) each [n]."""
        pair, which = (self.cols[:, None] == features.to(self.cols.device)[None, :]).nonzero(as_tuple=True)
        return self.rows[pair], which, vals[pair]

    def scatter_features(self, vals: torch.Tensor) -> torch.Tensor:
        """Σ over rows of ``vals`` per feature [F]."""
        return torch.zeros(self.n_features, dtype=vals.dtype, device=vals.device).index_add_(0, self.cols, vals)


# Every product below runs on the compiled kernels of native.c where they can be used (CPU,
# float32, contiguous: one pass per row or feature, at B=4096, F=9216, K=32, D=576 about twice
# as fast as torch's), else on torch: ``embedding_bag`` for the sparse-dense products (a weighted
# bag sum of rows, 4-5x faster on CPU than torch's CSR matmul) and ``sampled_addmm`` for the
# sampled one.

def spmm(p: Pattern, vals: torch.Tensor, dense_FD: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[B, D] = S @ dense (+ bias [D] in every row), S the B×F matrix of ``vals`` on pattern ``p``."""
    if p.nnz == 0:
        out = dense_FD.new_zeros(p.n_rows, dense_FD.shape[1])
        return out if bias is None else out + bias
    done = native.spmm(p.crow, p.cols, vals, dense_FD, p.n_rows, bias=bias)
    if done is not None:
        return done[0]
    out = F.embedding_bag(p.cols, dense_FD, p.crow, per_sample_weights=vals, mode="sum", include_last_offset=True)
    return out if bias is None else out + bias


def spmm_t(p: Pattern, vals: torch.Tensor, dense_BD: torch.Tensor,
           sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[F, D] = Sᵀ @ dense; with ``sums`` also Σ over rows of ``vals`` per feature [F]. ``dense``
    may be bfloat16 (see :data:`BACKWARD_DTYPES`): its rows are widened exactly, the sums float32."""
    if p.nnz == 0:
        zero = vals.new_zeros(p.n_features)
        return vals.new_zeros(p.n_features, dense_BD.shape[1]), zero if sums else None
    perm, crow_t, rows_t = p._transpose()
    done = native.spmm(crow_t, rows_t, vals, dense_BD, p.n_features, perm=perm, sums=sums)
    if done is not None:
        return done
    dense_BD = dense_BD.to(vals.dtype)
    out = F.embedding_bag(rows_t, dense_BD, crow_t, per_sample_weights=vals[perm], mode="sum",
                          include_last_offset=True)
    return out, p.scatter_features(vals) if sums else None


def sddmm(p: Pattern, a_BD: torch.Tensor, b_FD: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[nnz]: a[b]·b[f] (+ bias[f]) for each active pair (b, f), without the dense B×F product."""
    if p.nnz == 0:
        return a_BD.new_zeros(0)
    done = native.sddmm(p.crow, p.cols, a_BD, b_FD, bias)
    if done is not None:
        return done
    ones = torch.ones(p.nnz, dtype=a_BD.dtype, device=a_BD.device)
    out: torch.Tensor = torch.sparse.sampled_addmm(p.csr(ones), a_BD, b_FD.T, beta=0.0).values()
    return out if bias is None else out + bias[p.cols]


def decode_backward(p: Pattern, vals: torch.Tensor, g_BD: torch.Tensor, W_FD: torch.Tensor,
                    need_gv: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The decoder's gradients: per pair g[b]·W[f] (if ``need_gv``) and Sᵀ @ g [F, D]; one sweep
    over the pairs by feature with the compiled kernels. ``g_BD`` may be bfloat16 (widened exactly)."""
    if p.nnz:
        perm, crow_t, rows_t = p._transpose()
        done = native.decode_backward(crow_t, rows_t, perm, vals, g_BD, W_FD, need_gv)
        if done is not None:
            return done
    g_BD = g_BD.to(W_FD.dtype)
    return sddmm(p, g_BD, W_FD) if need_gv else None, spmm_t(p, vals, g_BD)[0]


# What the backward products may read the rows they gather (the batch's, for the encoder's gradient;
# the reconstruction's gradient, for the decoder's) in: float32, or rounded once to bfloat16, which
# halves the memory traffic of the two products that read B·k scattered rows (on CPU they run at
# cache bandwidth). The products accumulate in float32 either way, and the forward pass (the
# active values, the reconstruction, the loss) is untouched.
BACKWARD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def project_rows_(W_FD: torch.Tensor, g_FD: torch.Tensor) -> None:
    """g[f] −= (g[f]·W[f]) W[f] in place: the gradient's component along each unit row removed."""
    if not native.project_rows(W_FD, g_FD):  # one pass over both on CPU
        g_FD.addcmul_(W_FD, torch.linalg.vecdot(g_FD, W_FD).unsqueeze(1), value=-1.0)


@torch.no_grad()
def normalize_rows_(W_FD: torch.Tensor) -> None:
    """W[f] /= max(‖W[f]‖, 1e-12) in place."""
    if not native.normalize_rows(W_FD):  # one pass on CPU
        W_FD.div_(W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))


class _SparseEncode(Function):
    @staticmethod
    def forward(ctx: Any, x_BD: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor, center: torch.Tensor | None,
                p: Pattern, rows_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x_BD, W_FD)
        ctx.p, ctx.rows_dtype = p, rows_dtype
        return sddmm(p, x_BD, W_FD, b_F)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        x_BD, W_FD = ctx.saved_tensors
        p: Pattern = ctx.p
        g = g.contiguous()
        need_b = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        gx = spmm(p, g, W_FD) if ctx.needs_input_grad[0] else None
        gW, gb = spmm_t(p, g, x_BD.to(ctx.rows_dtype), sums=need_b) if ctx.needs_input_grad[1] else (None, None)
        if need_b and gb is None:
            gb = p.scatter_features(g)
        # x = x_raw − center: −Σ_rows gx[b] = −(Σ_n g_n W[f_n]) = −(per-feature sums of g) · W, an F×D
        # product instead of the per-row B×k×D one
        gc = -(gb @ W_FD) if ctx.needs_input_grad[3] and gb is not None else None
        return gx, gW, gb if ctx.needs_input_grad[2] else None, gc, None, None


class _SparseDecode(Function):
    @staticmethod
    def forward(ctx: Any, vals: torch.Tensor, W_FD: torch.Tensor, p: Pattern,
                bias: torch.Tensor | None, rows_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(vals, W_FD)
        ctx.p, ctx.rows_dtype = p, rows_dtype
        return spmm(p, vals, W_FD, bias)

    @staticmethod
    def backward(ctx: Any, g_BD: torch.Tensor) -> tuple[Any, ...]:
        vals, W_FD = ctx.saved_tensors
        p: Pattern = ctx.p
        g_BD = g_BD.contiguous()
        gb = g_BD.sum(0) if ctx.needs_input_grad[3] else None
        if ctx.needs_input_grad[1]:
            gv, gW = decode_backward(p, vals, g_BD.to(ctx.rows_dtype), W_FD, ctx.needs_input_grad[0])
            return gv, gW, None, gb, None
        return sddmm(p, g_BD, W_FD) if ctx.needs_input_grad[0] else None, None, None, gb, None


def sparse_encode(x_BD: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor, p: Pattern,
                  center: torch.Tensor | None = None, backward_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact pre-activations [nnz] of the active pairs: ``x[b]·W[f] + b[f]``.

    ``center`` [D]: ``x_BD`` is some input minus ``center``, formed without gradient; ``center``
    gets the gradient it would through the subtraction (only its sum over rows is needed, so
    the per-row input gradient is never formed). ``backward_dtype``: what the encoder's gradient
    reads the rows of ``x_BD`` in (:data:`BACKWARD_DTYPES`)."""
    # torch leaves Function.apply unannotated (here and below)
    out: torch.Tensor = _SparseEncode.apply(x_BD, W_FD, b_F, center, p,  # type: ignore[no-untyped-call]
                                            backward_dtype)
    return out


def sparse_decode(vals: torch.Tensor, W_FD: torch.Tensor, p: Pattern, bias: torch.Tensor | None = None,
                  backward_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, D] = Σ over active pairs of ``vals · W[f]``, + ``bias`` [D] in every row if given (each
    row starts from it: no pass of its own). ``backward_dtype``: what the decoder's gradients read
    the rows of the incoming gradient in (:data:`BACKWARD_DTYPES`)."""
    out: torch.Tensor = _SparseDecode.apply(vals, W_FD, p, bias,  # type: ignore[no-untyped-call]
                                            backward_dtype)
    return out


class Picks(NamedTuple):
    """What :func:`topk_select` picked: each row's top-k features [B, k] in ascending order, the
    top dead features [B', k_aux] for AuxK (or None, in no order), and with ``values`` the ranked
    values of both (in the order of their features)."""

    idx: torch.Tensor
    aux: torch.Tensor | None
    top: torch.Tensor | None = None
    aux_top: torch.Tensor | None = None


# The exact pre-filter of the top-k on CPU where the compiled kernels cannot be built
# (native.topk_rows applies the same bound in one vectorised pass: 2.9 ms per 1,024-row chunk):
# columns in TOPK_GROUPS strided groups (column c in group c // (F/G)'s slot c mod F/G: slot j's
# group maxima are one vectorised max over G rows of the [n, G, F/G] view). Measured at
# F = 9,216, k = 32, 1,024 bf16 rows on 2 cores: 7.9 ms against 11.8 ms for torch.topk over all
# columns (bench/step.py); only where F/G >= 4k.
TOPK_GROUPS = 16


def topk_groups(n_features: int, k: int) -> int:
    """The group count :func:`grouped_topk` uses for ``n_features`` and ``k``; 0: plain top-k."""
    g = TOPK_GROUPS
    return g if n_features % g == 0 and n_features // g >= 4 * k else 0


def grouped_topk(block: torch.Tensor, k: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest values of ``block`` [n, F] and their columns, exactly (up to the
    order of ties), ranking k·G candidates instead of F.

    Column c = g·(F/G) + j sits in slot j of group g. Take each slot's maximum over the G groups
    and the k slots whose maxima are largest: every value of the row's top k lies in one of
    those slots (a value v outside them is at most its slot's maximum, which is at most the
    k-th largest slot maximum, and those k maxima are k distinct values of the row ≥ it), so
    the top k of the k chosen slots' G·k values is the row's top k."""
    n, f = block.shape
    width = f // groups
    b3 = block.view(n, groups, width)
    slots = b3.amax(1).topk(k, dim=1, sorted=False).indices                   # [n, k]
    cand = b3.gather(2, slots[:, None, :].expand(n, groups, k)).reshape(n, groups * k)
    vals, j = cand.topk(k, dim=1, sorted=False)
    return vals, (j // k) * width + slots.gather(1, j % k)


@torch.no_grad()
def topk_select(x_BD: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor, k: int, *, dtype: torch.dtype,
                dead: torch.Tensor | None = None, k_aux: int = 0, aux_rows: int = 0, chunk: int = 1024,
                values: bool = False) -> Picks:
    """Indices of the top-k pre-activations per row [B, k] (and of the top-``k_aux`` among
    ``dead`` features, for AuxK, in the first ``aux_rows`` rows or all when 0), from the
    dense encoder product in ``dtype``; with ``values``, also the ranked values of both.

    The product is formed ``chunk`` rows at a time and ranked while it is still in cache,
    so the B×F matrix never exists whole; nothing here is kept for the backward pass.
    """
    # The bias rides in the product as an extra input column of ones: a GEMM with
    # K = D + 1 is cheaper than addmm's copy of the bias into every output row.
    n, d = x_BD.shape
    Wd = torch.empty(W_FD.shape[0], d + 1, dtype=dtype, device=W_FD.device)
    Wd[:, :d] = W_FD.detach()
    Wd[:, d] = b_F.detach()
    xd = torch.empty(n, d + 1, dtype=dtype, device=x_BD.device)
    xd[:, :d] = x_BD.detach()
    xd[:, d] = 1
    pre = torch.empty(min(n, chunk), W_FD.shape[0], dtype=dtype, device=x_BD.device)
    idx = torch.empty(n, k, dtype=torch.long, device=x_BD.device)
    top = torch.empty(n, k, dtype=dtype, device=x_BD.device) if values else None
    dead_idx = dead.nonzero()[:, 0] if dead is not None and k_aux else None
    n_aux = min(n, aux_rows) if aux_rows > 0 else n
    aux = torch.empty(n_aux, k_aux, dtype=torch.long, device=x_BD.device) if dead_idx is not None else None
    aux_top = torch.empty(n_aux, k_aux, dtype=dtype, device=x_BD.device) if aux is not None and values else None
    cpu = x_BD.device.type == "cpu"
    compiled = cpu and native.usable()
    groups = topk_groups(W_FD.shape[0], k) if cpu and not compiled else 0
    v32 = torch.empty(min(n, chunk), k) if compiled and top is not None else None  # the compiled kernel's values
    ascending = True  # the compiled kernel's columns are; torch's are sorted at the end
    for s in range(0, n, chunk):
        rows = min(chunk, n - s)
        block = torch.mm(xd[s:s + rows], Wd.T, out=pre[:rows])  # one reused buffer
        i_out, t_out = idx[s:s + rows], top[s:s + rows] if top is not None else None
        if compiled and native.topk_rows(block, k, i_out, v32[:rows] if v32 is not None else None):
            if t_out is not None and v32 is not None:
                t_out.copy_(v32[:rows])  # exact: the values were bf16 or float32 to begin with
        elif groups:
            ascending = False
            v, i = grouped_topk(block, k, groups)
            i_out.copy_(i)
            if t_out is not None:
                t_out.copy_(v)
        elif t_out is not None:
            ascending = False
            torch.topk(block, k, dim=1, sorted=False, out=(t_out, i_out))
        else:
            ascending = False
            i_out.copy_(block.topk(k, dim=1, sorted=False).indices)
        if aux is not None and s < n_aux:
            block = block[:n_aux - s]
            assert dead_idx is not None
            # rank only the dead columns: usually a small share of F
            v, j = block.index_select(1, dead_idx).topk(k_aux, dim=1, sorted=False)
            aux[s:s + chunk] = dead_idx[j]
            if aux_top is not None:
                aux_top[s:s + chunk] = v
    if not ascending:
        idx, order = idx.sort(dim=1)
        top = top.gather(1, order) if top is not None else None
    return Picks(idx, aux, top, aux_top)


# ---- the dense path: what the SAE uses where most pairs are active ---------------------
# (early ReLU training, before the penalty has bitten): plain matmuls beat the sparse
# kernels there. Autograd differentiates them; they keep the dense B×F product.

def dense_encode(x_BD: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor, p: Pattern) -> torch.Tensor:
    """Same result as :func:`sparse_encode`, from the dense product (one fused addmm)."""
    return torch.addmm(b_F, x_BD, W_FD.T)[p.rows, p.cols]


def dense_decode(vals: torch.Tensor, W_FD: torch.Tensor, p: Pattern) -> torch.Tensor:
    """Same result as :func:`sparse_decode`, through a dense B×F code matrix."""
    return vals.new_zeros(p.n_rows, p.n_features).index_put((p.rows, p.cols), vals) @ W_FD


# ---- the obviously-correct reference, for tests only ---------------------------------
# Written for reading, not speed; tests check both paths above against these.

def reference_encode(x_BD: torch.Tensor, W_FD: torch.Tensor, b_F: torch.Tensor, p: Pattern) -> torch.Tensor:
    """One dot product per active pair."""
    pairs = zip(p.rows.tolist(), p.cols.tolist(), strict=True)
    return torch.stack([x_BD[b] @ W_FD[f] + b_F[f] for b, f in pairs]) if p.nnz else x_BD.new_zeros(0)


def reference_decode(vals: torch.Tensor, W_FD: torch.Tensor, p: Pattern) -> torch.Tensor:
    """Each row: the sum of its pairs' values times their decoder rows."""
    zero = W_FD.new_zeros(W_FD.shape[1])
    crow = p.crow.tolist()
    return torch.stack([sum((vals[n] * W_FD[p.cols[n]] for n in range(crow[b], crow[b + 1])), zero)
                        for b in range(p.n_rows)])
