"""Ablate features: what the model loses without them.

``ablate(lm, sae, hook, features, batches)`` runs each batch clean and with the chosen
features zeroed (or set to their mean) inside the SAE spliced with its error term, so the
only change to the activation is Σ_i (f'_i − f_i) W_dec[i]. It reports the next-token loss
both ways, and for chosen tokens the change of their logit and log-probability, averaged
over the scored positions (or read at the last position of a prompt).

The mean of a feature (for mean ablation) is its average code over the kept positions of
the same batches, zeros included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from dictlens.errors import ConfigError, InputError
from dictlens.use.splice import Edit, Splice, check_edits

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE


@dataclass
class TokenEffect:
    token: str
    id: int
    logit_clean: float
    logit_ablated: float
    logprob_clean: float
    logprob_ablated: float

    @property
    def delta_logit(self) -> float:
        return self.logit_ablated - self.logit_clean


@dataclass
class AblationResult:
    hook: str
    features: list[int]
    mode: str
    n_predictions: int
    ce_clean: float
    ce_ablated: float
    means: dict[int, float] = field(default_factory=dict)  # mean ablation: the value each feature was set to
    fired: dict[int, int] = field(default_factory=dict)    # positions where each feature was active
    tokens: list[TokenEffect] = field(default_factory=list)

    @property
    def delta_loss(self) -> float:
        return self.ce_ablated - self.ce_clean

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["delta_loss"] = self.delta_loss
        for t, src in zip(d["tokens"], self.tokens, strict=True):
            t["delta_logit"] = src.delta_logit
        return d


def token_ids(lm: LoadedModel, tokens: Sequence[str]) -> list[int]:
    """One token id per string; a string that is not exactly one token is refused by name."""
    ids = []
    for t in tokens:
        enc = lm.tokenizer(t, add_special_tokens=False).input_ids
        if len(enc) != 1:
            pieces = [lm.tokenizer.decode([i]) for i in enc]
            raise InputError(f"token {t!r} is {len(enc)} tokens for {lm.name} ({pieces}); give a single token "
                             f"(mind the leading space: ' Paris')")
        ids.append(int(enc[0]))
    return ids


@torch.no_grad()
def _feature_stats(lm: LoadedModel, sae: SAE, hook: str, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   features: Sequence[int], max_norm: float | None) -> tuple[dict[int, float], dict[int, int]]:
    """Mean code (zeros included) and firing count of each feature over the kept positions."""
    from dictlens.data.tap import Tap

    tap = Tap(lm, [hook])
    sums = torch.zeros(len(features), dtype=torch.float64)
    fired = torch.zeros(len(features), dtype=torch.long)
    n = 0
    cols = torch.tensor(list(features))
    for ids, keep in batches:
        x = tap(ids)[hook].float()[keep.to(lm.device)].to(sae.device)
        if max_norm is not None:
            x = x[x.norm(dim=1) <= max_norm]
        with sae.ranking("float32"):
            p, vals = sae.encode_sparse(x)     # sparse: a dense [N, F] would not fit for wide SAEs
        _, which, v = p.select(vals, cols)
        sums.index_add_(0, which.cpu(), v.double().cpu())
        fired.index_add_(0, which.cpu(), (v > 0).long().cpu())
        n += len(x)
    if n == 0:
        raise InputError("ablation: no kept positions to average the features over")
    return ({int(i): float(s / n) for i, s in zip(features, sums, strict=True)},
            {int(i): int(c) for i, c in zip(features, fired, strict=True)})


@torch.no_grad()
def ablate(lm: LoadedModel, sae: SAE, hook: str, features: Sequence[int],
           batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, mode: Literal["zero", "mean"] = "zero",
           tokens: Sequence[str] = (), last_only: bool = False, max_norm: float | None = None) -> AblationResult:
    """Next-token loss and chosen tokens' logits with ``features`` of ``sae`` ablated at ``hook``.

    ``batches``: ``(input_ids [B, T], keep [B, T])`` as from
    :func:`dictlens.data.tokens.text_batches`; predictions are scored where both the
    position and the next token are kept. ``last_only``: read the tokens' logits at the
    last position of each row only (a prompt and its next token)."""
    if mode not in ("zero", "mean"):
        raise ConfigError(f"ablation mode {mode!r}: expected zero or mean")
    features = list(dict.fromkeys(int(f) for f in features))   # ablating a feature twice is once
    if not features:
        raise ConfigError("ablation: give at least one feature")
    check_edits(sae, [Edit(f, "zero") for f in features])
    batches = [(ids.to(lm.device), keep.to(lm.device)) for ids, keep in batches]
    if not batches:
        raise InputError("ablation: no text to run")
    tok_ids = token_ids(lm, tokens)
    means, fired = _feature_stats(lm, sae, hook, batches, features, max_norm)
    edits = [Edit(f, "mean", means[f]) if mode == "mean" else Edit(f, "zero") for f in features]
    splice = Splice(lm, {hook: sae}, {hook: edits}, max_norm=max_norm)
    sums = {"clean": 0.0, "ablated": 0.0}
    logits_sum = {k: torch.zeros(len(tok_ids), 2, dtype=torch.float64) for k in ("clean", "ablated")}
    n_pred = n_read = 0
    for ids, keep in batches:
        scored = keep[:, :-1] & keep[:, 1:]
        for name in ("clean", "ablated"):
            if name == "ablated":
                with splice:
                    logits = lm.model(input_ids=ids, use_cache=False).logits.float()
            else:
                logits = lm.model(input_ids=ids, use_cache=False).logits.float()
            logp = logits.log_softmax(-1)
            sums[name] += float(F.nll_loss(logp[:, :-1][scored], ids[:, 1:][scored], reduction="sum"))
            if tok_ids:
                at = (keep & (torch.arange(ids.shape[1], device=ids.device) == ids.shape[1] - 1)) if last_only \
                    else keep
                cols = torch.tensor(tok_ids, device=ids.device)
                logits_sum[name][:, 0] += logits[at][:, cols].double().sum(0).cpu()
                logits_sum[name][:, 1] += logp[at][:, cols].double().sum(0).cpu()
                if name == "clean":
                    n_read += int(at.sum())
        n_pred += int(scored.sum())
    if n_pred == 0 and not tok_ids:
        raise InputError("ablation: no next-token predictions to score (the text is too short)")
    ce = {k: v / n_pred if n_pred else float("nan") for k, v in sums.items()}
    effects = []
    if tok_ids and n_read:
        c, a = logits_sum["clean"] / n_read, logits_sum["ablated"] / n_read
        effects = [TokenEffect(t, i, float(c[j, 0]), float(a[j, 0]), float(c[j, 1]), float(a[j, 1]))
                   for j, (t, i) in enumerate(zip(tokens, tok_ids, strict=True))]
    return AblationResult(hook, [int(f) for f in features], mode, n_pred, ce["clean"], ce["ablated"],
                          means if mode == "mean" else {}, fired, effects)


def prompt_batches(lm: LoadedModel, prompts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (ids [1, T], keep [1, T]) batch per prompt (BOS first where the model has one;
    special tokens not kept)."""
    from dictlens.data.tokens import not_special, text_ids

    out = []
    for p in prompts:
        ids = text_ids(lm, p, what="prompt").cpu()
        out.append((ids, not_special(lm.tokenizer, ids)))
    return out
