"""The sparse autoencoder: one module, a pluggable activation, native save/load.

Shapes: ``x_BD`` inputs, ``W_enc`` and ``W_dec`` [F, D] (row f is feature f's encoder
and decoder direction), codes on a :class:`~dictlens.sae.kernels.Pattern` as ``vals``
[nnz], or dense as ``f_BF``. What differs between kinds of SAE (which pairs are active,
their values, extra parameters and losses) lives in ``dictlens/sae/activations/``.

Training runs in normalised units (inputs multiplied by ``input_scale`` so their mean
norm is √D). Every activation here is positively homogeneous, so on save the scale is
folded into the biases and thresholds (divided by it): the saved SAE reads raw
activations, its decoder keeps unit-norm rows, and its codes come out in raw units.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dictlens import __version__
from dictlens.config import from_dict, to_dict
from dictlens.distributed import World
from dictlens.errors import CheckpointError, ConfigError, InputError
from dictlens.io import atomic_write_bytes, atomic_write_json, read_json
from dictlens.provenance import Provenance
from dictlens.sae import activations
from dictlens.sae.activations import Codes
from dictlens.sae.config import SAEConfig
from dictlens.sae.kernels import (
    Pattern,
    dense_decode,
    dense_encode,
    normalize_rows_,
    project_rows_,
    sparse_decode,
    sparse_encode,
)
from dictlens.sae.shard import LatentShard, initial_directions

CONFIG_FILE, WEIGHTS_FILE = "config.json", "sae.safetensors"
FORMAT = "dictlens-sae"
# Above this share of active pairs the sparse kernels lose to plain dense matmuls
# (early ReLU training, before the penalty has bitten).
SPARSE_KERNELS_BELOW = 0.05
# Written for every activation by dictlens before the activation registry (BatchTopK's
# threshold was a buffer of every SAE); dropped on load where the activation has none.
LEGACY_KEYS = ("threshold",)


def _select_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    fast: Any = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.bfloat16 if fast is not None and fast() else torch.float32


class SAE(nn.Module):
    """A sparse autoencoder f = σ(W_enc (x − b_dec) + b_enc), x̂ = W_decᵀ f + b_dec."""

    input_scale: torch.Tensor
    output_scale: torch.Tensor   # transcoders only
    hook_scale: torch.Tensor   # crosscoders only
    W_skip: nn.Parameter   # skip transcoders only
    # owned by one activation each (registered by it): BatchTopK, JumpReLU, Gated
    threshold: torch.Tensor
    log_threshold: nn.Parameter
    r_mag: nn.Parameter
    b_mag: nn.Parameter

    def __init__(self, cfg: SAEConfig, *, device: str | torch.device | None = None, seed: int = 0,
                 provenance: Provenance | None = None, shard: LatentShard | None = None, draw: bool = True):
        """``shard``: hold only this rank's features (latent parallel, dictlens/sae/shard.py);
        ``draw=False``: leave the weights uninitialised (about to be loaded)."""
        super().__init__()
        if cfg.d_in <= 0:
            raise ConfigError("d_in: expected the input width, found 0")
        self.cfg = cfg
        self.activation = activations.get(cfg.activation)()
        self.provenance = provenance or Provenance()
        self._ranking: str | None = None  # set by ranking(): overrides cfg.select_dtype
        # what the sparse backward products read their gathered rows in (kernels.BACKWARD_DTYPES;
        # a training choice, the trainer's --backward-dtype: not part of the dictionary)
        self.backward_dtype = torch.float32
        # the ranks training it together (data parallel): an activation that selects across the
        # batch (BatchTopK) selects across the global batch; alone by default
        self.world = World()
        self.shard = shard
        F, D = cfg.n_features, cfg.d_in
        if cfg.transcoder and cfg.d_out <= 0:
            raise ConfigError("d_out: expected the width a transcoder writes, found 0")
        lo, hi = (shard.lo, shard.hi) if shard is not None else (0, F)
        W = initial_directions(F, cfg.d_out, seed, lo, hi) if draw else torch.empty(hi - lo, cfg.d_out)
        if draw:
            W *= (1.0 if cfg.decoder_norm == "unit" else cfg.init_decoder_norm) / W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W)
        if cfg.transcoder:   # the encoder reads another space: its own draw, unit rows
            E = initial_directions(F, D, seed + 1, lo, hi) if draw else torch.empty(hi - lo, D)
            self.W_enc_ = nn.Parameter(E / E.norm(dim=1, keepdim=True) if draw else E)
        elif not cfg.tied:
            self.W_enc_ = nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(hi - lo))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        if cfg.skip:   # a skip transcoder's affine skip connection, from zero (Paulo et al. 2025)
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, D))
        self.activation.add_parameters(self)
        # a crosscoder's: one scale per hook, over its columns [D] (every column of a hook the same)
        self.register_buffer("input_scale", torch.ones(cfg.d_in) if cfg.crosscoder else torch.tensor(1.0))
        if cfg.crosscoder:   # each hook's training scale, kept when the scales are folded (its normalised units)
            self.register_buffer("hook_scale", torch.ones(cfg.crosscoder))
        if cfg.transcoder:   # what its target was multiplied by in training (an SAE's is its input's)
            self.register_buffer("output_scale", torch.tensor(1.0))
        self.to(device=device)

    # ---- parameters and views -------------------------------------------------------
    @property
    def W_enc(self) -> torch.Tensor:
        return self.W_dec if self.cfg.tied else self.W_enc_

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def n_features(self) -> int:
        """The features this module holds: all of them, or a latent shard's share."""
        return self.shard.n_local if self.shard is not None else self.cfg.n_features

    @property
    def per_feature_keys(self) -> tuple[str, ...]:
        """State-dict entries with one row per feature (split by latent shards; the rest is shared)."""
        own = ("W_dec", "b_enc") if self.cfg.tied else ("W_dec", "W_enc_", "b_enc")
        return own + self.activation.per_feature_keys

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        """The width it writes (its decoder rows'): D for an SAE."""
        return self.cfg.d_out

    @property
    def target_scale(self) -> torch.Tensor:
        """What training multiplied the written activation by: a transcoder's output scale, an SAE's
        input scale. Codes and reconstructions come out in raw units divided by it."""
        return self.output_scale if self.cfg.transcoder else self.input_scale

    def skip_term(self, x_BD: torch.Tensor) -> torch.Tensor | None:
        """A skip transcoder's W_skip x [B, D_out] of normalised inputs, with gradient (None without one)."""
        return x_BD @ self.W_skip.T if self.cfg.skip else None

    def decoder_norms(self) -> torch.Tensor:
        """‖W_dec[f]‖ for every feature [F]."""
        norms: torch.Tensor = self.W_dec.norm(dim=1)
        return norms

    def penalty_norms(self) -> torch.Tensor:
        """What a sparsity penalty weights each feature's code by [F], with gradient: ‖W_dec[f]‖, and a
        crosscoder's Σ_h ‖W_dec[f, hook h]‖ (Lindsey et al. 2024: a feature pays for every hook it writes,
        so writing one hook is cheaper than spreading over all)."""
        if not self.cfg.crosscoder:
            return self.decoder_norms()
        norms: torch.Tensor = self.W_dec.view(self.W_dec.shape[0], self.cfg.crosscoder, -1).norm(dim=2).sum(1)
        return norms

    def hook_decoder_norms(self) -> torch.Tensor:
        """A crosscoder's ‖W_dec[f, hook h's columns]‖ for every feature and hook [F, H], in the units it
        was trained in (every hook scaled to one typical norm), so that a feature writing two hooks alike
        has equal norms there whatever their raw sizes."""
        hooks = max(1, self.cfg.crosscoder)
        norms: torch.Tensor = self.W_dec.detach().view(self.W_dec.shape[0], hooks, -1).norm(dim=2)
        if self.cfg.crosscoder and bool((self.input_scale == 1).all()):   # saved: its scales folded in
            norms = norms * (self.hook_scale / self.hook_scale.mean())
        return norms

    def feature_directions(self) -> torch.Tensor:
        """Unit feature directions W_dec[f]/‖W_dec[f]‖ [F, D]."""
        return self.W_dec / self.decoder_norms()[:, None].clamp_min(1e-12)

    # ---- the forward pass -----------------------------------------------------------
    def _check_input(self, x_BD: torch.Tensor) -> None:
        if x_BD.ndim != 2 or x_BD.shape[1] != self.d_in:
            raise InputError(f"SAE input: expected [batch, {self.d_in}], found {list(x_BD.shape)}")

    def ranking_dtype(self) -> torch.dtype:
        """The precision features are ranked in for top-k style selections.

        Lower precision ("auto" on hardware with fast bfloat16) is used only to rank
        features; thresholds (ReLU, JumpReLU, gates, BatchTopK at inference) are always
        decided in float32 so that no small activation is lost."""
        return _select_dtype(self._ranking or self.cfg.select_dtype, self.device)

    def dense_pre(self, x_c: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """No-grad dense pre-activations [B, F] of centred inputs, in ``dtype``."""
        with torch.no_grad():
            return torch.addmm(self.b_enc.detach().to(dtype), x_c.detach().to(dtype),
                               self.W_enc.detach().to(dtype).T)

    def encode_values(self, x_c: torch.Tensor, bias: torch.Tensor, p: Pattern,
                      center: torch.Tensor | None = None) -> torch.Tensor:
        """Exact pre-activations [nnz] on ``p`` (with gradient), sparse or dense by density.

        ``center``: ``x_c`` is an input that needs no gradient minus ``center`` (b_dec); the sparse
        path then gives ``center`` its gradient without the per-row one of ``x_c``."""
        if p.nnz > SPARSE_KERNELS_BELOW * p.n_rows * p.n_features:
            return dense_encode(x_c, self.W_enc, bias, p)
        if center is not None:
            return sparse_encode(x_c.detach(), self.W_enc, bias, p, center, self.backward_dtype)
        return sparse_encode(x_c, self.W_enc, bias, p, backward_dtype=self.backward_dtype)

    def reconstruct(self, vals: torch.Tensor, p: Pattern, skip: torch.Tensor | None = None) -> torch.Tensor:
        """x̂ = Σ over the pairs of ``vals · W_dec[f]`` + b_dec [B, D_out] (+ ``skip``, a skip transcoder's
        :meth:`skip_term`), with gradient; latent shards sum their partial decodes (b_dec and the skip
        split among them, so their gradients are too)."""
        if self.shard is None:
            out = self.decode_values(vals, p, bias=self.b_dec)
            return out if skip is None else out + skip
        n = self.shard.world.size
        part = self.decode_values(vals, p, bias=self.b_dec / n)
        return self.shard.world.sum_shared(part if skip is None else part + skip / n)

    def centring(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The centred inputs x − b_dec (or x without ``pre_bias``) and the centre to hand
        :meth:`encode_values` (b_dec, where the inputs themselves need no gradient)."""
        if not self.cfg.pre_bias:
            return x_BD, None
        return x_BD - self.b_dec, None if x_BD.requires_grad else self.b_dec

    def decode_values(self, vals: torch.Tensor, p: Pattern, W: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
        """Σ over the pairs of ``vals · W[f]`` [B, D] (W: the decoder unless given), + ``bias`` [D]
        if given."""
        W = self.W_dec if W is None else W
        if p.nnz > SPARSE_KERNELS_BELOW * p.n_rows * p.n_features:
            out = dense_decode(vals, W, p)
            return out if bias is None else out + bias
        return sparse_decode(vals, W, p, bias, self.backward_dtype)

    def encode_codes(self, x_BD: torch.Tensor, dead: torch.Tensor | None = None, k_aux: int = 0,
                     aux_rows: int = 0) -> Codes:
        """The full forward pass on normalised inputs (what the trainer calls).

        ``dead`` [F] and ``k_aux``: also pick, per row (of the first ``aux_rows``, or all),
        the top-``k_aux`` dead features for AuxK, where the activation's selection can.
        """
        self._check_input(x_BD)
        x_c, center = self.centring(x_BD)
        sel = self.activation.select(self, x_c, dead=dead, k_aux=k_aux, aux_rows=aux_rows)
        pre = self.encode_values(x_c, self.b_enc, sel.pattern, center)
        vals, extra = self.activation.values(self, pre, sel.pattern)
        skip = self.skip_term(x_BD)
        x_hat = self.reconstruct(vals, sel.pattern, skip)
        codes = Codes(sel.pattern, pre, vals, x_hat, sel.aux, extra, skip)
        self.activation.after_forward(self, codes)
        return codes

    # ---- the user-facing API (raw activations in, raw units out) --------------------
    def encode_sparse(self, x_BD: torch.Tensor) -> tuple[Pattern, torch.Tensor]:
        """Active pairs and their values for raw inputs; no dense B×F tensor is returned."""
        with torch.no_grad():
            codes = self.encode_codes(x_BD * self.input_scale)
        keep = codes.vals > 0
        return codes.pattern.subset(keep), codes.vals[keep] / self.code_scale

    @property
    def code_scale(self) -> torch.Tensor:
        """What raw codes are the trained ones divided by: the target's scale, a crosscoder's mean hook
        scale (its saved form's codes: :meth:`folded_state`)."""
        return self.input_scale.mean() if self.cfg.crosscoder else self.target_scale

    @contextmanager
    def ranking(self, select_dtype: str) -> Iterator[SAE]:
        """Inside the block, features are ranked in ``select_dtype`` (e.g. "float32" for
        evaluations that must not depend on the hardware's bfloat16 support). The config is
        left alone, so a save inside the block records the SAE's own setting."""
        saved = self._ranking
        self._ranking = select_dtype
        try:
            yield self
        finally:
            self._ranking = saved

    def raw_skip(self, x_BD: torch.Tensor | None) -> torch.Tensor | None:
        """A skip transcoder's skip connection of raw inputs, in raw output units (None without one or
        without ``x_BD``)."""
        if not self.cfg.skip or x_BD is None:
            return None
        with torch.no_grad():
            return (x_BD * self.input_scale) @ self.W_skip.T / self.target_scale

    def decode_sparse(self, p: Pattern, vals: torch.Tensor, x_BD: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction (raw units) from sparse codes as returned by encode_sparse; a skip transcoder
        adds its skip connection of the raw inputs ``x_BD`` when given (the dictionary's part alone
        without them)."""
        with torch.no_grad():
            if self.cfg.crosscoder:   # (scales per column: decoded in trained units, then brought back)
                return self.decode_values(vals * self.code_scale, p, bias=self.b_dec) / self.input_scale
            out = self.decode_values(vals, p, bias=self.b_dec / self.target_scale)
            skip = self.raw_skip(x_BD)
            return out if skip is None else out + skip

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense codes f [B, F] of raw inputs."""
        p, vals = self.encode_sparse(x_BD)
        f = torch.zeros(p.n_rows, p.n_features, dtype=vals.dtype, device=vals.device)
        return f.index_put((p.rows, p.cols), vals)

    def decode(self, f_BF: torch.Tensor, x_BD: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction (raw units) from dense codes [B, F]; a skip transcoder adds its skip connection
        of the raw inputs ``x_BD`` when given."""
        if f_BF.ndim != 2 or f_BF.shape[1] != self.n_features:
            raise InputError(f"SAE codes: expected [batch, {self.n_features}], found {list(f_BF.shape)}")
        if self.cfg.crosscoder:
            return (f_BF * self.code_scale @ self.W_dec + self.b_dec) / self.input_scale
        out = f_BF @ self.W_dec + self.b_dec / self.target_scale
        skip = self.raw_skip(x_BD)
        return out if skip is None else out + skip

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Reconstruction x̂ of raw inputs (a transcoder's prediction of its target), in raw units."""
        return self.encode_codes(x_BD * self.input_scale).x_hat / self.target_scale

    # ---- constraints ----------------------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each unit decoder row.

        The rows are unit-norm here: initialised so and renormalised after every step
        (``normalize_decoder``), so the projection needs no division by ‖W_dec[f]‖².
        """
        if self.cfg.decoder_norm != "unit" or self.W_dec.grad is None:
            return
        project_rows_(self.W_dec.detach(), self.W_dec.grad)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.cfg.decoder_norm == "unit":
            normalize_rows_(self.W_dec)

    # ---- save / load ----------------------------------------------------------------
    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The whole dictionary's ``state_dict`` (a latent shard's gathered into rank 0's host
        memory: None on the other ranks; every rank must call it)."""
        return full_state(self, self.shard, self.per_feature_keys)

    def gathered(self) -> SAE | None:
        """The whole dictionary as one ordinary SAE on this SAE's device (rank 0; None on the other
        ranks of a latent shard, each of which must call it); itself when not sharded."""
        if self.shard is None:
            return self
        state = self.full_state()
        if state is None:
            return None
        whole = SAE(self.cfg, device="cpu", provenance=self.provenance, draw=False)
        whole.load_state(state, "the gathered shards")
        return whole.to(device=self.device)

    def folded_state(self) -> dict[str, torch.Tensor]:
        """Weights with the training scales folded in: the saved SAE reads raw activations and writes
        raw ones, its decoder rows unchanged. Codes come out divided by the target's scale s_out, so
        the encoder (and a skip) take the ratio s_in / s_out (1 for an SAE) and the biases and
        thresholds are divided by s_out.

        A crosscoder's scales are per hook (vectors over the columns): codes come out divided by their
        mean c, the encoder's columns take s / c, the decoder's c / s (so a hook scaled
        up in training is written back at its own size) and the decoder bias ÷ s."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if self.cfg.crosscoder:
            s = self.input_scale.detach()
            c = float(s.mean())
            state["W_enc_"] *= s / c
            state["W_dec"] *= c / s
            state["b_enc"] /= c
            state["b_dec"] /= s
            self.activation.fold_scale(state, c)
            state["input_scale"] = torch.ones_like(s)
            return state
        s_in, s_out = float(self.input_scale), float(self.target_scale)
        if s_in != s_out:   # (a transcoder's: an SAE, possibly tied, reads and writes in one scale)
            state["W_enc_"] *= s_in / s_out
            if self.cfg.skip:
                state["W_skip"] *= s_in / s_out
        state["b_enc"] /= s_out
        state["b_dec"] /= s_out
        self.activation.fold_scale(state, s_out)
        state["input_scale"] = torch.tensor(1.0)
        if self.cfg.transcoder:
            state["output_scale"] = torch.tensor(1.0)
        return state

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``sae.safetensors`` into directory ``path``, atomically.

        ``extra``: more top-level entries for ``config.json`` (the trainer adds its settings).
        """
        return write_dictionary(path, WEIGHTS_FILE, FORMAT, self.folded_state(), self.cfg, self.provenance,
                                extra)

    def load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load weights (checkpoint keys checked against this SAE's, shapes included); a latent
        shard takes its rows of the whole dictionary's per-feature entries."""
        state = {k: v for k, v in state.items() if k not in LEGACY_KEYS or k in self.activation.owned_keys}
        load_state(self, state, self.shard, self.per_feature_keys, source)

    def finish_training(self, rows: Iterable[torch.Tensor]) -> None:
        """The activation's end of training on normalised input rows (BatchTopK calibrates its threshold)."""
        self.activation.finish_training(self, rows)

    def each(self) -> Iterator[tuple[int, SAE]]:
        """Its blocks of features and their layer: itself alone (a CLT has one per layer)."""
        yield 0, self

    def inputs_of(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Block ``layer``'s inputs: all of ``x``."""
        return x

    def written_by(self, y: torch.Tensor, layer: int) -> torch.Tensor:
        """What block ``layer`` writes: all of ``y``."""
        return y

    def decoders(self) -> list[nn.Parameter]:
        """The decoder matrices whose rows the unit-norm constraint holds."""
        return [self.W_dec]

    def set_scales(self, inputs: list[float], output: float) -> None:
        """The training scales: the input's (one per read hook) and the target's."""
        if self.cfg.crosscoder:
            if len(inputs) != self.cfg.crosscoder:
                raise ConfigError(f"a crosscoder over {self.cfg.crosscoder} hooks takes one input scale each, "
                                  f"found {len(inputs)}")
            scales = torch.tensor(inputs, dtype=torch.float32, device=self.input_scale.device)
            self.hook_scale.copy_(scales)
            self.input_scale.copy_(scales.repeat_interleave(self.cfg.d_in // self.cfg.crosscoder))
            return
        self.input_scale.fill_(inputs[0])
        if self.cfg.transcoder:
            self.output_scale.fill_(output)

    @torch.no_grad()
    def init_decoder_bias(self, value: torch.Tensor) -> None:
        """Start the decoder bias at ``value`` [D_out] (normalised units: the target's typical row)."""
        self.b_dec.copy_(value)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device | None = None) -> SAE:
        """Load an SAE saved by :meth:`save`; a damaged or foreign file is a clear error."""
        cfg, provenance, state, weights = read_dictionary(path, WEIGHTS_FILE, FORMAT, "SAE")
        sae = cls(cfg, device="cpu", provenance=provenance)
        sae.load_state(state, str(weights))
        return sae.to(device=device).eval()   # inference mode (BatchTopK: the threshold, not the batch)


def write_dictionary(path: str | Path, weights_file: str, fmt: str, state: dict[str, torch.Tensor],
                     cfg: SAEConfig, provenance: Provenance, extra: dict[str, Any] | None) -> Path:
    """Write a dictionary's folded ``state`` and ``config.json`` (``fmt``, its config and record) into
    directory ``path``, each file atomically."""
    from safetensors.torch import save

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / weights_file, save({k: v.contiguous().cpu() for k, v in state.items()}))
    atomic_write_json(out / CONFIG_FILE, {"format": fmt, "dictlens_version": __version__, "sae": to_dict(cfg),
                                          "provenance": provenance.to_json(), **(extra or {})})
    return out


def read_dictionary(path: str | Path, weights_file: str, fmt: str, what: str
                    ) -> tuple[SAEConfig, Provenance, dict[str, torch.Tensor], Path]:
    """The config, record and weights :func:`write_dictionary` wrote; a missing, foreign or damaged file
    is a clear error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    cfg_file, weights = root / CONFIG_FILE, root / weights_file
    for f in (cfg_file, weights):
        if not f.is_file():
            raise InputError(f"{what} checkpoint {root}: {f.name} is missing")
    meta = read_json(cfg_file)
    if meta.get("format") != fmt:
        raise InputError(f"{cfg_file} is not a dictlens {what} config")
    cfg = from_dict(SAEConfig, meta["sae"], source=str(cfg_file))
    if "provenance" in meta:
        provenance = Provenance.from_json(meta["provenance"], source=f"{cfg_file}: provenance")
    else:  # written by dictlens 0.1
        provenance = Provenance.from_legacy(meta.get("metadata") or {}, source=str(cfg_file))
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is truncated or damaged ({e})") from None
    return cfg, provenance, state, weights


def full_state(module: nn.Module, shard: LatentShard | None, per_feature: Sequence[str]
               ) -> dict[str, torch.Tensor] | None:
    """``module``'s whole ``state_dict``: a latent shard's per-feature entries gathered into rank 0's
    host memory (None on the other ranks; every rank must call it)."""
    state = module.state_dict()
    if shard is None:
        return state
    out: dict[str, torch.Tensor | None] = {
        k: shard.gather(v, f"gathering {k}") if k in per_feature else v.detach().cpu() for k, v in state.items()}
    return None if shard.world.rank else {k: v for k, v in out.items() if v is not None}


def load_state(module: nn.Module, state: dict[str, torch.Tensor], shard: LatentShard | None,
               per_feature: Sequence[str], source: str) -> None:
    """Load a whole dictionary's ``state`` into ``module`` (a latent shard takes its rows of the
    per-feature entries), keys and shapes checked first: a mismatch is one error naming them."""
    if shard is not None:
        state = {k: shard.slice(v, k, source) if k in per_feature else v for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        cfg = getattr(module, "cfg", None)
        diff = sorted(set(expected.items()) ^ set(found.items()))
        described = "" if cfg is None else (
            f" ({cfg.activation}, F={cfg.n_features}, D={cfg.d_in}" + (f", D_out={cfg.d_out}" if cfg.transcoder else "")
            + (f", {cfg.clt_layers} layers" if cfg.clt_layers else "") + ")")
        raise CheckpointError(f"{source} does not match its config{described}: differs in {diff[:4]}")
    module.load_state_dict(state)


__all__ = ["SAE", "Codes", "CONFIG_FILE", "WEIGHTS_FILE"]
