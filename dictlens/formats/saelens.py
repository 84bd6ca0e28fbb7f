"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (v6, pre-6.0 flat configs, and
training checkpoints with ``activation_scaler.json``).

Read: ``standard`` (ReLU), ``topk`` (with ``rescale_acts_by_decoder_norm`` folded into the
weights, which is exact), ``jumprelu`` (what SAELens writes BatchTopK and Matryoshka SAEs as),
``gated``; training checkpoints' ``batchtopk`` / ``matryoshka_batchtopk`` (the scalar
``topk_threshold``). SAELens's unit convention is kept: with ``expected_average_only_in``
the normalisation factor s is folded as SAELens folds it (``W_enc·s, W_dec/s, b_dec/s``),
so the codes stay in normalised units and equal what SAELens (and Neuronpedia) show; the
decoder rows then have norm 1/s and the SAE is marked ``decoder_norm="free"``.

Write: v6 ``cfg.json`` (with ``metadata.sae_lens_version``, without which SAELens drops the
metadata) + ``sae_weights.safetensors``; BatchTopK as ``jumprelu`` with its threshold per
feature, as SAELens saves it. dictlens's own record goes under ``cfg.json["dictlens"]``
(SAELens ignores unknown keys), so a written SAE reads back with its provenance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dictlens.errors import FormatError
from dictlens.formats.base import (
    ReadOptions,
    Weights,
    build_sae,
    export_state,
    log_threshold,
    need,
    read_safetensors,
    written_by_dictlens,
)
from dictlens.formats.hooks import from_transformer_lens, hf_model_name, to_transformer_lens
from dictlens.io import atomic_write_bytes, atomic_write_json, read_json
from dictlens.sae.activations import Form

if TYPE_CHECKING:
    from dictlens.sae.model import SAE

CFG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"
WRITTEN_AS = "6.0.0"   # the SAELens config layout written (metadata.sae_lens_version)
RUNTIME_NORMS = ("constant_norm_rescale", "layer_norm", "constant_scalar_rescale")
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")


def _version(v: object) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(v).split("-")[0].split(".")[:3])
    except ValueError:
        return (0,)


def normalise_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A v6-shaped config from a v6 or pre-6.0 (flat) one: ``architecture``, ``k``,
    ``normalize_activations`` as a string, and ``metadata`` holding model, hook and context."""
    meta = dict(cfg.get("metadata") or {})
    if _version(meta.get("sae_lens_version", "0")) >= (6,):
        return {**cfg, "metadata": meta}
    out = dict(cfg)
    fn = str(cfg.get("activation_fn_str", "relu")).lower()
    arch = cfg.get("architecture") or ("topk" if fn == "topk" else "standard")
    if arch == "standard" and fn == "topk":
        arch = "topk"
    out["architecture"] = arch
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if "k" in kwargs and "k" not in out:
        out["k"] = kwargs["k"]
    norm = cfg.get("normalize_activations", "none")
    out["normalize_activations"] = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    for key, old in (("model_name", "model_name"), ("hook_name", "hook_point"),
                     ("hook_head_index", "hook_point_head_index"), ("context_size", "context_size"),
                     ("prepend_bos", "prepend_bos"), ("dataset_path", "dataset_path"),
                     ("model_from_pretrained_kwargs", "model_from_pretrained_kwargs"),
                     ("neuronpedia_id", "neuronpedia_id")):
        if key not in meta and cfg.get(old) is not None:
            meta[key] = cfg[old]
    if "hook_name" not in meta and cfg.get("hook_name"):
        meta["hook_name"] = cfg["hook_name"]
    out["metadata"] = meta
    return out


class SAELens:
    name = "saelens"
    describe = "SAELens folder (cfg.json + sae_weights.safetensors)"
    writes = True

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()

    # ---- read ----------------------------------------------------------------------
    def read(self, path: Path, opts: ReadOptions) -> SAE:
        raw = read_json(path / CFG)
        if not isinstance(raw, dict):
            raise FormatError(f"{path / CFG}: expected a JSON object")
        cfg = normalise_config(raw)
        where = str(path / WEIGHTS)
        tensors = read_safetensors(path / WEIGHTS)
        arch = str(cfg.get("architecture", "standard"))
        if arch not in ("standard", "topk", "jumprelu", "gated", "batchtopk", "matryoshka_batchtopk", *TRANSCODERS):
            raise FormatError(f"{path / CFG}: SAELens architecture {arch!r} has no dictlens equivalent yet "
                              "(readable: standard, topk, jumprelu, gated, batchtopk, matryoshka_batchtopk, "
                              + ", ".join(TRANSCODERS) + ")")
        transcoder = arch in TRANSCODERS
        D, F = int(cfg["d_in"]), int(cfg["d_sae"])
        D_out = int(cfg.get("d_out", D)) if transcoder else D
        w = Weights(W_enc=need(tensors, "W_enc", (D, F), where).T.contiguous(),
                    W_dec=need(tensors, "W_dec", (F, D_out), where),
                    b_enc=need(tensors, "b_gate" if arch == "gated" else "b_enc", (F,), where),
                    b_dec=need(tensors, "b_dec", (D_out,), where))
        if transcoder:
            if cfg.get("apply_b_dec_to_input"):
                raise FormatError(f"{path / CFG}: a transcoder with apply_b_dec_to_input (SAELens refuses it too)")
            if "skip" in arch:   # W_skip [d_out, d_in], applied x @ W_skipᵀ: dictlens's own orientation
                w.W_skip = need(tensors, "W_skip", (D_out, D), where)
            arch = "jumprelu" if arch.startswith("jumprelu") else "standard"
        if "scaling_factor" in tensors:   # SAELens's legacy finetuning factor multiplies the codes before decoding
            w.W_dec = w.W_dec * need(tensors, "scaling_factor", (F,), where)[:, None]
        activation, k = self._activation(arch, cfg, tensors, w, F, where)
        s = self._norm_factor(path, cfg, opts)
        if s is not None:     # SAELens's fold: the codes stay in normalised units
            w.W_enc, w.W_dec, w.b_dec = w.W_enc * s, w.W_dec / s, w.b_dec / s
        return build_sae(activation, w, pre_bias=bool(cfg.get("apply_b_dec_to_input", not transcoder)), k=k,
                         provenance=self._provenance(path, raw, cfg, opts, s), transcoder=transcoder)

    def _activation(self, arch: str, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], w: Weights, F: int,
                    where: str) -> tuple[str, int | None]:
        if arch == "standard":
            return "relu", None
        if arch == "topk":
            if cfg.get("rescale_acts_by_decoder_norm"):   # rank pre·‖W_dec‖, decode acts/‖W_dec‖: fold n in
                n = w.W_dec.norm(dim=1)
                w.W_enc, w.b_enc, w.W_dec = w.W_enc * n[:, None], w.b_enc * n, w.W_dec / n[:, None]
            return "topk", int(cfg["k"])
        if arch == "jumprelu":
            w.extra["log_threshold"] = log_threshold(need(tensors, "threshold", (F,), where))
            return "jumprelu", None
        if arch == "gated":
            w.extra["r_mag"] = need(tensors, "r_mag", (F,), where)
            w.extra["b_mag"] = need(tensors, "b_mag", (F,), where)
            return "gated", None
        # a training checkpoint of a BatchTopK / Matryoshka BatchTopK SAE: the scalar threshold
        if "topk_threshold" not in tensors:
            raise FormatError(f"{where}: a {arch} training checkpoint without 'topk_threshold'")
        w.extra["threshold"] = tensors["topk_threshold"].to(torch.float32).reshape(())
        return "batchtopk", int(cfg["k"])

    def _norm_factor(self, path: Path, cfg: dict[str, Any], opts: ReadOptions) -> float | None:
        norm = str(cfg.get("normalize_activations", "none"))
        if norm in RUNTIME_NORMS:
            raise FormatError(f"{path / CFG}: normalize_activations {norm!r} rescales every token at run time, "
                              "which dictlens SAEs cannot express yet")
        if norm != "expected_average_only_in":
            return None
        s = opts.norm_scaling_factor
        if s is None and (path / SCALER).is_file():
            s = read_json(path / SCALER).get("scaling_factor")
        if s is None:
            raise FormatError(f"{path / CFG}: normalize_activations expected_average_only_in needs the normalisation "
                              "factor, which the folder does not hold: give --norm-scaling-factor (the release's "
                              "norm_scaling_factor) or an activation_scaler.json")
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise FormatError(f"{path}: norm scaling factor: expected a positive number, found {s!r}")
        return float(s)

    def _provenance(self, path: Path, raw: dict[str, Any], cfg: dict[str, Any], opts: ReadOptions,
                    s: float | None) -> Any:
        from dictlens.provenance import Provenance

        if isinstance(raw.get("dictlens"), dict):   # written by dictlens: its own record, and the name SAELens uses
            theirs = {"hook_name": cfg["metadata"].get("hook_name")} if cfg["metadata"].get("hook_name") else {}
            found = Provenance.of_sae(source="saelens", origin=str(path), notes={"saelens": theirs})
            return written_by_dictlens(raw, path / CFG, found)
        meta = cfg["metadata"]
        kwargs = meta.get("model_from_pretrained_kwargs") or {}
        if kwargs.get("center_writing_weights"):
            raise FormatError(f"{path / CFG}: the SAE reads TransformerLens activations with center_writing_weights "
                              "(each residual vector's mean over dimensions removed); dictlens reads the model's own")
        if meta.get("hook_head_index") is not None:
            raise FormatError(f"{path / CFG}: the SAE reads one attention head (hook_head_index "
                              f"{meta['hook_head_index']}); dictlens has no per-head hooks")
        model = opts.model or hf_model_name(meta.get("model_name"))   # TransformerLens names → hub ids
        source_hook = meta.get("hook_name")
        hook = opts.hook or (from_transformer_lens(source_hook, model) if source_hook else None)
        notes = {k: meta[k] for k in ("model_name", "hook_name", "hook_name_out", "dataset_path", "neuronpedia_id",
                                      "prepend_bos", "sae_lens_version", "sae_lens_training_version")
                 if meta.get(k) is not None}
        if s is not None:
            notes["norm_scaling_factor"] = s
        found = Provenance.of_sae(model=model, hook=hook, context=meta.get("context_size"), source="saelens",
                                  origin=str(path), normalization="none", notes={"saelens": notes})
        if str(cfg.get("architecture")) in TRANSCODERS:   # what it writes
            out_hook = meta.get("hook_name_out")
            found = found.replace(hook_out=from_transformer_lens(out_hook, model) if out_hook else None)
        return found

    # ---- write ---------------------------------------------------------------------
    def write(self, sae: SAE, out: Path) -> list[Path]:
        state = export_state(sae)
        kind = sae.activation
        tensors = {"W_enc": state["W_enc"].T.contiguous(), "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
        extra: dict[str, Any] = {}
        if sae.cfg.transcoder:
            return self._write_transcoder(sae, state, out)
        if kind.form is Form.RELU:
            arch = "standard"
        elif kind.form is Form.TOPK:
            arch, extra = "topk", {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
        elif kind.form is Form.THRESHOLD:   # BatchTopK too: SAELens saves it as jumprelu, θ per feature
            arch = "jumprelu"
            tensors["threshold"] = kind.inference_threshold(state, sae.n_features)
        elif kind.form is Form.GATED:
            arch = "gated"
            tensors.update(b_gate=state["b_enc"], r_mag=state["r_mag"], b_mag=state["b_mag"])
        else:
            raise FormatError(f"SAELens has no {sae.cfg.activation} SAE ({kind.form} codes; writable: ReLU, TopK, "
                              "thresholded and gated codes)")
        if arch != "gated":
            tensors["b_enc"] = state["b_enc"]
        p = sae.provenance
        hook = p.hook_in or ""
        metadata = {"sae_lens_version": WRITTEN_AS, "model_name": p.model,
                    "hook_name": to_transformer_lens(hook, p.model) or hook, "hook_head_index": None,
                    "context_size": p.context, "prepend_bos": True,
                    "dataset_path": p.text or p.acts}
        cfg = {"d_in": sae.d_in, "d_sae": sae.n_features, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": sae.cfg.pre_bias, "normalize_activations": "none",
               "reshape_activations": "none", "architecture": arch, **extra, "metadata": metadata,
               "dictlens": {"activation": sae.cfg.activation, "k": sae.cfg.k, "provenance": p.to_json()}}
        return _save(out, tensors, cfg)

    def _write_transcoder(self, sae: SAE, state: dict[str, torch.Tensor], out: Path) -> list[Path]:
        """SAELens's transcoder classes: ReLU (``transcoder``) or thresholded codes (``jumprelu_transcoder``,
        BatchTopK with its threshold), each with ``skip_`` when it has the affine skip."""
        kind = sae.activation
        tensors = {"W_enc": state["W_enc"].T.contiguous(), "W_dec": state["W_dec"], "b_dec": state["b_dec"],
                   "b_enc": state["b_enc"]}
        if kind.form is Form.RELU:
            arch = "transcoder"
        elif kind.form is Form.THRESHOLD:
            arch = "jumprelu_transcoder"
            tensors["threshold"] = kind.inference_threshold(state, sae.n_features)
        else:
            raise FormatError(f"SAELens has no {sae.cfg.activation} transcoder (its transcoders have ReLU or "
                              "JumpReLU codes; dictlens writes BatchTopK as JumpReLU)")
        if sae.cfg.skip:
            arch = "skip_transcoder" if arch == "transcoder" else "jumprelu_skip_transcoder"
            tensors["W_skip"] = state["W_skip"]
        p = sae.provenance
        hook, out_hook = p.hook_in or "", p.hook_out or ""
        metadata = {"sae_lens_version": WRITTEN_AS, "model_name": p.model,
                    "hook_name": to_transformer_lens(hook, p.model) or hook, "hook_head_index": None,
                    "hook_name_out": to_transformer_lens(out_hook, p.model) or out_hook, "hook_head_index_out": None,
                    "context_size": p.context, "prepend_bos": True, "dataset_path": p.text or p.acts}
        cfg = {"d_in": sae.d_in, "d_sae": sae.n_features, "d_out": sae.d_out, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
               "architecture": arch, "metadata": metadata,
               "dictlens": {"activation": sae.cfg.activation, "k": sae.cfg.k, "provenance": p.to_json()}}
        return _save(out, tensors, cfg)


def _save(out: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> list[Path]:
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS, save({k: v.contiguous() for k, v in tensors.items()}))
    atomic_write_json(out / CFG, cfg)
    return [out / CFG, out / WEIGHTS]


FORMAT = SAELens()
