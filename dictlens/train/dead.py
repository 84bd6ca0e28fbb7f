"""Dead features: usage tracking, bias boosting, and Anthropic-style resampling.

A feature is dead once it has not fired for ``dead_after`` training tokens. Turnover
counts features whose dead/alive status changed between two logs.
"""

from __future__ import annotations

from typing import Any

import torch

from dictlens.sae.kernels import Pattern
from dictlens.sae.model import SAE


class DeadTracker:
    def __init__(self, n_features: int, dead_after: int, device: torch.device):
        self.since_fired = torch.zeros(n_features, dtype=torch.long, device=device)
        self.dead_after = dead_after
        self._last_dead = torch.zeros(n_features, dtype=torch.bool, device=device)

    def fired(self, pattern: Pattern, vals: torch.Tensor) -> torch.Tensor:
        """int [F]: 1 where a feature fired in this batch (summed or maxed across ranks)."""
        # one scatter of the pairs' "fired" bits (a masked select and a bincount took 4x as long)
        return torch.zeros(len(self.since_fired), dtype=torch.int32, device=vals.device).scatter_reduce_(
            0, pattern.cols, (vals > 0).to(torch.int32), "amax")

    def fired_blocks(self, blocks: list[tuple[Pattern, torch.Tensor]]) -> torch.Tensor:
        """int [F]: :meth:`fired` for features held in consecutive blocks of equal size (a CLT's layers;
        one block for an SAE)."""
        if len(blocks) == 1:
            return self.fired(*blocks[0])
        F = len(self.since_fired) // len(blocks)
        return torch.cat([torch.zeros(F, dtype=torch.int32, device=vals.device).scatter_reduce_(
            0, p.cols, (vals > 0).to(torch.int32), "amax") for p, vals in blocks])

    def record(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Count ``n_tokens`` more tokens, resetting the features that fired."""
        self.since_fired += n_tokens
        self.since_fired[fired > 0] = 0

    def update(self, pattern: Pattern, vals: torch.Tensor, n_tokens: int) -> None:
        self.record(self.fired(pattern, vals), n_tokens)

    @property
    def dead(self) -> torch.Tensor:
        return self.since_fired >= self.dead_after

    def turnover(self) -> int:
        """Features whose dead status changed since the last call."""
        now = self.dead
        changed = int((now != self._last_dead).sum())
        self._last_dead = now.clone()
        return changed


@torch.no_grad()
def resample(sae: SAE, optimizer: Any, dead: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor,
             generator: torch.Generator, y: torch.Tensor | None = None) -> int:
    """Re-initialise dead features towards badly reconstructed inputs (Anthropic, 2023).

    Inputs are drawn with probability ∝ squared reconstruction loss; each dead feature's
    decoder row becomes its input's (centred) direction, its encoder row the same
    direction scaled to 0.2 × the mean alive encoder norm, its bias 0; a little noise
    breaks ties; the optimiser state of those rows is reset. A transcoder (``y``: its target)
    draws by the target's loss; the decoder row takes the target's centred direction, the encoder
    row the input's.
    """
    shard = sae.shard   # a latent shard: the draws are the whole dictionary's, each keeps its rows
    every = shard.all_features(dead, "gathering the dead features") if shard is not None else dead
    idx = every.nonzero()[:, 0]
    if len(idx) == 0:
        return 0
    target = x if y is None else y
    loss = (target - x_hat).pow(2).sum(1)
    weights = loss.pow(2).float().cpu() + 1e-12
    picks = torch.multinomial(weights, len(idx), replacement=len(idx) > len(x), generator=generator).to(x.device)

    def unit(rows: torch.Tensor) -> torch.Tensor:
        rows = rows + 0.01 * rows.norm(dim=1, keepdim=True) * torch.randn(
            rows.shape, generator=generator).to(x.device) / rows.shape[1] ** 0.5
        out: torch.Tensor = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return out

    directions = unit(target[picks] - sae.b_dec)
    inputs = directions if y is None else unit(sae.centring(x[picks])[0])
    alive = ~dead
    norms = torch.stack([sae.W_enc[alive].norm(dim=1).sum(), sae.W_dec[alive].norm(dim=1).sum(),
                         alive.sum().to(sae.W_dec.dtype)])
    if shard is not None:
        shard.world.sum_(norms, "summing the alive features' norms")
        mine = (idx >= shard.lo) & (idx < shard.hi)
        idx, directions, inputs = idx[mine] - shard.lo, directions[mine], inputs[mine]
    enc_norm, dec_norm = (norms[:2] / norms[2]) if float(norms[2]) > 0 else (torch.tensor(1.0), torch.tensor(1.0))
    sae.W_dec[idx] = directions * (1.0 if sae.cfg.decoder_norm == "unit" else dec_norm)
    if not sae.cfg.tied:
        sae.W_enc_[idx] = inputs * 0.2 * enc_norm
    sae.b_enc[idx] = 0.0
    _reset_rows(optimizer, sae, idx)
    return int(every.sum())


def _reset_rows(optimizer: Any, sae: SAE, idx: torch.Tensor) -> None:
    """Zero the optimiser state (moments, momentum) of the resampled features' rows."""
    rows_of = {p: name in sae.per_feature_keys for name, p in sae.named_parameters()}
    for p, state in optimizer.state.items():
        if not rows_of.get(p, False):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                # schedule-free keeps its iterate z: move it with the new row, zero the rest
                value[idx] = p[idx] if key == "z" else 0


@torch.no_grad()
def boost(sae: SAE, optimizer: Any, dead: torch.Tensor, amount: float) -> int:
    """Raise the encoder bias of every dead feature by ``amount`` (normalised units).

    A dead feature's pre-activation then climbs uniformly until it wins its first
    tokens, the ones its encoder direction matches best, and ordinary gradients take
    over from there; the bias stops rising as soon as it fires. This is the
    bias-update load balancing of DeepSeek-V3's router (top-k routing has the same
    starving-expert problem), applied to the encoder bias itself so that training and
    inference select alike. Schedule-free optimisers also keep the iterate ``z``: it is
    moved by the same amount, so the averaged weights see the whole boost.
    """
    n = int(dead.sum())
    if n == 0 or amount == 0:
        return 0
    step = dead.to(sae.b_enc.dtype) * amount
    sae.b_enc.add_(step)
    z = optimizer.state.get(sae.b_enc, {}).get("z")
    if isinstance(z, torch.Tensor) and z.shape == sae.b_enc.shape:
        z.add_(step)
    return n
