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


# ---- circuit-tracer --------------------------------------------------------------------------
def _ct_config(path, kind, **extra):
    import yaml

    cfg = {"model_kind": kind, "model_name": "gpt2", "feature_input_hook": "mlp.hook_in",
           "feature_output_hook": "hook_mlp_out", "scan": "test", **extra}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))


def _ct_layer(seed, skip=False, threshold=True, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(F, D, generator=g) / 4, "W_dec": torch.randn(F, D, generator=g) / 3,
         "b_enc": torch.randn(F, generator=g) / 5 + shift, "b_dec": torch.randn(D, generator=g) / 5}
    if threshold:
        t["activation_function.threshold"] = torch.rand(F, generator=g) * 0.4 + 0.1
    if skip:
        t["W_skip"] = torch.randn(D, D, generator=g) / 6
    return t


def circuit_tracer_layer(t, x, k=None):
    """circuit-tracer's SingleLayerTranscoder: x @ W_encᵀ + b_enc (no b_dec on the input); JumpReLU
    pre·1[pre > θ], TopK keeping the k largest (no ReLU) or ReLU; f @ W_dec + b_dec + x @ W_skipᵀ."""
    pre = x @ t["W_enc"].T + t["b_enc"]
    if k is not None:
        top = pre.topk(k, dim=1)
        f = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    elif "activation_function.threshold" in t:
        f = pre * (pre > t["activation_function.threshold"])
    else:
        f = torch.relu(pre)
    y = f @ t["W_dec"] + t["b_dec"]
    return f, y + x @ t["W_skip"].T if "W_skip" in t else y


def test_circuit_tracer_transcoder_sets_read_layer_by_layer_and_convert_whole(tmp_path, capsys):
    from dictlens.cli import main

    folder = tmp_path / "plt"
    folder.mkdir()
    layers = [_ct_layer(0, skip=True), _ct_layer(1, skip=True)]
    for i, t in enumerate(layers):
        save_file(t, str(folder / f"layer_{i}.safetensors"))
    _ct_config(folder, "transcoder_set")
    x = _x()
    for i, t in enumerate(layers):
        tc = read(folder / f"layer_{i}.safetensors")
        assert tc.cfg.transcoder and tc.cfg.skip and tc.cfg.activation == "jumprelu"
        assert (tc.provenance.model, tc.provenance.hook_in, tc.provenance.hook_out) == (
            "openai-community/gpt2", f"mlp_in.{i}", f"mlp_out.{i}")
        _predicts(tc, *circuit_tracer_layer(t, x), x)
    with pytest.raises(FormatError, match="a circuit-tracer transcoder set of 2 layers: give one layer's file"):
        read(folder)
    assert main(["convert", str(folder), "--out", str(tmp_path / "runs")]) == 0
    assert "a transcoder set of 2 layers" in capsys.readouterr().out
    from dictlens.load import load_sae

    for i, t in enumerate(layers):
        _predicts(load_sae(tmp_path / "runs" / f"layer_{i}"), *circuit_tracer_layer(t, x), x)
    # a TopK set: k from the config; circuit-tracer keeps the k largest without a ReLU, which dictlens's
    # TopK matches where they are positive (here: the encoder bias shifted up)
    topk = tmp_path / "topk"
    topk.mkdir()
    t = _ct_layer(2, threshold=False, shift=3.0)
    save_file(t, str(topk / "layer_0.safetensors"))
    _ct_config(topk, "transcoder_set", activation="topk", k=K)
    tc = read(topk / "layer_0.safetensors")
    assert tc.cfg.activation == "topk" and tc.cfg.k == K
    f, y = circuit_tracer_layer(t, x, k=K)
    assert bool((f.topk(K, dim=1).values > 0).all())
    _predicts(tc, f, y, x)
    save_file({**t, "activation_function.threshold": -torch.ones(F)}, str(topk / "layer_0.safetensors"))
    _ct_config(topk, "transcoder_set")
    with pytest.raises(FormatError, match="negative JumpReLU thresholds"):
        read(topk / "layer_0.safetensors")


def _our_set(n_layers, activation="jumprelu"):
    from dictlens.provenance import Provenance

    out = []
    for i in range(n_layers):
        tc = SAE(SAEConfig(d_in=D, n_features=F, activation=activation, k=K if activation == "topk" else None,
                           transcoder=True, d_out=D, skip=True), seed=10 + i,
                 provenance=Provenance(model="openai-community/gpt2", hook_in=f"mlp_in.{i}", hook_out=f"mlp_out.{i}"))
        with torch.no_grad():
            tc.b_dec.add_(0.3)
            tc.W_skip.normal_(0, 0.1)
            if activation == "jumprelu":
                tc.log_threshold.fill_(-2.0)
        out.append(tc.eval())
    return out


@pytest.mark.parametrize("activation", ["jumprelu", "topk", "relu"])
def test_dictlens_transcoders_written_as_a_circuit_tracer_set(tmp_path, capsys, activation):
    import yaml

    from dictlens.cli import main

    tcs = _our_set(3, activation)
    files = write(tcs[0], tmp_path / "set", "circuit-tracer", also=tcs[1:])
    assert sorted(f.name for f in files) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors",
                                             "layer_2.safetensors"]
    cfg = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert (cfg["model_kind"], cfg["feature_input_hook"], cfg["feature_output_hook"]) == (
        "transcoder_set", "mlp.hook_in", "hook_mlp_out")
    assert cfg.get("activation") == {"topk": "topk", "relu": "relu"}.get(activation)
    assert cfg.get("k") == (K if activation == "topk" else None)
    from safetensors.torch import load_file

    layer = load_file(str(tmp_path / "set" / "layer_1.safetensors"))
    assert "k" not in layer and ("activation_function.threshold" in layer) == (activation == "jumprelu")
    x = _x()
    for i, tc in enumerate(tcs):
        back = read(tmp_path / "set" / f"layer_{i}.safetensors")
        assert (back.provenance.hook_in, back.provenance.hook_out) == (f"mlp_in.{i}", f"mlp_out.{i}")
        with torch.no_grad(), tc.ranking("float32"):
            _predicts(back, tc.encode(x), tc(x), x)
    with pytest.raises(FormatError, match="every layer from 0; given layers 1, 2"):
        write(tcs[1], tmp_path / "gap", "circuit-tracer", also=tcs[2:])
    for i, tc in enumerate(tcs):
        tc.save(tmp_path / f"run{i}")
    assert main(["export", str(tmp_path / "run0"), "--to", "circuit-tracer", "--out", str(tmp_path / "cli"),
                 "--also", str(tmp_path / "run1"), "--also", str(tmp_path / "run2")]) == 0
    assert (tmp_path / "cli" / "layer_2.safetensors").is_file()
    assert main(["export", str(tmp_path / "run0"), "--to", "saelens", "--out", str(tmp_path / "sl"),
                 "--also", str(tmp_path / "run1")]) == 2
    assert "only circuit-tracer writes several dictionaries" in capsys.readouterr().err


def _ct_clt(folder, n=3, seed=0):
    """A circuit-tracer CLT written by hand: W_enc_i [F, D], b_enc_i, b_dec_i, threshold_i; W_dec_i [F, n − i, D]."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir()
    enc, dec = [], []
    for i in range(n):
        e = {f"W_enc_{i}": torch.randn(F, D, generator=g) / 4, f"b_enc_{i}": torch.randn(F, generator=g) / 5,
             f"b_dec_{i}": torch.randn(D, generator=g) / 5, f"threshold_{i}": torch.rand(F, generator=g) * 0.3 + 0.05}
        d = {f"W_dec_{i}": torch.randn(F, n - i, D, generator=g) / 3}
        save_file(e, str(folder / f"W_enc_{i}.safetensors"))
        save_file(d, str(folder / f"W_dec_{i}.safetensors"))
        enc.append(e)
        dec.append(d)
    _ct_config(folder, "cross_layer_transcoder")
    return enc, dec


def circuit_tracer_clt(enc, dec, xs):
    """circuit-tracer's CLT: a_i = JumpReLU(x_i @ W_enc_iᵀ + b_enc_i); layer j's output
    Σ_{i ≤ j} a_i @ W_dec_i[:, j − i] + b_dec_j."""
    acts = []
    for i, x in enumerate(xs):
        pre = x @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        acts.append(pre * (pre > enc[i][f"threshold_{i}"]))
    return [sum(acts[i] @ dec[i][f"W_dec_{i}"][:, j - i] for i in range(j + 1)) + enc[j][f"b_dec_{j}"]
            for j in range(len(xs))]


def test_circuit_tracer_clts_read_with_its_predictions_and_write_back(tmp_path):
    from safetensors.torch import load_file

    from dictlens.sae.clt import CLT

    enc, dec = _ct_clt(tmp_path / "clt")
    clt = read(tmp_path / "clt")
    assert isinstance(clt, CLT) and clt.n_layers == 3 and clt.cfg.activation == "jumprelu"
    p = clt.provenance
    assert (p.hook_in, p.hook_out) == ("mlp_in.0,mlp_in.1,mlp_in.2", "mlp_out.0,mlp_out.1,mlp_out.2")
    xs = [_x(seed=s) for s in range(3)]
    want = torch.cat(circuit_tracer_clt(enc, dec, xs), 1)
    with torch.no_grad(), clt.ranking("float32"):
        torch.testing.assert_close(clt(torch.cat(xs, 1)), want, rtol=0, atol=1e-5)
    from dictlens.cli import main
    from dictlens.load import load_dictionary

    assert main(["convert", str(tmp_path / "clt"), "--out", str(tmp_path / "run")]) == 0   # a dictlens CLT run
    run = load_dictionary(tmp_path / "run")
    assert isinstance(run, CLT) and run.provenance.source == "circuit-tracer"
    with torch.no_grad(), run.ranking("float32"):
        torch.testing.assert_close(run(torch.cat(xs, 1)), want, rtol=0, atol=1e-5)
    write(clt, tmp_path / "back", "circuit-tracer")
    for i in range(3):   # the same tensors: layer i's bias where circuit-tracer keeps it
        for name, theirs in (("W_enc", enc), ("W_dec", dec)):
            ours = load_file(str(tmp_path / "back" / f"{name}_{i}.safetensors"))
            assert sorted(ours) == sorted(theirs[i])
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[i][key], rtol=0, atol=1e-6)


def test_a_dictlens_clt_written_for_circuit_tracer_predicts_the_same(tmp_path):
    """Every block's bias covers the layers it writes; written, each layer's biases are summed into
    circuit-tracer's b_dec_j: the read-back CLT predicts what dictlens's did. One-layer formats refuse it."""
    from dictlens.provenance import Provenance
    from dictlens.sae.clt import CLT

    clt = CLT(SAEConfig(d_in=D, d_out=D, n_features=F, activation="jumprelu", transcoder=True, clt_layers=4), seed=4,
              provenance=Provenance(model="openai-community/gpt2", hook_in=",".join(f"mlp_in.{i}" for i in range(4)),
                                    hook_out=",".join(f"mlp_out.{i}" for i in range(4))))
    with torch.no_grad():
        for _, b in clt.each():
            b.b_dec.normal_(0, 0.3)
            b.log_threshold.fill_(-2.0)
    clt.eval()
    write(clt, tmp_path / "ct", "circuit-tracer")
    back = read(tmp_path / "ct")
    x = torch.cat([_x(seed=s) for s in range(4)], 1)
    with torch.no_grad(), clt.ranking("float32"), back.ranking("float32"):
        torch.testing.assert_close(back(x), clt(x), rtol=0, atol=1e-5)
    assert back.provenance.hook_in == clt.provenance.hook_in
    with pytest.raises(FormatError, match="not a cross-layer transcoder \\(write it as circuit-tracer\\)"):
        write(clt, tmp_path / "sl", "saelens")
