"""The sparse autoencoder: one module, a pluggable activation, native save/load.

Shapes: ``x_BD`` inputs, ``W_enc`` and ``W_dec`` [F, D] (row f is feature f's encoder
and decoder direction), codes on a :class:`~dictlens.sae.kernels.Pattern` as ``vals``
[nnz], or dense as ``f_BF``.

Training runs in normalised units (inputs multiplied by ``input_scale`` so their mean
norm is √D). Every activation here is positively homogeneous, so on save the scale is
folded into the biases and thresholds (divided by it): the saved SAE reads raw
activations, its decoder keeps unit-norm rows, and its codes come out in raw units.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dictlens import __version__
from dictlens.config import from_dict, to_dict
from dictlens.errors import CacheError, ConfigError, InputError
from dictlens.io import atomic_write_bytes, atomic_write_json, read_json
from dictlens.sae.activations import jumprelu, step
from dictlens.sae.config import SAEConfig
from dictlens.sae.kernels import (
    Pattern,
    reference_decode,
    reference_encode,
    sparse_decode,
    sparse_encode,
    topk_select,
)

CONFIG_FILE, WEIGHTS_FILE = "config.json", "sae.safetensors"
# Above this share of active pairs the sparse kernels lose to plain dense matmuls
# (early ReLU training, before the penalty has bitten).
DENSE_ABOVE = 0.05


@dataclass
class Codes:
    """The forward pass of a batch: active pairs, their values, and the reconstruction.

    ``pre`` holds the exact pre-activations on ``pattern`` (with gradient); ``vals`` the
    activations; ``pre_BF`` the no-grad dense pre-activations used for selection (in
    ``select_dtype``), kept for auxiliary losses that look at inactive features, except
    for TopK, whose selection (and AuxK's) runs in chunks and returns indices only.
    """

    pattern: Pattern
    pre: torch.Tensor
    vals: torch.Tensor
    x_hat: torch.Tensor
    pre_BF: torch.Tensor | None  # None when top-k selection ran chunked (it is never whole)
    aux_idx: torch.Tensor | None = None  # AuxK: top-k_aux dead features per row
    l0_surrogate: torch.Tensor | None = None  # JumpReLU: Σ H(z − θ) with its STE gradient
    gate: torch.Tensor | None = None  # Gated: ReLU(π_gate) on the pattern


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
    threshold: torch.Tensor
    log_threshold: nn.Parameter
    r_mag: nn.Parameter
    b_mag: nn.Parameter

    def __init__(self, cfg: SAEConfig, *, device: str | torch.device | None = None, seed: int = 0,
                 metadata: dict[str, Any] | None = None):
        super().__init__()
        if cfg.d_in <= 0:
            raise ConfigError("d_in: expected the input width, found 0")
        self.cfg = cfg
        self.metadata = dict(metadata or {})
        F, D = cfg.width, cfg.d_in
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(F, D, generator=g)
        W *= (1.0 if cfg.decoder_norm == "unit" else cfg.init_decoder_norm) / W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W)
        if not cfg.tied:
            self.W_enc_ = nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.b_dec = nn.Parameter(torch.zeros(D))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((F,), math.log(cfg.jumprelu_threshold)))
        if cfg.activation == "gated":
            self.r_mag = nn.Parameter(torch.zeros(F))
            self.b_mag = nn.Parameter(torch.zeros(F))
        # Inference threshold of BatchTopK (running mean of the smallest kept activation).
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("input_scale", torch.tensor(1.0))
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
        return self.cfg.width

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    def decoder_norms(self) -> torch.Tensor:
        """‖W_dec[f]‖ for every feature [F]."""
        return self.W_dec.norm(dim=1)

    def feature_directions(self) -> torch.Tensor:
        """Unit feature directions W_dec[f]/‖W_dec[f]‖ [F, D]."""
        return self.W_dec / self.decoder_norms()[:, None].clamp_min(1e-12)

    # ---- the forward pass -----------------------------------------------------------
    def _check_input(self, x_BD: torch.Tensor) -> None:
        if x_BD.ndim != 2 or x_BD.shape[1] != self.d_in:
            raise InputError(f"SAE input: expected [batch, {self.d_in}], found {list(x_BD.shape)}")

    def _dense_pre(self, x_c: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """No-grad dense pre-activations, in the selection precision.

        Lower precision ("auto" on hardware with fast bfloat16) is used only to rank
        features for top-k selection; thresholds (ReLU, JumpReLU, gates, BatchTopK at
        inference) are always decided in float32 so that no small activation is lost.
        """
        ranks = self.cfg.activation == "batchtopk" and self.training
        dt = _select_dtype(self.cfg.select_dtype, x_c.device) if ranks else torch.float32
        with torch.no_grad():
            return torch.addmm(bias.detach().to(dt), x_c.detach().to(dt), self.W_enc.detach().to(dt).T)

    def _encode_values(self, x_c: torch.Tensor, bias: torch.Tensor, p: Pattern) -> torch.Tensor:
        if p.nnz > DENSE_ABOVE * p.n_rows * p.n_features:
            return reference_encode(x_c, self.W_enc, bias, p)
        return sparse_encode(x_c, self.W_enc, bias, p)

    def _decode_values(self, vals: torch.Tensor, p: Pattern, W: torch.Tensor | None = None) -> torch.Tensor:
        W = self.W_dec if W is None else W
        if p.nnz > DENSE_ABOVE * p.n_rows * p.n_features:
            return reference_decode(vals, W, p)
        return sparse_decode(vals, W, p)

    def _select(self, pre_BF: torch.Tensor, training: bool) -> Pattern:
        act = self.cfg.activation
        if act == "batchtopk" and training:
            assert self.cfg.k is not None
            n = min(self.cfg.k * pre_BF.shape[0], pre_BF.numel())
            flat = pre_BF.flatten().topk(n, sorted=False).indices
            mask = torch.zeros(pre_BF.numel(), dtype=torch.bool, device=pre_BF.device)
            mask[flat] = True
            return Pattern.from_mask(mask.view_as(pre_BF) & (pre_BF > 0))
        if act == "batchtopk":
            return Pattern.from_mask(pre_BF > self.threshold.clamp_min(0))
        if act == "jumprelu":
            theta = self.log_threshold.detach().exp()
            # Pairs within ε/2 below θ carry θ's straight-through gradient.
            return Pattern.from_mask(pre_BF > theta - self.cfg.jumprelu_bandwidth / 2)
        return Pattern.from_mask(pre_BF > 0)  # relu, gated (π_gate > 0)

    def encode_codes(self, x_BD: torch.Tensor, dead: torch.Tensor | None = None, k_aux: int = 0,
                     aux_rows: int = 0) -> Codes:
        """The full forward pass on normalised inputs (what the trainer calls).

        ``dead`` [F] and ``k_aux``: also pick, per row (of the first ``aux_rows``, or all),
        the top-``k_aux`` dead features for AuxK.
        """
        self._check_input(x_BD)
        x_c = x_BD - self.b_dec if self.cfg.pre_bias else x_BD
        pre_BF: torch.Tensor | None = None
        aux_idx = None
        if self.cfg.activation == "topk":
            assert self.cfg.k is not None
            want_aux = dead is not None and bool(dead.any())
            idx, aux_idx = topk_select(x_c, self.W_enc, self.b_enc, self.cfg.k,
                                       dtype=_select_dtype(self.cfg.select_dtype, x_c.device),
                                       dead=dead if want_aux else None,
                                       k_aux=min(k_aux, int(dead.sum())) if want_aux and dead is not None else 0,
                                       aux_rows=aux_rows)
            p = Pattern.from_indices(idx, self.n_features)
        else:
            pre_BF = self._dense_pre(x_c, self.b_enc)
            p = self._select(pre_BF, self.training)
        pre = self._encode_values(x_c, self.b_enc, p)
        codes = Codes(p, pre, pre, pre, pre_BF, aux_idx)
        act = self.cfg.activation
        if act in ("topk", "batchtopk", "relu"):
            codes.vals = pre.relu()
        elif act == "jumprelu":
            theta = self.log_threshold.exp()[p.cols]
            codes.vals = jumprelu(pre, theta, self.cfg.jumprelu_bandwidth)
            codes.l0_surrogate = step(pre, theta, self.cfg.jumprelu_bandwidth).sum()
        else:  # gated: magnitude path shares W_enc, rescaled per feature
            codes.gate = pre.relu()
            mag = pre - self.b_enc[p.cols]
            codes.vals = (mag * self.r_mag.exp()[p.cols] + self.b_mag[p.cols]).relu()
        if act == "batchtopk" and self.training and p.nnz:
            self._update_threshold(codes.vals.detach())
        codes.x_hat = self._decode_values(codes.vals, p) + self.b_dec
        return codes

    @torch.no_grad()
    def _update_threshold(self, vals: torch.Tensor) -> None:
        smallest = vals[vals > 0].min() if bool((vals > 0).any()) else vals.new_tensor(0.0)
        if float(self.threshold) < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.mul_(0.99).add_(0.01 * smallest)

    @torch.no_grad()
    def calibrate_threshold(self, batches: Any) -> float:
        """BatchTopK: set the inference threshold from normalised inputs so that tokens get k
        active features on average: the (k·N)-th largest pre-activation over all N rows, i.e.
        exactly the batch top-k over the whole sample. The running mean kept during training
        remembers the first steps (0.99^132 = 27% weight after a 540k-token run), which left
        L0 at 9 for k = 16 and a quarter of the features silent at inference."""
        k, rows, pres = int(self.cfg.k or 0), 0, []
        for x in batches:
            x_c = x - self.b_dec if self.cfg.pre_bias else x
            pre = torch.addmm(self.b_enc, x_c, self.W_enc.T).relu()
            # a row's 4k largest bound its share of the top k·N (memory: [N, 4k], not [N, F])
            pres.append(pre.topk(min(4 * k, self.n_features), dim=1, sorted=False).values.flatten())
            rows += len(x)
        values = torch.cat(pres)
        n = min(k * rows, len(values))
        if n > 0:
            self.threshold.fill_(float(values.topk(n, sorted=True).values[-1]))
        return float(self.threshold)

    # ---- the user-facing API (raw activations in, raw units out) --------------------
    def encode_sparse(self, x_BD: torch.Tensor) -> tuple[Pattern, torch.Tensor]:
        """Active pairs and their values for raw inputs; no dense B×F tensor is returned."""
        with torch.no_grad():
            codes = self.encode_codes(x_BD * self.input_scale)
        keep = codes.vals > 0
        return codes.pattern.subset(keep), codes.vals[keep] / self.input_scale

    @contextmanager
    def ranking(self, select_dtype: str) -> Iterator[SAE]:
        """Inside the block, TopK features are ranked in ``select_dtype`` (e.g. "float32"
        for evaluations that must not depend on the hardware's bfloat16 support)."""
        saved = self.cfg.select_dtype
        self.cfg.select_dtype = select_dtype
        try:
            yield self
        finally:
            self.cfg.select_dtype = saved

    def decode_sparse(self, p: Pattern, vals: torch.Tensor) -> torch.Tensor:
        """Reconstruction of raw inputs from sparse codes (as returned by encode_sparse)."""
        with torch.no_grad():
            return self._decode_values(vals, p) + self.b_dec / self.input_scale

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense codes f [B, F] of raw inputs."""
        p, vals = self.encode_sparse(x_BD)
        f = torch.zeros(p.n_rows, p.n_features, dtype=vals.dtype, device=vals.device)
        return f.index_put((p.rows, p.cols), vals)

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        """Reconstruction of raw inputs from dense codes [B, F]."""
        if f_BF.ndim != 2 or f_BF.shape[1] != self.n_features:
            raise InputError(f"SAE codes: expected [batch, {self.n_features}], found {list(f_BF.shape)}")
        return f_BF @ self.W_dec + self.b_dec / self.input_scale

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Reconstruction x̂ of raw inputs."""
        return self.encode_codes(x_BD * self.input_scale).x_hat / self.input_scale

    # ---- constraints ----------------------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each unit decoder row.

        The rows are unit-norm here: initialised so and renormalised after every step
        (``normalize_decoder``), so the projection needs no division by ‖W_dec[f]‖².
        """
        if self.cfg.decoder_norm != "unit" or self.W_dec.grad is None:
            return
        W, g = self.W_dec.detach(), self.W_dec.grad
        g.addcmul_(W, torch.linalg.vecdot(g, W).unsqueeze(1), value=-1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.cfg.decoder_norm == "unit":
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ---- save / load ----------------------------------------------------------------
    def folded_state(self) -> dict[str, torch.Tensor]:
        """Weights with the input scale folded in (the saved SAE reads raw activations)."""
        s = float(self.input_scale)
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        for key in ("b_enc", "b_dec", "b_mag"):
            if key in state:
                state[key] /= s
        if "log_threshold" in state:
            state["log_threshold"] -= math.log(s)
        if float(state["threshold"]) > 0:
            state["threshold"] /= s
        state["input_scale"] = torch.tensor(1.0)
        return state

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``sae.safetensors`` into directory ``path``, atomically.

        ``extra``: more top-level entries for ``config.json`` (the trainer adds its settings).
        """
        from safetensors.torch import save

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous().cpu() for k, v in self.folded_state().items()}
        atomic_write_bytes(out / WEIGHTS_FILE, save(state))
        atomic_write_json(out / CONFIG_FILE, {"format": "dictlens-sae", "dictlens_version": __version__,
                                              "sae": to_dict(self.cfg), "metadata": self.metadata,
                                              **(extra or {})})
        return out

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device | None = None) -> SAE:
        """Load an SAE saved by :meth:`save`; a damaged or foreign file is a clear error."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        root = Path(path)
        cfg_file, weights = root / CONFIG_FILE, root / WEIGHTS_FILE
        for f in (cfg_file, weights):
            if not f.is_file():
                raise InputError(f"SAE checkpoint {root}: {f.name} is missing")
        meta = read_json(cfg_file)
        if meta.get("format") != "dictlens-sae":
            raise InputError(f"{cfg_file} is not a dictlens SAE config")
        cfg = from_dict(SAEConfig, meta["sae"], source=str(cfg_file))
        sae = cls(cfg, device="cpu", metadata=meta.get("metadata"))
        try:
            state = load_file(weights)
        except (SafetensorError, OSError, ValueError) as e:
            raise CacheError(f"{weights} is truncated or damaged ({e})") from None
        expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if expected != found:
            diff = sorted(set(expected.items()) ^ set(found.items()))
            raise CacheError(f"{weights} does not match its config ({cfg.activation}, F={cfg.width}, "
                             f"D={cfg.d_in}): differs in {diff[:4]}")
        sae.load_state_dict(state)
        return sae.to(device=device).eval()   # inference mode (BatchTopK: the threshold, not the batch)

