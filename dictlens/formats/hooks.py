"""Foreign hook names ↔ dictlens hooks.

SAELens and circuit-tracer name activations as TransformerLens does (``blocks.L.hook_resid_post``);
dictlens names them ``resid_post.L`` or by a Hugging Face module path. Where the two
libraries' points differ, the TransformerLens point is mapped to the module that computes
it: Gemma's ``hook_mlp_out`` / ``hook_attn_out`` come after Gemma's extra post-norms, so they
are that norm's output, not the plain MLP / attention output dictlens's ``mlp_out.L`` reads.
The blocks' module path is read from the model's name (GPT-2: ``transformer.h``; multimodal
Gemma 3: ``model.language_model.layers``; otherwise ``model.layers``); loading the model
checks it (a hook that does not resolve is refused with the valid ones).
"""

from __future__ import annotations

import re

from dictlens.data.hooks import NAMED_HOOK
from dictlens.errors import FormatError

_TL = re.compile(r"^blocks\.(\d+)\.(.+)$")
KNOWN = ("hook_resid_pre", "hook_resid_post", "hook_resid_mid", "hook_mlp_out", "hook_attn_out", "attn.hook_z",
         "mlp.hook_in", "mlp.hook_post", "ln2.hook_normalized")


def _family(model: str | None) -> str:
    m = (model or "").lower()
    if "gpt2" in m or "gpt-2" in m:
        return "gpt2"
    if "gemma" in m:
        return "gemma"
    return "llama"


def _blocks(model: str | None) -> str:
    m = (model or "").lower()
    if _family(model) == "gpt2":
        return "transformer.h"
    if "gemma-3" in m and not any(s in m for s in ("270m", "1b")):
        return "model.language_model.layers"   # Gemma 3 4B and up are multimodal
    return "model.layers"


def from_transformer_lens(name: str, model: str | None) -> str:
    """The dictlens hook for TransformerLens hook ``name`` of ``model``; unknown ones are refused
    with the list of known ones."""
    m = _TL.match(name)
    if m is None:
        if name in ("hook_embed",):
            return "model.embed_tokens" if _family(model) != "gpt2" else "transformer.wte"
        raise FormatError(f"hook {name!r}: not a TransformerLens block hook (blocks.L.X with X one of "
                          f"{', '.join(KNOWN)})")
    layer, point = int(m.group(1)), m.group(2)
    family, blocks = _family(model), _blocks(model)
    block = f"{blocks}.{layer}"
    simple = {"hook_resid_pre": f"resid_pre.{layer}", "hook_resid_post": f"resid_post.{layer}"}
    if point in simple:
        return simple[point]
    if point in ("hook_mlp_out", "hook_attn_out"):
        if family == "gemma":   # after Gemma's post-norms
            norm = "post_feedforward_layernorm" if point == "hook_mlp_out" else "post_attention_layernorm"
            return f"{block}.{norm}"
        return f"{'mlp' if point == 'hook_mlp_out' else 'attn'}_out.{layer}"
    if point == "hook_resid_mid":
        norm = {"gpt2": "ln_2", "gemma": "pre_feedforward_layernorm"}.get(family, "post_attention_layernorm")
        return f"{block}.{norm}:input"
    if point == "attn.hook_z":
        return f"{block}.attn.c_proj:input" if family == "gpt2" else f"{block}.self_attn.o_proj:input"
    if point == "mlp.hook_in":
        return f"mlp_in.{layer}"
    if point == "ln2.hook_normalized":
        raise FormatError(f"hook {name!r}: TransformerLens's unweighted RMS-normalised MLP input, which no module "
                          "of the Hugging Face model outputs (the MLP's input is weighted by the norm's gain); "
                          "give the hook the SAE was meant for with --hook")
    if point == "mlp.hook_post":
        return f"mlp_hidden.{layer}"
    raise FormatError(f"hook {name!r}: no dictlens equivalent is known for {point!r} (known: {', '.join(KNOWN)})")


def to_transformer_lens(hook: str, model: str | None) -> str | None:
    """The TransformerLens name of dictlens ``hook`` (None when there is none: a module path
    TransformerLens does not expose)."""
    m = NAMED_HOOK.match(hook)
    if m is None:
        layer = re.search(r"\.(\d+)\.", hook)
        for point in KNOWN:   # a module path one of the TransformerLens names maps to
            try:
                if layer and from_transformer_lens(f"blocks.{layer.group(1)}.{point}", model) == hook:
                    return f"blocks.{layer.group(1)}.{point}"
            except FormatError:
                continue
        return None
    kind, index = m.group(1), m.group(2)
    if kind == "mlp_hidden":
        return f"blocks.{index}.mlp.hook_post"
    if kind == "mlp_in":
        return f"blocks.{index}.mlp.hook_in"
    if kind in ("attn_out", "mlp_out") and _family(model) == "gemma":
        return None   # TransformerLens's Gemma hook_*_out is after the post-norm: another point
    return f"blocks.{index}.hook_{kind}"


_BLOCK = re.compile(r"^(?:model\.language_model\.layers|model\.layers|transformer\.h)\.(\d+)$")


def from_module_point(point: str) -> str:
    """The dictlens hook for a Hugging Face module point, ``PATH.output`` / ``PATH.input``
    (Gemma Scope 2) or a bare module path (its output): a block's output is ``resid_post.L``."""
    io = "output"
    for suffix in (".output", ".input"):
        if point.endswith(suffix):
            point, io = point[: -len(suffix)], suffix[1:]
    hidden = re.match(r"^(?:model\.language_model\.layers|model\.layers|transformer\.h)\.(\d+)\.mlp\."
                      r"(?:down_proj|c_proj)$", point)
    if hidden and io == "input":
        return f"mlp_hidden.{hidden.group(1)}"
    pre_norm = re.match(r"^(?:model\.language_model\.layers|model\.layers)\.(\d+)\.pre_feedforward_layernorm$", point)
    if pre_norm and io == "output":   # (Gemma 2/3: what the MLP receives, a transcoder's input)
        return f"mlp_in.{pre_norm.group(1)}"
    mlp = re.match(r"^(?:model\.language_model\.layers|model\.layers|transformer\.h)\.(\d+)\.mlp$", point)
    if mlp:
        return f"{'mlp_in' if io == 'input' else 'mlp_out'}.{mlp.group(1)}"
    m = _BLOCK.match(point)
    if m and io == "output":
        return f"resid_post.{m.group(1)}"
    if m:
        return f"resid_pre.{m.group(1)}"
    return point + (":input" if io == "input" else "")


def from_base_model_path(path: str) -> str:
    """The dictlens hook for a module path relative to the base model (sparsify's hookpoints:
    ``layers.10``, ``layers.10.mlp``, ``embed_tokens``)."""
    m = re.match(r"^(?:model\.)?layers\.(\d+)(?:\.(mlp|self_attn))?$", path)
    if m:
        kind = {None: "resid_post", "mlp": "mlp_out", "self_attn": "attn_out"}[m.group(2)]
        return f"{kind}.{m.group(1)}"
    return path if path.startswith("model.") else f"model.{path}"


def base_model_input(path: str) -> str:
    """The dictlens hook of what the module at sparsify hookpoint ``path`` receives (a transcoder's input):
    ``layers.10.mlp`` → ``mlp_in.10``, ``layers.10`` → ``resid_pre.10``, else the module's raw input."""
    m = re.match(r"^(?:model\.)?layers\.(\d+)(\.mlp)?$", path)
    if m:
        return f"{'mlp_in' if m.group(2) else 'resid_pre'}.{m.group(1)}"
    return (path if path.startswith("model.") else f"model.{path}") + ":input"


def to_base_model_path(hook: str) -> str:
    """sparsify's hookpoint name for dictlens ``hook``."""
    m = re.match(r"^(resid_post|mlp_out|attn_out)\.(\d+)$", hook)
    if m:
        return f"layers.{m.group(2)}" + {"resid_post": "", "mlp_out": ".mlp", "attn_out": ".self_attn"}[m.group(1)]
    if re.match(r"^(resid_pre|mlp_in|mlp_hidden)\.\d+$", hook) or ":" in hook:
        raise FormatError(f"hook {hook!r}: sparsify names a module's output relative to the base model; "
                          "this hook is an input")
    return hook.removeprefix("model.")


def to_module_point(hook: str, model: str | None) -> str:
    """Gemma Scope 2's ``PATH.output`` / ``PATH.input`` for dictlens ``hook``."""
    m = NAMED_HOOK.match(hook)
    blocks = _blocks(model)
    if m is None:
        path, _, io = hook.partition(":")
        return f"{path}.{io or 'output'}"
    kind, layer = m.group(1), m.group(2)
    if kind == "resid_post":
        return f"{blocks}.{layer}.output"
    if kind == "resid_pre":
        return f"{blocks}.{layer}.input"
    if kind == "mlp_hidden":
        return f"{blocks}.{layer}.mlp.{'c_proj' if _family(model) == 'gpt2' else 'down_proj'}.input"
    if kind == "mlp_in":
        return f"{blocks}.{layer}.mlp.input"
    return f"{blocks}.{layer}.{'mlp' if kind == 'mlp_out' else 'self_attn'}.output"


_HF_ORGS = (("gemma", "google"), ("pythia", "EleutherAI"), ("llama", "meta-llama"), ("qwen", "Qwen"),
            ("mistral", "mistralai"))


def hf_model_name(name: str | None) -> str | None:
    """The Hugging Face id of a TransformerLens model name (``gpt2-small`` → ``openai-community/gpt2``,
    ``gemma-2-2b`` → ``google/gemma-2-2b``); ids and paths are returned as they are."""
    if not name or "/" in name:
        return name
    if name in ("gpt2", "gpt2-small"):
        return "openai-community/gpt2"
    if name.startswith("gpt2-"):
        return "openai-community/" + {"medium": "gpt2-medium", "large": "gpt2-large", "xl": "gpt2-xl"}.get(
            name[5:], name)
    for key, org in _HF_ORGS:
        if name.lower().startswith(key):
            return f"{org}/{name}"
    return name
