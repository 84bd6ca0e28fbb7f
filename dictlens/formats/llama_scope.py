"""Llama Scope (OpenMOSS lm_saes v1): ``hyperparams.json`` + ``checkpoints/final.safetensors``.

Tensors (bf16, lm_saes orientation): ``encoder.weight [F, D]``, ``encoder.bias``,
``decoder.weight [D, F]``, ``decoder.bias``. Trained on dataset-wise normalised activations
(``x·s`` with ``s = √D / dataset_average_activation_norm``); released as JumpReLU SAEs whose
scalar ``jump_relu_threshold`` is in the units of lm_saes's inference form. That form, which
dictlens reproduces: ``b_enc/s_in, b_dec/s_out, W_dec·s_in/s_out``, then (with
``sparsity_include_decoder_norm``, the default) each feature's decoder norm n folded in
(``W_dec/n, W_enc·n, b_enc·n``), then ``f = pre·1[pre > θ]``. SAELens skips the decoder-norm
fold, so its Llama Scope SAEs fire about 1,000 features per token instead of about 30.
Transcoders (``hook_point_in`` ≠ ``hook_point_out``, the LXTC releases) read the same way, with
s_in ≠ s_out.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dictlens.errors import FormatError
from dictlens.formats.base import ReadOptions, Weights, build_sae, log_threshold, need, read_safetensors
from dictlens.formats.hooks import from_transformer_lens
from dictlens.io import read_json

if TYPE_CHECKING:
    from dictlens.sae.model import SAE

HYPER = "hyperparams.json"
CANDIDATES = ("checkpoints/final.safetensors", "sae_weights.safetensors", "checkpoints/pruned.safetensors")


def _model_of(path: Path, cfg: dict[str, Any]) -> str | None:
    if cfg.get("model_name"):
        return str(cfg["model_name"])
    m = re.search(r"Llama3_1-8B-(Base|Instruct)", path.as_posix())
    return ("meta-llama/Llama-3.1-8B" + ("-Instruct" if m.group(1) == "Instruct" else "")) if m else None


class LlamaScope:
    name = "llama-scope"
    describe = "Llama Scope (hyperparams.json + checkpoints/final.safetensors)"
    writes = False

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / HYPER).is_file() and any((path / c).is_file() for c in CANDIDATES)

    def read(self, path: Path, opts: ReadOptions) -> SAE:
        cfg: dict[str, Any] = read_json(path / HYPER)
        weights = next(path / c for c in CANDIDATES if (path / c).is_file())
        where = str(weights)
        hook_in, hook_out = cfg.get("hook_point_in"), cfg.get("hook_point_out", cfg.get("hook_point_in"))
        transcoder = hook_in != hook_out   # (the LXTC releases: an MLP's input to its output)
        act = str(cfg.get("act_fn", "jumprelu")).lower()
        if act != "jumprelu":
            raise FormatError(f"{path / HYPER}: act_fn {act!r}; the released Llama Scope SAEs are jumprelu")
        if cfg.get("use_glu_encoder"):
            raise FormatError(f"{path / HYPER}: use_glu_encoder, which dictlens cannot express")
        D, F = int(cfg["d_model"]), int(cfg["d_sae"])
        t = read_safetensors(weights)
        W_enc, b_enc = need(t, "encoder.weight", (F, D), where), need(t, "encoder.bias", (F,), where)
        W_dec = need(t, "decoder.weight", (D, F), where).T.contiguous()
        b_dec = need(t, "decoder.bias", (D,), where) if cfg.get("use_decoder_bias", True) else torch.zeros(D)
        s_in, s_out = self._scales(path, cfg, D)
        b_enc, b_dec, W_dec = b_enc / s_in, b_dec / s_out, W_dec * (s_in / s_out)
        if cfg.get("sparsity_include_decoder_norm", True):
            n = W_dec.norm(dim=1)
            W_dec, W_enc, b_enc = W_dec / n[:, None], W_enc * n[:, None], b_enc * n
        theta = torch.full((F,), float(cfg.get("jump_relu_threshold", 0.0)))
        w = Weights(W_enc, W_dec, b_enc, b_dec, extra={"log_threshold": log_threshold(theta)})
        from dictlens.provenance import Provenance

        model = opts.model or _model_of(path, cfg)
        hook = opts.hook or (from_transformer_lens(str(hook_in), model) if hook_in else None)
        notes = {"hook_name": hook_in, "s_in": s_in, "s_out": s_out,
                 "jump_relu_threshold": cfg.get("jump_relu_threshold")}
        prov = Provenance.of_sae(model=model, hook=hook, source=self.name, origin=str(path), normalization="none",
                                 notes={self.name: notes})
        if transcoder:
            notes["hook_name_out"] = hook_out
            prov = prov.replace(hook_out=from_transformer_lens(str(hook_out), model) if hook_out else None)
        return build_sae("jumprelu", w, pre_bias=bool(cfg.get("apply_decoder_bias_to_pre_encoder", not transcoder)),
                         provenance=prov, transcoder=transcoder)

    def _scales(self, path: Path, cfg: dict[str, Any], D: int) -> tuple[float, float]:
        if cfg.get("norm_activation", "dataset-wise") != "dataset-wise":
            raise FormatError(f"{path / HYPER}: norm_activation {cfg.get('norm_activation')!r} "
                              "(readable: dataset-wise)")
        avg = cfg.get("dataset_average_activation_norm") or {}
        if not (isinstance(avg, dict) and avg.get("in") and avg.get("out")):
            raise FormatError(f"{path / HYPER}: dataset_average_activation_norm {{in, out}} is missing; without it "
                              "the SAE's units are unknown")
        return math.sqrt(D) / float(avg["in"]), math.sqrt(D) / float(avg["out"])

    def write(self, sae: SAE, out: Path) -> list[Path]:
        raise FormatError("llama-scope: dictlens reads this format but does not write it")


FORMAT = LlamaScope()
