"""The preflight: a dictionary run on real activations at its hook before it is trusted.

A converter that reads the wrong thing without error is the field's worst failure: weights
transposed, a normalisation factor missing or applied twice, ``b_dec`` subtracted where the
source does not, the wrong hook or model. Each still gives codes, only meaningless ones. So
whenever a model is at hand, the dictionary reconstructs a sample of that model's
activations at its hook; an impossible result (FVU above 1: worse than predicting the mean;
more than half of the features on per token; none at all; an L0 far from the one
published with the weights) is refused unless forced, with
the likely cause named: the variants that would explain it (inputs scaled by
√D / their mean norm or its inverse, the weights transposed, the pre-bias the other way)
are tried on the same sample, and the one that fits is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dictlens.errors import FormatError

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE

TOKENS = 4096
L0_FACTOR = 3.0   # a measured L0 beyond ×/÷ this of the recorded one is impossible on the same hook
FORCE_HELP = "use a dictionary of another format even when the preflight on the model finds it impossible"


@dataclass
class Preflight:
    """The dictionary on ``tokens`` real activations; ``problem``: why it is impossible (None: it is not)."""

    tokens: int
    fvu: float
    l0: float
    dead_fraction: float
    problem: str | None = None

    def line(self) -> str:
        return (f"preflight on {self.tokens:,} tokens: FVU {self.fvu:.4f}, L0 {self.l0:.1f}, "
                f"dead {self.dead_fraction:.1%}")


def sample(lm: LoadedModel, hook: str, *, tokens: int = TOKENS, text: str = "default",
           max_norm: float | None = None) -> torch.Tensor:
    """[N, D] activations of ``lm`` at ``hook`` on real, non-special tokens of ``text``."""
    from dictlens.data.tap import Tap
    from dictlens.data.tokens import text_batches

    tap, rows = Tap(lm, [hook]), []
    for ids, keep in text_batches(lm, text, tokens=tokens, context=128):
        x = tap(ids.to(lm.device))[hook]
        x = x.reshape(-1, x.shape[-1])[keep.reshape(-1).to(x.device)].float().cpu()
        rows.append(x if max_norm is None else x[x.norm(dim=1) <= max_norm])
    return torch.cat(rows)[:tokens]


def _measure(sae: SAE, x: torch.Tensor) -> tuple[float, float, float]:
    from dictlens.eval.metrics import evaluate

    m = evaluate(sae, x.split(1024))
    return m.fvu, m.l0, m.dead_fraction


def _impossible(sae: SAE, fvu: float, l0: float) -> str | None:
    if not math.isfinite(fvu) or fvu > 1:
        return f"FVU {fvu:.3g} is worse than predicting the mean"
    if l0 > sae.n_features / 2:
        return f"{l0:,.0f} of {sae.n_features:,} features are on per token"
    if l0 == 0:
        return "no feature fires"
    recorded = recorded_l0(sae)
    if recorded and not recorded / L0_FACTOR <= l0 <= recorded * L0_FACTOR:
        return f"L0 {l0:,.1f} is far from the {recorded:g} recorded with the weights"
    return None


def recorded_l0(sae: SAE) -> float | None:
    """The L0 its publisher recorded with the weights (Gemma Scope's ``average_l0_N``, SAELens's
    registry ``l0``), when known and numeric."""
    value = sae.provenance.notes.get("recorded_l0")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _variant(sae: SAE, *, transpose: bool = False, flip_pre_bias: bool = False) -> SAE:
    from dataclasses import replace

    from dictlens.sae.model import SAE as SAEClass

    cfg = replace(sae.cfg, pre_bias=sae.cfg.pre_bias ^ flip_pre_bias)
    other = SAEClass(cfg, device="cpu", provenance=sae.provenance)
    state = {k: v.detach().cpu().clone() for k, v in sae.state_dict().items()}
    if transpose:
        for key in ("W_enc_", "W_dec"):
            if key in state:
                state[key] = state[key].T.contiguous()
    other.load_state(state, "preflight variant")
    return other.eval()


def diagnose(sae: SAE, x: torch.Tensor, fvu0: float) -> tuple[str, float] | None:
    """The usual mistake that explains ``sae``'s result on ``x`` (FVU ``fvu0``): the variant
    that fits far better (FVU below half of ``fvu0``), and its FVU; None when none does."""
    c = math.sqrt(sae.d_in) / float(x.norm(dim=1).mean().clamp_min(1e-12))
    tries: list[tuple[str, SAE, torch.Tensor]] = [
        (f"a missing normalisation factor: the dictionary fits these activations scaled by ×{c:.4g} "
         "(√D / their mean norm); give the factor (--norm-scaling-factor)", sae, x * c),
        (f"a normalisation factor applied twice: the dictionary fits these activations scaled by ×{1 / c:.4g}; "
         "the file already holds it, so do not give it again", sae, x / c)]
    if sae.d_in == sae.n_features:
        tries.append(("transposed weights: the dictionary fits with W_enc and W_dec transposed (square "
                      "matrices pass every shape check)", _variant(sae, transpose=True), x))
    bias = ("b_dec subtracted from the input where the source does not" if sae.cfg.pre_bias
            else "b_dec not subtracted from the input where the source does")
    tries.append((bias, _variant(sae, flip_pre_bias=True), x))
    best: tuple[str, float] | None = None
    for cause, s, xs in tries:
        fvu, l0, _ = _measure(s, xs)
        if _impossible(s, fvu, l0) is None and fvu < 0.5 * min(fvu0, 1.0) and (best is None or fvu < best[1]):
            best = (cause, fvu)
    return best


def preflight(sae: SAE, x: torch.Tensor, *, where: str, force: bool = False) -> Preflight:
    """Measure ``sae`` on ``x``; refuse an impossible result, or one that a usual mistake
    explains far better, naming the likely cause, unless ``force``."""
    fvu, l0, dead = _measure(sae, x)
    result = Preflight(len(x), fvu, l0, dead)
    impossible = _impossible(sae, fvu, l0)
    found = diagnose(sae, x, fvu)
    if found is not None:
        result.problem = (f"{impossible}; " if impossible else f"FVU {fvu:.3g} as read, {found[1]:.3g} with ") + \
            (f"likely {found[0]}" if impossible else f"the fix for likely {found[0]}")
    elif impossible is not None:
        result.problem = f"{impossible}; none of the usual mistakes explains it: the wrong hook or the wrong model?"
    if result.problem is not None and not force:
        raise FormatError(f"{where}: refused after the preflight ({result.line()}): {result.problem}; "
                          "--force uses it anyway")
    return result
