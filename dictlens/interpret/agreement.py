"""``dictlens agreement``: how far raters agree, how well they detect, and whether the
automated scores follow them.

- **Ratings** (1–5, ordinal): Cohen's kappa for each pair of raters on the features both
  rated (scikit-learn's ``cohen_kappa_score``, unweighted and quadratic-weighted), and
  Krippendorff's alpha over all raters (the ``krippendorff`` package; ordinal and nominal),
  missing ratings allowed.
- **Context marks** (which test contexts fit a rater's label): the same statistics over the
  units (feature, context), nominal; and each rater's **human detection** score, the
  balanced accuracy of those marks against where the feature fires.
- **Against the automated scores**: Spearman correlation, over features, of the mean human
  rating and of the mean human detection with one automated score (default the `tokens`
  explanations' detection AUC by the pattern judge).

Every statistic has a 95% percentile bootstrap interval over features.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dictlens.analysis.db import AnalysisDir, FeatureDB
from dictlens.config import check, field
from dictlens.errors import InputError
from dictlens.interpret.labels import from_csv, human_detection, to_csv
from dictlens.interpret.scores import BOOTSTRAP, scoring_sample
from dictlens.interpret.store import Interpretations, Label
from dictlens.io import atomic_write_json

RATINGS = (1, 2, 3, 4, 5)


def cohen_kappa(a: Sequence[float], b: Sequence[float], weights: str | None = None) -> float | None:
    """Cohen's kappa of two raters' paired values (None when undefined: fewer than two pairs,
    or both raters constant)."""
    from sklearn.metrics import cohen_kappa_score

    if len(a) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # undefined (one label only): NaN, returned as None
        k = float(cohen_kappa_score(a, b, weights=weights, labels=None))
    return k if np.isfinite(k) else None


def kripp_alpha(matrix: np.ndarray, level: Literal["nominal", "ordinal"],
                domain: Sequence[float] | None = None) -> float | None:
    """Krippendorff's alpha of a raters × units matrix (NaN: not rated); None when undefined."""
    import krippendorff

    pairable = (np.sum(~np.isnan(matrix), axis=0) >= 2).sum()
    values = np.unique(matrix[~np.isnan(matrix)])
    if pairable == 0 or len(values) < 2:
        return None
    a = float(krippendorff.alpha(reliability_data=matrix, level_of_measurement=level,
                                 value_domain=None if domain is None else list(domain)))
    return a if np.isfinite(a) else None


def _interval(stat: Callable[[np.ndarray], float | None], n: int, rng: np.random.Generator,
              draws: int) -> dict[str, float | int | None]:
    """``stat`` of units 0..n-1 and its bootstrap interval over resampled units."""
    value = stat(np.arange(n)) if n else None
    got = [v for v in (stat(rng.integers(0, n, n)) for _ in range(draws)) if v is not None] if value is not None else []
    lo, hi = (np.percentile(got, [2.5, 97.5]).tolist() if got else (None, None))
    return {"value": value, "low": lo, "high": hi, "units": n}


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


@dataclass(kw_only=True)
class AgreementJob(AnalysisDir):
    """``dictlens agreement``: inter-rater reliability, human detection, and humans against the automated scores."""

    raters: str | None = field(None, help="comma-separated raters to compare (default: every rater)")
    import_csv: str | None = field(None, help="first add the labels of this CSV (columns feature, rater, label, "
                                              "rating, contexts, created)")
    export_csv: str | None = field(None, help="write every label to this CSV")
    explainer: str = field("tokens", help="whose explanations' automated score to set against the humans")
    judge: str = field("pattern", help="the judge of that score")
    score: str = field("detection_auc", help="the automated score: detection, detection_auc, fuzzing or simulation")
    bootstrap: int = field(BOOTSTRAP, help="bootstrap resamples for each interval")
    seed: int = field(0, help="seed of the bootstrap")

    def __post_init__(self) -> None:
        check(self.bootstrap >= 10, "bootstrap", "at least 10", self.bootstrap)


@dataclass
class Agreement:
    result: dict[str, Any]
    imported: int
    written: list[Path]


def _rater_list(labels: Sequence[Label], wanted: str | None) -> list[str]:
    have = sorted({lab.rater for lab in labels})
    if wanted is None:
        return have
    asked = [r.strip() for r in wanted.split(",") if r.strip()]
    unknown = [r for r in asked if r not in have]
    if unknown:
        raise InputError(f"no labels by {', '.join(map(repr, unknown))}; raters here: {', '.join(have) or 'none'}")
    return asked


def agreement(labels: Sequence[Label], raters: Sequence[str], truth: dict[int, dict[str, bool]],
              auto: dict[int, float], draws: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Every statistic of the module's doc, on ``labels`` by ``raters``."""
    rng = np.random.default_rng(seed)
    labels = [lab for lab in labels if lab.rater in raters]
    feats = sorted({lab.feature for lab in labels})
    col = {f: i for i, f in enumerate(feats)}
    R = np.full((len(raters), len(feats)), np.nan)
    units = sorted({(lab.feature, c) for lab in labels for c in lab.contexts})
    ucol = {u: i for i, u in enumerate(units)}
    U = np.full((len(raters), len(units)), np.nan)
    for lab in labels:
        r = raters.index(lab.rater)
        if lab.rating is not None:
            R[r, col[lab.feature]] = lab.rating
        for c, fits in lab.contexts.items():
            U[r, ucol[(lab.feature, c)]] = float(fits)

    def pairs(M: np.ndarray, weights: str | None) -> list[dict[str, Any]]:
        out = []
        for i, j in itertools.combinations(range(len(raters)), 2):
            both = np.flatnonzero(~np.isnan(M[i]) & ~np.isnan(M[j]))
            a, b = M[i, both], M[j, both]

            def kappa(idx: np.ndarray, a: np.ndarray = a, b: np.ndarray = b) -> float | None:
                return cohen_kappa(a[idx], b[idx], weights)

            out.append({"raters": [raters[i], raters[j]], **_interval(kappa, len(both), rng, draws)})
        return out

    result: dict[str, Any] = {
        "raters": list(raters), "features": len(feats),
        "labels": {r: sum(lab.rater == r for lab in labels) for r in raters},
        "ratings": {
            "cohen_kappa": pairs(R, None), "cohen_kappa_quadratic": pairs(R, "quadratic"),
            "krippendorff_alpha_ordinal": _interval(lambda i: kripp_alpha(R[:, i], "ordinal", RATINGS),
                                                    len(feats), rng, draws),
            "krippendorff_alpha_nominal": _interval(lambda i: kripp_alpha(R[:, i], "nominal"), len(feats), rng,
                                                    draws)},
        "contexts": {
            "cohen_kappa": pairs(U, None),
            "krippendorff_alpha_nominal": _interval(lambda i: kripp_alpha(U[:, i], "nominal"), len(units), rng,
                                                    draws),
            "human_detection": {r: human_detection([lab for lab in labels if lab.rater == r], truth)
                                for r in raters}},
    }
    # per feature: the mean rating and the mean human detection, against the automated score
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # a feature nobody rated: NaN
        mean_rating = np.nanmean(R, axis=0) if len(feats) else np.zeros(0)
    detect = np.array([human_detection([lab for lab in labels if lab.feature == f], truth)["balanced_accuracy"]
                       for f in feats], dtype=float)
    have = np.array([f in auto for f in feats], bool)
    a = np.array([auto.get(f, np.nan) for f in feats])

    def corr(x: np.ndarray) -> dict[str, Any]:
        ok = np.flatnonzero(have & np.isfinite(x))
        return _interval(lambda i: _spearman(x[ok[i]], a[ok[i]]), len(ok), rng, draws)

    result["against_automated"] = {"mean_rating": corr(mean_rating), "human_detection": corr(detect)}
    return result


def agreement_job(job: AgreementJob, *, say: Callable[[str], None] = print) -> Agreement:
    """Import, compute, export; write ``ANALYSIS/agreement.json``."""
    path = job.path()
    db = FeatureDB(path)
    written: list[Path] = []
    with Interpretations(path) as st:
        imported = st.put_labels(from_csv(Path(job.import_csv), db.n_features)) if job.import_csv else 0
        labels = st.labels()
        if job.export_csv:
            written.append(to_csv(labels, Path(job.export_csv)))
        auto = {s.feature: s.value for s in st.scores(job.explainer, job.judge)
                if s.scorer == job.score and s.control == "" and s.value is not None}
    if not labels:
        raise InputError(f"{path}: no labels yet: label features in `dictlens serve {job.run}` (/label), or "
                         f"--import-csv FILE")
    raters = _rater_list(labels, job.raters)
    labelled = sorted({lab.feature for lab in labels})
    truth = {f: {c.id: c.fires for c in scoring_sample(db, f).contexts} for f in labelled}
    db.close()
    t0 = time.perf_counter()
    result = agreement(labels, raters, truth, auto, job.bootstrap, job.seed)
    result.update(automated={"explainer": job.explainer, "judge": job.judge, "score": job.score,
                             "features_scored": len(auto)}, seconds=time.perf_counter() - t0)
    out = path / "agreement.json"
    atomic_write_json(out, result)
    return Agreement(result, imported, [out, *written])
