"""Synthetic generators and toy models of superposition: the ground truth has the promised structure."""

from __future__ import annotations

import json

import pytest
import torch

from dictlens.errors import ConfigError
from dictlens.eval.synthetic import SyntheticConfig, firing_probabilities, generate, setting, sparse_features
from dictlens.eval.toy import ToyConfig, feature_dimensionality, train_toy_model


def test_firing_probabilities_have_the_requested_shape_and_mass():
    geo = firing_probabilities(SyntheticConfig(features=100, mean_active=5, decay=0.95))
    assert float(geo.sum()) == pytest.approx(5, rel=1e-5)
    assert torch.allclose(geo[1:] / geo[:-1], torch.full((99,), 0.95), rtol=1e-4)
    zipf = firing_probabilities(SyntheticConfig(features=100, mean_active=5, firing="zipf", zipf_exponent=1.0))
    assert float(zipf[0] / zipf[9]) == pytest.approx(10, rel=1e-4)
    # so much mass that the first features saturate at 1: the rest take up the difference
    full = firing_probabilities(SyntheticConfig(features=20, mean_active=15, decay=0.8))
    assert float(full.max()) == 1.0 and float(full.sum()) == pytest.approx(15, rel=1e-5)


def test_sharkey_setting_is_deterministic_and_has_five_active():
    a = sparse_features(d=32, n_features=64, n=20_000, seed=3)
    b = generate(SyntheticConfig(d=32, features=64, samples=20_000, seed=3))
    assert torch.equal(a.x, b.x) and torch.equal(a.codes, b.codes)
    assert a.mean_active == pytest.approx(5, rel=0.03)
    assert torch.allclose(a.x, a.codes @ a.features, atol=1e-5)
    assert torch.allclose(a.features.norm(dim=1), torch.ones(64))


def test_correlated_firing_keeps_marginals_and_correlates():
    cfg = SyntheticConfig(d=16, features=40, samples=60_000, mean_active=8, decay=1.0, correlation=0.8,
                          correlation_rank=2)
    data = generate(cfg)
    on = (data.codes > 0).float()
    assert torch.allclose(on.mean(0), torch.full((40,), 0.2), atol=0.015)   # every p_i = 8/40
    c = torch.corrcoef(on.T)
    off_diag = c[~torch.eye(40, dtype=torch.bool)]
    assert float(off_diag.abs().mean()) > 0.15     # independent firing would give ≈ 0.004
    independent = generate(SyntheticConfig(d=16, features=40, samples=60_000, mean_active=8, decay=1.0))
    c0 = torch.corrcoef((independent.codes > 0).float().T)
    assert float(c0[~torch.eye(40, dtype=torch.bool)].abs().mean()) < 0.02


def test_hierarchy_children_need_their_parent_and_exclude_each_other():
    cfg = SyntheticConfig(d=16, features=60, samples=30_000, parents=5, children=3, mean_active=6)
    data = generate(cfg)
    on = data.codes > 0
    from dictlens.eval.synthetic import _hierarchy

    groups = _hierarchy(cfg)
    assert len(groups) == 5 and all(len(k) == 3 for _, k in groups)
    for parent, kids in groups:
        assert not (on[:, kids].any(1) & ~on[:, parent]).any()     # never without the parent
        assert int(on[:, kids].sum(1).max()) <= 1                 # at most one child at a time
        assert int(on[:, kids].sum()) > 0
    with pytest.raises(ConfigError, match="parents"):
        SyntheticConfig(features=10, parents=3, children=4)


def test_noise_is_added_on_top():
    data = generate(SyntheticConfig(d=64, features=32, samples=5000, noise=0.1))
    residual = data.x - data.codes @ data.features
    assert float(residual.std()) == pytest.approx(0.1, rel=0.03)


def test_named_settings_and_typos():
    assert setting("zipf", d=8).firing == "zipf" and setting("zipf", d=8).d == 8
    assert setting("hierarchy", samples=10).parents == 64
    with pytest.raises(ConfigError, match="did you mean 'sharkey'"):
        setting("sharky")
    with pytest.raises(ConfigError, match="magnitude"):
        SyntheticConfig(magnitude="gaussian")


def test_feature_dimensionality_by_hand():
    assert torch.allclose(feature_dimensionality(torch.eye(3)), torch.ones(3))
    antipodal = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]])     # two features share a dimension
    assert torch.allclose(feature_dimensionality(antipodal), torch.tensor([0.5, 0.5, 1.0]))
    assert feature_dimensionality(torch.zeros(2, 2)).tolist() == [0.0, 0.0]


def test_toy_model_makes_a_pentagon_when_sparse_and_drops_features_when_dense():
    """Elhage et al.'s headline: 5 features in 2 dimensions. Sparse: all five, D_i = 2/5 each.
    Dense with decaying importance: only the two most important, one dimension each."""
    sparse = train_toy_model(ToyConfig(toy_features=5, toy_dims=2, sparsity=0.9, toy_steps=1500))
    assert torch.allclose(sparse.dimensionality(), torch.full((5,), 0.4), atol=0.02)
    data = sparse.data(2000)
    assert len(data.features) == 5 and torch.allclose(data.x, data.codes @ data.features, atol=1e-5)
    dense = train_toy_model(ToyConfig(toy_features=5, toy_dims=2, sparsity=0.0, importance_decay=0.7,
                                      toy_steps=4000))
    D = dense.dimensionality()
    assert torch.allclose(D[:2], torch.ones(2), atol=0.05) and float(dense.norms[2:].max()) < 0.5
    assert len(dense.data(100).features) == 2


def test_synth_command_on_every_generator_and_toy(tmp_path, capsys):
    from dictlens.cli import main

    small = ["--width", "24", "--tokens", "20000", "--sklearn-iters", "1", "--activation", "topk"]
    assert main(["synth", "--setting", "hierarchy", "--d", "16", "--features", "24", "--parents", "2",
                 "--children", "3", "--samples", "3000", "--correlation", "0.3", "--noise", "0.01", *small]) == 0
    out = capsys.readouterr().out
    assert "2 parents × 3 exclusive children" in out and "correlation 0.3" in out and "dictlens topk" in out
    assert main(["synth", "--setting", "toy", "--toy-features", "24", "--toy-dims", "8", "--toy-steps", "300",
                 "--sparsity", "0.9", "--samples", "3000", "--out", str(tmp_path), *small]) == 0
    out = capsys.readouterr().out
    assert "per-feature dimensionality" in out
    assert (tmp_path / "toy_model.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "synth.json").read_text())
    assert saved["config"]["setting"] == "toy" and {r["method"] for r in saved["rows"]} >= {"random", "dictlens topk"}
    assert main(["synth", "--setting", "toy", "--d", "5"]) == 2
    assert "--d describe the other generator" in capsys.readouterr().err
