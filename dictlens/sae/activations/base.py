"""What every activation is: the protocol a kind of SAE implements, and the forward record.

An activation decides, for the pre-activations ``z = W_enc (x − b_dec) + b_enc``, which
(row, feature) pairs are active and what they output; it owns the parameters and
buffers that decision needs, the loss terms only it has, and how the trainer's input
scale folds into those parameters on save. Everything else (the encoder and decoder,
the sparse kernels, the reconstruction loss, the optimiser) is shared. A new kind is one
file with a subclass of :class:`Activation` and one line in ``__init__.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar

import torch

from dictlens.sae.kernels import Pattern

if TYPE_CHECKING:
    from dictlens.sae.config import SAEConfig
    from dictlens.sae.model import SAE
    from dictlens.train.config import TrainConfig


@dataclass
class Codes:
    """The forward pass of a batch: active pairs, their values, and the reconstruction.

    ``pre`` [nnz] holds the exact pre-activations on ``pattern`` (with gradient), ``vals``
    [nnz] the activations, ``x_hat`` [B, D_out] the reconstruction (all in normalised units; for a
    transcoder, of its target), ``skip`` [B, D_out] a skip transcoder's W_skip x (included in ``x_hat``).
    ``aux``: the top dead features of each of the first B' rows for AuxK, as a pattern, when the
    TopK selection picked them. ``extra``: tensors an activation keeps for its own loss terms (named by it).
    """

    pattern: Pattern
    pre: torch.Tensor
    vals: torch.Tensor
    x_hat: torch.Tensor
    aux: Pattern | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    skip: torch.Tensor | None = None


@dataclass
class Selection:
    """Which pairs are active, and (TopK only) the dead features AuxK should use."""

    pattern: Pattern
    aux: Pattern | None = None


class Form(StrEnum):
    """How an activation's inference codes read in other libraries' terms (the one home of these
    names; :mod:`dictlens.formats` writes by them): ``RELU`` relu(pre); ``TOPK`` the k largest of
    pre, ReLU'd; ``THRESHOLD`` pre·1[pre > θ_f] with θ_f ≥ 0 from ``inference_threshold``;
    ``GATED``; ``GROUPMAX``."""

    RELU = "relu"
    TOPK = "topk"
    THRESHOLD = "threshold"
    GATED = "gated"
    GROUPMAX = "groupmax"


class Activation:
    """One kind of sparse activation. Subclasses set ``name`` and override what differs.

    Instances are stateless: parameters live on the :class:`SAE` (so their checkpoint keys
    are plain names such as ``log_threshold``) and are created by :meth:`add_parameters`.
    """

    name: ClassVar[str]
    help: ClassVar[str] = ""
    #: whether sparsity is set by ``k`` (active features per token) rather than a penalty
    uses_k: ClassVar[bool] = False
    #: the sparsity penalty when ``--sparsity auto``, and its coefficient (None: the penalty's own)
    default_penalty: ClassVar[str] = "none"
    default_penalty_coeff: ClassVar[float | None] = None
    #: dead-feature handling when ``--dead auto``
    default_dead: ClassVar[str] = "resample"
    #: the ``l0`` penalty needs a straight-through surrogate of the count (:meth:`l0_surrogate`)
    supports_l0: ClassVar[bool] = False
    #: the pre-activation loss (``pre_act_coeff``) needs a threshold to push towards
    supports_pre_act: ClassVar[bool] = False
    #: state-dict keys this activation adds to the SAE's (checked on load)
    owned_keys: ClassVar[tuple[str, ...]] = ()
    #: those of them with one row per feature (a latent shard holds its rows)
    per_feature_keys: ClassVar[tuple[str, ...]] = ()
    #: whether latent shards (dictlens/sae/shard.py) can train it: selections that look at each
    #: feature alone, or per row across features through the shard merge, and losses that sum
    #: over features
    shardable: ClassVar[bool] = False
    #: its inference codes in the terms other libraries' formats use (dictlens.formats writes by
    #: it): "relu" relu(pre); "topk" the k largest of pre, ReLU'd; "threshold" pre·1[pre > θ_f]
    #: with θ_f ≥ 0 from :meth:`inference_threshold`; "gated"; "groupmax"
    form: ClassVar[Form] = Form.RELU
    #: for the "threshold" form: one θ for every feature (BatchTopK's), not one each
    scalar_threshold: ClassVar[bool] = False

    # ---- configuration ------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Raise ConfigError on a field this activation cannot use (``k`` is checked by SAEConfig)."""

    def add_parameters(self, sae: SAE) -> None:
        """Register the parameters and buffers named in ``owned_keys`` on ``sae``."""

    # ---- the forward pass -----------------------------------------------------------
    def select(self, sae: SAE, x_c: torch.Tensor, *, dead: torch.Tensor | None = None, k_aux: int = 0,
               aux_rows: int = 0) -> Selection:
        """The active pairs of the centred inputs ``x_c`` [B, D]; no gradient flows through here.

        ``dead``, ``k_aux``, ``aux_rows``: AuxK's request, honoured by activations that can pick
        dead features during their own selection (others leave AuxK to its dense path)."""
        return Selection(Pattern.from_mask(sae.dense_pre(x_c) > 0))

    def values(self, sae: SAE, pre: torch.Tensor, p: Pattern) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Activations [nnz] from the exact pre-activations on the pattern, and any extras."""
        return pre.relu(), {}

    def after_forward(self, sae: SAE, codes: Codes) -> None:
        """Bookkeeping after a forward pass (BatchTopK tracks its threshold while training)."""

    # ---- training ---------------------------------------------------------------------
    def sparsity_values(self, codes: Codes) -> torch.Tensor:
        """The values [nnz] that L1-like penalties act on."""
        return codes.vals

    def l0_surrogate(self, codes: Codes) -> torch.Tensor:
        """Σ of active counts with a straight-through gradient (for ``supports_l0`` kinds)."""
        raise NotImplementedError(f"{self.name} has no L0 surrogate")

    def extra_losses(self, sae: SAE, codes: Codes, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig
                     ) -> dict[str, torch.Tensor]:
        """Loss terms only this activation has, each already multiplied by its coefficient (``x``: the
        normalised inputs, ``y``: the normalised target, ``x`` itself for an SAE)."""
        return {}

    def finish_training(self, sae: SAE, sample: Iterable[torch.Tensor]) -> None:
        """Last step of training, on a few normalised batches (BatchTopK calibrates here)."""

    # ---- save -------------------------------------------------------------------------
    def inference_threshold(self, state: dict[str, torch.Tensor], n_features: int) -> torch.Tensor:
        """θ_f [F] of the "threshold" form from a (folded) state dict; 0 for the others."""
        return torch.zeros(n_features)

    def fold_scale(self, state: dict[str, torch.Tensor], scale: float) -> None:
        """Fold the input scale into this activation's own entries of ``state`` (in place).

        The shared entries (``b_enc``, ``b_dec``) are divided by ``scale`` already; every
        activation here is positively homogeneous, so a threshold divides likewise."""
