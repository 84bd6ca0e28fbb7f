"""Search features by text: run a text through the model and the SAE and say which
features fire on which tokens, strongest first. (Search by token over the analysed text is
:meth:`dictlens.analysis.db.FeatureDB.features_for_token`.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from dictlens.errors import InputError

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE


@dataclass
class TokenCodes:
    """One token of the text: its text and its active features, strongest first."""

    text: str
    features: list[tuple[int, float]]


@dataclass
class TextFeatures:
    """``tokens``: every analysed token with its strongest features; ``features``: every
    feature that fired, by its largest activation on the text ({id, max, tokens})."""

    tokens: list[TokenCodes]
    features: list[dict[str, Any]]


@torch.no_grad()
def features_on_text(sae: SAE, lm: LoadedModel, hook: str, text: str, per_token: int = 8,
                     max_tokens: int = 1024, max_norm: float | None = None) -> TextFeatures:
    """Which features of ``sae`` fire on ``text`` at ``hook`` of ``lm``: per token the
    ``per_token`` strongest, and every feature ranked by its largest activation. BOS and
    other special tokens are left out, as in the analysis, and so are positions whose
    activation norm exceeds ``max_norm`` (the SAE's training outlier limit)."""
    from dictlens.data.tap import Tap
    from dictlens.data.tokens import not_special, text_ids

    ids = text_ids(lm, text, max_tokens=max_tokens).cpu()
    acts = Tap(lm, [hook])(ids)[hook][0].float()
    if acts.shape[-1] != sae.d_in:
        raise InputError(f"hook {hook} of {lm.name} gives {acts.shape[-1]}-wide activations; the SAE reads {sae.d_in}")
    with sae.ranking("float32"):
        codes = sae.encode(acts.to(sae.device)).cpu()
    keep = not_special(lm.tokenizer, ids)[0].tolist()
    tokens, best = [], torch.zeros(codes.shape[1])
    fired = torch.zeros(codes.shape[1], dtype=torch.long)
    too_big = (acts.norm(dim=-1) > max_norm).tolist() if max_norm is not None else [False] * len(acts)
    for t, i in enumerate(ids[0].tolist()):
        if not keep[t] or too_big[t]:  # outliers (SmolLM2's BOS: ~150x the median norm; attention sinks)
            continue
        row = codes[t]
        nz = row.nonzero()[:, 0]
        order = nz[row[nz].argsort(descending=True)]
        tokens.append(TokenCodes(lm.tokenizer.decode([i], clean_up_tokenization_spaces=False),
                                 [(int(f), float(row[f])) for f in order[:per_token]]))
        best = torch.maximum(best, row)
        fired += (row > 0).long()
    ranked = best.argsort(descending=True)
    return TextFeatures(tokens, [{"id": int(f), "max": float(best[f]), "tokens": int(fired[f])}
                                 for f in ranked if best[f] > 0])
