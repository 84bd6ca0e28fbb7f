"""Foreign formats: files written here in each library's layout, read back with the codes and
reconstructions of a reference forward written from that library's published formulas."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dictlens.errors import DictlensError, FormatError, InputError
from dictlens.formats import read, write
from dictlens.formats.base import ReadOptions
from dictlens.formats.hooks import from_transformer_lens, to_transformer_lens

D, F, K = 16, 64, 4


def _tensors(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D, F, generator=g) / 4, "W_dec": torch.randn(F, D, generator=g) / 3,
         "b_dec": torch.randn(D, generator=g) / 5}
    if arch == "gated":
        t.update(b_gate=torch.randn(F, generator=g) / 5, r_mag=torch.randn(F, generator=g) / 5,
                 b_mag=torch.randn(F, generator=g) / 5)
    else:
        t["b_enc"] = torch.randn(F, generator=g) / 5
    if arch == "jumprelu":
        t["threshold"] = torch.rand(F, generator=g) * 0.4 + 0.1
    return t


def _write_saelens(path, arch, t, *, pre_bias=True, extra=None, metadata=None, flat=False):
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "sae_weights.safetensors"))
    meta = {"sae_lens_version": "6.54.12", "model_name": "gpt2-small", "hook_name": "blocks.3.hook_resid_post",
            "context_size": 128, **(metadata or {})}
    if flat:   # a pre-6.0 config: everything at the top level
        cfg = {"d_in": D, "d_sae": F, "apply_b_dec_to_input": pre_bias, "hook_point": meta["hook_name"],
               "model_name": meta["model_name"], "context_size": 128, "normalize_activations": False,
               "activation_fn_str": "topk" if arch == "topk" else "relu", "activation_fn_kwargs": {"k": K}}
    else:
        cfg = {"d_in": D, "d_sae": F, "dtype": "torch.float32", "device": "cpu", "apply_b_dec_to_input": pre_bias,
               "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
               "metadata": meta, **(extra or {})}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def saelens_forward(arch, t, x, *, pre_bias=True, k=K, rescale=False, s=None):
    """SAELens v6's encode and decode, from its published formulas (codes, x̂)."""
    x_in = x * s if s is not None else x
    x_c = x_in - t["b_dec"] if pre_bias else x_in
    if arch == "gated":
        gate = (x_c @ t["W_enc"] + t["b_gate"]) > 0
        f = gate * torch.relu(x_c @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
        x_hat = f @ t["W_dec"] + t["b_dec"]
    else:
        pre = x_c @ t["W_enc"] + t["b_enc"]
        n = t["W_dec"].norm(dim=1)
        if arch == "standard":
            f = torch.relu(pre)
        elif arch == "jumprelu":
            f = torch.relu(pre) * (pre > t["threshold"])
        else:
            ranked = pre * n if rescale else pre
            top = ranked.topk(k, dim=1)
            f = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
        x_hat = (f / n if arch == "topk" and rescale else f) @ t["W_dec"] + t["b_dec"]
    return f, (x_hat / s if s is not None else x_hat)


def _x(n=200, seed=1):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _same(sae, codes, x_hat, x):
    with sae.ranking("float32"):
        assert torch.allclose(sae.encode(x), codes, atol=1e-5)
        assert torch.allclose(sae(x), x_hat, atol=1e-5)


@pytest.mark.parametrize("arch,pre_bias", [("standard", True), ("standard", False), ("topk", True),
                                           ("jumprelu", False), ("gated", True)])
def test_saelens_folders_read_with_saelens_codes(tmp_path, arch, pre_bias):
    t = _tensors(arch)
    extra = {"k": K} if arch == "topk" else {}
    sae = read(_write_saelens(tmp_path / arch, arch, t, pre_bias=pre_bias, extra=extra))
    x = _x()
    codes, x_hat = saelens_forward(arch, t, x, pre_bias=pre_bias)
    assert (codes > 0).any(dim=1).all()                     # the check can see codes
    _same(sae, codes, x_hat, x)
    assert sae.cfg.activation == {"standard": "relu", "gated": "gated"}.get(arch, arch)
    p = sae.provenance
    assert (p.source, p.model, p.hook_in, p.context) == ("saelens", "openai-community/gpt2", "resid_post.3", 128)
    assert p.notes["saelens"]["model_name"] == "gpt2-small"                 # TransformerLens's name, kept
    assert p.notes["saelens"]["hook_name"] == "blocks.3.hook_resid_post"
    assert sae.cfg.decoder_norm == "free"                   # their rows are not unit: kept, not renormalised


def test_saelens_topk_with_rescaled_acts_is_folded_exactly(tmp_path):
    t = _tensors("topk")
    sae = read(_write_saelens(tmp_path / "r", "topk", t, extra={"k": K, "rescale_acts_by_decoder_norm": True}))
    x = _x()
    codes, x_hat = saelens_forward("topk", t, x, rescale=True)
    plain, _ = saelens_forward("topk", t, x, rescale=False)
    assert not torch.equal(codes > 0, plain > 0)            # the rescale changes which features win
    _same(sae, codes, x_hat, x)
    assert sae.cfg.decoder_norm == "unit"                   # the fold leaves unit rows


def test_saelens_normalisation_factor_is_folded_as_saelens_folds_it(tmp_path):
    t = _tensors("standard")
    path = _write_saelens(tmp_path / "n", "standard", t)
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="needs the normalisation factor.*--norm-scaling-factor"):
        read(path)
    x = _x()
    codes, x_hat = saelens_forward("standard", t, x, s=2.5)
    _same(read(path, opts=ReadOptions(norm_scaling_factor=2.5)), codes, x_hat, x)
    (path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))   # a training checkpoint's
    sae = read(path)
    _same(sae, codes, x_hat, x)
    assert sae.provenance.notes["saelens"]["norm_scaling_factor"] == 2.5


def test_saelens_pre_6_flat_config(tmp_path):
    t = _tensors("topk")
    sae = read(_write_saelens(tmp_path / "old", "topk", t, flat=True))
    x = _x()
    _same(sae, *saelens_forward("topk", t, x), x)
    assert (sae.provenance.model, sae.provenance.hook_in) == ("openai-community/gpt2", "resid_post.3")


def test_saelens_batchtopk_training_checkpoint(tmp_path):
    t = _tensors("topk")
    t["topk_threshold"] = torch.tensor(0.3, dtype=torch.float64)
    sae = read(_write_saelens(tmp_path / "b", "batchtopk", t, extra={"k": K}))
    x = _x()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    f = torch.relu(pre) * (pre > 0.3)                       # inference: the threshold, as SAELens saves it
    _same(sae, f, f @ t["W_dec"] + t["b_dec"], x)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk", "gated"])
def test_dictlens_to_saelens_and_back_keeps_codes_and_provenance(tmp_path, activation):
    from dictlens.load import load_sae
    from dictlens.provenance import Provenance
    from dictlens.sae import SAE, SAEConfig

    k = K if activation in ("topk", "batchtopk") else None
    sae = SAE(SAEConfig(d_in=D, n_features=F, activation=activation, k=k), seed=3,
              provenance=Provenance.of_sae(model="smollm2-135m", hook="resid_post.15", context=128))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        if activation == "batchtopk":
            sae.threshold.fill_(0.2)
        if activation == "jumprelu":
            sae.log_threshold.uniform_(-2.5, -1.0)
    sae.eval()
    files = write(sae, tmp_path / "out", "saelens")
    cfg = json.loads(files[0].read_text())
    assert cfg["metadata"]["sae_lens_version"] >= "6" and cfg["metadata"]["hook_name"] == "blocks.15.hook_resid_post"
    back = load_sae(tmp_path / "out")                       # the one loader detects the format
    x = _x()
    with sae.ranking("float32"), back.ranking("float32"):
        assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-5)
        assert torch.allclose(back(x), sae(x), atol=1e-5)
    assert (back.provenance.model, back.provenance.hook_in, back.provenance.source) == \
        ("smollm2-135m", "resid_post.15", "saelens")
    # written files are what the reference SAELens forward computes too
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "out" / "sae_weights.safetensors"))
    codes, x_hat = saelens_forward(cfg["architecture"], t, x, pre_bias=cfg["apply_b_dec_to_input"], k=k or K)
    _same(sae, codes, x_hat, x)
    with pytest.raises(InputError, match="is not empty"):
        write(sae, tmp_path / "out", "saelens")


def test_what_saelens_cannot_hold_is_refused_by_name(tmp_path):
    from dictlens.sae import SAE, SAEConfig

    with pytest.raises(FormatError, match="SAELens has no groupmax SAE"):
        write(SAE(SAEConfig(d_in=D, n_features=F, activation="groupmax", k=K)), tmp_path / "g", "saelens")
    t = _tensors("standard")
    path = _write_saelens(tmp_path / "c", "standard", t,
                          metadata={"model_from_pretrained_kwargs": {"center_writing_weights": True}})
    with pytest.raises(FormatError, match="center_writing_weights"):
        read(path)
    path = _write_saelens(tmp_path / "h", "standard", t, metadata={"hook_head_index": 3})
    with pytest.raises(FormatError, match="one attention head"):
        read(path)


def test_bad_input_is_named(tmp_path):
    t = _tensors("standard")
    path = _write_saelens(tmp_path / "s", "standard", {**t, "W_enc": t["W_enc"].T.contiguous()})  # transposed
    with pytest.raises(FormatError, match=r"tensor 'W_enc' has shape \[64, 16\], expected \[16, 64\]"):
        read(path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match="no known dictionary layout \\(found weights.bin\\); known: saelens"):
        read(tmp_path / "junk")
    with pytest.raises(FormatError, match="expected one of saelens, .*found 'saelnes' \\(did you mean 'saelens'\\?\\)"):
        read(path, fmt="saelnes")
    good = _write_saelens(tmp_path / "t", "standard", t)
    (good / "sae_weights.safetensors").write_bytes((good / "sae_weights.safetensors").read_bytes()[:200])
    with pytest.raises(DictlensError, match="truncated or damaged"):
        read(good)


def test_hub_sources_offline_say_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="not in the local Hugging Face cache.*offline"):
        read("hf://nobody-here/no-such-saes/layer_3")
    with pytest.raises(InputError, match="expected hf://OWNER/REPO"):
        read("hf://justone")


def test_transformer_lens_hooks_map_to_the_module_that_computes_them():
    assert from_transformer_lens("blocks.5.hook_resid_pre", "gpt2-small") == "resid_pre.5"
    assert from_transformer_lens("blocks.5.hook_mlp_out", "meta-llama/Llama-3.1-8B") == "mlp_out.5"
    # Gemma's TransformerLens mlp/attn outputs come after its post-norms
    assert from_transformer_lens("blocks.5.hook_mlp_out", "gemma-2-2b") == "model.layers.5.post_feedforward_layernorm"
    assert from_transformer_lens("blocks.5.hook_resid_mid", "gpt2-small") == "transformer.h.5.ln_2:input"
    assert from_transformer_lens("blocks.5.attn.hook_z", "google/gemma-3-12b-pt") == \
        "model.language_model.layers.5.self_attn.o_proj:input"
    with pytest.raises(FormatError, match="no dictlens equivalent.*known: hook_resid_pre"):
        from_transformer_lens("blocks.5.hook_unknown", "gpt2")
    with pytest.raises(FormatError, match="unweighted RMS-normalised"):
        from_transformer_lens("blocks.2.ln2.hook_normalized", "gemma-2-2b")
    assert to_transformer_lens("resid_post.7", "smollm2-135m") == "blocks.7.hook_resid_post"
    assert to_transformer_lens("model.layers.5.post_feedforward_layernorm", "gemma-2-2b") == "blocks.5.hook_mlp_out"
    assert to_transformer_lens("mlp_out.5", "gemma-2-2b") is None
    # the MLP's neurons: one named hook, whatever the library calls it
    from dictlens.formats.hooks import from_module_point, to_module_point

    assert from_transformer_lens("blocks.4.mlp.hook_post", "gpt2-small") == "mlp_hidden.4"
    assert to_transformer_lens("mlp_hidden.4", "gemma-2-2b") == "blocks.4.mlp.hook_post"
    assert to_module_point("mlp_hidden.4", "gpt2") == "transformer.h.4.mlp.c_proj.input"
    assert from_module_point("model.layers.4.mlp.down_proj.input") == "mlp_hidden.4"
    assert from_module_point(to_module_point("mlp_hidden.4", "gemma-2-2b")) == "mlp_hidden.4"
    # the MLP's input and output, the two sides of a transcoder
    assert from_transformer_lens("blocks.4.mlp.hook_in", "gpt2-small") == "mlp_in.4"
    assert to_transformer_lens("mlp_in.4", "gpt2-small") == "blocks.4.mlp.hook_in"
    assert to_module_point("mlp_in.4", "gemma-3-1b") == "model.layers.4.mlp.input"
    assert from_module_point("model.layers.4.mlp.input") == "mlp_in.4"
    assert from_module_point("model.layers.4.mlp.output") == "mlp_out.4"


def test_convert_export_and_a_foreign_folder_in_every_command(tiny_model_dirs, corpus, tmp_path, capsys):
    """A dictlens SAE exported to SAELens evaluates, through the command line, exactly as the
    original; `convert` brings it back; a foreign folder is never written into."""
    from dictlens.cli import main

    model, acts, run = str(tiny_model_dirs["llama"]), tmp_path / "acts", tmp_path / "run"
    assert main(["harvest", "--model", model, "--hook", "resid_post.1", "--text", str(corpus), "--tokens", "3000",
                 "--context", "64", "--shard-tokens", "500", "--out", str(acts)]) == 0
    assert main(["train", "--acts", str(acts), "--k", "4", "--expansion", "2", "--tokens", "4096",
                 "--batch-size", "256", "--no-plots", "--out", str(run)]) == 0
    assert main(["export", str(run), "--to", "saelens", "--out", str(tmp_path / "sl")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "sl"), "--acts", str(acts)]) == 2
    assert "is a dictionary in another format; give --out" in capsys.readouterr().err
    for src, out in ((run, tmp_path / "e1"), (tmp_path / "sl", tmp_path / "e2")):
        assert main(["eval", str(src), "--acts", str(acts), "--out", str(out)]) == 0
    e1, e2 = (json.loads((tmp_path / e / "eval.json").read_text()) for e in ("e1", "e2"))
    assert e1["fvu"] == pytest.approx(e2["fvu"], abs=1e-6) and e1["l0"] == pytest.approx(e2["l0"])
    assert main(["convert", str(tmp_path / "sl"), "--out", str(tmp_path / "back")]) == 0
    text = capsys.readouterr().out
    assert "(saelens): topk SAE, F=64, D=32" in text and "hook resid_post.1 (theirs: blocks.1.hook_resid_post)" in text
    assert main(["convert", str(tmp_path / "sl"), "--out", str(tmp_path / "back")]) == 2
    assert "already holds a dictionary" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "back"), "--acts", str(acts)]) == 0
    assert json.loads((tmp_path / "back" / "eval.json").read_text())["fvu"] == pytest.approx(e1["fvu"], abs=1e-6)


def test_default_model_sae_exported_and_reimported_evaluates_the_same(smollm2, tmp_path):
    """On SmolLM2's own activations: a dictlens SAE, written as SAELens and read back, has the same FVU."""
    import dictlens
    from dictlens.eval.metrics import evaluate
    from dictlens.train import train

    cfg = dictlens.HarvestConfig(hooks=["resid_post.6"], out=str(tmp_path / "acts"), tokens=3000, context=64)
    dictlens.harvest(cfg, smollm2)
    store = dictlens.ActivationStore(tmp_path / "acts", "resid_post.6", model="smollm2-135m")
    sae = train(dictlens.SAEConfig(activation="topk", k=16, expansion=2),
                dictlens.TrainConfig(tokens=6000, batch_size=500, plots=False), store, tmp_path / "run")
    write(sae, tmp_path / "sl", "saelens")
    back = dictlens.load_sae(tmp_path / "sl")
    with sae.ranking("float32"), back.ranking("float32"):
        a, b = (evaluate(s, store.batches(1000, shuffle=False)) for s in (sae, back))
    assert 0 < a.fvu < 1 and a.fvu == pytest.approx(b.fvu, abs=1e-6) and a.l0 == pytest.approx(b.l0)
    assert back.provenance.model == "smollm2-135m" and back.provenance.hook_in == "resid_post.6"


def _jumprelu_reference(t, x):
    """Gemma Scope's forward: no b_dec subtraction, relu(pre)·1[pre > θ]."""
    pre = x @ t["W_enc"] + t["b_enc"]
    f = torch.relu(pre) * (pre > t["threshold"])
    return f, f @ t["W_dec"] + t["b_dec"]


def test_gemma_scope_npz_with_model_and_hook_from_its_hub_path(tmp_path):
    import numpy as np

    t = _tensors("jumprelu")
    folder = tmp_path / "models--google--gemma-scope-2b-pt-mlp" / "snapshots" / "abc" / "layer_12" / "width_16k" \
        / "average_l0_82"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in t.items()})
    sae = read(folder)
    x = _x()
    _same(sae, *_jumprelu_reference(t, x), x)
    p = sae.provenance
    assert (p.source, p.model, sae.cfg.pre_bias) == ("gemma-scope", "google/gemma-2-2b", False)
    assert p.hook_in == "model.layers.12.post_feedforward_layernorm"   # TL hook_mlp_out: after Gemma's post-norm
    assert p.notes["recorded_l0"] == 82                               # for the preflight
    np.savez(tmp_path / "params.npz", obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FormatError, match="pickled objects, which dictlens never loads"):
        read(tmp_path / "params.npz")


def test_gemma_scope_2_reads_its_hook_points_and_writes_back(tmp_path):
    t = {k.lower() if k.startswith("W_") else k: v for k, v in _tensors("jumprelu").items()}
    path = tmp_path / "resid_post" / "layer_9_width_16k_l0_small"
    path.mkdir(parents=True)
    save_file(t, str(path / "params.safetensors"))
    cfg = {"architecture": "jump_relu", "model_name": "google/gemma-3-270m-pt", "width": F, "l0": "small",
           "hf_hook_point_in": "model.layers.9.output", "hf_hook_point_out": "model.layers.9.output",
           "affine_connection": False, "type": "sae"}
    (path / "config.json").write_text(json.dumps(cfg))
    sae = read(path)
    x = _x()
    ref = {"W_enc": t["w_enc"], "W_dec": t["w_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"],
           "threshold": t["threshold"]}
    _same(sae, *_jumprelu_reference(ref, x), x)
    assert (sae.provenance.model, sae.provenance.hook_in) == ("google/gemma-3-270m-pt", "resid_post.9")
    # weights the config does not describe (an affine skip on an SAE) are refused, not half-read
    save_file({**t, "affine_skip_connection": torch.eye(D)}, str(path / "params.safetensors"))
    with pytest.raises(FormatError, match="affine_connection false, but the file holds an affine skip"):
        read(path)


@pytest.mark.parametrize("activation,pre_bias", [("jumprelu", True), ("relu", False), ("batchtopk", True)])
def test_dictlens_to_gemma_scope_2_and_back(tmp_path, activation, pre_bias):
    from dictlens.provenance import Provenance
    from dictlens.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=D, n_features=F, activation=activation, pre_bias=pre_bias,
                        k=K if activation == "batchtopk" else None), seed=5,
              provenance=Provenance.of_sae(model="google/gemma-3-1b-pt", hook="resid_post.4"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        if activation == "batchtopk":
            sae.threshold.fill_(0.2)
    sae.eval()
    files = write(sae, tmp_path / "gs2", "gemma-scope-2")
    assert json.loads(files[0].read_text())["hf_hook_point_in"] == "model.layers.4.output"
    back = read(tmp_path / "gs2")
    x = _x()
    assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-5) and torch.allclose(back(x), sae(x), atol=1e-5)
    assert back.provenance.hook_in == "resid_post.4" and not back.cfg.pre_bias   # the pre-bias folded into b_enc
    with pytest.raises(FormatError, match="a topk SAE cannot be written as one"):
        write(SAE(SAEConfig(d_in=D, n_features=F, activation="topk", k=K)), tmp_path / "no", "gemma-scope-2")


def _write_sparsify(path, t, activation="topk", **cfg):
    path.mkdir(parents=True)
    save_file(t, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"activation": activation, "expansion_factor": F // D,
                                               "normalize_decoder": True, "num_latents": F, "k": K,
                                               "multi_topk": False, "skip_connection": False, "transcode": False,
                                               "d_in": D, **cfg}))
    return path


@pytest.mark.parametrize("activation", ["topk", "groupmax"])
def test_sparsify_hookpoints_read_as_sparsify_computes(tmp_path, activation):
    g = torch.Generator().manual_seed(7)
    t = {"encoder.weight": torch.randn(F, D, generator=g) / 4, "encoder.bias": torch.randn(F, generator=g) / 5,
         "W_dec": torch.randn(F, D, generator=g) / 3, "b_dec": torch.randn(D, generator=g) / 5}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-160m"}))
    sae = read(_write_sparsify(tmp_path / "run" / "layers.6.mlp", t, activation))
    x = _x()
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])   # sparsify: relu, then select
    if activation == "topk":
        top = pre.topk(K, dim=1)
        f = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    else:   # the largest of each of k contiguous groups
        v, i = pre.unflatten(1, (K, F // K)).max(dim=2)
        f = torch.zeros_like(pre).scatter(1, i + torch.arange(K) * (F // K), v)
    _same(sae, f, f @ t["W_dec"] + t["b_dec"], x)
    assert (sae.provenance.model, sae.provenance.hook_in) == ("EleutherAI/pythia-160m", "mlp_out.6")
    with pytest.raises(FormatError, match="holds several dictionaries \\(layers.6.mlp\\): give one"):
        read(tmp_path / "run")
    with pytest.raises(FormatError, match="multi_topk \\(the multi-TopK loss's decoding\\)"):
        read(_write_sparsify(tmp_path / "tc", t, multi_topk=True))
    back = read(write(sae, tmp_path / "out", "sparsify")[0].parent)
    assert back.provenance.hook_in == "mlp_out.6"
    with sae.ranking("float32"), back.ranking("float32"):
        assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-5)


def _dl_state(cls, g):
    r = lambda *shape: torch.randn(*shape, generator=g) / 4   # noqa: E731
    if cls == "AutoEncoder":
        return {"bias": r(D), "encoder.weight": r(F, D), "encoder.bias": r(F), "decoder.weight": r(D, F)}
    if cls == "AutoEncoderNew":
        return {"encoder.weight": r(F, D), "encoder.bias": r(F), "decoder.weight": r(D, F), "decoder.bias": r(D)}
    if cls == "GatedAutoEncoder":
        return {"encoder.weight": r(F, D), "decoder.weight": r(D, F), "decoder_bias": r(D), "r_mag": r(F),
                "gate_bias": r(F), "mag_bias": r(F)}
    if cls == "JumpReluAutoEncoder":
        return {"W_enc": r(D, F), "b_enc": r(F), "W_dec": r(F, D), "b_dec": r(D),
                "threshold": torch.rand(F, generator=g) * 0.3 + 0.05}
    if cls == "MatryoshkaBatchTopKSAE":
        return {"W_enc": r(D, F), "b_enc": r(F), "W_dec": r(F, D), "b_dec": r(D), "k": torch.tensor(K),
                "threshold": torch.tensor(0.15), "group_sizes": torch.tensor([16, 16, 32])}
    return {"encoder.weight": r(F, D), "encoder.bias": r(F), "decoder.weight": r(D, F), "b_dec": r(D),
            "k": torch.tensor(K, dtype=torch.int32),
            "threshold": torch.tensor(0.15 if cls == "BatchTopKSAE" else -1.0)}


def dictionary_learning_forward(cls, s, x):
    """dictionary_learning's encode / decode of each class, from its source's formulas."""
    if cls == "AutoEncoder":
        f = torch.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["bias"]
    if cls == "AutoEncoderNew":
        f = torch.relu(x @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["decoder.bias"]
    if cls == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        f = (x_enc + s["gate_bias"] > 0) * torch.relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return f, f @ s["decoder.weight"].T + s["decoder_bias"]
    if cls == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        f = torch.relu(pre * (pre > s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    if cls == "MatryoshkaBatchTopKSAE":
        post = torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = post * (post > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    post = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
    if cls == "BatchTopKSAE":
        f = post * (post > s["threshold"])
    else:
        top = post.topk(K, dim=1)
        f = torch.zeros_like(post).scatter(1, top.indices, top.values)
    return f, f @ s["decoder.weight"].T + s["b_dec"]


@pytest.mark.parametrize("cls", ["AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder",
                                 "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"])
def test_dictionary_learning_classes_read_as_the_library_computes(tmp_path, cls):
    s = _dl_state(cls, torch.Generator().manual_seed(11))
    path = tmp_path / "trainer_0"
    path.mkdir()
    torch.save(s, path / "ae.pt")
    (path / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": cls, "activation_dim": D, "dict_size": F, "lm_name": "EleutherAI/pythia-70m-deduped",
        "layer": 3, "submodule_name": "resid_post_layer_3", "norm_factor": 7.0}}))   # already applied: not again
    sae = read(path)
    x = _x()
    codes, x_hat = dictionary_learning_forward(cls, s, x)
    assert (codes > 0).any()
    _same(sae, codes, x_hat, x)
    assert (sae.provenance.model, sae.provenance.hook_in) == ("EleutherAI/pythia-70m-deduped", "resid_post.3")
    if cls == "MatryoshkaBatchTopKSAE":
        assert sae.cfg.matryoshka == [16, 32, 64]
    back = read(write(sae, tmp_path / "out", "dictionary-learning")[0])   # and back (the ae.pt path works too)
    with sae.ranking("float32"), back.ranking("float32"):
        assert torch.allclose(back.encode(x), codes, atol=1e-5) and torch.allclose(back(x), x_hat, atol=1e-5)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["trainer"]["dict_class"] == \
        ("AutoEncoderTopK" if cls == "AutoEncoderTopK" else cls)


def test_dictionary_learning_backup_gets_its_norm_factor_once_and_pickles_are_refused(tmp_path):
    s = _dl_state("AutoEncoderTopK", torch.Generator().manual_seed(12))
    path = tmp_path / "live"
    path.mkdir()
    nf = 3.0
    unscaled = {k: (v / nf if k in ("encoder.bias", "b_dec") else v) for k, v in s.items()}
    torch.save({"step": 100, "ae": unscaled, "norm_factor": nf}, path / "ae.pt")   # the backup of a live run
    (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))
    sae = read(path)
    x = _x()
    _same(sae, *dictionary_learning_forward("AutoEncoderTopK", s, x), x)
    assert sae.provenance.notes["dictionary-learning"]["norm_factor_applied"] == nf

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"ae": Evil()}, path / "ae.pt")
    with pytest.raises(FormatError, match="not a weights-only file.*refuses to execute it"):
        read(path)


def test_llama_scope_standardised_and_decoder_folded_as_lm_saes_does(tmp_path):
    """The training-units forward, with codes reported in lm_saes's inference units
    (f = z·‖W_dec‖/s, gated by f > θ): dictlens's folded SAE gives the same."""
    g = torch.Generator().manual_seed(13)
    enc, dec = torch.randn(F, D, generator=g) / 4, torch.randn(D, F, generator=g) * 1.5   # non-unit decoder columns
    b_enc, b_dec = torch.randn(F, generator=g) / 5, torch.randn(D, generator=g) / 5
    t = {"encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec, "decoder.bias": b_dec}
    t = {k: v.to(torch.bfloat16) for k, v in t.items()}                                      # released as bf16
    path = tmp_path / "Llama3_1-8B-Base-L15R-8x"
    (path / "checkpoints").mkdir(parents=True)
    save_file(t, str(path / "checkpoints" / "final.safetensors"))
    avg, theta = 3.0, 0.4
    (path / "hyperparams.json").write_text(json.dumps({
        "d_model": D, "d_sae": F, "act_fn": "jumprelu", "jump_relu_threshold": theta, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": avg, "out": avg}, "hook_point_in": "blocks.15.hook_resid_post",
        "hook_point_out": "blocks.15.hook_resid_post", "apply_decoder_bias_to_pre_encoder": True,
        "sparsity_include_decoder_norm": True, "use_decoder_bias": True}))
    sae = read(path)
    t = {k: v.to(torch.float32) for k, v in t.items()}
    s = D ** 0.5 / avg
    x = _x() * 2
    z = (x * s - t["decoder.bias"]) @ t["encoder.weight"].T + t["encoder.bias"]        # training units
    n = t["decoder.weight"].norm(dim=0)
    f_inf = z * n / s
    f = f_inf * (f_inf > theta)
    x_hat = ((f * s / n) @ t["decoder.weight"].T + t["decoder.bias"]) / s
    assert (f > 0).sum(1).float().mean() < F / 2                                          # the threshold acts
    with sae.ranking("float32"):
        assert torch.allclose(sae.encode(x), f, atol=1e-4) and torch.allclose(sae(x), x_hat, atol=1e-4)
    assert sae.cfg.decoder_norm == "unit"
    assert (sae.provenance.model, sae.provenance.hook_in) == ("meta-llama/Llama-3.1-8B", "resid_post.15")


def test_openai_relu_autoencoders_and_the_layer_norm_ones_refused(tmp_path):
    g = torch.Generator().manual_seed(14)
    s = {"pre_bias": torch.randn(D, generator=g) / 5, "encoder.weight": torch.randn(F, D, generator=g) / 4,
         "latent_bias": torch.randn(F, generator=g) / 5, "decoder.weight": torch.randn(D, F, generator=g) / 3,
         "stats_last_nonzero": torch.zeros(F, dtype=torch.int64), "activation": "ReLU", "activation_state_dict": {}}
    path = tmp_path / "gpt2-small" / "resid_delta_mlp_v4" / "autoencoders"
    path.mkdir(parents=True)
    torch.save(s, path / "5.pt")
    sae = read(path / "5.pt")
    x = _x()
    f = torch.relu((x - s["pre_bias"]) @ s["encoder.weight"].T + s["latent_bias"])
    _same(sae, f, f @ s["decoder.weight"].T + s["pre_bias"], x)
    assert (sae.provenance.model, sae.provenance.hook_in, sae.provenance.context) == ("gpt2", "mlp_out.5", 64)
    torch.save({**s, "activation": "TopK", "activation_state_dict": {"k": 32}}, path / "6.pt")
    with pytest.raises(FormatError, match="layer-normalises every token"):
        read(path / "6.pt")


def test_goodfire_pth(tmp_path):
    g = torch.Generator().manual_seed(15)
    s = {"encoder_linear.weight": torch.randn(F, D, generator=g) / 4,
         "encoder_linear.bias": torch.randn(F, generator=g) / 5,
         "decoder_linear.weight": torch.randn(D, F, generator=g) / 3,
         "decoder_linear.bias": torch.randn(D, generator=g)}
    path = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19"
    path.mkdir()
    torch.save(s, path / "Llama-3.1-8B-Instruct-SAE-l19.pth")
    sae = read(path)
    x = _x()
    f = torch.relu(x @ s["encoder_linear.weight"].T + s["encoder_linear.bias"])
    _same(sae, f, f @ s["decoder_linear.weight"].T + s["decoder_linear.bias"], x)
    assert (sae.provenance.model, sae.provenance.hook_in) == ("meta-llama/Llama-3.1-8B-Instruct", "resid_post.19")


def test_preflight_on_the_model_refuses_transposed_weights(tiny_model_dirs, corpus, tmp_path, capsys):
    """`dictlens convert --check`: the dictionary on the model's own activations at its hook."""
    from safetensors.torch import load_file

    from dictlens.cli import main

    model, acts, run = str(tiny_model_dirs["llama"]), tmp_path / "acts", tmp_path / "run"
    assert main(["harvest", "--model", model, "--hook", "resid_post.1", "--text", str(corpus), "--tokens", "6000",
                 "--context", "64", "--out", str(acts)]) == 0
    assert main(["train", "--acts", str(acts), "--k", "8", "--expansion", "1", "--tokens", "20000",   # F = D: square
                 "--batch-size", "256", "--no-plots", "--out", str(run)]) == 0
    assert main(["export", str(run), "--to", "saelens", "--out", str(tmp_path / "good")]) == 0
    check = ["--check", "--check-text", str(corpus), "--check-tokens", "2000"]
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "good"), "--out", str(tmp_path / "c0"), *check]) == 0
    assert "preflight on 2,000 tokens: FVU 0." in capsys.readouterr().out
    assert json.loads((tmp_path / "c0" / "config.json").read_text())["provenance"]["notes"]["preflight"]["fvu"] < 1
    good = load_file(str(tmp_path / "good" / "sae_weights.safetensors"))
    bad = tmp_path / "t"
    bad.mkdir()
    save_file({**good, "W_enc": good["W_enc"].T.contiguous(), "W_dec": good["W_dec"].T.contiguous()},
              str(bad / "sae_weights.safetensors"))
    (bad / "cfg.json").write_text((tmp_path / "good" / "cfg.json").read_text())
    assert main(["convert", str(bad), "--out", str(tmp_path / "ot"), *check]) == 2
    err = capsys.readouterr().err
    assert "refused after the preflight" in err and "likely transposed weights" in err and "--force" in err, err
    assert not (tmp_path / "ot").exists()                                  # nothing written
    assert main(["convert", str(bad), "--out", str(tmp_path / "forced"), *check, "--force"]) == 0
    assert "FORCED past" in capsys.readouterr().out
    # every command that loads the model runs the preflight on a foreign dictionary
    assert main(["search", str(tmp_path / "good"), "--text", "the cat sat on the mat"]) == 0
    assert "features fire on the text" in capsys.readouterr().out
    assert main(["search", str(bad), "--text", "the cat sat on the mat"]) == 2
    assert "likely transposed weights" in capsys.readouterr().err
    assert main(["search", str(bad), "--text", "the cat sat on the mat", "--force"]) == 0
    # a foreign dictionary's analysis, and the app's live text over it
    assert main(["analyze", str(tmp_path / "good"), "--text", str(corpus), "--tokens", "1000", "--context", "64",
                 "--no-report"]) == 2
    assert "give --out" in capsys.readouterr().err                         # never into the foreign folder
    assert main(["analyze", str(tmp_path / "good"), "--text", str(corpus), "--tokens", "1000", "--context", "64",
                 "--no-report", "--out", str(tmp_path / "an")]) == 0
    from dictlens.app.server import create_app

    reply = create_app(tmp_path / "an").test_client().post("/api/text", json={"text": "the cat sat on the mat"})
    assert reply.status_code == 200 and reply.get_json()["tokens"]


def test_preflight_names_a_missing_and_a_doubled_normalisation_factor(tmp_path):
    """On data with known features, offset like a residual stream and far from unit scale."""
    from safetensors.torch import load_file

    from dictlens.data.store import ArraySource
    from dictlens.eval.synthetic import generate, setting
    from dictlens.formats.preflight import preflight
    from dictlens.provenance import Provenance
    from dictlens.sae import SAEConfig
    from dictlens.train import Trainer
    from dictlens.train.config import TrainConfig

    data = generate(setting("sharkey", d=D, features=F, samples=40_000, mean_active=3))
    offset = torch.randn(D, generator=torch.Generator().manual_seed(3)) * 3
    x = (data.x + offset) * 40                                               # mean norm far from √D
    trainer = Trainer(SAEConfig(activation="topk", k=K, expansion=F / D), TrainConfig(tokens=200_000, batch_size=1024,
                      plots=False), ArraySource(x[:-4000]), tmp_path / "run", progress=False,
                      provenance=Provenance.of_sae(model="m", hook="resid_post.1"))
    sae = trainer.fit()
    held = x[-4000:]
    assert preflight(sae, held, where="trained").problem is None              # a sound SAE passes
    write(sae, tmp_path / "good", "saelens")
    good = load_file(str(tmp_path / "good" / "sae_weights.safetensors"))
    scale = sae.provenance.input_scale
    cfg = json.loads((tmp_path / "good" / "cfg.json").read_text())

    def variant(name, tensors, **changes):
        path = tmp_path / name
        path.mkdir()
        save_file(tensors, str(path / "sae_weights.safetensors"))
        (path / "cfg.json").write_text(json.dumps({**cfg, **changes}))
        return path

    missing = read(variant("m", {**good, "b_enc": good["b_enc"] * scale, "b_dec": good["b_dec"] * scale}))
    with pytest.raises(FormatError, match="likely a missing normalisation factor"):
        preflight(missing, held, where="m")
    recorded = sae.provenance.replace(notes={"recorded_l0": 40})      # published with ten times the L0 measured
    sae.provenance = recorded
    with pytest.raises(FormatError, match="L0 4.0 is far from the 40 recorded with the weights"):
        preflight(sae, held, where="recorded")
    doubled = read(variant("d", good, normalize_activations="expected_average_only_in"),
                   opts=ReadOptions(norm_scaling_factor=scale))
    with pytest.raises(FormatError, match="likely a normalisation factor applied twice"):
        preflight(doubled, held, where="d")


def test_saelens_registry_releases_resolve_to_their_hub_files_format_and_factor(monkeypatch):
    import importlib.util

    from dictlens.formats import registry

    releases = {"gpt2-small-res-jb": {"repo_id": "jbloom/GPT2-Small-SAEs-Reformatted", "model": "gpt2-small",
                                      "saes": [{"id": "blocks.8.hook_resid_pre", "path": "blocks.8.hook_resid_pre"}]},
                "gemma-scope-2b-pt-res": {"repo_id": "google/gemma-scope-2b-pt-res", "model": "gemma-2-2b",
                                          "conversion_func": "gemma_2",
                                          "saes": [{"id": "layer_12/width_16k/average_l0_82",
                                                    "path": "layer_12/width_16k/average_l0_82"}]},
                "llama_scope_lxr_8x": {"repo_id": "fnlp/Llama3_1-8B-Base-LXR-8x", "model": "Llama-3.1-8B",
                                       "conversion_func": "llama_scope",
                                       "saes": [{"id": "l15r_8x", "path": "Llama3_1-8B-Base-L15R-8x",
                                                 "norm_scaling_factor": 0.25, "l0": 30.5}]},
                "odd": {"repo_id": "x/y", "conversion_func": "deepseek_r1", "saes": [{"id": "a", "path": "a"}]}}
    src, fmt, opts, _ = registry.resolve("saelens:gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82",
                                         ReadOptions(), releases)
    assert (src, fmt, opts.model) == ("hf://google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82",
                                      "gemma-scope", "google/gemma-2-2b")
    src, fmt, opts, l0 = registry.resolve("saelens:llama_scope_lxr_8x/l15r_8x", ReadOptions(), releases)
    assert (fmt, opts.norm_scaling_factor, opts.model, l0) == ("llama-scope", 0.25, "meta-llama/Llama-3.1-8B", 30.5)
    assert registry.resolve("saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre", ReadOptions(), releases)[1] == \
        "saelens"
    with pytest.raises(InputError, match="no release 'gpt2-smal' .*did you mean 'gpt2-small-res-jb'"):
        registry.resolve("saelens:gpt2-smal/blocks.8.hook_resid_pre", ReadOptions(), releases)
    with pytest.raises(InputError, match="has no SAE 'blocks.9.hook_resid_pre'"):
        registry.resolve("saelens:gpt2-small-res-jb/blocks.9.hook_resid_pre", ReadOptions(), releases)
    with pytest.raises(FormatError, match="'deepseek_r1', a format dictlens has no reader for"):
        registry.resolve("saelens:odd/a", ReadOptions(), releases)
    if importlib.util.find_spec("sae_lens") is None:                      # CI: the optional extra is absent
        with pytest.raises(InputError, match="pip install sae-lens"):
            read("saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre")


# the fields Neuronpedia's importer reads (its convert-saedashboard-to-neuronpedia-export)
NP_FEATURE = {"modelId", "layer", "index", "creatorId", "createdAt", "hasVector", "vector", "vectorLabel", "hookName",
              "topkCosSimIndices", "topkCosSimValues", "neuron_alignment_indices", "neuron_alignment_values",
              "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_pearson",
              "correlated_neurons_l1", "correlated_features_indices", "correlated_features_pearson",
              "correlated_features_l1", "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
              "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
              "logits_hist_data_bar_values", "decoder_weights_dist", "maxActApprox", "vectorDefaultSteerStrength"}
NP_ACTIVATION = {"id", "tokens", "modelId", "layer", "index", "maxValue", "maxValueTokenIndex", "minValue", "values",
                 "dfaValues", "dfaTargetIndex", "dfaMaxValue", "creatorId", "createdAt", "lossValues",
                 "logitContributions", "binMin", "binMax", "binContains", "qualifyingTokenIndex", "dataIndex",
                 "dataSource"}


def test_neuronpedia_export_of_an_analysis(analysed_run, tmp_path, capsys):
    import gzip

    from dictlens.analysis.db import FeatureDB
    from dictlens.cli import main
    from dictlens.load import load_sae

    run = analysed_run
    assert main(["export", str(run), "--to", "neuronpedia", "--source-set", "tiny-res", "--out",
                 str(tmp_path / "np")]) == 0
    root = tmp_path / "np" / "1-tiny-res"
    for name in ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl"):
        assert json.loads((root / name).read_text())
    features = [json.loads(line) for line in gzip.decompress((root / "features" / "batch-0.jsonl.gz").read_bytes())
                .decode().splitlines()]
    activations = [json.loads(line) for line in
                   gzip.decompress((root / "activations" / "batch-0.jsonl.gz").read_bytes()).decode().splitlines()]
    db, sae = FeatureDB(run / "analysis"), load_sae(run)
    assert len(features) == 64 and all(set(f) == NP_FEATURE for f in features)
    assert activations and all(set(a) == NP_ACTIVATION for a in activations)
    f = max(features, key=lambda r: r["frac_nonzero"])
    assert f["frac_nonzero"] == pytest.approx(db.feature(f["index"])["density"])
    assert f["vector"] == pytest.approx(sae.W_dec[f["index"]].tolist(), abs=1e-6)
    assert f["hookName"] == "blocks.1.hook_resid_post" and f["layer"] == "1-tiny-res"
    assert f["pos_str"] == [t["token"] for t in db.feature(f["index"])["logit_top"]]
    mine = [a for a in activations if a["index"] == f["index"]]
    assert mine and all(a["maxValue"] == max(a["values"]) and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
                        for a in mine)
    assert {a["binMin"] for a in mine if "-top-" in a["id"]} == {-1.0}                    # SAEDashboard: top = bin -1
    assert any(a["binMin"] >= 0 for a in mine)                                             # and the quantile bins
    assert main(["export", str(run), "--to", "neuronpedia", "--source-set", "bad name!", "--out",
                 str(tmp_path / "np2")]) == 2
    assert "letters, digits and hyphens" in capsys.readouterr().err


def test_a_saelens_unit_sae_and_a_dictlens_unit_sae_give_the_same_reconstruction(tmp_path):
    """One SAE trained on x·s, held two ways: dictlens folds s into the biases (codes in raw
    units), SAELens keeps normalised-unit weights and folds s into W_enc, W_dec, b_dec on load
    (codes in normalised units). Same x̂; codes differ by exactly s."""
    from dictlens.provenance import Provenance
    from dictlens.sae import SAE, SAEConfig

    s = 7.5
    norm = SAE(SAEConfig(d_in=D, n_features=F, activation="jumprelu"), seed=4, provenance=Provenance.of_sae())
    with torch.no_grad():
        norm.b_enc.normal_(0, 0.3)
        norm.b_dec.normal_(0, 0.3)
        norm.log_threshold.uniform_(-2.5, -1.0)
        norm.input_scale.fill_(s)                       # trained on x·s: dictlens's fold happens on save
    dictlens_units = SAE.load(norm.eval().save(tmp_path / "dl"))
    st = {k: v.detach() for k, v in norm.state_dict().items()}
    path = _write_saelens(tmp_path / "sl", "jumprelu", {"W_enc": st["W_enc_"].T.contiguous(), "W_dec": st["W_dec"],
                                                        "b_enc": st["b_enc"], "b_dec": st["b_dec"],
                                                        "threshold": st["log_threshold"].exp()})
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    saelens_units = read(path, opts=ReadOptions(norm_scaling_factor=s))
    x = _x() / s * 3
    assert torch.allclose(saelens_units(x), dictlens_units(x), atol=1e-5)
    codes = dictlens_units.encode(x)
    assert (codes > 0).any() and torch.allclose(saelens_units.encode(x), codes * s, atol=1e-4)
