"""Training: it really reconstructs, resumes exactly, and stops clearly on bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import dictlens.train.trainer as trainer_mod
from dictlens import SAE, ArraySource, SAEConfig, SAEEstimator, TrainConfig, evaluate
from dictlens.errors import ActivationError, CheckpointError, CheckpointMismatch, ConfigError, InputError
from dictlens.eval.synthetic import sparse_features
from dictlens.train import train

from .conftest import interrupted


@pytest.fixture(scope="module")
def data():
    return sparse_features(d=32, n_features=64, n=24_000, mean_active=3, decay=0.97, seed=0)


def _split(x):
    return ArraySource(x[:20_000]), ArraySource(x[20_000:])


def test_topk_sae_recovers_and_reconstructs(data, tmp_path):
    tr, ho = _split(data.x)
    sae = train(SAEConfig(activation="topk", k=4, n_features=128), TrainConfig(tokens=240_000, batch_size=512,
                lr=3e-3, log_every=20), tr, tmp_path / "run", progress=False)
    m = evaluate(sae, ho.batches(1000, shuffle=False))
    assert m.fvu < 0.08 and m.l0 <= 4
    best_cos = (data.features @ sae.feature_directions().detach().T).max(dim=1).values
    assert float(best_cos.mean()) > 0.9  # the true features are found
    assert (tmp_path / "run" / "sae.safetensors").is_file() and (tmp_path / "run" / "curves.png").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"mse", "boosted", "fvu", "l0", "dead_fraction", "turnover", "lr", "tokens_per_s"} <= set(log[-1])
    assert log[-1]["fvu"] < log[0]["fvu"]
    loaded = SAE.load(tmp_path / "run")
    sae.cfg.select_dtype = loaded.cfg.select_dtype = "float32"  # compare exactly, not bf16 rankings
    x = ho.data[:100]
    torch.testing.assert_close(loaded(x), sae(x).detach(), rtol=1e-4, atol=1e-4)


ACTIVATION_SETUPS = [
    ("batchtopk", {"k": 4}), ("relu", {}), ("jumprelu", {}), ("gated", {}), ("topk", {"k": 4, "matryoshka": [16, 64]}),
    ("groupmax", {"k": 8}),
]


@pytest.mark.parametrize(("act", "extra"), ACTIVATION_SETUPS)
def test_every_activation_learns(data, act, extra):
    from dictlens.sae import activations

    assert {a for a, _ in ACTIVATION_SETUPS} == set(activations.NAMES)  # a new kind gets a row here
    tr, ho = _split(data.x)
    sae = train(SAEConfig(activation=act, n_features=128, **extra),
                TrainConfig(tokens=60_000, batch_size=512, lr=3e-3, plots=False), tr, progress=False)
    m = evaluate(sae, ho.batches(1000, shuffle=False))
    assert m.fvu < 0.6, (act, m)


@pytest.mark.parametrize("opt", [{"optimizer": "adamw", "weight_decay": 0.01}, {"optimizer": "signsgd", "lr": 1e-3},
                                 {"optimizer": "adam", "schedule_free": True},
                                 {"optimizer": "adam", "schedule": "cosine", "clip_grad": 1.0},
                                 {"optimizer": "adam", "schedule": "plateau", "log_every": 2}])
def test_optimisers_and_schedules_train(data, opt):
    tr, ho = _split(data.x)
    cfg = TrainConfig(**{"tokens": 60_000, "batch_size": 512, "lr": 3e-3, "plots": False, **opt})
    sae = train(SAEConfig(activation="topk", k=4, n_features=128), cfg, tr, progress=False)
    assert evaluate(sae, ho.batches(1000, shuffle=False)).fvu < 0.5


@pytest.mark.parametrize("setup", [
    (SAEConfig(activation="topk", k=4, n_features=128), {"dead_tokens": 2048}),
    (SAEConfig(activation="topk", k=4, n_features=128), {"dead": "auxk", "dead_tokens": 512, "schedule_free": False}),
    (SAEConfig(activation="relu", n_features=128), {"resample_every": 7, "dead_tokens": 1024}),
    (SAEConfig(activation="topk", k=4, n_features=128), {"schedule_free": True, "optimizer": "signsgd"}),
    (SAEConfig(activation="groupmax", k=4, n_features=128), {}),
])
def test_interrupted_and_resumed_equals_uninterrupted(data, tmp_path, monkeypatch, setup):
    sae_cfg, extra = setup
    cfg = TrainConfig(**{"tokens": 30 * 256, "batch_size": 256, "lr": 3e-3, "log_every": 5, "plots": False,
                         "checkpoint_every": 2560, **extra})
    src = ArraySource(data.x[:3000])  # several epochs
    whole = train(sae_cfg, cfg, src, tmp_path / "whole", progress=False)

    interrupted(monkeypatch, lambda: train(sae_cfg, cfg, src, tmp_path / "part", progress=False))
    with pytest.raises(CheckpointError, match="already holds a training checkpoint"):
        train(sae_cfg, cfg, src, tmp_path / "part", progress=False)
    resumed = train(sae_cfg, cfg, src, tmp_path / "part", progress=False, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    lines = (tmp_path / "part" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(5, 31, 5))


def test_a_checkpoint_older_than_a_setting_resumes_as_trained_with_its_default(data, tmp_path):
    """(A checkpoint written before --backward-dtype existed names no backward_dtype: it was float32.)"""
    from dictlens.train.checkpoint import load_checkpoint, save_checkpoint

    sae_cfg = SAEConfig(activation="topk", k=4, n_features=64)
    cfg = TrainConfig(tokens=2048, batch_size=256, plots=False, checkpoint_every=1024)
    train(sae_cfg, cfg, data.x[:2048], tmp_path / "r", progress=False)
    path = tmp_path / "r" / "checkpoint.safetensors"
    ck = load_checkpoint(path)
    del ck["train_config"]["backward_dtype"]
    save_checkpoint(path, ck)
    more = TrainConfig(tokens=4096, batch_size=256, plots=False, checkpoint_every=1024)
    assert train(sae_cfg, more, data.x[:4096], tmp_path / "r", progress=False, resume=True) is not None
    with pytest.raises(CheckpointError, match="backward_dtype"):   # but a real change is still refused
        train(sae_cfg, TrainConfig(tokens=8192, batch_size=256, plots=False, backward_dtype="bfloat16"),
              data.x[:4096], tmp_path / "r", progress=False, resume=True)


def test_nan_batch_stops_with_step_and_checkpoint_or_is_skipped(data, tmp_path):
    x = data.x[:4096].clone()
    x[3000, 5] = float("nan")
    cfg = dict(tokens=4096, batch_size=512, plots=False)
    with pytest.raises(ActivationError, match=r"step \d+: the batch holds NaN or Inf in 1 rows; checkpoint saved"):
        train(SAEConfig(activation="topk", k=4, n_features=64), TrainConfig(**cfg), x, tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "checkpoint.safetensors").is_file()
    train(SAEConfig(activation="topk", k=4, n_features=64), TrainConfig(**cfg, skip_nonfinite=True), x,
                tmp_path / "s", progress=False)
    meta = json.loads((tmp_path / "s" / "config.json").read_text())
    assert meta["train"]["state"]["skipped_nonfinite"] >= 1 and meta["train"]["state"]["step"] == 8


def test_bad_inputs_are_named(data, tmp_path):
    with pytest.raises(InputError, match="d_in: the SAE expects width 16, the activations have width 32"):
        train(SAEConfig(d_in=16), TrainConfig(tokens=512, batch_size=256), data.x[:1000], progress=False)
    with pytest.raises(InputError, match="fewer rows \\(100\\) than one batch \\(256\\)"):
        train(SAEConfig(k=4, n_features=64), TrainConfig(tokens=512, batch_size=256), data.x[:100], progress=False)
    with pytest.raises(ConfigError, match="sparsity: expected l0 only with the jumprelu"):
        train(SAEConfig(activation="relu"), TrainConfig(sparsity="l0"), data.x[:1000], progress=False)
    train(SAEConfig(k=4, n_features=64), TrainConfig(tokens=512, batch_size=256, plots=False), data.x[:1000],
          tmp_path / "r", progress=False)
    with pytest.raises(CheckpointMismatch,
                       match=r"was trained with other settings .*'optimizer': \('adam', 'signsgd'\)"):
        train(SAEConfig(k=4, n_features=64), TrainConfig(tokens=1024, batch_size=256, optimizer="signsgd"),
              data.x[:1000], tmp_path / "r", progress=False, resume=True)
    with pytest.raises(CheckpointMismatch, match="is from a different SAE"):
        train(SAEConfig(activation="relu", n_features=64), TrainConfig(tokens=1024, batch_size=256), data.x[:1000],
              tmp_path / "r", progress=False, resume=True)


def test_sklearn_style_estimator(data):
    X = data.x[:8000].numpy()
    est = SAEEstimator(activation="topk", k=4, n_features=96, tokens=80_000, batch_size=512, lr=3e-3)
    codes = est.fit_transform(X)
    assert codes.shape == (8000, 96) and ((codes > 0).sum(1) <= 4).all()
    X_hat = est.inverse_transform(codes)
    fvu = ((X - X_hat) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    assert fvu < 0.3 and est.components_.shape == (96, 32)
    np.testing.assert_allclose(np.linalg.norm(est.components_, axis=1), 1, rtol=1e-5)
    with pytest.raises(ConfigError, match="unknown parameter 'tokns' \\(did you mean 'tokens'\\?\\)"):
        SAEEstimator(tokns=5)


@pytest.mark.parametrize("terms", [
    {"sparsity": "tanh"}, {"sparsity": "smooth_l0"}, {"sparsity": "hoyer"},
    {"sparsity": "l1", "dead_penalty_coeff": 0.1, "diversity_coeff": 1.0, "sparsity_warmup_steps": 10},
])
def test_every_penalty_is_logged_and_trains(data, terms, tmp_path):
    tr, ho = _split(data.x)
    cfg = TrainConfig(tokens=30_000, batch_size=512, lr=3e-3, log_every=5, plots=False, dead_tokens=1024, **terms)
    sae = train(SAEConfig(activation="relu", n_features=128, decoder_norm="free"), cfg, tr, tmp_path / "r",
                progress=False)
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    name = f"sparsity_{terms['sparsity']}"
    assert all(np.isfinite(r[name]) and r[name] > 0 for r in log)
    for extra in ("dead_penalty", "diversity"):
        if f"{extra}_coeff" in terms:
            assert extra in log[-1]
    assert evaluate(sae, ho.batches(1000, shuffle=False)).fvu < 1.0


def test_jumprelu_pre_activation_loss(data):
    tr, _ = _split(data.x)
    cfg = TrainConfig(tokens=10_000, batch_size=512, lr=3e-3, plots=False, pre_act_coeff=0.1)
    sae = train(SAEConfig(activation="jumprelu", n_features=64), cfg, tr, progress=False)
    plain = train(SAEConfig(activation="jumprelu", n_features=64), dataclasses.replace(cfg, pre_act_coeff=0.0),
                  tr, progress=False)
    assert torch.isfinite(sae.log_threshold).all()
    # its gradient lowers θ (and raises z) wherever z < θ: with it, the thresholds end lower and
    # fewer features are silent on the training data
    assert float(sae.log_threshold.detach().mean()) < float(plain.log_threshold.detach().mean())
    from dictlens.sae.activations.jumprelu import pre_activation_loss

    x = torch.as_tensor(tr.data[:512])
    sae.train()
    loss = pre_activation_loss(sae, x * sae.input_scale)
    loss.backward()
    assert float(loss.detach()) > 0 and float(sae.log_threshold.grad.sum()) > 0  # descent lowers log θ
    with pytest.raises(ConfigError, match="pre_act_coeff: expected 0 unless the activation is jumprelu"):
        train(SAEConfig(activation="relu", n_features=64), cfg, tr, progress=False)


def test_tensorboard_receives_the_logged_metrics(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(tokens=4096, batch_size=512, log_every=2, plots=False, tensorboard=str(tmp_path / "tb"))
    train(SAEConfig(activation="topk", k=4, n_features=64), cfg, data.x[:4096], progress=False)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/fvu", "train/mse", "train/l0", "train/lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/fvu")] == [2, 4, 6, 8]


def test_boost_revives_dead_features_and_none_does_not(data):
    def dead_after(dead_method):
        cfg = TrainConfig(tokens=40 * 512, batch_size=512, lr=3e-3, plots=False, dead=dead_method,
                          dead_tokens=512, boost=1.0, log_every=1)
        t = trainer_mod.Trainer(SAEConfig(activation="topk", k=4, n_features=128), cfg,
                                ArraySource(data.x[:20_000]), progress=False)
        t.start()
        with torch.no_grad():
            t.sae.b_enc[:16] = -20.0  # far below any top-4 pre-activation: these never fire
        logs = []
        for x in ArraySource(data.x[:20_000]).batches(512, shuffle=True, seed=0):
            if t.state.step >= cfg.steps:
                break
            logs.append(t.step(x))
        assert t.state.step == cfg.steps and all(r is not None for r in logs)
        return int(t.dead.dead[:16].sum()), logs

    still_dead, logs = dead_after("boost")
    assert still_dead == 0 and max(r["boosted"] for r in logs) >= 16
    assert dead_after("none")[0] == 16


def test_auxk_dense_and_sparse_paths_agree():
    """With k_aux ≥ the dead count both paths use every dead feature: same loss, same gradients."""
    from dictlens.train.losses import auxk

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, activation="topk", k=4, n_features=64, select_dtype="float32"))
    x = torch.randn(200, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 17, 40, 41, 63]] = True
    results = []
    for sparse in (False, True):
        sae.zero_grad(set_to_none=True)
        codes = sae.encode_codes(x, dead if sparse else None, 8)
        assert (codes.aux is not None) == sparse
        loss = auxk(sae, codes, x, dead, 8)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}))
    (l_dense, g_dense), (l_sparse, g_sparse) = results
    torch.testing.assert_close(l_dense, l_sparse, rtol=1e-5, atol=1e-6)
    assert g_dense.keys() == g_sparse.keys()
    for name in g_dense:
        torch.testing.assert_close(g_dense[name], g_sparse[name], rtol=1e-4, atol=1e-5, msg=name)


def test_default_resampling_happens_in_the_first_half_only(data):
    cfg = TrainConfig(tokens=80 * 256, batch_size=256, plots=False)
    t = trainer_mod.Trainer(SAEConfig(activation="relu", n_features=64), cfg, ArraySource(data.x[:2000]),
                            progress=False)
    due = []
    for step in range(cfg.steps):
        t.state.step = step
        if t._resample_due():
            due.append(step + 1)
    assert due == [10, 20, 30, 40]


def test_a_trained_or_loaded_batchtopk_sae_codes_each_token_alone(tmp_path):
    """After training (and after loading) BatchTopK uses its learned threshold: a token's codes
    do not depend on its batch-mates, and evaluating does not move the threshold. In training
    mode one huge-norm token in the batch would take the whole batch's budget."""
    from dictlens import ArraySource, SAEConfig, TrainConfig
    from dictlens.sae.model import SAE
    from dictlens.train import train

    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    sae = train(SAEConfig(activation="batchtopk", k=4, n_features=64), TrainConfig(tokens=40_000, batch_size=512,
                plots=False), ArraySource(x), tmp_path / "run", progress=False)
    loaded = SAE.load(tmp_path / "run")
    for model in (sae, loaded):
        assert not model.training
        threshold = float(model.threshold)
        batch = torch.cat([x[:8], 100 * x[8:9]])          # one attention-sink-sized token
        with torch.no_grad():
            alone, together = model.encode(x[:8]), model.encode(batch)[:8]
        assert torch.equal(alone != 0, together != 0) and torch.allclose(alone, together, atol=1e-5)
        assert float((alone != 0).sum(1).float().mean()) > 1
        assert float(model.threshold) == threshold


def test_batchtopk_inference_threshold_gives_k_on_average():
    """The threshold is calibrated at the end of training: held-out L0 ≈ k, not the running
    mean's leftover from the first steps."""
    from dictlens.train import train

    data = sparse_features(d=32, n_features=64, n=20_000, seed=0)
    sae = train(SAEConfig(activation="batchtopk", k=6, n_features=128),
                TrainConfig(tokens=60_000, batch_size=1024, plots=False), ArraySource(data.x[:16_000]),
                progress=False)
    m = evaluate(sae, [data.x[16_000:]])
    assert 5.0 < m.l0 < 7.0, m.l0


def test_resample_rewrites_exactly_the_dead_rows_and_their_optimiser_state():
    """Dead features point at badly reconstructed inputs (decoder unit rows along x − b_dec,
    encoder rows 0.2 × the mean alive encoder norm, bias 0); their Adam moments are zeroed;
    nothing of a live feature changes."""
    from dictlens.train.dead import resample

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, activation="relu", n_features=32, select_dtype="float32"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    (sae.encode_codes(x).x_hat - x).pow(2).sum().backward()
    opt.step()
    sae.normalize_decoder()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[2, 9, 30]] = True
    before = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    state_before = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}
    alive_enc = float(sae.W_enc.detach()[~dead].norm(dim=1).mean())
    x_hat = sae.encode_codes(x).x_hat.detach()
    assert resample(sae, opt, dead, x, x_hat, torch.Generator().manual_seed(0)) == 3
    centred = x - before["b_dec"]
    directions = centred / centred.norm(dim=1, keepdim=True)
    for f in (2, 9, 30):
        cos = directions @ sae.W_dec[f].detach()
        assert float(cos.max()) > 0.99                                     # along one input's x − b_dec
        torch.testing.assert_close(sae.W_dec[f].norm(), torch.tensor(1.0))
        assert float(sae.W_enc[f].norm()) == pytest.approx(0.2 * alive_enc, rel=1e-4)
        assert float(sae.b_enc[f]) == 0.0
    keep = ~dead
    for name in ("W_dec", "W_enc_", "b_enc"):
        assert torch.equal(sae.state_dict()[name][keep], before[name][keep]), name
    assert torch.equal(sae.b_dec, before["b_dec"])
    for p, s in opt.state.items():
        if p.shape[0] != 32:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            assert bool((s[key][dead] == 0).all()), key
            assert torch.equal(s[key][keep], state_before[id(p)][key][keep]), key
