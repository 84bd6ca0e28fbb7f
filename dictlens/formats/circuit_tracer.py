"""circuit-tracer: transcoder sets (per-layer transcoders, ``config.yaml`` + ``layer_{L}.safetensors``)
and cross-layer transcoders (``config.yaml`` + ``W_enc_{i}.safetensors`` / ``W_dec_{i}.safetensors``).

A set's layer file holds ``W_enc [F, D]`` and ``W_dec [F, D]`` (feature-major, as dictlens), ``b_enc [F]``,
``b_dec [D]``, ``activation_function.threshold [F]`` (JumpReLU) and ``W_skip [D, D]`` applied
``x @ W_skipᵀ`` (dictlens's orientation); nothing subtracts ``b_dec`` from the input. circuit-tracer's
activations: JumpReLU ``pre·1[pre > θ]``, ReLU (no threshold), TopK (``activation: topk`` and ``k`` in
the config) keeping the k largest values without a ReLU. dictlens's TopK applies the ReLU after the
selection, so the two agree wherever a token's k largest pre-activations are positive (a trained
TopK transcoder's are); a negative threshold (which lets negative codes through) is refused.

A CLT over L layers: ``W_enc_{i}`` [F, D], ``b_enc_{i}``, ``threshold_{i}`` (JumpReLU, else ReLU) and
``b_dec_{i}`` [D] (layer i's output bias) in ``W_enc_{i}.safetensors``; ``W_dec_{i}`` [F, L − i, D] (slot
j − i writes layer j) in ``W_dec_{i}.safetensors``. dictlens's block i holds the same decoder as
[F, (L − i)·D]; its bias covers layers i..L−1, so writing sums every block's segment of layer j into
``b_dec_{j}`` and reading puts ``b_dec_{j}`` in block j's first segment.

Hooks are TransformerLens names relative to ``blocks.{L}.`` (``feature_input_hook: mlp.hook_in``,
``feature_output_hook: hook_mlp_out``), mapped like SAELens's. circuit-tracer needs every layer from 0:
a set is written from the transcoders of layers 0..L−1 together (``dictlens export RUN --also RUN ...``).
dictlens's record goes under the config's ``dictlens`` key, so a written dictionary reads back with it.
Reading a set: one layer's file (``DIR/layer_5.safetensors``) is one transcoder; ``dictlens convert DIR``
converts every layer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dictlens.errors import FormatError
from dictlens.formats.base import ReadOptions, Weights, build_sae, export_state, log_threshold, need, read_safetensors
from dictlens.formats.hooks import from_transformer_lens, hf_model_name, to_transformer_lens
from dictlens.io import atomic_write_bytes
from dictlens.sae.activations import Form

if TYPE_CHECKING:
    from dictlens.provenance import Provenance
    from dictlens.sae.clt import CLT, Dictionary
    from dictlens.sae.model import SAE

CONFIG = "config.yaml"
SET, CROSS = "transcoder_set", "cross_layer_transcoder"
_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")


def read_config(path: Path) -> dict[str, Any]:
    """A circuit-tracer ``config.yaml`` (YAML, read safely: no objects are built from it)."""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FormatError(f"{path}: not a readable YAML config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: expected a YAML mapping")
    return cfg


def _kind(path: Path) -> str | None:
    """The ``model_kind`` of a circuit-tracer directory (or of a set's layer file's directory)."""
    folder = path.parent if path.is_file() else path
    if not (folder / CONFIG).is_file():
        return None
    kind = read_config(folder / CONFIG).get("model_kind")
    if path.is_file():
        return SET if kind == SET and _LAYER_FILE.match(path.name) else None
    return kind if kind in (SET, CROSS) else None


def layer_files(folder: Path) -> dict[int, Path]:
    """A set's layer files by layer."""
    found = {int(m.group(1)): folder / name for name in sorted(p.name for p in folder.iterdir())
             if (m := _LAYER_FILE.match(name))}
    if not found:
        raise FormatError(f"{folder}: a circuit-tracer transcoder set without layer_*.safetensors files")
    return dict(sorted(found.items()))


def is_set(path: Path) -> bool:
    """Whether ``path`` is a circuit-tracer transcoder set's directory (every layer)."""
    return path.is_dir() and _kind(path) == SET


def _hook(tl: str, layer: int, model: str | None) -> str:
    """dictlens's hook for a circuit-tracer hook (TransformerLens, relative to ``blocks.{layer}.``)."""
    return from_transformer_lens(f"blocks.{layer}.{tl}", model)


def _tl_relative(hook: str, model: str | None) -> tuple[str, int]:
    """(circuit-tracer's relative hook, layer) for a dictlens hook."""
    name = to_transformer_lens(hook, model)
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name or "")
    if m is None:
        raise FormatError(f"hook {hook!r}: circuit-tracer names hooks inside a block (blocks.L.NAME); this one has "
                          "no such TransformerLens name")
    return m.group(2), int(m.group(1))


# circuit-tracer's ``activation`` config values (absent: JumpReLU where thresholds are stored, else ReLU),
# the codes each names, and the dictlens activation that computes them
THEIRS = {"topk": Form.TOPK, "relu": Form.RELU, "jumprelu": Form.THRESHOLD}
OURS = {Form.TOPK: "topk", Form.RELU: "relu", Form.THRESHOLD: "jumprelu"}


def _non_negative(theta: torch.Tensor, where: str) -> torch.Tensor:
    if bool((theta < 0).any()):
        raise FormatError(f"{where}: negative JumpReLU thresholds (circuit-tracer then passes negative codes; "
                          "dictlens codes are never negative)")
    return theta


def _form(cfg: dict[str, Any], thresholds: bool, where: str) -> tuple[Form, int | None]:
    """The codes a circuit-tracer dictionary computes (and a TopK set's k) from its config and files."""
    kind = cfg.get("activation")
    if kind is not None and kind not in THEIRS:
        raise FormatError(f"{where}: activation {kind!r} (readable: {', '.join(THEIRS)})")
    form = THEIRS[kind] if kind is not None else Form.THRESHOLD if thresholds else Form.RELU
    if form is Form.TOPK:
        if not isinstance(cfg.get("k"), int):
            raise FormatError(f"{where}: activation topk without an integer k in the config")
        return form, int(cfg["k"])
    return (Form.THRESHOLD if thresholds else form), None


class CircuitTracer:
    name = "circuit-tracer"
    describe = "circuit-tracer transcoder set layer (DIR/layer_L.safetensors) or cross-layer transcoder (config.yaml)"
    writes = True

    def detect(self, path: Path) -> bool:
        try:
            return _kind(path) is not None
        except FormatError:
            return False

    # ---- read ----------------------------------------------------------------------
    def read(self, path: Path, opts: ReadOptions) -> Dictionary:
        kind = _kind(path)
        if kind == CROSS:
            return self._read_clt(path, opts)
        if path.is_dir():
            layers = list(layer_files(path))
            raise FormatError(f"{path} is a circuit-tracer transcoder set of {len(layers)} layers: give one layer's "
                              f"file ({path / f'layer_{layers[0]}.safetensors'}), or convert them all with "
                              f"dictlens convert {path} --out DIR (one run per layer)")
        return self._read_layer(path, opts)

    def _config(self, folder: Path) -> tuple[dict[str, Any], str | None]:
        cfg = read_config(folder / CONFIG)
        return cfg, hf_model_name(cfg.get("model_name"))

    def _read_layer(self, path: Path, opts: ReadOptions) -> SAE:
        cfg, model = self._config(path.parent)
        model = opts.model or model
        m = _LAYER_FILE.match(path.name)
        assert m is not None
        layer, where = int(m.group(1)), str(path)
        t = read_safetensors(path)
        if "W_enc" not in t:
            raise FormatError(f"{where}: no tensor 'W_enc' (found {', '.join(sorted(t))})")
        F, D = t["W_enc"].shape
        form, k = _form(cfg, "activation_function.threshold" in t, where)
        w = Weights(W_enc=need(t, "W_enc", (F, D), where), W_dec=need(t, "W_dec", (F, D), where),
                    b_enc=need(t, "b_enc", (F,), where), b_dec=need(t, "b_dec", (D,), where),
                    W_skip=need(t, "W_skip", (D, D), where) if "W_skip" in t else None)
        if form is Form.THRESHOLD:
            theta = _non_negative(need(t, "activation_function.threshold", (F,), where), where)
            w.extra["log_threshold"] = log_threshold(theta)
        prov = self._provenance(path.parent, cfg, model, [layer], opts)
        return build_sae(OURS[form], w, pre_bias=False, k=k, provenance=prov, transcoder=True)

    def _read_clt(self, path: Path, opts: ReadOptions) -> CLT:
        from dictlens.sae.clt import CLT
        from dictlens.sae.config import SAEConfig

        cfg, model = self._config(path)
        model = opts.model or model
        n = len([p for p in path.iterdir() if re.match(r"^W_enc_\d+\.safetensors$", p.name)])
        if n == 0:
            raise FormatError(f"{path}: a circuit-tracer CLT without W_enc_*.safetensors files")
        encoders = [read_safetensors(path / f"W_enc_{i}.safetensors") for i in range(n)]
        decoders = [read_safetensors(path / f"W_dec_{i}.safetensors") for i in range(n)]
        if "W_enc_0" not in encoders[0]:
            raise FormatError(f"{path / 'W_enc_0.safetensors'}: no tensor 'W_enc_0'")
        F, D = encoders[0]["W_enc_0"].shape
        thresholds = [e.get(f"threshold_{i}") for i, e in enumerate(encoders)]
        if any(th is None for th in thresholds) and not all(th is None for th in thresholds):
            raise FormatError(f"{path}: thresholds for some layers only")
        form, _ = _form(cfg, thresholds[0] is not None, str(path / CONFIG))
        if form is Form.TOPK:
            raise FormatError(f"{path / CONFIG}: circuit-tracer's CLTs have no TopK")
        state: dict[str, torch.Tensor] = {}
        rows_unit = True
        for i, (enc, dec) in enumerate(zip(encoders, decoders, strict=True)):
            where_e, where_d = str(path / f"W_enc_{i}.safetensors"), str(path / f"W_dec_{i}.safetensors")
            W_dec = need(dec, f"W_dec_{i}", (F, n - i, D), where_d).reshape(F, (n - i) * D)
            b_dec = torch.zeros((n - i) * D)
            b_dec[:D] = need(enc, f"b_dec_{i}", (D,), where_e)
            rows_unit = rows_unit and bool(((W_dec.norm(dim=1) - 1).abs() <= 1e-4).all())
            block = {"W_enc_": need(enc, f"W_enc_{i}", (F, D), where_e),
                     "b_enc": need(enc, f"b_enc_{i}", (F,), where_e),
                     "W_dec": W_dec, "b_dec": b_dec, "input_scale": torch.tensor(1.0),
                     "output_scale": torch.tensor(1.0)}
            if form is Form.THRESHOLD:
                theta = _non_negative(need(enc, f"threshold_{i}", (F,), where_e), where_e)
                block["log_threshold"] = log_threshold(theta)
            state.update({f"blocks.{i}.{k}": v for k, v in block.items()})
        sae_cfg = SAEConfig(d_in=D, d_out=D, n_features=F, activation=OURS[form], transcoder=True, clt_layers=n,
                            decoder_norm="unit" if rows_unit else "free")
        clt = CLT(sae_cfg, device="cpu", provenance=self._provenance(path, cfg, model, list(range(n)), opts),
                  draw=False)
        clt.load_state(state, str(path))
        return clt.eval()

    def _provenance(self, folder: Path, cfg: dict[str, Any], model: str | None, layers: list[int],
                    opts: ReadOptions) -> Provenance:
        from dictlens.formats.base import written_by_dictlens
        from dictlens.provenance import Provenance

        tl_in = str(cfg.get("feature_input_hook") or "hook_resid_mid")
        tl_out = str(cfg.get("feature_output_hook") or "hook_mlp_out")
        reads = [opts.hook] if opts.hook and len(layers) == 1 else [_hook(tl_in, i, model) for i in layers]
        writes = [_hook(tl_out, i, model) for i in layers]
        notes = {k: cfg[k] for k in ("model_name", "model_kind", "feature_input_hook", "feature_output_hook", "scan",
                                     "activation", "k") if k in cfg}
        found = Provenance(model=model, hook_in=",".join(reads), hook_out=",".join(writes), source=self.name,
                           origin=str(folder), normalization="none", notes={self.name: notes})
        mine = cfg.get("dictlens")
        if isinstance(mine, dict) and isinstance(mine.get("layers"), list) and len(layers) == 1:
            by_layer = mine["layers"]   # a set written by dictlens: each layer's own record
            if layers[0] >= len(by_layer):
                raise FormatError(f"{folder / CONFIG}: dictlens's records cover {len(by_layer)} layers, "
                                  f"not {layers[0]}")
            cfg = {"dictlens": {"provenance": by_layer[layers[0]]}}
        return written_by_dictlens(cfg, folder / CONFIG, found)

    # ---- write ---------------------------------------------------------------------
    def write(self, sae: Dictionary, out: Path) -> list[Path]:
        from dictlens.sae.clt import CLT

        if isinstance(sae, CLT):
            return self._write_clt(sae, out)
        return write_set([sae], out)

    def _write_clt(self, clt: CLT, out: Path) -> list[Path]:
        from safetensors.torch import save

        form = clt.block(0).activation.form
        if form not in (Form.RELU, Form.THRESHOLD):
            raise FormatError(f"circuit-tracer's CLTs have JumpReLU or ReLU codes; a {clt.cfg.activation} CLT cannot "
                              "be written as one")
        if clt.cfg.d_in != clt.cfg.d_out:
            raise FormatError(f"circuit-tracer's CLTs write what they read's width; this one reads {clt.cfg.d_in} and "
                              f"writes {clt.cfg.d_out}")
        n, D = clt.n_layers, clt.cfg.d_out
        layers = [int(h.rsplit(".", 1)[-1]) for h in (clt.provenance.hook_in or "").split(",") if h[-1:].isdigit()]
        if layers and layers != list(range(n)):
            raise FormatError(f"circuit-tracer's CLTs span every layer from 0; this one reads layers "
                              f"{layers[0]}-{layers[-1]}")
        states = [export_state(b) for _, b in clt.each()]
        F = states[0]["W_enc"].shape[0]
        bias = [sum((states[src]["b_dec"][(j - src) * D:(j - src + 1) * D] for src in range(j + 1)),
                    torch.zeros(D)) for j in range(n)]
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for i, (block, st) in enumerate(zip([b for _, b in clt.each()], states, strict=True)):
            enc = {f"W_enc_{i}": st["W_enc"].contiguous(), f"b_enc_{i}": st["b_enc"], f"b_dec_{i}": bias[i]}
            if form is Form.THRESHOLD:
                enc[f"threshold_{i}"] = block.activation.inference_threshold(st, F)
            dec = {f"W_dec_{i}": st["W_dec"].reshape(F, n - i, D).contiguous()}
            for name, tensors in ((f"W_enc_{i}.safetensors", enc), (f"W_dec_{i}.safetensors", dec)):
                atomic_write_bytes(out / name, save(tensors))
                written.append(out / name)
        written.append(_write_config(out, CROSS, clt.provenance, form, None))
        return written


def write_set(transcoders: Sequence[SAE], out: Path) -> list[Path]:
    """Write one-layer transcoders (of layers 0..L−1 of one model, each reading and writing the same hooks
    there) as a circuit-tracer transcoder set."""
    from safetensors.torch import save

    by_layer: dict[int, SAE] = {}
    hooks: set[tuple[str, str]] = set()
    models = {tc.provenance.model for tc in transcoders}
    if len(models) > 1:
        raise FormatError(f"a transcoder set belongs to one model; these were trained on {sorted(map(str, models))}")
    kinds = {tc.cfg.activation for tc in transcoders}
    if len(kinds) > 1 or len({tc.cfg.k for tc in transcoders}) > 1:
        raise FormatError(f"a circuit-tracer set has one activation; these have {sorted(kinds)}")
    for tc in transcoders:
        p = tc.provenance
        if not tc.cfg.transcoder or tc.cfg.clt_layers:
            raise FormatError("circuit-tracer's transcoder sets hold transcoders (an MLP's input to its output); "
                              f"the dictionary reading {p.hook_in} reconstructs what it reads")
        if tc.d_in != tc.d_out:
            raise FormatError(f"circuit-tracer's transcoders write what they read's width; the one reading {p.hook_in} "
                              f"reads {tc.d_in} and writes {tc.d_out}")
        if tc.activation.form not in (Form.RELU, Form.THRESHOLD, Form.TOPK):
            raise FormatError(f"circuit-tracer has ReLU, JumpReLU and TopK transcoders; not {tc.cfg.activation}")
        if not p.hook_in or not p.hook_out:
            raise FormatError("a transcoder without the hooks it reads and writes in its record")
        (tl_in, layer), (tl_out, layer_out) = _tl_relative(p.hook_in, p.model), _tl_relative(p.hook_out, p.model)
        if layer != layer_out:
            raise FormatError(f"the transcoder reading {p.hook_in} writes another layer ({p.hook_out})")
        if layer in by_layer:
            raise FormatError(f"two transcoders at layer {layer}")
        by_layer[layer], hooks = tc, hooks | {(tl_in, tl_out)}
    if sorted(by_layer) != list(range(len(by_layer))):
        raise FormatError(f"circuit-tracer's transcoder sets hold every layer from 0; given layers "
                          f"{', '.join(map(str, sorted(by_layer)))} (add the others: dictlens export RUN --also "
                          "RUN ...)")
    if len(hooks) > 1:
        raise FormatError(f"a circuit-tracer set reads and writes the same hooks at every layer; found {sorted(hooks)}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for layer, tc in sorted(by_layer.items()):
        st = export_state(tc)
        tensors = {"W_enc": st["W_enc"].contiguous(), "W_dec": st["W_dec"].contiguous(), "b_enc": st["b_enc"],
                   "b_dec": st["b_dec"]}
        if tc.activation.form is Form.THRESHOLD:
            tensors["activation_function.threshold"] = tc.activation.inference_threshold(st, tc.n_features)
        if tc.cfg.skip:
            tensors["W_skip"] = st["W_skip"].contiguous()
        atomic_write_bytes(out / f"layer_{layer}.safetensors", save(tensors))
        written.append(out / f"layer_{layer}.safetensors")
    first = by_layer[0]
    written.append(_write_config(out, SET, first.provenance, first.activation.form, first.cfg.k,
                                 records=[tc.provenance for _, tc in sorted(by_layer.items())]))
    return written


def _write_config(out: Path, kind: str, p: Provenance, form: Form, k: int | None,
                  records: Sequence[Provenance] = ()) -> Path:
    import yaml

    reads, writes = (p.hook_in or "").split(",")[0], (p.hook_out or "").split(",")[0]
    cfg: dict[str, Any] = {"model_kind": kind, "model_name": p.model,
                           "feature_input_hook": _tl_relative(reads, p.model)[0],
                           "feature_output_hook": _tl_relative(writes, p.model)[0], "scan": f"dictlens:{out.name}"}
    if kind == SET:   # (a TopK set's k goes here: circuit-tracer's strict load refuses a k tensor in the files)
        if form is not Form.THRESHOLD:   # (JumpReLU: found from the threshold tensors)
            cfg["activation"] = next(theirs for theirs, f in THEIRS.items() if f is form)
        if form is Form.TOPK:
            cfg["k"] = int(k or 0)
    record = [r.to_json() for r in records] if records else None
    cfg["dictlens"] = {"provenance": p.to_json(), **({"layers": record} if record else {})}
    atomic_write_bytes(out / CONFIG, yaml.safe_dump(cfg, sort_keys=False).encode())
    return out / CONFIG


FORMAT = CircuitTracer()
