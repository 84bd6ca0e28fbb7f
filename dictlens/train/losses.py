"""Loss terms of SAE training; each is returned by name and logged separately.

Conventions (normalised inputs, mean norm √D): reconstruction is the mean over the batch
of ‖x − x̂‖² (summed over dimensions); sparsity penalties are means over the batch of
sums over features. ``w_f = ‖W_dec[f]‖`` when penalties are weighted by decoder norm.
  l1        Σ_f f·w_f
  tanh      Σ_f tanh(f·w_f)                    (Anthropic, Feb 2024)
  smooth_l0 Σ_f σ(α f w_f + β) − σ(β)          (α = 10, β = −3; the sigmoid L0 proxy)
  hoyer     ‖f‖₁ / ‖f‖₂                         (per token)
  l0        Σ_f H(z_f − θ_f)                     (JumpReLU, straight-through θ gradient)
Auxiliary: AuxK (Gao et al.), a dead-feature decoder penalty, a decoder-diversity
penalty, and the terms an activation owns (its ``extra_losses``: the Gated SAE's
frozen-decoder gate loss, the JumpReLU pre-activation loss).
"""

from __future__ import annotations

from typing import Any

import torch

from dictlens.distributed import World
from dictlens.errors import ActivationError
from dictlens.sae.activations import Codes
from dictlens.sae.model import SAE
from dictlens.train.config import TrainConfig

SMOOTH_L0_ALPHA, SMOOTH_L0_BETA = 10.0, -3.0
# the terms a latent shard computes whole (from the summed reconstructions); the others are sums
# over features, each shard holding its part
WHOLE_ON_EVERY_SHARD = ("mse", "auxk")


class _SquaredError(torch.autograd.Function):
    """Σ (a − b)²: the difference formed once and kept, its square summed by one dot product, the
    backward pass one scaling of it (F.mse_loss(reduction="sum") took 3.7 ms both ways at
    B = 4,096, D = 576 on 2 cores; this 1.8)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        r = a - b
        ctx.save_for_backward(r)
        flat = r.reshape(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (r,) = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        ga = r * (2 * g)
        return ga if need_a else None, -ga if need_b else None


def squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ (a − b)² over every element (a and b of one shape), differentiable in both."""
    if a.shape != b.shape:
        raise ValueError(f"squared_error: shapes {list(a.shape)} and {list(b.shape)} differ")
    out: torch.Tensor = _SquaredError.apply(a, b)  # type: ignore[no-untyped-call]
    return out


def reconstruction(sae: SAE, codes: Codes, x: torch.Tensor) -> torch.Tensor:
    """Mean ‖x − x̂‖² (``x``: the target, the input for an SAE); with Matryoshka prefixes, the mean over
    every nested prefix too."""
    full = squared_error(codes.x_hat, x) / len(x)
    prefixes = sae.cfg.matryoshka
    if not prefixes:
        return full
    losses = [full]
    first = sae.shard.lo if sae.shard is not None else 0   # a latent shard's first feature
    for m in prefixes:
        if m >= sae.cfg.n_features:
            continue
        keep = codes.pattern.cols < m - first
        x_hat = sae.reconstruct(codes.vals[keep], codes.pattern.subset(keep), codes.skip)
        losses.append(squared_error(x_hat, x) / len(x))
    return torch.stack(losses).mean()


def sparsity(sae: SAE, codes: Codes, penalty: str, weighted: bool) -> torch.Tensor:
    b = codes.pattern.n_rows
    if penalty == "none":
        return codes.vals.new_zeros(())
    if penalty == "l0":
        return sae.activation.l0_surrogate(codes) / b
    vals = sae.activation.sparsity_values(codes)
    if weighted and penalty in ("l1", "tanh", "smooth_l0"):
        vals = vals * sae.penalty_norms()[codes.pattern.cols]
    if penalty == "l1":
        return vals.sum() / b
    if penalty == "tanh":
        return torch.tanh(vals).sum() / b
    if penalty == "smooth_l0":
        beta = torch.tensor(SMOOTH_L0_BETA)
        return (torch.sigmoid(SMOOTH_L0_ALPHA * vals + beta) - torch.sigmoid(beta)).sum() / b
    # hoyer: per-row L1/L2 on the pattern
    rows = codes.pattern.rows
    l1 = torch.zeros(b, dtype=vals.dtype, device=vals.device).index_add(0, rows, vals.abs())
    l2 = torch.zeros(b, dtype=vals.dtype, device=vals.device).index_add(0, rows, vals.pow(2)).sqrt()
    return (l1 / l2.clamp_min(1e-8)).mean()


# AuxK on the dead columns: below this many dead features per aux-k slot, a dense
# product over just those columns (three small matmuls each way) beats the sparse
# kernels, whose B·k_aux pairs cost far more per FLOP (measured: 300 dead, k_aux = 288,
# B = 4096: 80 ms sparse against 25 ms dense on 2 cores).
AUXK_DENSE_FACTOR = 12


def auxk_is_sparse(n_dead: int, k_aux: int) -> bool:
    """Whether AuxK should take its pairs from the TopK selection (many dead features)."""
    return n_dead > AUXK_DENSE_FACTOR * k_aux


def auxk(sae: SAE, codes: Codes, x: torch.Tensor, dead: torch.Tensor, k_aux: int, rows: int = 0,
         world: World | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruct the residual with the top-k_aux dead features (Gao et al. 2024), on the
    first ``rows`` rows of the batch (all when 0), normalised by the residual's variance
    (``y``: a transcoder's target, whose residual it is; the input ``x`` itself for an SAE).

    Data parallel (``world``), ``x`` is this rank's slice of the global batch: the first rows
    and the variance are the global batch's, and the term is scaled so that the ranks'
    averaged gradients are the global term's."""
    world, shard = world or World(), sae.shard
    # latent shards: the trainer asks the selection for dead features whenever the whole dictionary
    # has some, so no pattern means none
    n_dead = int(dead.sum()) if shard is None else int(codes.aux is not None)
    if n_dead == 0:
        return x.new_zeros(())
    start = world.rank * len(x)   # this slice's first row in the global batch
    n = len(x) if rows <= 0 else max(0, min(len(x), rows - start))
    y = x if y is None else y
    x, y, x_hat = x[:n], y[:n], codes.x_hat[:n]
    x_c, center = sae.centring(x)
    e = (y - x_hat).detach()
    if codes.aux is not None:  # picked during the chunked TopK selection: sparse kernels
        p = codes.aux
        vals = sae.encode_values(x_c, sae.b_enc, p, center).relu()
        e_hat = sae.decode_values(vals, p)
        if shard is not None:   # the shards' partial auxiliary reconstructions
            e_hat = shard.world.sum_shared(e_hat, "summing the partial AuxK reconstructions")
    else:  # few dead features: dense over their columns only, [n, n_dead]
        if shard is not None:
            raise ActivationError("AuxK on latent shards takes its dead features from the TopK selection")
        cols = dead.nonzero()[:, 0]
        pre = torch.addmm(sae.b_enc[cols], x_c, sae.W_enc[cols].T)
        acts = pre.relu()
        if k_aux < n_dead:
            keep = torch.zeros_like(pre, dtype=torch.bool)
            keep.scatter_(1, pre.detach().topk(k_aux, dim=1, sorted=False).indices, True)
            acts = acts * keep
        e_hat = acts @ sae.W_dec[cols]
    if world.alone:
        return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
    moments = world.sum_(torch.cat([e.sum(0), e.pow(2).sum().reshape(1), e.new_tensor([float(len(e))])]),
                         "reducing the AuxK residual's variance")
    total = float(moments[-1])
    centred = (moments[-2] - moments[:-2].pow(2).sum() / max(total, 1.0)).clamp_min(1e-12)
    return (e - e_hat).pow(2).sum() / centred * world.size


def dead_penalty(sae: SAE, dead: torch.Tensor) -> torch.Tensor:
    return sae.W_dec[dead].pow(2).sum()


def diversity(sae: SAE, generator: torch.Generator, sample: int = 1024) -> torch.Tensor:
    """Mean |cos| between distinct decoder rows, over a random sample of features."""
    idx = torch.randperm(sae.n_features, generator=generator)[:sample].to(sae.device)
    d = sae.feature_directions()[idx]
    cos = d @ d.T
    n = len(idx)
    return (cos.abs().sum() - cos.diagonal().abs().sum()) / max(1, n * (n - 1))


def loss_terms(sae: SAE, codes: Codes, x: torch.Tensor, cfg: TrainConfig, step: int, dead: torch.Tensor,
               generator: torch.Generator, dead_method: str, world: World | None = None,
               y: torch.Tensor | None = None, reconstruct: bool = True) -> dict[str, torch.Tensor]:
    """Every active loss term, already multiplied by its coefficient; ``total`` is their sum. ``x``: the
    normalised inputs; ``y``: the normalised target (a transcoder's; ``x`` itself when None).

    ``dead_method``: the trainer's resolved ``cfg.dead_method`` (AuxK adds a term). Data
    parallel (``world``), every term is such that the mean over the ranks of its gradient is
    the global batch's: the batch means are, and AuxK is made so."""
    y = x if y is None else y
    # (without ``reconstruct``: a CLT's block, whose writes are summed with the other blocks' before the
    # one reconstruction term)
    terms = {"mse": reconstruction(sae, codes, y)} if reconstruct else {}
    penalty = cfg.penalty(sae.cfg)
    if penalty != "none":
        ramp = min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
        terms[f"sparsity_{penalty}"] = ramp * cfg.penalty_coeff(sae.cfg) * sparsity(
            sae, codes, penalty, cfg.weight_by_decoder_norm)
    terms.update(sae.activation.extra_losses(sae, codes, x, y, cfg))
    if dead_method == "auxk" and cfg.auxk_coeff > 0:
        terms["auxk"] = cfg.auxk_coeff * auxk(sae, codes, x, dead, cfg.aux_k(sae.cfg), cfg.auxk_rows, world, y)
    if cfg.dead_penalty_coeff > 0:
        terms["dead_penalty"] = cfg.dead_penalty_coeff * dead_penalty(sae, dead)
    if cfg.diversity_coeff > 0:
        terms["diversity"] = cfg.diversity_coeff * diversity(sae, generator)
    terms["total"] = torch.stack(list(terms.values())).sum() if terms else x.new_zeros(())
    return terms
