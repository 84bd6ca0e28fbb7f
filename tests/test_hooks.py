"""Every named hook point reads exactly what the model itself computes, on three architectures."""

from __future__ import annotations

import pytest
import torch

from dictlens import Tap, named_hooks, resolve_hook
from dictlens.errors import HookError

from .conftest import ARCHS

DOWN_PROJ = {"llama": "down_proj", "gpt2": "c_proj", "gpt_neox": "dense_4h_to_h"}
FINAL_NORM = {"llama": "model.norm", "gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}


def _ids(lm, batch=2, length=12):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, lm.config.vocab_size, (batch, length), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_named_hooks_match_hidden_states(tiny_models, arch):
    lm = tiny_models[arch]
    ids = _ids(lm)
    hidden = lm.model(ids, output_hidden_states=True).hidden_states
    n = lm.n_layers
    acts = Tap(lm, [f"{k}.{i}" for i in range(n) for k in ("resid_pre", "resid_post", "attn_out", "mlp_out")])(ids)
    for i in range(n):
        torch.testing.assert_close(acts[f"resid_pre.{i}"], hidden[i], rtol=0, atol=0)
        if i < n - 1:
            torch.testing.assert_close(acts[f"resid_post.{i}"], hidden[i + 1], rtol=0, atol=0)
        # The residual update is exactly the two sublayer outputs.
        torch.testing.assert_close(acts[f"resid_pre.{i}"] + acts[f"attn_out.{i}"] + acts[f"mlp_out.{i}"],
                                   acts[f"resid_post.{i}"], rtol=1e-5, atol=1e-5)
    # hidden_states' last entry has the final norm applied; the block output has not.
    final_norm = dict(lm.model.named_modules())[FINAL_NORM[arch]]
    torch.testing.assert_close(final_norm(acts[f"resid_post.{n - 1}"]), hidden[n], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_raw_module_paths_read_module_input_and_output(tiny_models, arch):
    lm = tiny_models[arch]
    linear = named_hooks(lm.model)["mlp_out.1"].module + "." + DOWN_PROJ[arch]
    seen = {}
    module = dict(lm.model.named_modules())[linear]
    handle = module.register_forward_hook(lambda m, a, o: seen.update(inp=a[0].clone(), out=o.clone()))
    try:
        acts = Tap(lm, [linear, f"{linear}:input"], stop_early=False)(_ids(lm))
    finally:
        handle.remove()
    torch.testing.assert_close(acts[linear], seen["out"], rtol=0, atol=0)
    torch.testing.assert_close(acts[f"{linear}:input"], seen["inp"], rtol=0, atol=0)
    # mlp_hidden is the output projection's input: the MLP's neurons, as wide as the MLP
    neurons = Tap(lm, ["mlp_hidden.1"], stop_early=False)(_ids(lm))["mlp_hidden.1"]
    torch.testing.assert_close(neurons, seen["inp"], rtol=0, atol=0)
    assert neurons.shape[-1] == lm.config.intermediate_size if arch == "llama" else neurons.shape[-1] > lm.d_model


@pytest.mark.parametrize("arch", ARCHS)
def test_early_stop_skips_later_blocks_and_changes_nothing(tiny_models, arch):
    lm = tiny_models[arch]
    ids = _ids(lm)
    blocks = {h.module for name, h in named_hooks(lm.model).items() if name.startswith("resid_post")}
    calls = []
    modules = dict(lm.model.named_modules())
    handles = [modules[b].register_forward_hook(lambda m, a, o, b=b: calls.append(b)) for b in sorted(blocks)]
    try:
        early = Tap(lm, ["resid_post.1", "mlp_out.0"])
        a = early(ids)
        n_early = len(calls)
        full = Tap(lm, ["resid_post.1", "mlp_out.0"], stop_early=False)
        b = full(ids)
    finally:
        for h in handles:
            h.remove()
    assert early.stopped_early and not full.stopped_early
    assert n_early == 2  # blocks 0 and 1 only
    assert len(calls) - n_early == lm.n_layers
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# the norm whose output the MLP reads, and what that norm reads (GPT-NeoX's parallel residual: the block's input)
MLP_NORM = {"llama": "post_attention_layernorm", "gpt2": "ln_2", "gpt_neox": "post_attention_layernorm"}


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_in_is_what_the_mlp_receives(tiny_models, arch):
    """mlp_in.L is the block's norm applied to the residual the MLP sees, computed here from the
    other hooks and the norm module, and the MLP applied to it gives mlp_out.L exactly."""
    lm = tiny_models[arch]
    ids = _ids(lm)
    n = lm.n_layers
    acts = Tap(lm, [f"{k}.{i}" for i in range(n) for k in ("resid_pre", "attn_out", "mlp_in", "mlp_out")])(ids)
    modules = dict(lm.model.named_modules())
    parallel = bool(getattr(lm.config, "use_parallel_residual", False))
    for i in range(n):
        block = named_hooks(lm.model)[f"resid_pre.{i}"].module
        norm = modules[f"{block}.{MLP_NORM[arch]}"]
        mid = acts[f"resid_pre.{i}"] if parallel else acts[f"resid_pre.{i}"] + acts[f"attn_out.{i}"]
        with torch.no_grad():
            torch.testing.assert_close(acts[f"mlp_in.{i}"], norm(mid), rtol=1e-6, atol=1e-6)
            mlp = modules[named_hooks(lm.model)[f"mlp_out.{i}"].module]
            torch.testing.assert_close(mlp(acts[f"mlp_in.{i}"]), acts[f"mlp_out.{i}"], rtol=0, atol=0)
        assert acts[f"mlp_in.{i}"].shape[-1] == lm.d_model


def test_unknown_hook_lists_valid_ones(llama):
    valid = r"valid: resid_pre.0-3, resid_post.0-3, attn_out.0-3, mlp_in.0-3, mlp_hidden.0-3"
    with pytest.raises(HookError, match=r"resid_post.9.*" + valid):
        resolve_hook(llama.model, "resid_post.9")
    with pytest.raises(HookError, match="no.such.module"):
        resolve_hook(llama.model, "no.such.module")
    with pytest.raises(HookError, match="sideways"):
        resolve_hook(llama.model, "model.layers.0.mlp:sideways")


def test_hook_names_are_the_same_scheme_everywhere(tiny_models):
    for lm in tiny_models.values():
        names = list(named_hooks(lm.model))
        assert names[:6] == ["resid_pre.0", "attn_out.0", "mlp_in.0", "mlp_hidden.0", "mlp_out.0", "resid_post.0"]
        assert len(names) == 6 * lm.n_layers
