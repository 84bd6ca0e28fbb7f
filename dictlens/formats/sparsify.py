"""EleutherAI sparsify: one folder per hookpoint, ``cfg.json`` + ``sae.safetensors``.

Feature-major like dictlens (``encoder.weight [F, D]``, ``encoder.bias``, ``W_dec [F, D]``,
``b_dec``), ``b_dec`` subtracted from an SAE's input, ``relu`` then TopK
or group-max (k contiguous groups, the largest of each): dictlens's topk and groupmax, an
identity mapping. The hookpoint is the folder's name, a module path relative to the base
model (``layers.10`` is the output of block 10: ``resid_post.10``); the model comes from
``--model`` or a ``model`` entry in the run's ``config.json`` beside the hookpoints.
Transcoders (``transcode``: the hookpoint module's input to its output, no ``b_dec`` subtracted) and
their skip connections (``W_skip [D, D]``, ``x @ W_skipᵀ``) read and write as they are; ``multi_topk``
and signed latents are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dictlens.errors import FormatError
from dictlens.formats.base import (
    ReadOptions,
    Weights,
    build_sae,
    encoder_bias_for,
    export_state,
    need,
    read_safetensors,
    written_by_dictlens,
)
from dictlens.formats.hooks import base_model_input, from_base_model_path, to_base_model_path
from dictlens.io import atomic_write_bytes, atomic_write_json, read_json
from dictlens.sae.activations import Form

if TYPE_CHECKING:
    from dictlens.sae.model import SAE

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


class Sparsify:
    name = "sparsify"
    describe = "EleutherAI sparsify hookpoint folder (cfg.json + sae.safetensors)"
    writes = True

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()

    def read(self, path: Path, opts: ReadOptions) -> SAE:
        cfg: dict[str, Any] = read_json(path / CFG)
        where = str(path / WEIGHTS)
        for flag, what in (("multi_topk", "the multi-TopK loss's decoding"), ("signed", "signed latents")):
            if cfg.get(flag):
                raise FormatError(f"{path / CFG}: {flag} ({what}), which dictlens cannot express yet")
        transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
        if skip and not transcode:
            raise FormatError(f"{path / CFG}: a skip connection on an SAE (skip_connection without transcode); "
                              "dictlens has skip connections on transcoders only")
        activation = str(cfg.get("activation", "topk"))
        if activation not in ("topk", "groupmax"):
            raise FormatError(f"{path / CFG}: activation {activation!r} (readable: topk, groupmax)")
        t = read_safetensors(path / WEIGHTS)
        if "encoder.weight" not in t:
            raise FormatError(f"{where}: no tensor 'encoder.weight' (found {', '.join(sorted(t))})")
        F, D = t["encoder.weight"].shape
        w = Weights(W_enc=need(t, "encoder.weight", (F, D), where), W_dec=need(t, "W_dec", (F, D), where),
                    b_enc=need(t, "encoder.bias", (F,), where), b_dec=need(t, "b_dec", (D,), where),
                    W_skip=need(t, "W_skip", (D, D), where) if skip else None)   # (x @ W_skipᵀ, as dictlens)
        model = opts.model
        run_cfg = path.parent / "config.json"
        if model is None and run_cfg.is_file():
            run = read_json(run_cfg)
            model = run.get("model") if isinstance(run, dict) else None
        from dictlens.provenance import Provenance

        notes: dict[str, object] = {"hookpoint": path.name,
                                    **{k: cfg[k] for k in ("k", "num_latents", "expansion_factor") if k in cfg}}
        written = from_base_model_path(path.name)   # a transcoder reads the module's input, writes its output
        hook_in = opts.hook or (base_model_input(path.name) if transcode else written)
        prov = Provenance(model=model, hook_in=hook_in, hook_out=written if transcode else hook_in, source=self.name,
                          origin=str(path), normalization="none", notes={self.name: notes})
        return build_sae(activation, w, pre_bias=not transcode, k=int(cfg["k"]), transcoder=transcode,
                         provenance=written_by_dictlens(cfg, path / CFG, prov))

    def write(self, sae: SAE, out: Path) -> list[Path]:
        """Into ``out/<hookpoint>/`` (the folder sparsify's ``load_many`` reads)."""
        from safetensors.torch import save

        form = sae.activation.form
        if form not in (Form.TOPK, Form.GROUPMAX):
            raise FormatError(f"sparsify holds TopK and group-max SAEs; a {sae.cfg.activation} SAE cannot be "
                              "written as one")
        state = export_state(sae)
        p = sae.provenance
        transcode = sae.cfg.transcoder
        if transcode:   # sparsify's: a module's input to its output, one width
            if sae.d_out != sae.d_in:
                raise FormatError(f"sparsify transcoders write what they read's width; this one reads {sae.d_in} "
                                  f"and writes {sae.d_out}")
            if p.hook_out and p.hook_in != base_model_input(to_base_model_path(p.hook_out)):
                raise FormatError(f"sparsify transcoders read the input of the module whose output they write; this "
                                  f"one reads {p.hook_in} and writes {p.hook_out}")
        # sparsify subtracts b_dec from an SAE's input, never from a transcoder's
        b_enc = state["b_enc"] if transcode else encoder_bias_for(sae, state, subtracts_b_dec=True)
        written = p.hook_out if transcode else p.hook_in
        folder = out / (to_base_model_path(written) if written else "sae")
        tensors = {"encoder.weight": state["W_enc"].contiguous(), "encoder.bias": b_enc,
                   "W_dec": state["W_dec"].contiguous(), "b_dec": state["b_dec"]}
        if sae.cfg.skip:
            tensors["W_skip"] = state["W_skip"].contiguous()
        cfg = {"activation": str(form), "expansion_factor": sae.n_features // sae.d_in, "normalize_decoder": True,
               "num_latents": sae.n_features, "k": sae.cfg.k, "multi_topk": False, "skip_connection": sae.cfg.skip,
               "transcode": transcode, "d_in": sae.d_in, "dictlens": {"provenance": p.to_json()}}
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / WEIGHTS, save(tensors))
        atomic_write_json(folder / CFG, cfg)
        return [folder / CFG, folder / WEIGHTS]


FORMAT = Sparsify()
