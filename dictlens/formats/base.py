"""What every format converter shares: the :class:`Format` protocol, the options a read may
need, and :func:`build_sae`, the one place foreign tensors become a dictlens :class:`SAE`.

dictlens semantics (what a converter reproduces): ``x_c = x − b_dec`` when ``pre_bias``,
``pre = x_c W_encᵀ + b_enc`` with ``W_enc [F, D]`` feature-major, the activation's codes,
``x̂ = f W_dec + b_dec`` with ``W_dec [F, D]``. A converter reproduces the source library's
codes and reconstructions exactly; when the source's decoder rows are not unit norm the SAE
is marked ``decoder_norm="free"`` rather than renormalised (renormalising changes codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dictlens.errors import CheckpointError, FormatError

if TYPE_CHECKING:
    from dictlens.provenance import Provenance
    from dictlens.sae.clt import Dictionary
    from dictlens.sae.model import SAE


@dataclass
class ReadOptions:
    """What a read may need beyond the files: a normalisation factor the files do not carry,
    the model and hook when the files do not say (or to correct them)."""

    norm_scaling_factor: float | None = None
    model: str | None = None
    hook: str | None = None


class Format(Protocol):
    """One foreign layout: how to recognise it, read it into an SAE, and write one."""

    name: str
    describe: str       # one line for listings and errors
    writes: bool

    def detect(self, path: Path) -> bool:
        """Whether ``path`` (a directory or file) is in this layout."""

    def read(self, path: Path, opts: ReadOptions) -> Dictionary:
        """The dictionary in ``path`` (an SAE or transcoder; a CLT where the format holds one), with its
        provenance (source = this format, origin = path)."""

    def write(self, sae: SAE, out: Path) -> list[Path]:
        """Write ``sae`` in this layout into directory ``out``; the files written."""


def need(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """Tensor ``name`` of ``shape``, in float32; its absence or another shape is named."""
    if name not in tensors:
        raise FormatError(f"{where}: no tensor {name!r} (found {', '.join(sorted(tensors)) or 'none'})")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise FormatError(f"{where}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
    return t.detach().to(torch.float32).contiguous()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or damaged file is named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or damaged ({e})") from None


@dataclass
class Weights:
    """A dictionary in dictlens orientation (``W_enc``, ``W_dec``: [F, D]), float32."""

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)   # log_threshold, r_mag, b_mag, threshold
    W_skip: torch.Tensor | None = None   # a skip transcoder's [D_out, D], applied as x @ W_skipᵀ


def build_sae(activation: str, w: Weights, *, pre_bias: bool, provenance: Provenance,
              k: int | None = None, matryoshka: list[int] | None = None, unit_tol: float = 1e-4,
              transcoder: bool = False) -> SAE:
    """A dictlens SAE holding exactly ``w`` (decoder rows kept as they are: ``decoder_norm`` is
    "unit" only when every row already has norm 1 within ``unit_tol``). ``transcoder`` (or a
    decoder wider or narrower than the encoder, or a skip): a transcoder, which never subtracts
    ``b_dec`` from its input."""
    from dictlens.sae.config import SAEConfig
    from dictlens.sae.model import SAE

    F, D = w.W_enc.shape
    D_out = int(w.W_dec.shape[1])
    transcoder = transcoder or D_out != D or w.W_skip is not None
    if transcoder and pre_bias:   # (old sparsify transcoders): W (x − b_dec) + b_enc = W x + (b_enc − W b_dec)
        if D_out != D:
            raise FormatError(f"{provenance.origin}: a transcoder that subtracts its {D_out}-wide output bias from "
                              f"its {D}-wide input")
        w.b_enc, pre_bias = w.b_enc - w.W_enc @ w.b_dec, False
    norms = w.W_dec.norm(dim=1)
    unit = bool(((norms - 1).abs() <= unit_tol).all())
    cfg = SAEConfig(d_in=D, n_features=F, activation=activation, k=k, pre_bias=pre_bias,
                    decoder_norm="unit" if unit else "free", matryoshka=matryoshka, transcoder=transcoder,
                    d_out=D_out if transcoder else 0, skip=w.W_skip is not None)
    sae = SAE(cfg, device="cpu", provenance=provenance)
    state: dict[str, Any] = {"W_dec": w.W_dec, "W_enc_": w.W_enc, "b_enc": w.b_enc, "b_dec": w.b_dec,
                             "input_scale": torch.tensor(1.0), **w.extra}
    if transcoder:
        state["output_scale"] = torch.tensor(1.0)
    if w.W_skip is not None:
        state["W_skip"] = w.W_skip
    if "threshold" not in state and "threshold" in sae.state_dict():
        state["threshold"] = torch.tensor(-1.0)
    sae.load_state({k_: torch.as_tensor(v, dtype=torch.float32) for k_, v in state.items()}, provenance.origin or "")
    return sae.eval()


def log_threshold(theta: torch.Tensor) -> torch.Tensor:
    """dictlens's JumpReLU parameter for thresholds θ of a ``relu(pre)·1[pre > θ]`` source:
    θ ≤ 0 gives log θ = −inf (exp → 0: the source's ReLU), which keeps the codes exact."""
    return torch.log(theta.to(torch.float32).clamp_min(0))


def threshold_of(sae: SAE) -> torch.Tensor:
    """Per-feature θ of a JumpReLU SAE [F]."""
    return sae.log_threshold.detach().exp()


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def written_by_dictlens(cfg: dict[str, Any], where: Path, found: Provenance) -> Provenance:
    """``found`` (what the foreign files say), or, for files dictlens wrote, the record saved
    under their config's ``dictlens`` entry, with ``found``'s source, origin and notes."""
    from dictlens.provenance import Provenance

    mine = cfg.get("dictlens")
    if not (isinstance(mine, dict) and "provenance" in mine):
        return found
    p = Provenance.from_json(mine["provenance"], source=f"{where}: dictlens.provenance")
    return p.replace(source=found.source, origin=found.origin, notes={**p.notes, **found.notes})


def load_torch(path: Path) -> Any:
    """A ``.pt`` / ``.pth`` file read with ``weights_only=True`` only: a file that would run
    code to load is refused (and never executed), a truncated one is named."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FormatError(f"{path}: not a weights-only file (it would run code to load: {str(e)[:120]}); "
                          "dictlens refuses to execute it") from None
    except (EOFError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path} is truncated or damaged ({e})") from None


def export_state(sae: SAE) -> dict[str, torch.Tensor]:
    """What every writer starts from: the SAE's folded weights in float32 on the CPU, with
    ``W_enc`` [F, D] resolved (the decoder for a tied SAE)."""
    state = {k: v.detach().cpu().to(torch.float32) for k, v in sae.folded_state().items()}
    state["W_enc"] = state.pop("W_enc_", state["W_dec"])
    return state


def encoder_bias_for(sae: SAE, state: dict[str, torch.Tensor], *, subtracts_b_dec: bool) -> torch.Tensor:
    """``b_enc`` for a format that does (or does not) subtract ``b_dec`` from the input: the
    pre-bias folds either way exactly, ``W (x − b) + b_enc = W x + (b_enc − W b)``."""
    if sae.cfg.pre_bias == subtracts_b_dec:
        return state["b_enc"]
    shift = state["W_enc"] @ state["b_dec"]
    return state["b_enc"] - shift if sae.cfg.pre_bias else state["b_enc"] + shift
