"""The SAE spliced into the model: next-token loss with the hooked activation replaced.

For each batch of token contexts the model runs four times: clean; with the hooked
activation replaced by the SAE's reconstruction; by zero; by its mean (over the
evaluated tokens, or given). The two ablations do not depend on the SAE: a
:class:`SpliceReference` computes them once for many SAEs. Definitions (``docs/metrics.md``), with CE the mean
next-token cross-entropy in nats over the predicted positions:

  loss recovered vs ablation A = (CE_A − CE_SAE) / (CE_A − CE_clean)   (1: as good as clean)
  ΔLM loss = CE_SAE − CE_clean
  KL = mean over positions of KL(p_clean ‖ p_SAE) of the next-token distributions
  agreement = share of positions whose most likely next token is the clean model's

A transcoder writes another activation than it reads: its :class:`Swap` replaces the MLP's output
(``mlp_out.L``) by its prediction from the MLP's input (``mlp_in.L``) of the same forward pass, and
several swaps at once give the replacement model (every MLP replaced by its transcoder). With
``error_term`` the swap adds back what the transcoder misses in that pass (the model's own output
minus the prediction), which leaves the logits as they were up to float rounding. A cross-layer
transcoder is one swap per layer: layer j's MLP output becomes the sum of what the features of layers
0..j write there, each layer's features read from that layer's MLP input in the same pass.

Positions where ``keep`` is false (special tokens, padding) keep their clean activation
and are not scored, as they were left out of training; so do positions whose activation
norm exceeds ``max_norm`` (the outlier limit of the SAE's training cache, when it had one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dictlens.config import check, field
from dictlens.data.hooks import HookPoint, Replace, read_into, replaced, resolve_hook
from dictlens.data.models import LoadedModel
from dictlens.errors import ConfigError, InputError

if TYPE_CHECKING:
    from dictlens.sae.clt import CLT, Dictionary
    from dictlens.sae.model import SAE


@dataclass
class SpliceMetrics:
    n_tokens: int  # scored next-token predictions
    n_outliers: int  # positions left clean and unscored: activation norm above the cache's outlier limit
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_mean: float
    kl_sae: float
    delta_lm_loss: float
    recovered_vs_zero: float
    recovered_vs_mean: float
    agreement: float = float("nan")   # share of scored positions whose top next token is the clean model's

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-12 else float("nan")


@dataclass(frozen=True)
class Swap:
    """One activation replaced during a forward pass: the activation at ``writes`` becomes ``fn(a)``,
    ``a`` the activation at ``reads`` in the same pass (``writes`` itself when None: an SAE). With
    ``error_term`` it becomes ``fn(a) + (x − fn(a))``, x the activation the model computed there."""

    writes: str
    fn: Replace
    reads: str | None = None
    error_term: bool = False


def _constant(value: torch.Tensor) -> Replace:
    """A replacement by ``value`` [D] at every position."""
    return lambda x: value.expand_as(x)


def _in_float32(fn: Replace) -> Replace:
    """``fn`` applied to the activation in float32 (a model run in half precision)."""
    return lambda x: fn(x.float())


@dataclass
class SpliceReference:
    """What does not depend on the SAE: the batches, the mean activation, and the CE with the
    hooked activation zeroed and mean-ablated (every hooked activation, for several at once).
    Computed once, shared by every SAE at the hook (a sweep splices dozens)."""
    hook: str   # the hooks, comma-separated, for several
    data: list[tuple[torch.Tensor, torch.Tensor]]
    mean: torch.Tensor   # [D], or [H, D] for H hooks
    ce_zero: float
    ce_mean: float
    n_outliers: int = 0   # positions kept clean because their norm exceeded the limit


def _scored(keep: torch.Tensor) -> torch.Tensor:
    return keep[:, :-1] & keep[:, 1:]  # predict a kept token from a kept position


def swapped_logits(lm: LoadedModel, swaps: list[Swap], ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The logits with every swap in place (the clean model's for none); positions where ``keep`` is
    false keep the model's own activation."""
    from contextlib import ExitStack

    seen: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for swap in swaps:
            point = resolve_hook(lm.model, swap.writes)

            def masked(x: torch.Tensor, swap: Swap = swap, name: str = point.name) -> torch.Tensor:
                a = x if swap.reads is None else seen[swap.reads]
                new = swap.fn(a).to(x.dtype)
                if new.shape != x.shape:
                    raise InputError(f"splice at {name}: replacement has shape {list(new.shape)}, "
                                     f"the activation {list(x.shape)}")
                if swap.error_term:
                    new = new + (x - new)
                return torch.where(keep.unsqueeze(-1), new, x)
            stack.enter_context(replaced(lm.model, point, masked))
        # registered after the replacements, so that a read sees what a replacement upstream wrote
        for reads in dict.fromkeys(s.reads for s in swaps if s.reads is not None):
            stack.enter_context(read_into(lm.model, resolve_hook(lm.model, reads), seen))
        return lm.model(input_ids=ids, use_cache=False).logits.float()


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor) -> tuple[float, torch.Tensor]:
    logp = logits[:, :-1].log_softmax(-1)
    scored = _scored(keep)
    return float(F.nll_loss(logp[scored], ids[:, 1:][scored], reduction="sum")), logp


def _batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], lm: LoadedModel
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = [(ids.to(lm.device), keep.to(lm.device)) for ids, keep in batches]
    if not data or not any(bool(_scored(k).any()) for _, k in data):
        raise InputError("splice evaluation: no tokens to score")
    return data


@torch.inference_mode()
def splice_reference(lm: LoadedModel, hook: str | Sequence[str], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     mean: torch.Tensor | None = None, max_norm: float | None = None) -> SpliceReference:
    """Zero- and mean-ablation CE at ``hook`` over ``batches`` (``mean`` [D] default: the mean
    activation over the kept positions of these batches); several hooks are ablated together
    (``mean`` [H, D]).

    ``max_norm``: positions whose activation norm exceeds it are treated like special tokens
    (kept clean, not scored). Pass the limit the SAE's training cache dropped outliers at
    (:func:`outlier_limit`): an SAE never saw such activations (attention-sink positions with
    100x the median norm), and a threshold SAE fires thousands of features on them."""
    hooks = [hook] if isinstance(hook, str) else list(hook)
    points = [resolve_hook(lm.model, h) for h in hooks]
    data = _batches(batches, lm)
    n_outliers = 0
    if mean is None or max_norm is not None:
        data, computed, n_outliers = _scan(lm, points, data, max_norm)
        mean = (computed[0] if isinstance(hook, str) else computed) if mean is None else mean
    if not any(bool(_scored(k).any()) for _, k in data):
        raise InputError(f"splice evaluation: no tokens to score (all above the norm limit {max_norm})")
    mean = mean.to(lm.device)
    means = [mean] if isinstance(hook, str) else list(mean)
    ablations = {"zero": [Swap(p.name, torch.zeros_like) for p in points],
                 "mean": [Swap(p.name, _constant(m)) for p, m in zip(points, means, strict=True)]}
    sums = {"zero": 0.0, "mean": 0.0}
    n = 0
    for ids, keep in data:
        for name, swaps in ablations.items():
            sums[name] += _nll_sum(swapped_logits(lm, swaps, ids, keep), ids, keep)[0]
        n += int(_scored(keep).sum())
    return SpliceReference(",".join(p.name for p in points), data, mean, sums["zero"] / n, sums["mean"] / n,
                           n_outliers)


SPLICE_TOKENS = 4096


@dataclass
class SpliceConfig:
    """Splicing SAEs into their model over a text: the flags ``eval`` and ``sweep`` share."""

    splice_text: str | None = field(None, help="also splice the SAE(s) into the model over this text (a path, "
                                               "`default`, a dataset): CE, ΔLM loss, loss recovered, KL")
    splice_tokens: int = field(SPLICE_TOKENS, help="scored predictions for --splice-text")
    splice_skip: int = field(0, help="skip the contexts holding the first N tokens of --splice-text (e.g. "
                                     "those the SAE was trained on)")
    context: int = field(128, help="context length (tokens) for --splice-text")

    def __post_init__(self) -> None:
        check(self.splice_tokens >= 1, "splice_tokens", "at least 1", self.splice_tokens)
        check(self.splice_skip >= 0, "splice_skip", "0 or more", self.splice_skip)
        check(self.context >= 2, "context", "at least 2 tokens", self.context)
        if self.splice_text is None and (self.splice_tokens != SPLICE_TOKENS or self.splice_skip):
            raise ConfigError("--splice-tokens / --splice-skip need --splice-text")

    def batches(self, lm: LoadedModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(ids, keep)`` batches of the text, after the skipped tokens."""
        from dictlens.data.tokens import text_batches

        assert self.splice_text is not None
        return text_batches(lm, self.splice_text, tokens=self.splice_tokens, context=self.context,
                            skip_tokens=self.splice_skip)


@torch.inference_mode()
def splice_metrics(lm: LoadedModel, hook: str | Sequence[Swap], reconstruct: Replace | None = None,
                   batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
                   mean: torch.Tensor | None = None, reference: SpliceReference | None = None,
                   max_norm: float | None = None) -> SpliceMetrics:
    """CE / KL / agreement with ``reconstruct`` (e.g. an SAE's forward on raw activations) spliced in at
    ``hook``, or with several :class:`Swap` in place at once (``hook`` a list of them: a transcoder's,
    the replacement model's); the ablations are then of every swapped activation.

    ``batches`` yields ``(input_ids [B, T], keep [B, T] bool)``; ``mean`` [D] is the
    activation used by mean ablation (default: the mean over the kept positions of
    these batches, from a first pass). Pass a ``reference`` from :func:`splice_reference`
    instead of ``batches`` to reuse its batches and ablation losses: two forward passes per
    batch (clean, spliced) instead of four.
    """
    if isinstance(hook, str):
        if reconstruct is None:
            raise InputError("splice evaluation: give the replacement of the activation at the hook")
        fn = reconstruct
        swaps = [Swap(hook, _in_float32(fn))]
    else:
        swaps = [Swap(s.writes, _in_float32(s.fn), s.reads, s.error_term) for s in hook]
    if not swaps:
        raise InputError("splice evaluation: nothing to splice")
    written = [resolve_hook(lm.model, s.writes).name for s in swaps]
    if len(set(written)) != len(written):
        twice = next(w for w in written if written.count(w) > 1)
        raise InputError(f"splice evaluation: two dictionaries write {twice}")
    if reference is None:
        if batches is None:
            raise InputError("splice evaluation: give batches or a reference")
        reference = splice_reference(lm, written[0] if isinstance(hook, str) else written, batches, mean, max_norm)
    elif max_norm is not None:
        raise InputError("splice evaluation: max_norm belongs to the reference (splice_reference(..., max_norm))")
    elif reference.hook != ",".join(written):
        raise InputError(f"splice evaluation: the reference was computed at {reference.hook}, not {','.join(written)}")
    sums = {"clean": 0.0, "sae": 0.0, "kl": 0.0, "agree": 0.0}
    n = 0
    for ids, keep in reference.data:
        scored = _scored(keep)
        nll, logp_clean = _nll_sum(swapped_logits(lm, [], ids, keep), ids, keep)
        sums["clean"] += nll
        nll, logp = _nll_sum(swapped_logits(lm, swaps, ids, keep), ids, keep)
        sums["sae"] += nll
        kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
        sums["kl"] += float(kl[scored].sum())
        sums["agree"] += float((logp_clean.argmax(-1) == logp.argmax(-1))[scored].sum())
        n += int(scored.sum())
    ce = {k: v / n for k, v in sums.items()}
    z, m = reference.ce_zero, reference.ce_mean
    return SpliceMetrics(n_tokens=n, n_outliers=reference.n_outliers, ce_clean=ce["clean"], ce_sae=ce["sae"],
                         ce_zero=z,
                         ce_mean=m, kl_sae=ce["kl"], delta_lm_loss=ce["sae"] - ce["clean"],
                         recovered_vs_zero=_recovered(z, ce["sae"], ce["clean"]),
                         recovered_vs_mean=_recovered(m, ce["sae"], ce["clean"]), agreement=ce["agree"])


def _scan(lm: LoadedModel, points: list[HookPoint], data: list[tuple[torch.Tensor, torch.Tensor]],
          max_norm: float | None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, int]:
    """One clean pass: drop positions above ``max_norm`` (at any of the points) from ``keep``; the mean
    of each point's activation over the rest [H, D]."""
    from dictlens.data.tap import Tap

    names = [p.name for p in points]
    tap = Tap(lm, names)
    total, count, outliers, out = None, 0, 0, []
    for ids, keep in data:
        acts = torch.stack([a.double() for a in tap(ids).values()]) if len(names) > 1 else \
            tap(ids)[names[0]].double()[None]
        if max_norm is not None:
            big = keep & (acts.norm(dim=-1) > max_norm).any(0)
            outliers += int(big.sum())
            keep = keep & ~big
        out.append((ids, keep))
        kept = acts[:, keep]
        total = kept.sum(1) if total is None else total + kept.sum(1)
        count += kept.shape[1]
    assert total is not None
    return out, (total / max(1, count)).float(), outliers


def sae_replacement(sae: SAE) -> Replace:
    """The SAE's reconstruction of raw activations of any leading shape [..., D] (a transcoder's
    prediction [..., D_out] from its inputs), ranked in float32."""
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        with sae.ranking("float32"):
            return sae(x.reshape(-1, x.shape[-1]).float()).reshape(*x.shape[:-1], -1)
    return reconstruct


def dictionary_swap(sae: SAE, *, error_term: bool = False, reads: str | None = None, writes: str | None = None
                    ) -> Swap:
    """The swap that splices ``sae`` where it belongs: an SAE replaces the hook it reads by its
    reconstruction; a transcoder replaces the hook it writes (``mlp_out.L``) by its prediction from the
    one it reads (``mlp_in.L``). The hooks come from its provenance unless given."""
    reads = reads or sae.provenance.hook_in
    writes = writes or (sae.provenance.hook_out if sae.cfg.transcoder else reads)
    if not reads or not writes:
        raise InputError("splice: the dictionary's record names no hook it reads"
                         + (" or writes" if sae.cfg.transcoder else "") + "; give the hooks")
    return Swap(writes, sae_replacement(sae), reads if sae.cfg.transcoder else None, error_term)


class _CLTPass:
    """A cross-layer transcoder spliced into one forward pass, one swap per layer: layer j's swap encodes
    layer j's MLP input, adds block j's writes to the pending predictions of layers j..L−1, and returns
    layer j's. The model runs its layers in order, so layer 0's swap opens each pass; every block is
    encoded once per pass (not once per layer it writes)."""

    def __init__(self, clt: CLT):
        self.clt = clt
        self.pending: torch.Tensor | None = None
        self.next = 0

    def layer(self, j: int) -> Replace:
        clt = self.clt

        def predict(x: torch.Tensor) -> torch.Tensor:
            if j == 0:
                self.pending, self.next = None, 0
            if self.next != j:
                raise InputError(f"splice: the cross-layer transcoder's layer {j} ran before its layer {self.next}: "
                                 "the model must run its layers in order, each once per pass")
            flat = x.reshape(-1, x.shape[-1]).float()
            d = clt.cfg.d_out
            if self.pending is None:
                self.pending = torch.zeros(len(flat), clt.d_out, device=flat.device)
            block = clt.block(j)
            with block.ranking("float32"):
                self.pending[:, j * d:] += block.decode_sparse(*block.encode_sparse(flat), flat)
            self.next = j + 1
            return self.pending[:, j * d:(j + 1) * d].reshape(*x.shape[:-1], d)
        return predict


def clt_swaps(clt: CLT, *, error_term: bool = False, reads: Sequence[str] | None = None,
              writes: Sequence[str] | None = None) -> list[Swap]:
    """The swaps that splice a cross-layer transcoder in: every MLP output of its layers replaced by
    its prediction (hooks from its record unless given)."""
    from dictlens.data.hooks import Wiring

    if reads is None or writes is None:
        if not clt.provenance.hook_in or not clt.provenance.hook_out:
            raise InputError("splice: the cross-layer transcoder's record names no hooks; give them")
        recorded = Wiring.of_record(clt.provenance.hook_in, clt.provenance.hook_out)
        reads, writes = reads or recorded.reads, writes or recorded.writes
    if len(reads) != clt.n_layers or len(writes) != clt.n_layers:
        raise InputError(f"splice: a cross-layer transcoder over {clt.n_layers} layers reads and writes one hook "
                         f"per layer, given {len(reads)} and {len(writes)}")
    one_pass = _CLTPass(clt)
    return [Swap(w, one_pass.layer(j), r, error_term) for j, (r, w) in enumerate(zip(reads, writes, strict=True))]


def dictionary_swaps(d: Dictionary, *, error_term: bool = False) -> list[Swap]:
    """The swaps that splice dictionary ``d`` where it belongs (one; a CLT's, one per layer)."""
    from dictlens.sae.clt import CLT

    if isinstance(d, CLT):
        return clt_swaps(d, error_term=error_term)
    if d.cfg.crosscoder:
        raise InputError("splice: a crosscoder's reconstruction of each hook reads every hook, later ones too, so it "
                         "cannot replace them in one forward pass; measure it without splicing")
    return [dictionary_swap(d, error_term=error_term)]
