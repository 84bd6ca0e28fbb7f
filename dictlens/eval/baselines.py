"""Baselines beside the SAEs on synthetic data: what a learned dictionary must beat.

* random: unit Gaussian directions (what chance looks like for MMCS / MCC);
* PCA: the top principal directions (at most d of them);
* sklearn: ``MiniBatchDictionaryLearning`` (online dictionary learning, Mairal et al.),
  codes by OMP with the true mean number of active features, or by lasso;
* FISTA: sparse codes for a fixed dictionary (an SAE's decoder) found by optimisation
  instead of the encoder: the gap between the two is the SAE's amortisation gap.
"""

from __future__ import annotations

from typing import Any

import torch

from dictlens.errors import ConfigError


def random_dictionary(n: int, d: int, seed: int = 0) -> torch.Tensor:
    # offset: the synthetic generators draw their true features from the plain seed
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(1_000_003 + seed))
    return w / w.norm(dim=1, keepdim=True)


def pca_dictionary(x: torch.Tensor, n: int) -> torch.Tensor:
    """The top min(n, d) principal directions of ``x`` [N, d]."""
    xc = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    return vh[: min(n, x.shape[1])].float()


def _sklearn() -> Any:
    try:
        import sklearn.decomposition
    except ImportError as e:  # pragma: no cover - the 'baselines' extra
        raise ConfigError("the sklearn baseline needs scikit-learn: pip install 'dictlens[baselines]'") from e
    return sklearn.decomposition


def sklearn_dictionary(x: torch.Tensor, n: int, *, alpha: float = 0.1, max_iter: int = 10, batch_size: int = 256,
                       seed: int = 0) -> torch.Tensor:
    """A dictionary [n, d] learned by scikit-learn's MiniBatchDictionaryLearning."""
    model = _sklearn().MiniBatchDictionaryLearning(n_components=n, alpha=alpha, max_iter=max_iter,
                                                   batch_size=batch_size, random_state=seed)
    model.fit(x.double().numpy())
    return torch.from_numpy(model.components_).float()


def sklearn_codes(x: torch.Tensor, dictionary: torch.Tensor, *, codes: str = "omp", n_nonzero: int = 5,
                  alpha: float = 0.1) -> torch.Tensor:
    """Codes [N, n] of ``x`` on a fixed dictionary: OMP with ``n_nonzero`` atoms, or (non-negative) lasso."""
    algo = {"omp": "omp", "lasso": "lasso_lars"}.get(codes)
    if algo is None:
        raise ConfigError(f"codes: expected omp or lasso, found {codes!r}")
    import warnings

    with warnings.catch_warnings():
        # OMP stops early (and says so) when a learned dictionary has near-parallel atoms: expected here
        warnings.filterwarnings("ignore", message="Orthogonal matching pursuit ended prematurely")
        out = _sklearn().sparse_encode(x.double().numpy(), dictionary.double().numpy(), algorithm=algo,
                                       n_nonzero_coefs=n_nonzero, alpha=alpha, positive=codes == "lasso")
    return torch.from_numpy(out).float()


@torch.no_grad()
def fista_codes(x: torch.Tensor, dictionary: torch.Tensor, *, l1: float = 0.05, iters: int = 500,
                tol: float = 1e-5, bias: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_{f ≥ 0} ½‖x − b − f·W‖² + l1·‖f‖₁ for a fixed dictionary W [F, d] (FISTA), stopped
    after ``iters`` steps or once a step changes the codes by less than ``tol`` (relative)."""
    W = dictionary.float()
    target = x.float() - (bias.float() if bias is not None else 0.0)
    step = 1.0 / float(torch.linalg.matrix_norm(W.double(), ord=2) ** 2)
    f = torch.zeros(len(x), len(W))
    y, t = f.clone(), 1.0
    # grad = (y·W − x)·Wᵀ: through the Gram matrix WWᵀ when that is the cheaper product (F < 2d)
    use_gram = len(W) < 2 * W.shape[1]
    gram = W @ W.T if use_gram else W
    xw = target @ W.T if use_gram else target
    for i in range(iters):
        grad = torch.addmm(xw, y, gram, alpha=1.0, beta=-1.0) if use_gram else (y @ W - target) @ W.T
        f_next = y.sub_(grad, alpha=step).sub_(step * l1).clamp_min_(0)   # y's buffer is free now
        if i % 10 == 9 and float((f_next - f).norm()) <= tol * float(f_next.norm()):
            return f_next
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = f.sub_(f_next).mul_(-(t - 1) / t_next).add_(f_next)            # f_next + c·(f_next − f)
        f, t = f_next, t_next
    return f
