"""Gemma Scope: Google DeepMind's JumpReLU SAEs for Gemma 2 (``params.npz``) and Gemma 3
(Gemma Scope 2: ``config.json`` + ``params.safetensors``).

Both compute ``pre = x W_enc + b_enc`` (no ``b_dec`` subtraction), ``f = relu(pre)·1[pre > θ]``,
``x̂ = f W_dec + b_dec``, in raw activation units: a dictlens JumpReLU SAE without pre-bias.
Gemma Scope 1 names neither model nor hook in its files; they are read from the hub path
(``google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82``), else given with
``--model`` / ``--hook``. Its ``res`` SAEs read the residual stream after block L; ``mlp``
and ``att`` read TransformerLens's ``hook_mlp_out`` (after Gemma's post-feed-forward norm)
and ``attn.hook_z`` (the attention output projection's input). Gemma Scope 2 names the
Hugging Face points (``hf_hook_point_in/out``); its transcoders (``pre_feedforward_layernorm`` output,
the MLP's input, to ``post_feedforward_layernorm`` output) read as dictlens transcoders, the affine skip
``x @ A`` as ``W_skip = Aᵀ``. Gemma Scope 1's transcoders and embedding SAEs, and Gemma Scope 2's
cross-layer transcoders, are refused.

Write: the Gemma Scope 2 layout, for JumpReLU, ReLU (θ = 0) and BatchTopK (its threshold
per feature) SAEs and transcoders (with their skip), the pre-bias folded into ``b_enc``
(``b_enc − W_enc b_dec``: exact).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dictlens.errors import CheckpointError, FormatError
from dictlens.formats.base import (
    ReadOptions,
    Weights,
    build_sae,
    encoder_bias_for,
    export_state,
    log_threshold,
    need,
    read_safetensors,
    written_by_dictlens,
)
from dictlens.formats.hooks import from_module_point, from_transformer_lens, to_module_point
from dictlens.io import atomic_write_bytes, atomic_write_json, read_json
from dictlens.sae.activations import Form

if TYPE_CHECKING:
    from dictlens.provenance import Provenance
    from dictlens.sae.model import SAE

NPZ, GS2_CONFIG, GS2_WEIGHTS = "params.npz", "config.json", "params.safetensors"
_REPO = re.compile(r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att|transcoders)")
_LAYER = re.compile(r"layer_(\d+)")


def _weights(t: dict[str, torch.Tensor], where: str) -> tuple[Weights, torch.Tensor]:
    """The weights (a transcoder's decoder may be of another width; its affine skip ``x @ A`` becomes
    dictlens's ``W_skip = Aᵀ``) and the thresholds."""
    t = {k.lower() if k.lower().startswith("w_") else k: v for k, v in t.items()}
    for name in ("w_enc", "w_dec"):
        if name not in t:
            raise FormatError(f"{where}: no tensor {name!r} (found {', '.join(sorted(t))})")
    D, F = t["w_enc"].shape
    D_out = int(t["w_dec"].shape[-1])
    w = Weights(W_enc=need(t, "w_enc", (D, F), where).T.contiguous(), W_dec=need(t, "w_dec", (F, D_out), where),
                b_enc=need(t, "b_enc", (F,), where), b_dec=need(t, "b_dec", (D_out,), where))
    if "affine_skip_connection" in t:
        w.W_skip = need(t, "affine_skip_connection", (D, D_out), where).T.contiguous()
    return w, need(t, "threshold", (F,), where)


def _provenance(source: str, origin: Path, model: str | None, hook: str | None, notes: dict[str, object]
                ) -> Provenance:
    from dictlens.provenance import Provenance

    return Provenance.of_sae(model=model, hook=hook, source=source, origin=str(origin), normalization="none",
                             notes={source: notes})


class GemmaScope:
    name = "gemma-scope"
    describe = "Gemma Scope for Gemma 2 (params.npz)"
    writes = False

    def _file(self, path: Path) -> Path:
        return path / NPZ if path.is_dir() else path

    def detect(self, path: Path) -> bool:
        return self._file(path).name == NPZ and self._file(path).is_file()

    def read(self, path: Path, opts: ReadOptions) -> SAE:
        import numpy as np

        f = self._file(path)
        try:   # the hub marks npz as pickle: never unpickle
            with np.load(f, allow_pickle=False) as z:
                tensors = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        except ValueError as e:
            raise FormatError(f"{f}: holds pickled objects, which dictlens never loads ({e})") from None
        except (OSError, EOFError) as e:
            raise CheckpointError(f"{f} is truncated or damaged ({e})") from None
        w, theta = _weights(tensors, str(f))
        w.extra["log_threshold"] = log_threshold(theta)
        model, hook, notes = self._where(f, opts)
        prov = _provenance(self.name, f, model, hook, notes)
        if "recorded_l0" in notes:   # where the preflight looks for it
            prov = prov.replace(notes={**prov.notes, "recorded_l0": notes["recorded_l0"]})
        return build_sae("jumprelu", w, pre_bias=False, provenance=prov)

    def _where(self, f: Path, opts: ReadOptions) -> tuple[str | None, str | None, dict[str, object]]:
        text = f.as_posix().replace("models--google--", "google/")
        repo, layer = _REPO.search(text), _LAYER.search(text)
        if "/embedding/" in text:
            raise FormatError(f"{f}: an embedding SAE, trained after Gemma's √d embedding scale, which dictlens's "
                              "hooks do not include yet")
        if repo and repo.group(3) == "transcoders":
            raise FormatError(f"{f}: a Gemma Scope 1 transcoder (npz, reading TransformerLens's ln2.hook_normalized); "
                              "dictlens reads Gemma Scope 2's transcoders, not these yet")
        model = opts.model or (f"google/gemma-2-{repo.group(1)}" + ("-it" if repo.group(2) == "it" else "")
                               if repo else None)
        hook = opts.hook
        notes: dict[str, object] = {}
        l0 = re.search(r"average_l0_(\d+)", text)
        if l0:
            notes["recorded_l0"] = int(l0.group(1))
        if hook is None and repo and layer:
            point = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}[repo.group(3)]
            notes["hook_name"] = f"blocks.{layer.group(1)}.{point}"
            hook = from_transformer_lens(str(notes["hook_name"]), model)
        return model, hook, notes

    def write(self, sae: SAE, out: Path) -> list[Path]:
        raise FormatError("gemma-scope: write the Gemma Scope 2 layout (--to gemma-scope-2)")


class GemmaScope2:
    name = "gemma-scope-2"
    describe = "Gemma Scope 2 for Gemma 3 (config.json + params.safetensors)"
    writes = True

    def detect(self, path: Path) -> bool:
        if not (path.is_dir() and (path / GS2_CONFIG).is_file() and (path / GS2_WEIGHTS).is_file()):
            return False
        cfg = read_json(path / GS2_CONFIG)
        return isinstance(cfg, dict) and "hf_hook_point_in" in cfg

    def read(self, path: Path, opts: ReadOptions) -> SAE:
        cfg = read_json(path / GS2_CONFIG)
        where = str(path / GS2_WEIGHTS)
        tensors = read_safetensors(path / GS2_WEIGHTS)
        if cfg.get("architecture", "jump_relu") != "jump_relu":
            raise FormatError(f"{path / GS2_CONFIG}: architecture {cfg['architecture']!r}; Gemma Scope 2 SAEs "
                              "are jump_relu")
        point_in, point_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out") or cfg.get("hf_hook_point_in")
        if bool(cfg.get("affine_connection")) != ("affine_skip_connection" in tensors):
            said = "names an affine skip connection the file does not hold" if cfg.get("affine_connection") else \
                "says affine_connection false, but the file holds an affine skip connection"
            raise FormatError(f"{path / GS2_CONFIG}: the config {said}")
        w, theta = _weights(tensors, where)
        w.extra["log_threshold"] = log_threshold(theta)
        transcoder = point_in != point_out or w.W_skip is not None or w.W_dec.shape[1] != w.W_enc.shape[1]
        model = opts.model or cfg.get("model_name")
        hook = opts.hook or (from_module_point(str(point_in)) if point_in else None)
        notes: dict[str, object] = {k: cfg[k] for k in ("hf_hook_point_in", "hf_hook_point_out", "width", "l0",
                                                        "type", "affine_connection") if k in cfg}
        found = _provenance(self.name, path, model, hook, notes)
        if transcoder:   # what it writes (Gemma 3's post-feed-forward norm output: a module path in dictlens)
            found = found.replace(hook_out=from_module_point(str(point_out)) if point_out else None)
        prov = written_by_dictlens(cfg, path / GS2_CONFIG, found)
        return build_sae("jumprelu", w, pre_bias=False, provenance=prov, transcoder=transcoder)

    def write(self, sae: SAE, out: Path) -> list[Path]:
        from safetensors.torch import save

        state = export_state(sae)
        kind = sae.activation
        if kind.form not in (Form.THRESHOLD, Form.RELU):   # ReLU: θ = 0
            raise FormatError(f"Gemma Scope 2 holds JumpReLU SAEs; a {sae.cfg.activation} SAE cannot be written as "
                              f"one ({kind.form} codes; writable: ReLU and thresholded codes)")
        tensors = {"w_enc": state["W_enc"].T.contiguous(), "w_dec": state["W_dec"].contiguous(),
                   "b_enc": encoder_bias_for(sae, state, subtracts_b_dec=False), "b_dec": state["b_dec"],
                   "threshold": kind.inference_threshold(state, sae.n_features)}
        p = sae.provenance
        point = to_module_point(p.hook_in, p.model) if p.hook_in else None
        point_out = point
        if sae.cfg.transcoder:
            point_out = to_module_point(p.hook_out, p.model) if p.hook_out else None
            if sae.cfg.skip:   # Gemma Scope 2 adds x @ A: A = W_skipᵀ
                tensors["affine_skip_connection"] = state["W_skip"].T.contiguous()
        cfg = {"architecture": "jump_relu", "model_name": p.model, "hf_hook_point_in": point,
               "hf_hook_point_out": point_out, "width": sae.n_features, "affine_connection": sae.cfg.skip,
               "type": "transcoder" if sae.cfg.transcoder else "sae", "dictlens": {"provenance": p.to_json()}}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / GS2_WEIGHTS, save(tensors))
        atomic_write_json(out / GS2_CONFIG, cfg)
        return [out / GS2_CONFIG, out / GS2_WEIGHTS]


FORMAT, FORMAT_2 = GemmaScope(), GemmaScope2()
