"""Interop with the real libraries (outside CI): each library writes dictionaries with its own
code and dictlens reads them; dictlens writes and each library loads the files. Codes and
reconstructions are compared on the same random inputs (max |difference|).

    bash bench/setup_peers.sh                      # once: .bench-venv with sae-lens, eai-sparsify, dictionary-learning
    HF_HUB_OFFLINE=1 .bench-venv/bin/python bench/interop.py [--json docs/interop.json]
    HF_HUB_OFFLINE=1 .bench-ct/bin/python bench/interop.py --only circuit-tracer   # (its own environment)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from dictlens.formats import read, write
from dictlens.provenance import Provenance
from dictlens.sae import SAE, SAEConfig

D, F, K = 64, 256, 8
ROWS: list[dict[str, object]] = []


def _x() -> torch.Tensor:
    return torch.randn(512, D, generator=torch.Generator().manual_seed(0))


Check = Callable[[Path], tuple[torch.Tensor, ...]]   # → (their codes, ours, their x̂, ours)


def _record(library: str, direction: str, kind: str, fn: Check) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            theirs_f, ours_f, theirs_x, ours_x = fn(Path(tmp))
            row = {"library": library, "direction": direction, "kind": kind,
                   "codes_max_abs_diff": float((theirs_f.float() - ours_f.float()).abs().max()),
                   "recon_max_abs_diff": float((theirs_x.float() - ours_x.float()).abs().max()),
                   "l0": float((ours_f > 0).sum(1).float().mean())}
        except Exception as e:   # a check that cannot run is reported, not hidden
            row = {"library": library, "direction": direction, "kind": kind,
                   "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            traceback.print_exc()
    ROWS.append(row)
    print(row, flush=True)


def _perturb(module: torch.nn.Module, names: tuple[str, ...], scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(n.endswith(k) for k in names):
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _ours(activation: str, **cfg: object) -> SAE:
    sae = SAE(SAEConfig(d_in=D, n_features=F, activation=activation, **cfg), seed=2,   # type: ignore[arg-type]
              provenance=Provenance.of_sae(model="gpt2", hook="resid_post.3", context=128))
    _perturb(sae, ("b_enc", "b_dec"))
    with torch.no_grad():
        if activation == "jumprelu":
            sae.log_threshold.fill_(-1.5)
        if activation == "batchtopk":
            sae.threshold.fill_(0.3)
    return sae.eval()


def _dense(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with sae.ranking("float32"), torch.no_grad():
        return sae.encode(x), sae(x)


# ---- SAELens -------------------------------------------------------------------------
def saelens() -> None:

    kinds = {"standard": ("StandardSAE", "StandardSAEConfig", {}), "topk": ("TopKSAE", "TopKSAEConfig", {"k": K}),
             "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig", {}), "gated": ("GatedSAE", "GatedSAEConfig", {})}
    for kind, (cls_name, cfg_name, extra) in kinds.items():
        _record("sae-lens", "theirs → dictlens", kind,
                lambda tmp, c=cls_name, n=cfg_name, e=extra: _saelens_made(tmp, c, n, e, whole=False))
    for activation in ("relu", "topk", "jumprelu", "batchtopk", "gated"):
        _record("sae-lens", "dictlens → theirs", activation, lambda tmp, a=activation: _saelens_loaded(
            tmp, _ours(a, k=K if a in ("topk", "batchtopk") else None), whole=False))


def _saelens_made(tmp: Path, cls_name: str, cfg_name: str, cfg: dict[str, object], *, whole: bool
                  ) -> tuple[torch.Tensor, ...]:
    """A SAELens class built by SAELens (parameters moved off their defaults), saved with its own code and read
    here; the output compared is its decode of its codes, or (``whole``: a transcoder, skip included) its forward."""
    import sae_lens

    sae = getattr(sae_lens, cls_name)(getattr(sae_lens, cfg_name)(d_in=D, d_sae=F, **cfg))
    _perturb(sae, ("b_enc", "b_dec", "b_gate", "b_mag", "r_mag", "W_enc", "W_dec", "W_skip"))
    if hasattr(sae, "threshold"):
        with torch.no_grad():
            sae.threshold.fill_(0.2)
    sae.save_model(str(tmp))
    x = _x()
    with torch.no_grad():
        f = sae.encode(x)
        out = sae(x) if whole else sae.decode(f)
    of, ox = _dense(read(tmp), x)
    return f, of, out, ox


def _saelens_loaded(tmp: Path, ours: SAE, *, whole: bool) -> tuple[torch.Tensor, ...]:
    """``ours`` written in SAELens's layout and loaded by SAELens's own loader."""
    import sae_lens

    write(ours, tmp / "sl", "saelens")
    sae = sae_lens.SAE.load_from_disk(str(tmp / "sl"))
    x = _x()
    with torch.no_grad():
        f = sae.encode(x)
        of, ox = _dense(ours, x)
        return f, of, sae(x) if whole else sae.decode(f), ox


# ---- sparsify -----------------------------------------------------------------------------
def sparsify() -> None:
    """sparsify's TopK SAEs and transcoders (``transcode=True``, with and without ``skip_connection``) both
    ways; a transcoder's prediction is its decode plus ``x @ W_skipᵀ``."""
    from sparsify import SparseCoder, SparseCoderConfig

    def predict(sc: object, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = sc.encode(x)   # type: ignore[attr-defined]
        f = torch.zeros(len(x), F).scatter(1, out.top_indices, out.top_acts)
        y = sc.decode(out.top_acts, out.top_indices)   # type: ignore[attr-defined]
        W_skip = getattr(sc, "W_skip", None)
        return f, y if W_skip is None else y + x @ W_skip.mT

    for kind, point, extra in (("topk", "layers.3", {}), ("topk transcoder", "layers.3.mlp", {"transcode": True}),
                               ("topk transcoder + skip", "layers.3.mlp",
                                {"transcode": True, "skip_connection": True})):
        def theirs_to_ours(tmp: Path, point: str = point, extra: dict = extra) -> tuple[torch.Tensor, ...]:
            sc = SparseCoder(D, SparseCoderConfig(num_latents=F, k=K, **extra), device="cpu")
            _perturb(sc, ("encoder.bias", "b_dec", "W_skip"))
            sc.save_to_disk(tmp / point)
            x = _x()
            with torch.no_grad():
                f, y = predict(sc, x)
            of, oy = _dense(read(tmp / point), x)
            return f, of, y, oy

        def ours_to_theirs(tmp: Path, extra: dict = extra) -> tuple[torch.Tensor, ...]:
            ours = (_our_transcoder("topk", bool(extra.get("skip_connection")), D) if extra.get("transcode")
                    else _ours("topk", k=K))
            files = write(ours, tmp, "sparsify")
            sc = SparseCoder.load_from_disk(files[0].parent, device="cpu")
            x = _x()
            with torch.no_grad():
                f, y = predict(sc, x)
            of, oy = _dense(ours, x)
            return f, of, y, oy

        _record("eai-sparsify", "theirs → dictlens", kind, theirs_to_ours)
        _record("eai-sparsify", "dictlens → theirs", kind, ours_to_theirs)


# ---- transcoders -----------------------------------------------------------------------------
D_OUT = 48   # a transcoder's output width (SAELens allows another; sparsify's is its input's)


def _our_transcoder(activation: str, skip: bool, d_out: int) -> SAE:
    tc = SAE(SAEConfig(d_in=D, n_features=F, activation=activation, k=K if activation == "topk" else None,
                       transcoder=True, d_out=d_out, skip=skip), seed=3,
             provenance=Provenance(model="gpt2", hook_in="mlp_in.3", hook_out="mlp_out.3", context=128))
    _perturb(tc, ("b_enc", "b_dec", "W_skip"))
    with torch.no_grad():
        if activation == "jumprelu":
            tc.log_threshold.fill_(-1.5)
    return tc.eval()


def saelens_transcoders() -> None:
    """SAELens's four transcoder classes written by SAELens and read here; dictlens's written and loaded there.
    Reconstructions are the full predictions (the skip included: SAELens's forward)."""
    kinds = {"transcoder": ("Transcoder", "TranscoderConfig"), "skip_transcoder": ("SkipTranscoder",
             "SkipTranscoderConfig"), "jumprelu_transcoder": ("JumpReLUTranscoder", "JumpReLUTranscoderConfig"),
             "jumprelu_skip_transcoder": ("JumpReLUSkipTranscoder", "JumpReLUSkipTranscoderConfig")}
    for kind, (cls_name, cfg_name) in kinds.items():
        _record("sae-lens", "theirs → dictlens", kind,
                lambda tmp, c=cls_name, n=cfg_name: _saelens_made(
                    tmp, c, n, {"d_out": D_OUT, "apply_b_dec_to_input": False}, whole=True))
    for activation, skip in (("relu", False), ("relu", True), ("jumprelu", False), ("jumprelu", True)):
        _record("sae-lens", "dictlens → theirs", f"{activation} transcoder{' + skip' if skip else ''}",
                lambda tmp, a=activation, s=skip: _saelens_loaded(tmp, _our_transcoder(a, s, D_OUT), whole=True))


# ---- circuit-tracer ----------------------------------------------------------------------------
CT_LAYERS = 3


def _our_layers(activation: str) -> list[SAE]:
    """dictlens skip transcoders of layers 0..CT_LAYERS−1 (mlp_in.L → mlp_out.L), biases moved off zero."""
    out = []
    for layer in range(CT_LAYERS):
        tc = _our_transcoder(activation, True, D)
        tc.provenance = tc.provenance.replace(hook_in=f"mlp_in.{layer}", hook_out=f"mlp_out.{layer}")
        with torch.no_grad():
            tc.b_dec.add_(0.1 * layer)
        out.append(tc)
    return out


def _layer_inputs() -> torch.Tensor:
    return torch.randn(CT_LAYERS, 512, D, generator=torch.Generator().manual_seed(5))


def circuit_tracer() -> None:
    """dictlens's transcoder sets and CLTs loaded by circuit-tracer's own loaders (load_transcoder_set,
    load_clt), and circuit-tracer's own objects saved with its code and read by dictlens; codes and
    predictions compared on every layer's inputs."""
    import circuit_tracer  # noqa: F401  (its absence is the reported error)
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    cpu = torch.device("cpu")
    # (TopK sets: circuit-tracer 0.5.0, the one on PyPI, has ReLU and JumpReLU transcoders only)
    for activation in ("relu", "jumprelu"):
        def set_to_theirs(tmp: Path, activation: str = activation) -> tuple[torch.Tensor, ...]:
            ours = _our_layers(activation)
            write(ours[0], tmp / "set", "circuit-tracer", also=ours[1:])
            ts = load_transcoder_set({i: str((tmp / "set" / f"layer_{i}.safetensors").resolve())
                                      for i in range(CT_LAYERS)}, scan="dictlens", feature_input_hook="mlp.hook_in",
                                     feature_output_hook="hook_mlp_out", device=cpu, dtype=torch.float32,
                                     lazy_encoder=False, lazy_decoder=False)
            xs = _layer_inputs()
            with torch.no_grad():
                f = ts.encode(xs)
                y = ts.decode(f, xs)
                pairs = [_dense(tc, xs[i]) for i, tc in enumerate(ours)]
            return (f.reshape(-1, F), torch.cat([a for a, _ in pairs]), y.reshape(-1, D),
                    torch.cat([b for _, b in pairs]))
        _record("circuit-tracer", "dictlens → theirs", f"{activation} transcoder set + skip", set_to_theirs)

    def clt_to_theirs(tmp: Path) -> tuple[torch.Tensor, ...]:
        from dictlens.sae.clt import CLT

        clt = CLT(SAEConfig(d_in=D, d_out=D, n_features=F, activation="jumprelu", transcoder=True,
                            clt_layers=CT_LAYERS), seed=6,
                  provenance=Provenance(model="gpt2", hook_in=",".join(f"mlp_in.{i}" for i in range(CT_LAYERS)),
                                        hook_out=",".join(f"mlp_out.{i}" for i in range(CT_LAYERS))))
        with torch.no_grad():
            for _, b in clt.each():
                b.b_dec.normal_(0, 0.3)
                b.log_threshold.fill_(-1.5)
        clt.eval()
        write(clt, tmp / "clt", "circuit-tracer")
        theirs = load_clt(str((tmp / "clt").resolve()), feature_input_hook="mlp.hook_in",
                          feature_output_hook="hook_mlp_out", device=cpu, dtype=torch.float32, lazy_decoder=False,
                          lazy_encoder=False)
        xs = _layer_inputs()
        with torch.no_grad():
            f = theirs.encode(xs)
            y = theirs.decode(f)
            with clt.ranking("float32"):
                x_cat = xs.permute(1, 0, 2).reshape(512, CT_LAYERS * D)
                p, vals = clt.encode_sparse(x_cat)
                dense = torch.zeros(512, clt.n_features).index_put((p.rows, p.cols), vals)
                oy = clt(x_cat)
        theirs_f = f.permute(1, 0, 2).reshape(512, CT_LAYERS * F)
        return theirs_f, dense, y.permute(1, 0, 2).reshape(512, CT_LAYERS * D), oy
    _record("circuit-tracer", "dictlens → theirs", "jumprelu CLT", clt_to_theirs)
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

    def config(folder: Path, kind: str) -> None:   # (what a hub repo carries beside the files)
        import yaml

        (folder / "config.yaml").write_text(yaml.safe_dump({
            "model_kind": kind, "model_name": "gpt2", "feature_input_hook": "mlp.hook_in",
            "feature_output_hook": "hook_mlp_out", "scan": "theirs"}))

    for jump in (False, True):
        def set_to_ours(tmp: Path, jump: bool = jump) -> tuple[torch.Tensor, ...]:
            layers = {}
            for i in range(CT_LAYERS):
                act = JumpReLU(torch.full((F,), 0.2)) if jump else torch.nn.ReLU()
                tc = SingleLayerTranscoder(D, F, act, i, skip_connection=True, device=cpu, dtype=torch.float32)
                _perturb(tc, ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip"), scale=0.3)
                layers[i] = tc
            ts = TranscoderSet(layers, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                               scan="theirs")
            ts.to_safetensors(str(tmp / "set"))
            config(tmp / "set", "transcoder_set")
            xs = _layer_inputs()
            with torch.no_grad():
                f = ts.encode(xs)
                y = ts.decode(f, xs)
                pairs = [_dense(read(tmp / "set" / f"layer_{i}.safetensors"), xs[i]) for i in range(CT_LAYERS)]
            return (f.reshape(-1, F), torch.cat([a for a, _ in pairs]), y.reshape(-1, D),
                    torch.cat([b for _, b in pairs]))
        _record("circuit-tracer", "theirs → dictlens", f"{'jumprelu' if jump else 'relu'} transcoder set + skip",
                set_to_ours)

    def clt_to_ours(tmp: Path) -> tuple[torch.Tensor, ...]:
        theirs = CrossLayerTranscoder(CT_LAYERS, F, D, activation_function="jump_relu",
                                      feature_input_hook="mlp.hook_in", device=cpu, dtype=torch.float32,
                                      lazy_decoder=False)
        _perturb(theirs, ("W_enc", "W_dec", "b_enc", "b_dec", "W_dec.0", "W_dec.1", "W_dec.2"), scale=0.3)
        with torch.no_grad():
            theirs.activation_function.threshold.fill_(0.2)
        theirs.to_safetensors(str(tmp / "clt"))
        config(tmp / "clt", "cross_layer_transcoder")
        ours = read(tmp / "clt")
        xs = _layer_inputs()
        with torch.no_grad():
            f = theirs.encode(xs)
            y = theirs.decode(f)
            x_cat = xs.permute(1, 0, 2).reshape(512, CT_LAYERS * D)
            with ours.ranking("float32"):
                p, vals = ours.encode_sparse(x_cat)
                oy = ours(x_cat)
        dense = torch.zeros(512, ours.n_features).index_put((p.rows, p.cols), vals)
        return f.permute(1, 0, 2).reshape(512, CT_LAYERS * F), dense, y.permute(1, 0, 2).reshape(512, CT_LAYERS * D), oy
    _record("circuit-tracer", "theirs → dictlens", "jumprelu CLT", clt_to_ours)


# ---- dictionary_learning --------------------------------------------------------------------
def dictionary_learning() -> None:
    import importlib

    classes = {"AutoEncoder": ("dictionary_learning.dictionary", {}),
               "AutoEncoderNew": ("dictionary_learning.dictionary", {}),
               "GatedAutoEncoder": ("dictionary_learning.dictionary", {}),
               "JumpReluAutoEncoder": ("dictionary_learning.dictionary", {}),
               "AutoEncoderTopK": ("dictionary_learning.trainers.top_k", {"k": K}),
               "BatchTopKSAE": ("dictionary_learning.trainers.batch_top_k", {"k": K})}
    for name, (module, extra) in classes.items():
        def theirs_to_ours(tmp: Path, name: str = name, module: str = module, extra: dict = extra
                           ) -> tuple[torch.Tensor, ...]:
            cls = getattr(importlib.import_module(module), name)
            ae = cls(D, F, **extra)
            _perturb(ae, ("bias", "b_enc", "b_dec", "gate_bias", "mag_bias", "r_mag"))
            if hasattr(ae, "threshold"):
                with torch.no_grad():
                    ae.threshold.fill_(0.1)
            torch.save(ae.state_dict(), tmp / "ae.pt")
            (tmp / "config.json").write_text(json.dumps({"trainer": {"dict_class": name, "activation_dim": D,
                                                                     "dict_size": F, "k": extra.get("k")}}))
            x = _x()
            with torch.no_grad():
                f = ae.encode(x)
                xh = ae.decode(f)
            of, ox = _dense(read(tmp), x)
            return f, of, xh, ox
        _record("dictionary-learning", "theirs → dictlens", name, theirs_to_ours)
    for activation, name in (("relu", "AutoEncoder"), ("topk", "AutoEncoderTopK"), ("jumprelu", "JumpReluAutoEncoder"),
                             ("gated", "GatedAutoEncoder"), ("batchtopk", "BatchTopKSAE")):
        def ours_to_theirs(tmp: Path, activation: str = activation, name: str = name) -> tuple[torch.Tensor, ...]:
            module, extra = classes[name]
            ours = _ours(activation, k=K if activation in ("topk", "batchtopk") else None)
            write(ours, tmp, "dictionary-learning")
            cls = getattr(importlib.import_module(module), name)
            ae = cls(D, F, **extra)
            ae.load_state_dict(torch.load(tmp / "ae.pt", weights_only=True))
            x = _x()
            with torch.no_grad():
                f = ae.encode(x)
                xh = ae.decode(f)
            of, ox = _dense(ours, x)
            return f, of, xh, ox
        _record("dictionary-learning", "dictlens → theirs", activation, ours_to_theirs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--only", help="one library's rows (circuit-tracer runs in its own environment, .bench-ct)")
    p.add_argument("--trained", action="store_true", help="also train with each library's own trainer on "
                                                          "SmolLM2 activations (harvested if missing)")
    p.add_argument("--acts", default=str(Path(__file__).resolve().parent.parent / "runs" / "bench" / "acts"))
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--heldout", type=int, default=16384)
    args = p.parse_args()
    for lib in (saelens, sparsify, dictionary_learning, saelens_transcoders, circuit_tracer):
        if args.only and lib.__name__.replace("_", "-") != args.only:
            continue
        try:
            lib()
        except ImportError as e:
            ROWS.append({"library": lib.__name__, "error": f"not installed: {e}"})
    print("\n| library | direction | kind | max Δ codes | max Δ x̂ | L0 |\n|---|---|---|---:|---:|---:|")
    for r in ROWS:
        if "error" in r:
            print(f"| {r['library']} | {r.get('direction', '')} | {r.get('kind', '')} | error: {r['error']} | | |")
        else:
            print(f"| {r['library']} | {r['direction']} | {r['kind']} | {r['codes_max_abs_diff']:.2e} | "
                  f"{r['recon_max_abs_diff']:.2e} | {r['l0']:.1f} |")
    trained_rows = trained(Path(args.acts), args.tokens, args.heldout) if args.trained else []
    if trained_rows:
        print("\n| library | held-out FVU, its own forward | dictlens reading its files | L0 theirs / dictlens |"
              "\n|---|---:|---:|---:|")
        for r in trained_rows:
            print(f"| {r['library']} | error: {r['error']} | | |" if "error" in r else
                  f"| {r['library']} | {r['fvu_theirs']:.6f} | {r['fvu_dictlens']:.6f} | "
                  f"{r['l0_theirs']:.2f} / {r['l0_dictlens']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"constructed": ROWS, "trained": trained_rows}, indent=1))



# ---- trained by each library's own trainer on SmolLM2 activations ---------------------------
def trained(acts: Path, tokens: int, heldout: int) -> list[dict[str, object]]:
    """Each library trains a TopK SAE with its own trainer on the same SmolLM2-135M resid_post.15
    rows (bench/train.py's protocol), saves it with its own code; dictlens reads the files.
    FVU on the held-out rows: the library's own forward beside dictlens's ``evaluate``."""
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train as bt

    from dictlens.eval.metrics import evaluate

    train_f, held_f = bt.prepare(acts, tokens, heldout)
    held = torch.from_numpy(np.load(held_f))
    rows: list[dict[str, object]] = []
    savers = {
        "sae-lens": (lambda: bt.run_saelens(train_f, tokens),
                     lambda m, d: m.save_inference_model(str(d)) if hasattr(m, "save_inference_model")
                     else m.save_model(str(d))),
        "eai-sparsify": (lambda: bt.run_sparsify(train_f, tokens, "signum"),
                         lambda m, d: m.save_to_disk(d / "layers.15")),
        "dictionary-learning": (lambda: bt.run_dictionary_learning(train_f, tokens), _save_dictionary_learning),
    }
    for library, (train_it, save) in savers.items():
        try:
            torch.manual_seed(0)
            run = train_it()
            theirs = bt.metrics(run.encode, run.decode, held_f)
            with tempfile.TemporaryDirectory() as tmp:
                save(run.model, Path(tmp))
                src = Path(tmp) / "layers.15" if library == "eai-sparsify" else Path(tmp)
                ours = evaluate(read(src), held.split(4096))
            rows.append({"library": library, "trained_tokens": tokens, "heldout_tokens": len(held),
                         "fvu_theirs": theirs["fvu"], "fvu_dictlens": ours.fvu, "l0_theirs": theirs["l0"],
                         "l0_dictlens": ours.l0})
        except Exception as e:
            traceback.print_exc()
            rows.append({"library": library, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
        print(rows[-1], flush=True)
    return rows


def _save_dictionary_learning(ae: object, out: Path) -> None:
    torch.save(ae.state_dict(), out / "ae.pt")   # type: ignore[attr-defined]
    (out / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": "AutoEncoderTopK", "activation_dim": ae.activation_dim, "dict_size": ae.dict_size,   # type: ignore[attr-defined]
        "k": int(ae.k), "lm_name": "smollm2-135m", "layer": 15, "submodule_name": "resid_post_layer_15"}}))   # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
