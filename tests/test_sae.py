"""The SAE module: configs, every activation, constraints, save/load with the scale folded in."""

from __future__ import annotations

import pytest
import torch

from dictlens import SAE, SAEConfig
from dictlens.errors import CheckpointError, ConfigError, InputError
from dictlens.sae import activations

ACTS = activations.NAMES


def _cfg(act: str, **kw) -> SAEConfig:
    kw.setdefault("select_dtype", "float32")  # exact comparisons below; bf16 selection is tested apart
    return SAEConfig(d_in=12, n_features=40, activation=act, k=5 if activations.get(act).uses_k else None, **kw)


def test_contradictory_configs_are_named():
    with pytest.raises(ConfigError, match="k: applies to topk, batchtopk, groupmax only, not relu"):
        SAEConfig(d_in=8, activation="relu", k=8)
    with pytest.raises(ConfigError, match="k: expected at most n_features = 16, found 32"):
        SAEConfig(d_in=8, n_features=16, k=32)
    with pytest.raises(ConfigError, match="activation: expected topk / batchtopk"):
        SAEConfig(d_in=8, activation="toppk")
    with pytest.raises(ConfigError, match="matryoshka: expected increasing sizes up to 40"):
        SAEConfig(d_in=8, n_features=40, matryoshka=[20, 10])


@pytest.mark.parametrize("act", ACTS)
def test_save_load_round_trip_with_folded_scale(act, tmp_path):
    sae = SAE(_cfg(act), seed=1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        sae.normalize_decoder()
        sae.input_scale.fill_(3.7)
        if "threshold" in sae.activation.owned_keys:
            sae.threshold.fill_(0.2)
    sae.eval()
    x = torch.randn(64, 12) * 5
    before, codes_before = sae(x), sae.encode(x)
    sae.save(tmp_path / "s")
    loaded = SAE.load(tmp_path / "s").eval()
    assert float(loaded.input_scale) == 1.0
    torch.testing.assert_close(loaded(x), before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded.encode(x), codes_before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), loaded(x), rtol=1e-4, atol=1e-4)
    if sae.cfg.decoder_norm == "unit":
        torch.testing.assert_close(loaded.decoder_norms(), torch.ones(40))


def test_damaged_checkpoints_are_named(tmp_path):
    SAE(_cfg("topk")).save(tmp_path / "s")
    weights = tmp_path / "s" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="sae.safetensors is truncated or damaged"):
        SAE.load(tmp_path / "s")
    SAE(_cfg("jumprelu")).save(tmp_path / "j")
    (tmp_path / "s" / "sae.safetensors").write_bytes((tmp_path / "j" / "sae.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not match its config"):
        SAE.load(tmp_path / "s")
    with pytest.raises(InputError, match="config.json is missing"):
        SAE.load(tmp_path / "nothing")


def test_wrong_width_is_an_error():
    sae = SAE(_cfg("topk"))
    with pytest.raises(InputError, match=r"expected \[batch, 12\], found \[3, 7\]"):
        sae(torch.randn(3, 7))
    with pytest.raises(InputError, match=r"SAE codes: expected \[batch, 40\]"):
        sae.decode(torch.randn(3, 12))


def test_topk_has_exactly_k_and_batchtopk_k_on_average():
    x = torch.randn(50, 12)
    topk = SAE(_cfg("topk"))
    with torch.no_grad():
        topk.b_enc.fill_(100.0)  # every pre-activation positive: exactly k survive the ReLU
    f = topk.encode(x)
    assert ((f > 0).sum(1) == 5).all()
    pre = (x - topk.b_dec) @ topk.W_enc.detach().T + topk.b_enc.detach()
    chosen = (f > 0)
    # the chosen ones are the k largest: each beats every one left out of its row
    assert bool((pre.masked_fill(~chosen, float("inf")).min(1).values
                 > pre.masked_fill(chosen, float("-inf")).max(1).values).all())
    btk = SAE(_cfg("batchtopk")).train()
    codes = btk.encode_codes(x)
    assert codes.pattern.nnz <= 5 * 50 and float(btk.threshold) > 0


def test_unit_decoder_constraint():
    sae = SAE(_cfg("topk"))
    x = torch.randn(32, 12)
    (sae.encode_codes(x).x_hat - x).pow(2).sum().backward()
    scale = float(sae.W_dec.grad.abs().max())
    sae.project_decoder_grad()
    assert float((sae.W_dec.grad * sae.W_dec.detach()).sum(1).abs().max()) < 1e-6 * scale
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.decoder_norms(), torch.ones(40))


def test_jumprelu_threshold_gets_the_straight_through_gradient():
    sae = SAE(SAEConfig(d_in=1, n_features=1, activation="jumprelu", jumprelu_threshold=1.0,
                        jumprelu_bandwidth=0.5, pre_bias=False))
    with torch.no_grad():
        sae.W_enc_.fill_(1.0)
        sae.W_dec.fill_(1.0)
    x = torch.tensor([[1.1], [0.9], [3.0]])  # within ε/2 above, within ε/2 below, far above
    codes = sae.encode_codes(x)
    sae.activation.l0_surrogate(codes).backward()
    # dL0/dθ = −(1/ε)·#{|z − θ| < ε/2} ; d/d log θ = θ · that
    assert float(sae.log_threshold.grad) == pytest.approx(-(1 / 0.5) * 2 * 1.0)
    assert codes.vals.tolist() == pytest.approx([1.1, 0.0, 3.0])


def test_bfloat16_selection_agrees_with_float32():
    """bf16 only ranks features; the chosen sets nearly coincide and values stay exact."""
    torch.manual_seed(0)
    cfg = dict(d_in=64, n_features=512, activation="topk", k=16)
    exact, fast = SAE(SAEConfig(**cfg, select_dtype="float32")), SAE(SAEConfig(**cfg, select_dtype="bfloat16"))
    x = torch.randn(256, 64)
    with torch.no_grad():
        a, b = exact.encode_codes(x), fast.encode_codes(x)
    same = (a.pattern.cols.view(256, 16)[:, :, None] == b.pattern.cols.view(256, 16)[:, None, :]).any(2)
    assert float(same.float().mean()) > 0.95
    err_a, err_b = float((x - a.x_hat).pow(2).sum()), float((x - b.x_hat).pow(2).sum())
    assert abs(err_a - err_b) / err_a < 0.01
    # values of the pairs both chose are identical: computed in float32 either way
    pa = dict(zip(zip(a.pattern.rows.tolist(), a.pattern.cols.tolist(), strict=True), a.pre.tolist(), strict=True))
    for r, c, v in zip(b.pattern.rows.tolist(), b.pattern.cols.tolist(), b.pre.tolist(), strict=True):
        if (r, c) in pa:
            assert v == pytest.approx(pa[(r, c)], rel=1e-6, abs=1e-6)


def test_groupmax_activates_the_largest_of_every_group():
    """Group-max, the activation added through the registry alone: k groups of F/k features."""
    sae = SAE(SAEConfig(d_in=12, n_features=40, activation="groupmax", k=4, select_dtype="float32"))
    with torch.no_grad():
        sae.b_enc.add_(torch.linspace(-1, 1, 40))
    x = torch.randn(3000, 12)  # more rows than one selection chunk
    codes = sae.encode_codes(x)
    pre = (x - sae.b_dec) @ sae.W_enc.detach().T + sae.b_enc.detach()
    expected = pre.view(3000, 4, 10).argmax(2) + torch.arange(0, 40, 10)
    assert torch.equal(codes.pattern.cols.view(3000, 4), expected.sort(1).values)
    torch.testing.assert_close(codes.vals, pre.gather(1, expected.sort(1).values).flatten().relu())
    assert sae.cfg.kind.default_dead == "boost" and sae.cfg.uses_k
    with pytest.raises(ConfigError, match="n_features: expected a multiple of k = 3 for groupmax"):
        SAEConfig(d_in=12, n_features=40, activation="groupmax", k=3)


def test_each_activation_owns_its_checkpoint_keys():
    shared = {"W_dec", "W_enc_", "b_enc", "b_dec", "input_scale"}
    for act in ACTS:
        sae = SAE(_cfg(act))
        assert set(sae.state_dict()) == shared | set(sae.activation.owned_keys), act


def test_a_checkpoint_from_before_the_registry_still_loads(tmp_path):
    """dictlens 0.1 saved BatchTopK's threshold buffer for every SAE."""
    from safetensors.torch import load_file, save_file

    sae = SAE(_cfg("relu"), seed=3)
    sae.save(tmp_path / "old")
    state = load_file(tmp_path / "old" / "sae.safetensors")
    save_file({**state, "threshold": torch.tensor(-1.0)}, tmp_path / "old" / "sae.safetensors")
    x = torch.randn(8, 12)
    torch.testing.assert_close(SAE.load(tmp_path / "old")(x), sae.eval()(x))
