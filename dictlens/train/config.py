"""TrainConfig: how an SAE is trained (the SAE's own shape lives in SAEConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dictlens.config import check, field
from dictlens.errors import ConfigError
from dictlens.sae import activations
from dictlens.sae.config import SPARSITY_PENALTIES, SAEConfig

OPTIMIZERS = ("adam", "adamw", "signsgd")
SCHEDULES = ("constant", "cosine", "linear", "plateau")
DEAD_HANDLING = ("boost", "auxk", "resample", "none")
LR_CAP = 1e-2


@dataclass
class TrainConfig:
    """Optimisation, losses, dead-feature handling, checkpoints and logging."""

    tokens: int = field(1_000_000, help="training tokens")
    batch_size: int = field(4096, help="tokens per step")
    lr: float = field(0.0, help="learning rate (0: 2e-4/√(F/2^14) for Adam, the published TopK rule; "
                                "5e-3/√(F/2^14) for signSGD, as in sparsify)")
    optimizer: str = field("adam", help="adam, adamw or signsgd (with momentum); the default, with "
                                        "schedule-free averaging, had the best held-out FVU in bench/train.py")
    schedule_free: bool = field(True, help="schedule-free averaging (Defazio et al.) around the optimiser")
    beta1: float = field(0.9, help="Adam β1 / signSGD momentum")
    beta2: float = field(0.0, help="Adam β2 (0: 0.99 with schedule-free averaging, else 0.999)")
    weight_decay: float = field(0.0, help="decoupled weight decay (adamw)")
    warmup_steps: int = field(20, help="linear learning-rate warm-up steps")
    schedule: str = field("linear", help="after warm-up: constant, cosine, linear (decay over the last "
                                         "decay_fraction) or plateau (reduce on plateau)")
    decay_fraction: float = field(0.2, help="share of training over which the linear schedule decays to 0")
    clip_grad: float = field(0.0, help="clip the gradient norm to this (0: off)")
    backward_dtype: str = field("float32", help="what the sparse backward products read the rows they gather "
                                "in (the batch, the reconstruction's gradient): float32, or bfloat16, half the "
                                "memory traffic (on CPU ~8 ms of a step at B=4096, F=9216); sums stay float32, "
                                "the forward pass exact", choices=("float32", "bfloat16"))
    sparsity: str = field("auto", help="penalty: auto, none, l1, tanh, smooth_l0, hoyer or l0")
    sparsity_coeff: float = field(0.0, help="penalty coefficient (0: the penalty's default)")
    sparsity_warmup_steps: int = field(0, help="ramp the penalty coefficient linearly over these steps")
    weight_by_decoder_norm: bool = field(True, help="weight L1/tanh penalties by ‖W_dec[f]‖")
    dead: str = field("auto", help="dead features: auto (boost for activations with k, else resample), "
                                   "boost, auxk, resample or none")
    dead_tokens: int = field(0, help="tokens without firing before a feature counts as dead "
                                     "(0: tokens/64, at least 2 batches, at most 10M)")
    boost: float = field(0.05, help="dead=boost: every step, raise each dead feature's encoder bias "
                                    "by this × the batch's mean input norm/√d (1 under the default "
                                    "normalisation) until it fires again")
    auxk_coeff: float = field(1 / 32, help="AuxK loss coefficient")
    auxk_k: int = field(0, help="AuxK latents per token (0: 2k for top-k SAEs, else D/2)")
    auxk_rows: int = field(0, help="compute AuxK on the first N tokens of each batch (0: all)")
    resample_every: int = field(0, help="resample dead features every N steps (0: 4 times in the first half)")
    dead_penalty_coeff: float = field(0.0, help="Σ over dead features of ‖W_dec[f]‖² × this")
    diversity_coeff: float = field(0.0, help="mean |cos| between decoder rows (sampled) × this")
    pre_act_coeff: float = field(0.0, help="JumpReLU pre-activation loss Σ ReLU(θ − z)·‖W_dec‖ × this")
    b_dec_init: str = field("geometric_median", help="decoder bias start: geometric_median, mean or zero")
    seed: int = field(0, help="random seed (initialisation and data order)")
    device: str | None = field(None, help="cpu or cuda (default: cuda when present)")
    log_every: int = field(10, help="log metrics every N steps")
    checkpoint_every: int = field(0, help="checkpoint every N tokens (0: at the end and on Ctrl-C)")
    skip_nonfinite: bool = field(False, help="skip batches with NaN/Inf (counted) instead of stopping")
    plots: bool = field(True, help="write PNG plots of the training curves at the end")
    tensorboard: str | None = field(None, help="also write the logged metrics as TensorBoard scalars here "
                                               "(needs the tensorboard package)")
    wandb_project: str | None = field(None, help="also log the metrics to this Weights & Biases project "
                                                 "(needs the wandb package)")

    def __post_init__(self) -> None:
        check(self.tokens > 0, "tokens", "a positive count", self.tokens)
        check(self.batch_size > 0, "batch_size", "a positive count", self.batch_size)
        check(self.lr >= 0, "lr", "a non-negative number", self.lr)
        check(self.optimizer in OPTIMIZERS, "optimizer", " / ".join(OPTIMIZERS), self.optimizer)
        check(self.schedule in SCHEDULES, "schedule", " / ".join(SCHEDULES), self.schedule)
        check(self.sparsity in (*SPARSITY_PENALTIES, "auto"), "sparsity",
              "auto / " + " / ".join(SPARSITY_PENALTIES), self.sparsity)
        check(self.dead in (*DEAD_HANDLING, "auto"), "dead", "auto / " + " / ".join(DEAD_HANDLING), self.dead)
        check(self.b_dec_init in ("geometric_median", "mean", "zero"), "b_dec_init",
              "geometric_median, mean or zero", self.b_dec_init)
        check(0 <= self.decay_fraction <= 1, "decay_fraction", "a share in [0, 1]", self.decay_fraction)
        check(self.clip_grad >= 0, "clip_grad", "a non-negative norm", self.clip_grad)
        check(0 <= self.beta2 < 1, "beta2", "a number in [0, 1)", self.beta2)
        check(self.boost >= 0, "boost", "a non-negative number", self.boost)

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def learning_rate(self, sae: SAEConfig) -> float:
        if self.lr > 0:
            return self.lr
        # signSGD: sparsify's rule; Adam: the published TopK rule (Gao et al.), which is tuned
        # for billions of tokens; schedule-free Adam: the best rate of bench/train.py
        # (9e-3 at 9,216 features), scaled with width by the same 1/√F law.
        rules = {"signsgd": 5e-3, "adam": 6.75e-3 if self.schedule_free else 2e-4}
        base = rules.get(self.optimizer, rules["adam"])
        # The 1/√F law was fitted on wide SAEs; for narrow ones it runs away (0.038 at 512
        # features), and the Sharkey-setting SAEs learned nothing (MMCS 0.2 against 0.999
        # at 1e-2 or below): cap it.
        return min(LR_CAP, base / math.sqrt(sae.n_features / 2**14))

    @property
    def adam_beta2(self) -> float:
        if self.beta2 > 0:
            return self.beta2
        return 0.99 if self.schedule_free else 0.999

    def aux_k(self, sae: SAEConfig) -> int:
        if self.auxk_k > 0:
            return self.auxk_k
        return 2 * sae.k if sae.k else sae.d_in // 2

    def penalty(self, sae: SAEConfig) -> str:
        if self.sparsity != "auto":
            return self.sparsity
        return sae.kind.default_penalty

    def penalty_coeff(self, sae: SAEConfig) -> float:
        if self.sparsity_coeff > 0:
            return self.sparsity_coeff
        penalty = self.penalty(sae)
        own = sae.kind.default_penalty_coeff
        if own is not None and penalty == sae.kind.default_penalty:
            return own
        return {"l1": 5.0, "tanh": 5.0, "smooth_l0": 0.5, "hoyer": 1.0, "l0": 0.5, "none": 0.0}[penalty]

    def dead_method(self, sae: SAEConfig) -> str:
        if self.dead != "auto":
            return self.dead
        return sae.kind.default_dead

    def dead_after(self) -> int:
        # Short runs need a short window: most features that die do so early, and AuxK or a
        # boost can only revive those it sees as dead (bench/train.py: 2.1% dead at
        # tokens/64, 16% at tokens/5, with AuxK).
        if self.dead_tokens > 0:
            return self.dead_tokens
        return min(10_000_000, max(2 * self.batch_size, self.tokens // 64))


def check_compatible(sae: SAEConfig, train: TrainConfig) -> None:
    """Contradictions between the two configs, named."""
    penalty = train.penalty(sae)
    kind = sae.kind
    with_l0 = " / ".join(n for n, a in activations.REGISTRY.items() if a.supports_l0)
    check(penalty != "l0" or kind.supports_l0, "sparsity",
          f"l0 only with the {with_l0} activation (it needs the threshold's straight-through gradient)", penalty)
    with_pre = " / ".join(n for n, a in activations.REGISTRY.items() if a.supports_pre_act)
    check(train.pre_act_coeff == 0 or kind.supports_pre_act, "pre_act_coeff",
          f"0 unless the activation is {with_pre}", train.pre_act_coeff)


def check_shardable(sae: SAEConfig, train: TrainConfig) -> None:
    """Refuse the training settings latent shards cannot split yet (the SAE's own are refused by
    :meth:`dictlens.sae.shard.LatentShard.of`), each named."""
    refused = {"the hoyer penalty (a per-token ratio over every feature)": train.penalty(sae) == "hoyer",
               "--diversity-coeff (pairs of features from every shard)": train.diversity_coeff > 0}
    for what, bad in refused.items():
        if bad:
            raise ConfigError(f"shard_latents: {what} cannot be split across ranks yet")
