"""The cross-layer transcoder (CLT): each layer's features read that layer's MLP input and write to the
MLP outputs of that layer and of every later one.

Over L consecutive layers with F features and width D per layer, block l holds layer l's encoder
(W_enc [F, D], b_enc [F], and whatever its activation owns) and its decoder W_dec [F, (L − l)·D]:
row f is feature f's write to layers l, l+1, ..., L−1 side by side (circuit-tracer's layout). The
prediction of layer j's MLP output is Σ over blocks l ≤ j of block l's segment for j:

    ŷ_j = Σ_{l ≤ j} W_dec[l][:, (j−l)·D:(j−l+1)·D]ᵀ f_l + Σ_{l ≤ j} b_dec[l][(j−l)·D:(j−l+1)·D]

Causality holds by construction (no block has a segment for an earlier layer). Each block is an
ordinary transcoder :class:`~dictlens.sae.model.SAE` of output width (L − l)·D, so every activation,
the sparse kernels (an active feature's writes to later layers are one wider row of the same sparse
decode, never a dense [B, F, L, D] tensor), latent shards and the save-time scale folding are the
SAE's. Block l's decoder bias covers the layers it writes to, so layer j's bias is the sum of j + 1
blocks' segments (the saved file keeps them so; a format writer sums them). The unit-norm
constraint holds each feature's whole decoder row (its writes to every later layer together).

Inputs are the L layers' MLP inputs side by side [B, L·D] (a :class:`~dictlens.data.hooks.Wiring`
with L reads), scaled per layer in training; the targets are the L MLP outputs [B, L·D], one scale
for all of them, so the loss sums every layer's squared error in the same units.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dictlens.config import from_dict, to_dict
from dictlens.distributed import World
from dictlens.errors import ConfigError, InputError
from dictlens.io import read_json
from dictlens.provenance import Provenance
from dictlens.sae.activations import Codes
from dictlens.sae.config import SAEConfig
from dictlens.sae.kernels import Pattern
from dictlens.sae.model import CONFIG_FILE, SAE, full_state, load_state, read_dictionary, write_dictionary
from dictlens.sae.shard import LatentShard

CLT_FILE = "clt.safetensors"
FORMAT = "dictlens-clt"


def block_config(cfg: SAEConfig, layer: int) -> SAEConfig:
    """The transcoder config of block ``layer`` of a CLT: layer ``layer``'s encoder, a decoder writing
    the ``clt_layers − layer`` layers from it on."""
    return from_dict(SAEConfig, {**to_dict(cfg), "clt_layers": 0, "transcoder": True,
                                 "d_out": (cfg.clt_layers - layer) * cfg.d_out})


class CLT(nn.Module):
    """A cross-layer transcoder: ``blocks[l]`` reads layer l, writes layers l..L−1."""

    def __init__(self, cfg: SAEConfig, *, device: str | torch.device | None = None, seed: int = 0,
                 provenance: Provenance | None = None, shard: LatentShard | None = None, draw: bool = True):
        super().__init__()
        if cfg.clt_layers < 1:
            raise ConfigError("clt_layers: a cross-layer transcoder needs at least one layer")
        if cfg.d_in <= 0 or cfg.d_out <= 0:
            raise ConfigError("d_in, d_out: expected a CLT's per-layer widths, found 0")
        self.cfg = cfg
        self.provenance = provenance or Provenance()
        self.shard = shard
        # block l's draws from a seed of its own, so that each layer's initial features do not depend on L
        self.blocks = nn.ModuleList([SAE(block_config(cfg, layer), device="cpu", seed=seed + 7919 * layer,
                                         shard=shard, draw=draw) for layer in range(cfg.clt_layers)])
        self.to(device=device)

    # ---- shapes and views -----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.cfg.clt_layers

    @property
    def layer_features(self) -> int:
        """Features per layer this module holds (a latent shard's share)."""
        return self.block(0).n_features

    @property
    def n_features(self) -> int:
        """Every layer's features this module holds, layer 0's first."""
        return self.n_layers * self.layer_features

    @property
    def d_in(self) -> int:
        """The width it reads: every layer's MLP input side by side."""
        return self.n_layers * self.cfg.d_in

    @property
    def d_out(self) -> int:
        return self.n_layers * self.cfg.d_out

    @property
    def device(self) -> torch.device:
        return self.block(0).device

    def block(self, layer: int) -> SAE:
        b = self.blocks[layer]
        assert isinstance(b, SAE)
        return b

    def each(self) -> Iterator[tuple[int, SAE]]:
        return ((layer, self.block(layer)) for layer in range(self.n_layers))

    @property
    def per_feature_keys(self) -> tuple[str, ...]:
        return tuple(f"blocks.{layer}.{k}" for layer, b in self.each() for k in b.per_feature_keys)

    @property
    def input_scale(self) -> torch.Tensor:
        """[L·D]: each layer's input scale over its columns."""
        return torch.cat([b.input_scale.expand(self.cfg.d_in) for _, b in self.each()])

    @property
    def target_scale(self) -> torch.Tensor:
        return self.block(0).output_scale

    @property
    def world(self) -> World:
        return self.block(0).world

    @world.setter
    def world(self, world: World) -> None:
        for _, b in self.each():
            b.world = world

    @property
    def backward_dtype(self) -> torch.dtype:
        return self.block(0).backward_dtype

    @backward_dtype.setter
    def backward_dtype(self, dtype: torch.dtype) -> None:
        for _, b in self.each():
            b.backward_dtype = dtype

    def inputs_of(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer ``layer``'s columns of inputs [B, L·D]."""
        d = self.cfg.d_in
        return x[:, layer * d:(layer + 1) * d]

    def written_by(self, y: torch.Tensor, layer: int) -> torch.Tensor:
        """The columns of targets [B, L·D] that block ``layer`` writes (its layer's and every later one's)."""
        return y[:, layer * self.cfg.d_out:]

    def decoder_norms(self) -> torch.Tensor:
        """‖W_dec[f]‖ of every feature (its whole row: the writes to every later layer) [L·F]."""
        return torch.cat([b.decoder_norms() for _, b in self.each()])

    def layer_norms(self) -> torch.Tensor:
        """[L·F, L]: the norm of each feature's write to each layer (0 before its own layer)."""
        d, L = self.cfg.d_out, self.n_layers
        out = torch.zeros(self.n_features, L, device=self.device)
        for layer, b in self.each():
            rows = b.W_dec.detach().view(-1, L - layer, d).norm(dim=2)
            out[layer * self.layer_features:(layer + 1) * self.layer_features, layer:] = rows
        return out

    def decoders(self) -> list[nn.Parameter]:
        return [b.W_dec for _, b in self.each()]

    # ---- the forward pass -----------------------------------------------------------------
    def encode_blocks(self, x: torch.Tensor, dead: torch.Tensor | None = None, k_aux: int = 0,
                      aux_rows: int = 0) -> tuple[list[Codes], torch.Tensor]:
        """Every block's codes for normalised inputs [B, L·D], and the prediction of every layer's target
        [B, L·D] (with gradient). Each block's ``x_hat`` is then replaced by the whole prediction of what
        it writes (the sum over every block), the residual its auxiliary losses see. ``dead`` [L·F]."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise InputError(f"CLT input: expected [batch, {self.d_in}] ({self.n_layers} layers of {self.cfg.d_in}), "
                             f"found {list(x.shape)}")
        L, d, F = self.n_layers, self.cfg.d_out, self.layer_features
        codes: list[Codes] = []
        parts: list[list[torch.Tensor]] = [[] for _ in range(L)]
        for layer, b in self.each():
            dead_l = None if dead is None else dead[layer * F:(layer + 1) * F]
            c = b.encode_codes(self.inputs_of(x, layer), dead_l, k_aux, aux_rows)
            codes.append(c)
            for j, seg in enumerate(c.x_hat.split(d, dim=1)):
                parts[layer + j].append(seg)
        y_hat = torch.cat([torch.stack(p).sum(0) if len(p) > 1 else p[0] for p in parts], dim=1)
        for layer, c in enumerate(codes):
            c.x_hat = self.written_by(y_hat, layer)
        return codes, y_hat

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """The prediction of every layer's MLP output [B, L·D] from every layer's MLP input [B, L·D], raw units."""
        return self.encode_blocks(x_BD * self.input_scale)[1] / self.target_scale

    def encode_sparse(self, x_BD: torch.Tensor) -> tuple[Pattern, torch.Tensor]:
        """Every layer's active features for raw inputs [B, L·D], as one pattern over the L·F features
        (layer l's feature f is column l·F + f), values in raw output units."""
        F = self.layer_features
        rows, cols, vals = [], [], []
        for layer, b in self.each():
            p, v = b.encode_sparse(self.inputs_of(x_BD, layer))
            rows.append(p.rows)
            cols.append(p.cols + layer * F)
            vals.append(v)
        r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals)
        order = torch.argsort(r * self.n_features + c)
        return Pattern.from_pairs(r[order], c[order], len(x_BD), self.n_features), v[order]

    def decode_sparse(self, p: Pattern, vals: torch.Tensor, x_BD: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer's prediction (raw units) [B, L·D] from codes as :meth:`encode_sparse` gives them."""
        F, d = self.layer_features, self.cfg.d_out
        layer_of = p.cols // F
        out = torch.zeros(p.n_rows, self.d_out, device=vals.device)
        with torch.no_grad():
            for layer, b in self.each():
                mine = layer_of == layer
                part = Pattern.from_pairs(p.rows[mine], p.cols[mine] - layer * F, p.n_rows, F)
                out[:, layer * d:] += b.decode_sparse(part, vals[mine])
        return out

    @contextmanager
    def ranking(self, select_dtype: str) -> Iterator[CLT]:
        with ExitStack() as stack:
            for _, b in self.each():
                stack.enter_context(b.ranking(select_dtype))
            yield self

    # ---- training hooks -------------------------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        for _, b in self.each():
            b.project_decoder_grad()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for _, b in self.each():
            b.normalize_decoder()

    def set_scales(self, inputs: list[float], output: float) -> None:
        if len(inputs) != self.n_layers:
            raise ConfigError(f"a CLT over {self.n_layers} layers takes {self.n_layers} input scales, "
                              f"found {len(inputs)}")
        for layer, b in self.each():
            b.set_scales([inputs[layer]], output)

    @torch.no_grad()
    def init_decoder_bias(self, value: torch.Tensor) -> None:
        """Layer j's bias starts at ``value``'s columns of j, carried by block j's own segment."""
        d = self.cfg.d_out
        for layer, b in self.each():
            b.b_dec.zero_()
            b.b_dec[:d] = value[layer * d:(layer + 1) * d]

    def finish_training(self, rows: Iterable[torch.Tensor]) -> None:
        sample = list(rows)
        for layer, b in self.each():
            b.finish_training([self.inputs_of(x, layer) for x in sample])

    # ---- save / load ----------------------------------------------------------------------
    def full_state(self) -> dict[str, torch.Tensor] | None:
        return full_state(self, self.shard, self.per_feature_keys)

    def load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        load_state(self, state, self.shard, self.per_feature_keys, source)

    def gathered(self) -> CLT | None:
        """The whole CLT on rank 0 (None on the other ranks of a latent shard); itself when not sharded."""
        if self.shard is None:
            return self
        state = self.full_state()
        if state is None:
            return None
        whole = CLT(self.cfg, device="cpu", provenance=self.provenance, draw=False)
        whole.load_state(state, "the gathered shards")
        return whole.to(device=self.device)

    def folded_state(self) -> dict[str, torch.Tensor]:
        """Every block's weights with the training scales folded in (raw inputs in, raw outputs out)."""
        return {f"blocks.{layer}.{k}": v for layer, b in self.each() for k, v in b.folded_state().items()}

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``clt.safetensors`` into directory ``path``, atomically."""
        return write_dictionary(path, CLT_FILE, FORMAT, self.folded_state(), self.cfg, self.provenance, extra)

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device | None = None) -> CLT:
        cfg, provenance, state, weights = read_dictionary(path, CLT_FILE, FORMAT, "CLT")
        clt = cls(cfg, device="cpu", provenance=provenance, draw=False)
        clt.load_state(state, str(weights))
        return clt.to(device=device).eval()


Dictionary = SAE | CLT   # what reads activations and writes predictions: every kind dictlens trains


def is_clt(path: str | Path) -> bool:
    """Whether ``path`` holds a dictlens CLT."""
    cfg = Path(path) / CONFIG_FILE
    return cfg.is_file() and read_json(cfg).get("format") == FORMAT


__all__ = ["CLT", "CLT_FILE", "Dictionary", "block_config", "is_clt"]
