"""Transcoders in other libraries' layouts: SAELens's four transcoder classes, sparsify's transcoders
(``transcode``, ``skip_connection``) and Gemma Scope 2's (with the affine skip), each file written here
by hand in that library's layout and read back with the predictions of a reference forward written
from the library's published formulas; dictlens transcoders written in each layout read back the same."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dictlens.errors import FormatError
from dictlens.formats import read, write
from dictlens.sae import SAE, SAEConfig

D, D_OUT, F, K = 16, 24, 64, 4


def _tensors(seed=0, d_out=D_OUT, skip=False, jumprelu=False):
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D, F, generator=g) / 4, "W_dec": torch.randn(F, d_out, generator=g) / 3,
         "b_enc": torch.randn(F, generator=g) / 5, "b_dec": torch.randn(d_out, generator=g) / 5}
    if skip:
        t["W_skip"] = torch.randn(d_out, D, generator=g) / 6
    if jumprelu:
        t["threshold"] = torch.rand(F, generator=g) * 0.4 + 0.1
    return t


def _x(n=200, seed=1):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _predicts(tc, codes, y_hat, x):
    with tc.ranking("float32"):
        torch.testing.assert_close(tc.encode(x), codes, rtol=0, atol=1e-5)
        torch.testing.assert_close(tc(x), y_hat, rtol=0, atol=1e-5)


def saelens_transcoder(t, x, jumprelu):
    """SAELens's Transcoder / JumpReLUTranscoder (+ Skip): no b_dec on the input, x @ W_skipᵀ added."""
    pre = x @ t["W_enc"] + t["b_enc"]
    f = torch.relu(pre) * (pre > t["threshold"]) if jumprelu else torch.relu(pre)
    y = f @ t["W_dec"] + t["b_dec"]
    return f, y + x @ t["W_skip"].T if "W_skip" in t else y


def _write_saelens(path, arch, t):
    path.mkdir(parents=True)
    save_file(t, str(path / "sae_weights.safetensors"))
    meta = {"sae_lens_version": "6.54.12", "model_name": "gpt2-small", "hook_name": "blocks.3.mlp.hook_in",
            "hook_name_out": "blocks.3.hook_mlp_out", "context_size": 128}
    (path / "cfg.json").write_text(json.dumps({
        "d_in": D, "d_sae": F, "d_out": t["W_dec"].shape[1], "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "architecture": arch, "metadata": meta}))
    return path


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_transcoders_read_with_saelens_predictions_and_write_back(tmp_path, arch):
    jumprelu, skip = arch.startswith("jumprelu"), "skip" in arch
    t = _tensors(skip=skip, jumprelu=jumprelu)
    tc = read(_write_saelens(tmp_path / arch, arch, t))
    x = _x()
    codes, y_hat = saelens_transcoder(t, x, jumprelu)
    assert (codes > 0).any(dim=1).all()
    _predicts(tc, codes, y_hat, x)
    assert tc.cfg.transcoder and tc.cfg.skip == skip and (tc.d_in, tc.d_out) == (D, D_OUT)
    p = tc.provenance
    assert (p.model, p.hook_in, p.hook_out) == ("openai-community/gpt2", "mlp_in.3", "mlp_out.3")
    assert p.notes["saelens"]["hook_name_out"] == "blocks.3.hook_mlp_out"
    files = write(tc, tmp_path / "out", "saelens")
    cfg = json.loads(files[0].read_text())
    assert cfg["architecture"] == arch and cfg["d_out"] == D_OUT and not cfg["apply_b_dec_to_input"]
    assert cfg["metadata"]["hook_name_out"] == "blocks.3.hook_mlp_out"
    back = read(tmp_path / "out")
    _predicts(back, codes, y_hat, x)
    assert (back.provenance.hook_in, back.provenance.hook_out) == ("mlp_in.3", "mlp_out.3")


def test_what_saelens_transcoders_cannot_hold_is_refused(tmp_path):
    topk = SAE(SAEConfig(d_in=D, n_features=F, k=K, transcoder=True, d_out=D_OUT))
    with pytest.raises(FormatError, match="SAELens has no topk transcoder"):
        write(topk, tmp_path / "t", "saelens")
    path = _write_saelens(tmp_path / "b", "transcoder", _tensors(d_out=D))
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": True}))
    with pytest.raises(FormatError, match="a transcoder with apply_b_dec_to_input"):
        read(path)


def _write_sparsify(path, t, **cfg):
    path.mkdir(parents=True)
    save_file(t, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": F // D,
                                               "normalize_decoder": True, "num_latents": F, "k": K,
                                               "multi_topk": False, "d_in": D, **cfg}))
    return path


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoders_read_as_sparsify_computes_and_write_back(tmp_path, skip):
    g = torch.Generator().manual_seed(3)
    t = {"encoder.weight": torch.randn(F, D, generator=g) / 4, "encoder.bias": torch.randn(F, generator=g) / 5,
         "W_dec": torch.randn(F, D, generator=g) / 3, "b_dec": torch.randn(D, generator=g) / 5}
    if skip:
        t["W_skip"] = torch.randn(D, D, generator=g) / 6
    tc = read(_write_sparsify(tmp_path / "run" / "layers.6.mlp", t, transcode=True, skip_connection=skip))
    x = _x()
    pre = torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"])   # a transcoder: no b_dec subtracted
    top = pre.topk(K, dim=1)
    f = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    y = f @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].mT if skip else 0)
    _predicts(tc, f, y, x)
    assert (tc.provenance.hook_in, tc.provenance.hook_out) == ("mlp_in.6", "mlp_out.6") and tc.cfg.skip == skip
    files = write(tc, tmp_path / "out", "sparsify")
    assert files[0].parent.name == "layers.6.mlp"
    cfg = json.loads(files[0].read_text())
    assert cfg["transcode"] and cfg["skip_connection"] == skip
    back = read(files[0].parent)
    _predicts(back, f, y, x)
    with pytest.raises(FormatError, match="read the input of the module whose output they write"):
        odd = SAE(SAEConfig(d_in=D, n_features=F, k=K, transcoder=True, d_out=D))
        odd.provenance = odd.provenance.replace(hook_in="resid_pre.2", hook_out="mlp_out.6")
        write(odd, tmp_path / "odd", "sparsify")
    with pytest.raises(FormatError, match="skip connection on an SAE"):
        read(_write_sparsify(tmp_path / "s" / "layers.2", t, skip_connection=True))


def test_gemma_scope_2_transcoders_with_the_affine_skip(tmp_path):
    """Gemma Scope 2's transcoder files: pre_feedforward_layernorm output (the MLP's input) to
    post_feedforward_layernorm output, JumpReLU, the affine skip added as x @ A."""
    g = torch.Generator().manual_seed(5)
    t = {"w_enc": torch.randn(D, F, generator=g) / 4, "w_dec": torch.randn(F, D, generator=g) / 3,
         "b_enc": torch.randn(F, generator=g) / 5, "b_dec": torch.randn(D, generator=g) / 5,
         "threshold": torch.rand(F, generator=g) * 0.4 + 0.1, "affine_skip_connection": torch.randn(D, D, generator=g)}
    path = tmp_path / "layer_5_width_16k_l0_small_affine"
    path.mkdir()
    save_file(t, str(path / "params.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "google/gemma-3-270m",
        "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output", "width": F, "l0": 10,
        "affine_connection": True, "type": "transcoder"}))
    tc = read(path)
    x = _x()
    pre = x @ t["w_enc"] + t["b_enc"]
    f = torch.relu(pre) * (pre > t["threshold"])
    _predicts(tc, f, f @ t["w_dec"] + t["b_dec"] + x @ t["affine_skip_connection"], x)
    p = tc.provenance
    assert tc.cfg.transcoder and tc.cfg.skip
    assert (p.hook_in, p.hook_out) == ("mlp_in.5", "model.layers.5.post_feedforward_layernorm")
    files = write(tc, tmp_path / "out", "gemma-scope-2")
    cfg = json.loads(files[0].read_text())
    assert (cfg["type"], cfg["affine_connection"]) == ("transcoder", True)
    assert cfg["hf_hook_point_out"] == "model.layers.5.post_feedforward_layernorm.output"
    back = read(tmp_path / "out")
    _predicts(back, f, f @ t["w_dec"] + t["b_dec"] + x @ t["affine_skip_connection"], x)


@pytest.mark.parametrize("fmt,activation", [("saelens", "jumprelu"), ("saelens", "relu"), ("sparsify", "topk"),
                                            ("gemma-scope-2", "batchtopk")])
def test_a_trained_skip_transcoder_written_in_each_layout_predicts_the_same(tiny_models, tmp_path, fmt, activation):
    """A skip transcoder trained here on a tiny Llama's layer-1 MLP, written in each layout and read back:
    the same prediction of the MLP's output from its input."""
    from dictlens.data.store import StreamingSource
    from dictlens.provenance import Provenance
    from dictlens.train.config import TrainConfig
    from dictlens.train.trainer import train

    lm = tiny_models["llama"]
    src = StreamingSource(lm, ["mlp_in.1", "mlp_out.1"], "default", tokens=4096, context=32)
    rows = next(iter(src.batches_by_hook(4096, shuffle=False)))
    x, y = rows["mlp_in.1"], rows["mlp_out.1"]
    k = None if activation in ("jumprelu", "relu") else K
    tc = train(SAEConfig(activation=activation, k=k, n_features=64, transcoder=True, skip=True),
               TrainConfig(tokens=8192, batch_size=256, plots=False), x, target=y, progress=False,
               provenance=Provenance(model=lm.name, hook_in="mlp_in.1", hook_out="mlp_out.1"))
    files = write(tc, tmp_path / fmt, fmt)
    back = read(files[0].parent)
    assert back.cfg.transcoder and back.cfg.skip
    assert (back.provenance.hook_in, back.provenance.hook_out) == ("mlp_in.1", "mlp_out.1")
    with torch.no_grad(), tc.ranking("float32"), back.ranking("float32"):
        torch.testing.assert_close(back(x[:512]), tc(x[:512]), rtol=1e-4, atol=1e-4)


def test_llama_scope_transcoders_standardised_with_their_two_scales(tmp_path):
    """An LXTC-style transcoder (hook_point_in ≠ hook_point_out, s_in ≠ s_out): lm_saes's inference form,
    pre = z·‖W_dec‖/s_out for the training-units pre-activation z, f = pre·1[pre > θ], ŷ = ŷ_train/s_out."""
    g = torch.Generator().manual_seed(17)
    enc, dec = torch.randn(F, D, generator=g) / 4, torch.randn(D, F, generator=g) * 1.5
    b_enc, b_dec = torch.randn(F, generator=g) / 5, torch.randn(D, generator=g) / 5
    t = {"encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec, "decoder.bias": b_dec}
    path = tmp_path / "Llama3_1-8B-Base-L3TC-8x"
    (path / "checkpoints").mkdir(parents=True)
    save_file(t, str(path / "checkpoints" / "final.safetensors"))
    avg_in, avg_out, theta = 3.0, 5.0, 0.3
    (path / "hyperparams.json").write_text(json.dumps({
        "d_model": D, "d_sae": F, "act_fn": "jumprelu", "jump_relu_threshold": theta, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": avg_in, "out": avg_out}, "hook_point_in": "blocks.3.mlp.hook_in",
        "hook_point_out": "blocks.3.hook_mlp_out", "apply_decoder_bias_to_pre_encoder": False,
        "sparsity_include_decoder_norm": True, "use_decoder_bias": True, "model_name": "meta-llama/Llama-3.1-8B"}))
    tc = read(path)
    s_in, s_out = D ** 0.5 / avg_in, D ** 0.5 / avg_out
    x = _x() * 2
    z = (x * s_in) @ enc.T + b_enc                     # training units
    n = dec.norm(dim=0)
    pre = z * n / s_out
    f = pre * (pre > theta)
    y_hat = (f * s_out / n) @ dec.T / s_out + b_dec / s_out
    assert 0 < (f > 0).sum(1).float().mean() < F / 2
    with tc.ranking("float32"):
        torch.testing.assert_close(tc.encode(x), f, rtol=0, atol=1e-4)
        torch.testing.assert_close(tc(x), y_hat, rtol=0, atol=1e-4)
    assert tc.cfg.transcoder and (tc.provenance.hook_in, tc.provenance.hook_out) == ("mlp_in.3", "mlp_out.3")
