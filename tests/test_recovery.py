"""Recovery metrics against known features."""

from __future__ import annotations

import pytest
import torch

from dictlens.errors import InputError
from dictlens.eval.recovery import mcc, mmcs, recovery
from dictlens.eval.synthetic import sparse_features


def test_perfect_permuted_and_scaled_dictionary_scores_one():
    data = sparse_features(d=16, n_features=24, n=500, seed=0)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    learned = data.features[perm] * 3.0
    r = recovery(data.features, learned, data.codes, data.codes[:, perm])
    assert r.mmcs == pytest.approx(1.0) and r.mcc == pytest.approx(1.0)
    assert r.precision == 1.0 and r.recall == 1.0 and r.f1 == 1.0


def test_duplicates_fool_mmcs_but_not_mcc():
    data = sparse_features(d=16, n_features=8, n=10, seed=0)
    half = data.features[:4]
    learned = torch.cat([half, half])  # every other true feature missing, the rest twice
    assert mmcs(data.features[:4], learned) == pytest.approx(1.0)
    assert mcc(data.features, learned) < 0.8  # four true features matched to duplicates of others


def test_random_dictionary_scores_low_and_codes_count():
    data = sparse_features(d=64, n_features=32, n=400, seed=0)
    g = torch.Generator().manual_seed(2)
    learned = torch.randn(32, 64, generator=g)
    r = recovery(data.features, learned, data.codes, torch.ones(400, 32))
    assert r.mmcs < 0.5 and r.mcc < 0.3
    assert r.recall == 1.0 and r.precision == pytest.approx(float((data.codes > 0).float().mean()), rel=1e-6)
    with pytest.raises(InputError, match="same d"):
        mmcs(data.features, torch.randn(5, 3))


def test_default_training_recovers_the_true_features_at_the_true_width():
    """A shortened Sharkey setting (d = 64, G = 128): the defaults must find the features."""
    from dictlens import ArraySource, SAEConfig, TrainConfig
    from dictlens.train import train

    data = sparse_features(d=64, n_features=128, n=40_000, mean_active=5, decay=0.99, seed=0)
    cfg = TrainConfig(tokens=300_000, batch_size=512, plots=False)
    assert cfg.learning_rate(SAEConfig(d_in=64, n_features=128, k=5)) == 1e-2  # the capped rule
    sae = train(SAEConfig(activation="topk", k=5, n_features=128), cfg, ArraySource(data.x), progress=False)
    assert recovery(data.features, sae.W_dec).mcc > 0.95


def test_synth_command_prints_every_method(capsys):
    from dictlens.cli import main

    assert main(["synth", "--d", "32", "--features", "48", "--samples", "6000", "--width", "48",
                 "--tokens", "60000", "--sklearn-iters", "1"]) == 0
    out = capsys.readouterr().out
    for method in ("random", "PCA", "sklearn", "dictlens topk", "dictlens relu", "dictlens batchtopk", "FISTA"):
        assert method in out
    topk = next(line for line in out.splitlines() if line.startswith("| dictlens topk"))
    random = next(line for line in out.splitlines() if line.startswith("| random"))
    assert float(topk.split("|")[4]) > float(random.split("|")[4]) + 0.3  # MCC column
