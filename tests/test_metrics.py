"""The metric definitions, pinned: docs/metrics.md states each formula."""

from __future__ import annotations

import pytest
import torch

from dictlens import SAE, SAEConfig, evaluate
from dictlens.errors import InputError
from dictlens.eval.metrics import ReconstructionStats
from dictlens.sae.kernels import Pattern


def _data(n=3000, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a large common offset, as in residual streams: variance must be taken about the mean
    return torch.randn(n, d, generator=g) * torch.linspace(0.5, 3, d) + 40.0


def _stats(x, x_hat, chunks=1):
    s = ReconstructionStats()
    for a, b in zip(x.chunk(chunks), x_hat.chunk(chunks), strict=True):
        s.update(a, b)
    return s.result()


def test_predicting_the_mean_explains_nothing_and_a_perfect_reconstruction_everything():
    x = _data()
    mean = _stats(x, x.mean(0).expand_as(x))
    assert mean.fvu == pytest.approx(1.0, abs=1e-9) and mean.explained_variance == pytest.approx(0.0, abs=1e-9)
    # about zero instead of the mean (the old bug), the mean predictor would look excellent:
    assert mean.nmse_uncentred < 0.01
    perfect = _stats(x, x.clone())
    assert perfect.fvu == 0 and perfect.explained_variance == 1 and perfect.cosine == pytest.approx(1.0)
    assert perfect.relative_reconstruction_bias == pytest.approx(1.0) and perfect.l2_ratio == pytest.approx(1.0)


def test_streamed_equals_one_batch():
    x = _data()
    x_hat = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    one, many = _stats(x, x_hat), _stats(x, x_hat, chunks=7)
    for key in ("fvu", "mse", "mse_per_token", "nmse_uncentred", "cosine", "l2_ratio", "relative_reconstruction_bias"):
        assert getattr(many, key) == pytest.approx(getattr(one, key), rel=1e-12), key
    # the legacy formula uses each batch's own mean, so it is the one that depends on batching
    assert many.explained_variance_legacy != pytest.approx(one.explained_variance_legacy, rel=1e-9)


def test_formulas_on_a_hand_example():
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    m = _stats(x, x_hat)
    # errors 1 and 1; mean (2, 2); Σ‖x − x̄‖² = (1 + 4) + (1 + 4) = 10
    assert m.fvu == pytest.approx(2 / 10) and m.mse == pytest.approx(2 / 4) and m.mse_per_token == pytest.approx(1)
    assert m.nmse_uncentred == pytest.approx(2 / 26)
    assert m.explained_variance_legacy == pytest.approx(1 - 1 / 5)  # each token: 1 − 1/5
    assert m.relative_reconstruction_bias == pytest.approx((2 + 18) / (1 + 21))
    assert m.l2_ratio == pytest.approx((2**0.5 / 1 + 18**0.5 / 5) / 2)


def test_shrinkage_is_measured():
    x = _data()
    m = _stats(x, 0.8 * x)
    assert m.relative_reconstruction_bias == pytest.approx(0.8) and m.l2_ratio == pytest.approx(0.8)
    assert m.cosine == pytest.approx(1.0)


def test_sparsity_counts_dead_and_dense():
    x = _data(n=100, d=4)
    idx = torch.zeros(100, 2, dtype=torch.long)
    idx[:, 0] = 0  # feature 0 on every token: dense
    idx[:, 1] = 1 + (torch.arange(100) % 5 == 0).long()  # feature 1 on 80 tokens, 2 on 20 (> 10%)
    idx[0, 1] = 3  # feature 3 once (in place of 2): alive, rare
    p = Pattern.from_indices(idx, 6)  # features 4 and 5 never: dead
    vals = torch.full((p.nnz,), -0.5)
    s = ReconstructionStats(6)
    s.update(x, x, p, vals)
    m = s.result()
    assert m.l0 == 2 and m.l1 == pytest.approx(1.0)
    assert m.dead_fraction == pytest.approx(2 / 6) and m.dense_fraction == pytest.approx(3 / 6)
    assert m.feature_density().tolist() == pytest.approx([1.0, 0.8, 0.19, 0.01, 0.0, 0.0])


def test_evaluate_an_sae_and_bad_input():
    sae = SAE(SAEConfig(d_in=12, activation="topk", k=3, n_features=24, select_dtype="float32"))
    x = _data(n=500)
    with torch.no_grad():
        sae.b_enc.fill_(50.0)  # every pre-activation positive: exactly k = 3 codes per token
        sae.b_enc[:4] = -1e4   # and four features that can never fire
    m = evaluate(sae, x.split(128))
    f = sae.encode(x)
    assert m.n_tokens == 500 and m.l0 == 3.0 and bool(((f > 0).sum(1) == 3).all())
    assert m.dead_fraction == pytest.approx(float(((f > 0).sum(0) == 0).float().mean())) and m.dead_fraction >= 4 / 24
    x_hat = sae.decode(f).detach().double()
    fvu = float((x.double() - x_hat).pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())
    assert m.fvu == pytest.approx(fvu, rel=1e-6)
    assert set(m.to_dict()) >= {"fvu", "explained_variance_legacy", "dense_fraction", "relative_reconstruction_bias"}
    with pytest.raises(InputError, match="expected \\[batch, 12\\], found \\[10, 5\\]"):
        evaluate(sae, [torch.zeros(10, 5)])
    with pytest.raises(InputError, match="empty"):
        evaluate(sae, [])
    bad = x[:10].clone()
    bad[3, 2] = float("nan")
    with pytest.raises(InputError, match="1 rows hold NaN"):
        evaluate(sae, [bad])
