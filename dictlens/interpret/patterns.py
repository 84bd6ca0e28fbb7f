"""The ``tokens`` explainer: deterministic, offline, in the spirit of N2G.

From a feature's example windows (the analysis database's top and quantile examples), it
finds the tokens its activation sits on and, when one dominates, the token just before: the
share of the feature's activation mass each carries. The result is a :class:`TokenPattern`,
kept as structure (so that it can predict an activation per token: the simulation score)
and rendered as a sentence.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dictlens.errors import InputError

COVERAGE = 0.8        # tokens are listed until they carry this share of the activation mass
MAX_TOKENS = 8
CONTEXT_SHARE = 0.6   # a preceding token is part of the pattern when it precedes this share of the mass


@dataclass(frozen=True)
class Window:
    """One example context: token texts and the feature's activation at each."""

    texts: list[str]
    acts: list[float]


@dataclass
class TokenPattern:
    """Where a feature fires: ``tokens`` (text, share of the activation mass, mean activation
    there), and ``before`` (the preceding token text and the share of mass it precedes) when one
    dominates; ``coverage``: the share of mass the listed tokens carry."""

    tokens: list[tuple[str, float, float]]
    before: tuple[str, float] | None
    coverage: float
    windows: int
    firings: int
    notes: dict[str, Any] = field(default_factory=dict)

    def sentence(self) -> str:
        if not self.tokens:
            return "never fires in its examples"
        shown = ", ".join(f"{t!r} ({share:.0%})" for t, share, _ in self.tokens[:5])
        what = f"fires on {shown}"
        if len(self.tokens) > 5:
            what += f" and {len(self.tokens) - 5} more tokens"
        if self.before is not None:
            what += f", after {self.before[0]!r} ({self.before[1]:.0%} of its activation)"
        return what + f"; these carry {self.coverage:.0%} of its activation in {self.windows} examples"

    def predict(self, texts: Sequence[str]) -> list[float]:
        """The pattern's activation per token, in [0, 1]: the token's mean activation relative
        to the pattern's strongest, where the preceding token fits."""
        strength = {t: mean for t, _, mean in self.tokens}
        top = max(strength.values(), default=0.0) or 1.0
        out = []
        for i, t in enumerate(texts):
            fits = self.before is None or (i > 0 and texts[i - 1] == self.before[0])
            out.append(strength.get(t, 0.0) / top if fits else 0.0)
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TokenPattern:
        before = d.get("before")
        return cls([(str(t), float(s), float(m)) for t, s, m in d["tokens"]],
                   None if before is None else (str(before[0]), float(before[1])),
                   float(d["coverage"]), int(d["windows"]), int(d["firings"]), dict(d.get("notes", {})))


def explain_tokens(windows: Sequence[Window]) -> TokenPattern:
    """The pattern of the activations in ``windows``."""
    mass: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    before: dict[str, float] = defaultdict(float)
    total, firings = 0.0, 0
    for w in windows:
        if len(w.texts) != len(w.acts):
            raise InputError(f"example window: {len(w.texts)} tokens but {len(w.acts)} activations")
        for i, (t, a) in enumerate(zip(w.texts, w.acts, strict=True)):
            if a > 0:
                mass[t] += a
                count[t] += 1
                total += a
                firings += 1
                if i > 0:
                    before[w.texts[i - 1]] += a
    if total <= 0:
        return TokenPattern([], None, 0.0, len(windows), 0)
    ranked = sorted(mass, key=lambda t: -mass[t])
    tokens, covered = [], 0.0
    for t in ranked[:MAX_TOKENS]:
        tokens.append((t, mass[t] / total, mass[t] / count[t]))
        covered += mass[t] / total
        if covered >= COVERAGE:
            break
    prev = max(before, key=lambda t: before[t], default=None)
    context = (prev, before[prev] / total) if prev is not None and before[prev] / total >= CONTEXT_SHARE else None
    return TokenPattern(tokens, context, covered, len(windows), firings)


def simulation_score(pattern: TokenPattern, windows: Sequence[Window]) -> float:
    """Pearson correlation between the pattern's predicted and the true activations over every
    token of ``windows`` (0 when either is constant)."""
    import numpy as np

    pred = np.concatenate([pattern.predict(w.texts) for w in windows]) if windows else np.zeros(0)
    true = np.concatenate([np.asarray(w.acts, np.float64) for w in windows]) if windows else np.zeros(0)
    if len(true) < 2 or pred.std() == 0 or true.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, true)[0, 1])


def windows(db: Any, feature: int, kinds: Sequence[str] = ("top", "quantile")) -> list[Window]:
    """The example windows of ``feature`` in a feature database (:class:`~dictlens.analysis.db.FeatureDB`)."""
    return [Window(e.texts, e.acts) for kind in kinds for e in db.examples(feature, kind=kind)]
