"""How well an explanation predicts where its feature fires: detection, fuzzing, simulation.

Each feature's **scoring sample** comes from the feature database and is disjoint from what
its explanation was written from (the top examples):

- activating contexts: the quantile examples (every activation quantile group), less any
  whose position is also a top example;
- non-activating contexts: the random contexts where the feature is silent, and **hard
  negatives** — top contexts of its nearest features (decoder cosine) in which it does not
  fire at all.

A **judge** reads an explanation and answers for contexts (:class:`Judge`): the offline
:class:`PatternJudge` answers with the ``tokens`` explanation's own pattern; an LLM judge
(:mod:`dictlens.interpret.llm`) answers by asking a chat model.

- **detection**: the judge says how likely each context is to hold a firing; balanced
  accuracy (at 0.5) and ROC AUC between activating and non-activating contexts;
- **fuzzing**: in each activating context, once the tokens where the feature fires are
  highlighted and once as many tokens where it does not; the judge says whether the
  highlighted tokens fit the explanation; balanced accuracy;
- **simulation**: the judge predicts the activation of every token (0–1); Pearson
  correlation with the true activations over all tokens of the sample.

Every value comes with a 95% percentile bootstrap interval over the sample's contexts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from dictlens.errors import InputError
from dictlens.interpret.patterns import TokenPattern, Window, windows
from dictlens.interpret.store import Explanation

SCORERS = ("detection", "fuzzing", "simulation")
CHANCE = {"detection": 0.5, "detection_auc": 0.5, "fuzzing": 0.5, "simulation": 0.0}
BOOTSTRAP = 1000
HARD_NEGATIVES = 10


@dataclass(frozen=True)
class Context(Window):
    """A scoring context: ``kind`` is ``activating``, ``random`` or ``neighbour``; ``group``
    the activation quantile group of an activating one (-1 otherwise)."""

    kind: str = "activating"
    group: int = -1
    position: int = -1

    @property
    def fires(self) -> bool:
        return max(self.acts, default=0.0) > 0

    @property
    def id(self) -> str:
        """A name for the context that stays the same across runs (``kind:position``)."""
        return f"{self.kind}:{self.position}"


@dataclass
class Sample:
    """One feature's scoring contexts."""

    feature: int
    activating: list[Context]
    negatives: list[Context]

    @property
    def contexts(self) -> list[Context]:
        return self.activating + self.negatives


def explaining_windows(db: Any, feature: int) -> list[Window]:
    """What an explanation is written from: the feature's top examples."""
    return windows(db, feature, ("top",))


def scoring_sample(db: Any, feature: int, hard_negatives: int = HARD_NEGATIVES) -> Sample:
    """The feature's scoring contexts (see the module's doc), from a
    :class:`~dictlens.analysis.db.FeatureDB`."""
    top = set(db.example_positions(feature, "top"))
    active = [Context(e.texts, e.acts, "activating", e.group, e.position) for e in db.examples(feature, kind="quantile")
              if e.position not in top and max(e.acts, default=0.0) > 0]
    randoms = db.examples(feature, kind="random")
    negatives = [Context(e.texts, e.acts, "random", -1, e.position) for e in randoms]
    seen = {e.position for e in randoms}
    left, right = int(db.meta.get("window_left", 24)), int(db.meta.get("window_right", 8))
    hard = 0
    for other, _ in db.feature(feature)["neighbours"]:
        if hard >= hard_negatives:
            break
        for pos in db.example_positions(other, "top"):
            if pos in seen:
                continue
            toks, acts, _ = db.codes.window(feature, pos, left, right)
            if not np.any(acts > 0):
                seen.add(pos)
                negatives.append(Context([db.token_text(int(t)) for t in toks], acts.tolist(), "neighbour", -1, pos))
                hard += 1
                break
    return Sample(feature, active, negatives)


class Judge(Protocol):
    """Reads an explanation and answers about contexts."""

    name: str

    def detect(self, explanation: Explanation, contexts: Sequence[Window]) -> list[float]:
        """Per context, how likely (0–1) the feature fires somewhere in it."""
        ...

    def fuzz(self, explanation: Explanation, items: Sequence[tuple[Window, Sequence[int]]]) -> list[float]:
        """Per (context, highlighted token indices), how likely (0–1) the highlighted tokens are where it fires."""
        ...

    def simulate(self, explanation: Explanation, contexts: Sequence[Window]) -> list[list[float]]:
        """Per context, the predicted activation (0–1) of each token."""
        ...


class PatternJudge:
    """The offline judge: the ``tokens`` explanation's pattern predicts the activations."""

    name = "pattern"

    @staticmethod
    def pattern(explanation: Explanation) -> TokenPattern:
        if explanation.pattern is None:
            raise InputError(f"feature {explanation.feature}: the pattern judge scores `tokens` explanations, "
                             f"and {explanation.explainer!r} has no pattern; use --judge llm")
        return TokenPattern.from_json(explanation.pattern)

    def detect(self, explanation: Explanation, contexts: Sequence[Window]) -> list[float]:
        p = self.pattern(explanation)
        # above 0.5 exactly when the pattern fires somewhere; ordered by its strongest prediction
        return [0.5 + 0.5 * m if (m := max(p.predict(c.texts), default=0.0)) > 0 else 0.0 for c in contexts]

    def fuzz(self, explanation: Explanation, items: Sequence[tuple[Window, Sequence[int]]]) -> list[float]:
        p = self.pattern(explanation)
        out = []
        for c, marked in items:
            pred = p.predict(c.texts)
            out.append(float(np.mean([pred[i] > 0 for i in marked])) if len(marked) else 0.0)
        return out

    def simulate(self, explanation: Explanation, contexts: Sequence[Window]) -> list[list[float]]:
        p = self.pattern(explanation)
        return [p.predict(c.texts) for c in contexts]


@dataclass
class Value:
    """One score of one feature: its value (None: undefined on this sample), 95% interval, size."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    details: dict[str, Any] = field(default_factory=dict)


# Metrics take resample weights W [B, n] (how often each of the n items is drawn; a row of
# ones is the sample itself) and return [B] values (NaN where undefined), so that a
# bootstrap is a few array operations instead of B Python calls.

def _balanced_accuracy(y: np.ndarray, s: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    hit = np.where(y == 1, s >= 0.5, s < 0.5).astype(np.float64)

    def metric(W: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            tpr = (W * hit * (y == 1)).sum(1) / (W * (y == 1)).sum(1)
            tnr = (W * hit * (y == 0)).sum(1) / (W * (y == 0)).sum(1)
        return np.asarray((tpr + tnr) / 2)
    return metric


def _auc(y: np.ndarray, s: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """ROC AUC as the Mann–Whitney statistic (ties count half), weighted by the draws."""
    pos, neg = y == 1, y == 0
    M = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])

    def metric(W: np.ndarray) -> np.ndarray:
        wp, wn = W[:, pos], W[:, neg]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.asarray(np.einsum("bi,ij,bj->b", wp, M, wn) / (wp.sum(1) * wn.sum(1)))
    return metric


def _pearson(pred: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Pearson correlation over all tokens of the drawn contexts (0 when either side is constant)."""
    S = np.array([[len(p), p.sum(), t.sum(), (p * p).sum(), (t * t).sum(), (p * t).sum()]
                  for p, t in zip(pred, true, strict=True)], np.float64).reshape(-1, 6)

    def metric(W: np.ndarray) -> np.ndarray:
        n, sp, st, spp, stt, spt = (W @ S).T
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = spt - sp * st / n
            vp, vt = spp - sp * sp / n, stt - st * st / n
            r = cov / np.sqrt(vp * vt)
        flat = (vp <= 1e-12 * np.maximum(spp, 1)) | (vt <= 1e-12 * np.maximum(stt, 1))
        return np.asarray(np.where(n < 2, np.nan, np.where(flat, 0.0, np.clip(r, -1, 1))))
    return metric


def _mean(v: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    def metric(W: np.ndarray) -> np.ndarray:
        return np.asarray(W @ v / W.sum(1))
    return metric


def bootstrap(metric: Callable[[np.ndarray], np.ndarray], n: int, rng: np.random.Generator,
              draws: int = BOOTSTRAP) -> tuple[float | None, float | None, float | None]:
    """``metric`` of all ``n`` items and its 95% percentile interval over ``draws``
    resamples of the items (resamples where it is undefined are left out)."""
    if n == 0:
        return None, None, None
    value = float(metric(np.ones((1, n)))[0])
    if not np.isfinite(value):
        return None, None, None
    idx = rng.integers(0, n, (draws, n))
    W = np.zeros((draws, n))
    np.add.at(W, (np.repeat(np.arange(draws), n), idx.ravel()), 1.0)
    got = metric(W)
    got = got[np.isfinite(got)]
    if len(got) == 0:
        return value, None, None
    lo, hi = np.percentile(got, [2.5, 97.5])
    return value, float(lo), float(hi)


def _classification(y: np.ndarray, s: np.ndarray, rng: np.random.Generator,
                    metric: Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]],
                    draws: int) -> Value:
    v, lo, hi = bootstrap(metric(y, s), len(y), rng, draws)
    return Value(v, lo, hi, len(y), {"positives": int(y.sum()), "negatives": int(len(y) - y.sum())})


def detection(judge: Judge, explanation: Explanation, sample: Sample, rng: np.random.Generator,
              draws: int = BOOTSTRAP) -> dict[str, Value]:
    contexts = sample.contexts
    if not sample.activating or not sample.negatives:
        return {}
    y = np.array([c.fires for c in contexts], np.int64)
    s = np.asarray(judge.detect(explanation, contexts), np.float64)
    return {"detection": _classification(y, s, rng, _balanced_accuracy, draws),
            "detection_auc": _classification(y, s, rng, _auc, draws)}


def fuzz_items(sample: Sample, rng: np.random.Generator) -> tuple[list[tuple[Window, list[int]]], np.ndarray]:
    """Each activating context twice: its firing tokens highlighted (label 1), and as many
    of its silent tokens (label 0), when it has that many."""
    items: list[tuple[Window, list[int]]] = []
    y: list[int] = []
    for c in sample.activating:
        acts = np.asarray(c.acts)
        on, off = np.flatnonzero(acts > 0), np.flatnonzero(acts <= 0)
        if len(on) == 0 or len(off) < len(on):
            continue
        items += [(c, on.tolist()), (c, sorted(rng.choice(off, len(on), replace=False).tolist()))]
        y += [1, 0]
    return items, np.asarray(y, np.int64)


def fuzzing(judge: Judge, explanation: Explanation, sample: Sample, rng: np.random.Generator,
            draws: int = BOOTSTRAP) -> dict[str, Value]:
    items, y = fuzz_items(sample, rng)
    if not items:
        return {}
    s = np.asarray(judge.fuzz(explanation, items), np.float64)
    return {"fuzzing": _classification(y, s, rng, _balanced_accuracy, draws)}


def simulation(judge: Judge, explanation: Explanation, sample: Sample, rng: np.random.Generator,
               draws: int = BOOTSTRAP) -> dict[str, Value]:
    contexts = sample.contexts
    if not sample.activating:           # nothing held out where it fires: the correlation says nothing
        return {}
    pred = [np.asarray(p, np.float64) for p in judge.simulate(explanation, contexts)]
    true = [np.asarray(c.acts, np.float64) for c in contexts]
    for c, p in zip(contexts, pred, strict=True):
        if len(p) != len(c.texts):
            raise InputError(f"judge {judge.name}: {len(p)} predictions for a context of {len(c.texts)} tokens")

    v, lo, hi = bootstrap(_pearson(pred, true), len(contexts), rng, draws)
    return {"simulation": Value(v, lo, hi, len(contexts), {"tokens": int(sum(len(t) for t in true))})}


SCORER_FUNCTIONS = {"detection": detection, "fuzzing": fuzzing, "simulation": simulation}


def score(judge: Judge, explanation: Explanation, sample: Sample, scorers: Sequence[str] = SCORERS, *,
          seed: int = 0, draws: int = BOOTSTRAP) -> dict[str, Value]:
    """Every requested scorer's values for one explanation on one feature's sample."""
    out: dict[str, Value] = {}
    for name in scorers:
        if name not in SCORER_FUNCTIONS:
            raise InputError(f"unknown scorer {name!r}: choose from {', '.join(SCORERS)}")
        rng = np.random.default_rng([seed, sample.feature, SCORERS.index(name)])
        out.update(SCORER_FUNCTIONS[name](judge, explanation, sample, rng, draws))
    return out


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(n)`` with no fixed point (for n ≥ 2): who lends whom an explanation."""
    if n < 2:
        return np.arange(n)
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def summary(values: Sequence[float | None], rng: np.random.Generator, draws: int = BOOTSTRAP) -> dict[str, Any]:
    """Mean over features with its 95% bootstrap interval over features, and the count."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    mean, lo, hi = bootstrap(_mean(v), len(v), rng, draws)
    return {"mean": mean, "low": lo, "high": hi, "features": int(len(v))}


def difference(a: Sequence[float | None], b: Sequence[float | None], rng: np.random.Generator,
               draws: int = BOOTSTRAP) -> dict[str, Any]:
    """Mean of ``a`` minus mean of ``b`` over two sets of features (two dictionaries), with a
    95% bootstrap interval (each set resampled on its own) and the two-sided Mann–Whitney p
    that both come from one distribution."""
    from scipy.stats import mannwhitneyu

    x = np.asarray([v for v in a if v is not None], np.float64)
    y = np.asarray([v for v in b if v is not None], np.float64)
    if len(x) == 0 or len(y) == 0:
        return {"difference": None, "low": None, "high": None, "p": None}
    d = x[rng.integers(0, len(x), (draws, len(x)))].mean(1) - y[rng.integers(0, len(y), (draws, len(y)))].mean(1)
    lo, hi = np.percentile(d, [2.5, 97.5])
    p = float(mannwhitneyu(x, y, alternative="two-sided").pvalue)
    return {"difference": float(x.mean() - y.mean()), "low": float(lo), "high": float(hi),
            "p": p if np.isfinite(p) else None}
