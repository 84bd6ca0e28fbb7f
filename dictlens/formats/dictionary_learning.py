"""saprmarks/dictionary_learning: ``ae.pt`` (a weights-only state dict) + ``config.json``.

Read with ``torch.load(..., weights_only=True)`` only: a file that needs more is refused,
never executed. The seven classes, by ``config.json["trainer"]["dict_class"]`` (else by
their keys): ``AutoEncoder`` (ReLU, pre-bias ``bias``), ``AutoEncoderNew`` (ReLU, no
pre-bias, the decoder's own bias), ``GatedAutoEncoder``, ``JumpReluAutoEncoder`` (no b_dec
subtraction), ``AutoEncoderTopK``, ``BatchTopKSAE`` and ``MatryoshkaBatchTopKSAE`` (their
scalar inference threshold; −1 means plain ReLU). The final files already carry the
training normalisation factor (biases and thresholds scaled): it is not applied again;
the backup ``ae.pt`` of an interrupted run (``{"ae", "norm_factor", ...}``) does not, and
gets it exactly once.

Write: ``AutoEncoderTopK``, ``BatchTopKSAE`` (``MatryoshkaBatchTopKSAE`` with Matryoshka
prefixes), ``AutoEncoder`` / ``AutoEncoderNew`` (ReLU with / without pre-bias),
``JumpReluAutoEncoder`` (pre-bias folded into ``b_enc``) and ``GatedAutoEncoder``.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dictlens.errors import FormatError
from dictlens.formats.base import (
    ReadOptions,
    Weights,
    build_sae,
    encoder_bias_for,
    export_state,
    load_torch,
    log_threshold,
    need,
    written_by_dictlens,
)
from dictlens.io import atomic_write_bytes, atomic_write_json, read_json
from dictlens.sae.activations import Form

if TYPE_CHECKING:
    from dictlens.sae.model import SAE

AE, CONFIG = "ae.pt", "config.json"
CLASSES = ("AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
           "BatchTopKSAE", "MatryoshkaBatchTopKSAE")
# the tensors each class's scale_biases multiplies by the normalisation factor
BIASES = {"AutoEncoder": ("bias", "encoder.bias"), "AutoEncoderNew": ("encoder.bias", "decoder.bias"),
          "GatedAutoEncoder": ("decoder_bias", "gate_bias", "mag_bias"),
          "JumpReluAutoEncoder": ("b_enc", "b_dec", "threshold"),
          "AutoEncoderTopK": ("encoder.bias", "b_dec", "threshold"),
          "BatchTopKSAE": ("encoder.bias", "b_dec", "threshold"),
          "MatryoshkaBatchTopKSAE": ("b_enc", "b_dec", "threshold")}


def _guess_class(state: dict[str, torch.Tensor]) -> str:
    keys = set(state)
    if "group_sizes" in keys:
        return "MatryoshkaBatchTopKSAE"
    if "r_mag" in keys:
        return "GatedAutoEncoder"
    if "W_enc" in keys:
        return "JumpReluAutoEncoder"
    if "b_dec" in keys and "k" in keys:
        return "AutoEncoderTopK"   # BatchTopKSAE has the same keys: config.json tells them apart
    return "AutoEncoder" if "bias" in keys else "AutoEncoderNew"


def _hook(trainer: dict[str, Any]) -> str | None:
    name = str(trainer.get("submodule_name") or "")
    m = re.match(r"^(resid_post|resid_pre|mlp_out|attn_out)_layer_(\d+)$", name)
    return f"{m.group(1)}.{m.group(2)}" if m else None


class DictionaryLearning:
    name = "dictionary-learning"
    describe = "saprmarks dictionary_learning (ae.pt + config.json)"
    writes = True

    def _dir(self, path: Path) -> Path:
        return path.parent if path.name == AE else path

    def detect(self, path: Path) -> bool:
        return (self._dir(path) / AE).is_file()

    def read(self, path: Path, opts: ReadOptions) -> SAE:
        root = self._dir(path)
        f = root / AE
        state = load_torch(f)
        cfg = read_json(root / CONFIG) if (root / CONFIG).is_file() else {}
        trainer = cfg.get("trainer", {}) if isinstance(cfg, dict) else {}
        factor = None
        if isinstance(state, dict) and "ae" in state and isinstance(state["ae"], dict):   # a backup of a live run
            factor = state.get("norm_factor")
            state = state["ae"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise FormatError(f"{f}: expected a state dict of tensors")
        cls = str(trainer.get("dict_class") or _guess_class(state))
        if cls not in CLASSES:
            raise FormatError(f"{f}: dict_class {cls!r} (readable: {', '.join(CLASSES)})")
        if factor is not None:   # the backup's biases are still in normalised units: scale them once
            state = {k: v * float(factor) if k in BIASES[cls] and not (k == "threshold" and float(v.max()) < 0)
                     else v for k, v in state.items()}
        activation, w, pre_bias, k, prefixes = self._weights(cls, state, str(f), trainer)
        from dictlens.provenance import Provenance

        notes = {"dict_class": cls, **{key: trainer[key] for key in ("submodule_name", "layer", "trainer_class")
                                       if key in trainer}}
        if factor is not None:
            notes["norm_factor_applied"] = float(factor)
        found = Provenance.of_sae(model=opts.model or trainer.get("lm_name"), hook=opts.hook or _hook(trainer),
                                  source=self.name, origin=str(root), normalization="none",
                                  notes={self.name: notes})
        return build_sae(activation, w, pre_bias=pre_bias, k=k, matryoshka=prefixes,
                         provenance=written_by_dictlens(cfg if isinstance(cfg, dict) else {}, root / CONFIG, found))

    def _weights(self, cls: str, s: dict[str, torch.Tensor], where: str, trainer: dict[str, Any]
                 ) -> tuple[str, Weights, bool, int | None, list[int] | None]:
        if cls in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
            D, F = s["W_enc"].shape
            w = Weights(need(s, "W_enc", (D, F), where).T.contiguous(), need(s, "W_dec", (F, D), where),
                        need(s, "b_enc", (F,), where), need(s, "b_dec", (D,), where))
        else:
            F, D = s["encoder.weight"].shape
            dec = need(s, "decoder.weight", (D, F), where).T.contiguous()
            b_enc = need(s, "gate_bias" if cls == "GatedAutoEncoder" else "encoder.bias", (F,), where)
            b_dec_key = {"AutoEncoder": "bias", "AutoEncoderNew": "decoder.bias",
                         "GatedAutoEncoder": "decoder_bias"}.get(cls, "b_dec")
            w = Weights(need(s, "encoder.weight", (F, D), where), dec, b_enc, need(s, b_dec_key, (D,), where))
        if cls in ("AutoEncoder", "AutoEncoderNew"):
            return "relu", w, cls == "AutoEncoder", None, None
        if cls == "GatedAutoEncoder":
            w.extra.update(r_mag=need(s, "r_mag", (F,), where), b_mag=need(s, "mag_bias", (F,), where))
            return "gated", w, True, None, None
        if cls == "JumpReluAutoEncoder":
            w.extra["log_threshold"] = log_threshold(need(s, "threshold", (F,), where))
            return "jumprelu", w, False, None, None
        k = int(s["k"]) if "k" in s else trainer.get("k")
        if k is None:
            raise FormatError(f"{where}: a {cls} without k (neither the file nor config.json's trainer holds it)")
        if cls == "AutoEncoderTopK":
            return "topk", w, True, int(k), None
        w.extra["threshold"] = s["threshold"].to(torch.float32).reshape(()) if "threshold" in s else torch.tensor(-1.0)
        prefixes = torch.cumsum(s["group_sizes"], 0).tolist() if "group_sizes" in s else None
        return "batchtopk", w, True, int(k), prefixes

    def write(self, sae: SAE, out: Path) -> list[Path]:
        st = export_state(sae)
        W_enc, W_dec, b_dec = st["W_enc"], st["W_dec"], st["b_dec"]
        kind, F = sae.activation, sae.n_features
        if kind.form is Form.RELU:   # AutoEncoder subtracts its pre-bias; AutoEncoderNew has none
            cls, state = ("AutoEncoder", {"bias": b_dec, "encoder.weight": W_enc, "encoder.bias": st["b_enc"],
                                          "decoder.weight": W_dec.T}) if sae.cfg.pre_bias else \
                ("AutoEncoderNew", {"encoder.weight": W_enc, "encoder.bias": st["b_enc"], "decoder.weight": W_dec.T,
                                    "decoder.bias": b_dec})
        elif kind.form is Form.GATED:   # GatedAutoEncoder always subtracts b_dec: fold a missing pre-bias in
            shift = torch.zeros(F) if sae.cfg.pre_bias else W_enc @ b_dec
            cls, state = "GatedAutoEncoder", {"encoder.weight": W_enc, "decoder.weight": W_dec.T, "decoder_bias": b_dec,
                                              "r_mag": st["r_mag"], "gate_bias": st["b_enc"] + shift,
                                              "mag_bias": st["b_mag"] + st["r_mag"].exp() * shift}
        elif kind.form is Form.THRESHOLD and not kind.scalar_threshold:
            cls, state = "JumpReluAutoEncoder", {
                "W_enc": W_enc.T, "b_enc": encoder_bias_for(sae, st, subtracts_b_dec=False), "W_dec": W_dec,
                "b_dec": b_dec, "threshold": kind.inference_threshold(st, F)}
        elif kind.form in (Form.TOPK, Form.THRESHOLD):   # TopK, or BatchTopK's one threshold: both subtract b_dec
            b_enc = encoder_bias_for(sae, st, subtracts_b_dec=True)
            thr = kind.inference_threshold(st, F)[0] if kind.form is Form.THRESHOLD else torch.tensor(-1.0)
            if kind.form is Form.THRESHOLD and sae.cfg.matryoshka:
                sizes = torch.diff(torch.tensor([0, *sae.cfg.matryoshka]))
                cls, state = "MatryoshkaBatchTopKSAE", {"W_enc": W_enc.T, "b_enc": b_enc, "W_dec": W_dec,
                                                        "b_dec": b_dec, "k": torch.tensor(sae.cfg.k),
                                                        "threshold": thr, "group_sizes": sizes}
            else:
                cls = "AutoEncoderTopK" if kind.form is Form.TOPK else "BatchTopKSAE"
                state = {"encoder.weight": W_enc, "encoder.bias": b_enc, "decoder.weight": W_dec.T, "b_dec": b_dec,
                         "k": torch.tensor(sae.cfg.k, dtype=torch.int32), "threshold": thr}
        else:
            raise FormatError(f"dictionary_learning has no {sae.cfg.activation} SAE ({kind.form} codes; writable: "
                              "ReLU, TopK, thresholded and gated codes)")
        p = sae.provenance
        m = re.match(r"^(resid_post|resid_pre|mlp_out|attn_out)\.(\d+)$", p.hook_in or "")
        trainer = {"dict_class": cls, "activation_dim": sae.d_in, "dict_size": F, "k": sae.cfg.k,
                   "lm_name": p.model, "layer": int(m.group(2)) if m else None,
                   "submodule_name": f"{m.group(1)}_layer_{m.group(2)}" if m else p.hook_in}
        buf = io.BytesIO()
        torch.save({k: v.contiguous() for k, v in state.items()}, buf)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / AE, buf.getvalue())
        atomic_write_json(out / CONFIG, {"trainer": trainer, "buffer": {"d_submodule": sae.d_in, "io": "out"},
                                         "dictlens": {"provenance": p.to_json()}})
        return [out / AE, out / CONFIG]


FORMAT = DictionaryLearning()
