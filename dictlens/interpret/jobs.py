"""``dictlens explain`` and ``dictlens score``: explanations and their scores, in the feature database.

Both work on a sample of the features that fire (seeded, so a rerun picks the same), or on
the features named; both save each feature's result as soon as it is made, so that an
interrupted run resumes where it stopped (and a failed feature is retried by running the
same command again).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np

from dictlens.analysis.db import AnalysisDir, FeatureDB, feature_ranges
from dictlens.config import check, field
from dictlens.errors import ConfigError, InputError
from dictlens.interpret.llm import LLMConfig, LLMError, open_chat, pmap
from dictlens.interpret.patterns import explain_tokens
from dictlens.interpret.scores import (
    BOOTSTRAP,
    CHANCE,
    HARD_NEGATIVES,
    SCORERS,
    Judge,
    PatternJudge,
    Sample,
    Value,
    derangement,
    difference,
    explaining_windows,
    score,
    scoring_sample,
    summary,
)
from dictlens.interpret.store import Explanation, Interpretations, Score
from dictlens.io import atomic_write_json

TOKENS_EXPLAINER_VERSION = 1
CACHE_DIR = "llm-cache"


def choose_features(db: FeatureDB, spec: str | None, max_features: int, seed: int,
                    among: Sequence[int] | None = None) -> list[int]:
    """The features named by ``spec`` (e.g. ``0-99,120``), or a seeded random sample of at
    most ``max_features`` of those that fire (of ``among`` when given)."""
    named = feature_ranges(spec)
    if named is not None:
        return sorted({db.check_feature(f) for f in named})
    alive = np.array([r["id"] for r in db.features(limit=db.n_features, alive_only=True)], np.int64)
    if among is not None:
        alive = np.intersect1d(alive, np.asarray(list(among), np.int64))
    if len(alive) == 0:
        raise InputError(f"{db.path}: no feature to work on (none fires{' among those explained' if among else ''})")
    rng = np.random.default_rng(seed)
    return sorted(int(f) for f in rng.choice(alive, min(max_features, len(alive)), replace=False))


@dataclass(kw_only=True)
class Selection(AnalysisDir):
    """Which features of which analysis."""

    features: str | None = field(None, help="features to work on, e.g. 0-99,120 (default: a random sample of "
                                            "those that fire)")
    max_features: int = field(200, help="size of that sample")
    seed: int = field(0, help="seed of the sample")

    def __post_init__(self) -> None:
        check(self.max_features >= 1, "max_features", "at least 1", self.max_features)


@dataclass(kw_only=True)
class ExplainJob(Selection):
    """``dictlens explain``: an explanation of each feature, from its top examples."""

    explainer: str = field("tokens", choices=("tokens", "llm"),
                           help="tokens: the offline pattern explainer; llm: a chat model (--llm-url or --llm-local)")
    force: bool = field(False, help="explain again the features that already have this explainer's explanation")
    llm: LLMConfig = field(default_factory=LLMConfig, help="the chat model")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.explainer == "llm" and not self.llm.given:
            raise ConfigError("--explainer llm needs --llm-url URL --llm-model NAME, or --llm-local MODEL")


@dataclass
class Explained:
    """What ``explain`` did: features newly explained, kept (already explained), failed."""

    explainer: str
    explained: list[int]
    kept: list[int]
    errors: dict[int, str]
    seconds: float
    written: list[Path]
    notes: dict[str, Any] = dc_field(default_factory=dict)


def _bar(total: int, desc: str, unit: str = "feature") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def explain_job(job: ExplainJob, *, say: Callable[[str], None] = print) -> Explained:
    """Explain the chosen features and store the explanations in the feature database."""
    path = job.path()
    db = FeatureDB(path)
    feats = choose_features(db, job.features, job.max_features, job.seed)
    t0 = time.perf_counter()
    with Interpretations(path) as store:
        chat = open_chat(job.llm, path / CACHE_DIR) if job.explainer == "llm" else None
        name = "tokens" if chat is None else f"llm:{chat.model}"
        have = {e.feature for e in store.explanations(name)}
        todo = [f for f in feats if job.force or f not in have]
        kept = [f for f in feats if f not in todo]
        errors: dict[int, str] = {}
        notes: dict[str, Any] = {}
        bar = _bar(len(todo), f"explain ({name})")

        def done(f: int, r: Explanation | LLMError) -> None:
            if isinstance(r, LLMError):
                errors[f] = str(r)
            else:
                store.put_explanations([r])
            bar.update(1)

        if chat is None:            # deterministic and fast: one transaction for all, not one per feature
            made = []
            for f in todo:
                p = explain_tokens(explaining_windows(db, f))
                made.append(Explanation(f, name, p.sentence(), p.to_json(), "", f"tokens-v{TOKENS_EXPLAINER_VERSION}",
                                        {"examples": "top"}))
                bar.update(1)
            store.put_explanations(made)
        else:
            from dictlens.interpret.asking import explain_llm, explain_messages

            windows = {f: explaining_windows(db, f) for f in todo}
            if job.llm.hosted and todo:
                from dictlens.interpret.llm import estimate

                say("explain: " + estimate([explain_messages(windows[f]) for f in todo], job.llm.max_tokens, job.llm))

            def ask(f: int) -> Explanation:
                text, settings = explain_llm(chat, windows[f], job.llm)
                return Explanation(f, name, text, None, chat.model, settings["prompt"], settings)

            pmap(ask, todo, chat.parallel, done)
            notes = {"backend": chat.name, "cache": str(chat.dir), "cache_hits": chat.hits,
                     "requests": chat.misses}
        bar.close()
    db.close()
    seconds = time.perf_counter() - t0
    out = path / f"explain-{name.replace(':', '_').replace('/', '_')}.json"
    atomic_write_json(out, {"explainer": name, "features": feats, "explained": [f for f in todo if f not in errors],
                            "kept": kept, "errors": {str(k): v for k, v in errors.items()}, "seconds": seconds,
                            **notes})
    return Explained(name, [f for f in todo if f not in errors], kept, errors, seconds, [out], notes)


@dataclass(kw_only=True)
class ScoreJob(Selection):
    """``dictlens score``: how well each explanation predicts where its feature fires."""

    explainer: str = field("tokens", help="whose explanations to score: tokens or llm:MODEL")
    judge: str = field("pattern", choices=("pattern", "llm"),
                       help="pattern: the tokens explanation's own pattern (offline); llm: a chat model")
    scorers: str = field(",".join(SCORERS), help="comma-separated: " + ", ".join(SCORERS))
    shuffled: bool = field(True, help="also score each feature with another feature's explanation (a control "
                                      "that must sit near chance)")
    hard_negatives: int = field(HARD_NEGATIVES, help="non-activating contexts taken from the nearest features' top "
                                                     "examples, per feature")
    random_control: bool = field(False, help="also explain and score the features of random directions (TopK at "
                                             "the SAE's L0, analysed over the same text): what the explainer and "
                                             "judge make of no structure")
    against: str | None = field(None, help="compare with another dictionary, explained and scored the same way on "
                                           "a sample of the same size: a run or analysis directory analysed over "
                                           "the same text (e.g. another width), or neurons / neurons:LAYER (the "
                                           "model's MLP neurons at the SAE's layer, at the SAE's L0)")
    bootstrap: int = field(BOOTSTRAP, help="bootstrap resamples for each interval")
    force: bool = field(False, help="score again the features that already have these scores")
    llm: LLMConfig = field(default_factory=LLMConfig, help="the chat model (--judge llm)")

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [s for s in self.scorer_list if s not in SCORERS]
        if bad:
            raise ConfigError(f"scorers: unknown {', '.join(map(repr, bad))}; choose from {', '.join(SCORERS)}")
        check(self.bootstrap >= 10, "bootstrap", "at least 10", self.bootstrap)
        check(self.hard_negatives >= 0, "hard_negatives", "zero or more", self.hard_negatives)
        if self.judge == "llm" and not self.llm.given:
            raise ConfigError("--judge llm needs --llm-url URL --llm-model NAME, or --llm-local MODEL")

    @property
    def scorer_list(self) -> list[str]:
        return [s.strip() for s in self.scorers.split(",") if s.strip()]


@dataclass
class Scored:
    """The per-feature scores ``score`` made, its summary table (one row per score and
    control), the comparison with ``--against`` (one row per score) and the files it wrote."""

    explainer: str
    judge: str
    scores: list[Score]
    table: list[dict[str, Any]]
    errors: dict[int, str]
    seconds: float
    written: list[Path]
    comparison: list[dict[str, Any]] = dc_field(default_factory=list)
    against: str | None = None


def _rows(f: int, explainer: str, judge: str, control: str, values: dict[str, Value],
          extra: dict[str, Any]) -> list[Score]:
    return [Score(f, explainer, judge, k, control, v.value, v.low, v.high, v.n, {**v.details, **extra})
            for k, v in values.items()]


def score_table(scores: Sequence[Score], draws: int = BOOTSTRAP, seed: int = 0) -> list[dict[str, Any]]:
    """Per score kind and control, the mean over features with its bootstrap interval, and chance."""
    rng = np.random.default_rng(seed)
    keys = sorted({(s.scorer, s.control) for s in scores}, key=lambda k: (list(CHANCE).index(k[0]), k[1]))
    return [{"scorer": sc, "control": ctl or "own explanation", "chance": CHANCE[sc],
             **summary([s.value for s in scores if (s.scorer, s.control) == (sc, ctl)], rng, draws)}
            for sc, ctl in keys]


def score_job(job: ScoreJob, *, say: Callable[[str], None] = print) -> Scored:
    """Score the chosen features' explanations (and the shuffled control); store and summarise."""
    path = job.path()
    db = FeatureDB(path)
    t0 = time.perf_counter()
    with Interpretations(path) as store:
        expl = {e.feature: e for e in store.explanations(job.explainer)}
        if not expl:
            known = ", ".join(store.explainers()) or "none yet"
            raise InputError(f"{path}: no {job.explainer!r} explanations to score (explainers here: {known}); "
                             f"run `dictlens explain {job.run}` first")
        feats = [f for f in choose_features(db, job.features, job.max_features, job.seed, among=list(expl))
                 if f in expl]
        judge: Judge
        if job.judge == "pattern":
            judge = PatternJudge()
            settings: dict[str, Any] = {}
        else:
            from dictlens.interpret.asking import LLMJudge

            llm_judge = LLMJudge(open_chat(job.llm, path / CACHE_DIR), job.llm)
            judge, settings = llm_judge, llm_judge.settings
        have = {(s.feature, s.control) for s in store.scores(job.explainer, judge.name)
                if s.scorer in job.scorer_list}
        partner = dict(zip(feats, np.asarray(feats)[derangement(len(feats), np.random.default_rng(job.seed))].tolist(),
                           strict=True))
        controls = ["", "shuffled"] if job.shuffled and len(feats) > 1 else [""]
        todo = [(f, c) for f in feats for c in controls if job.force or (f, c) not in have]
        errors: dict[int, str] = {}
        samples: dict[int, Sample] = {}
        bar = _bar(len(todo), f"score ({job.explainer} by {judge.name})")

        def one(item: tuple[int, str]) -> list[Score]:
            f, control = item
            if f not in samples:
                samples[f] = scoring_sample(db, f, job.hard_negatives)
            lent = expl[partner[f]] if control else expl[f]
            values = score(judge, lent, samples[f], job.scorer_list, seed=job.seed, draws=job.bootstrap)
            extra = {**settings, **({"explanation_of": lent.feature} if control else {})}
            return _rows(f, job.explainer, judge.name, control, values, extra)

        def done(item: tuple[int, str], r: list[Score] | LLMError) -> None:
            if isinstance(r, LLMError):
                errors[item[0]] = str(r)
            else:
                store.put_scores(r)
            bar.update(1)

        pmap(one, todo, 1, done)
        bar.close()
        chosen = set(feats)
        scores = [s for s in store.scores(job.explainer, judge.name) if s.feature in chosen
                  and s.scorer.split("_")[0] in job.scorer_list]      # detection_auc comes with detection
    comparison: list[dict[str, Any]] = []
    label = None
    if job.against:
        other, label = against_analysis(job.against, path, db, say)
        theirs = other_scores(job, other, len(feats), label, say, shuffled=job.shuffled)
        comparison = compare_table(scores, theirs, label, job.bootstrap, job.seed)
        scores += theirs
    db.close()
    if job.random_control:
        from dictlens.interpret.controls import random_analysis

        scores += other_scores(job, random_analysis(path, job.seed, say=say), len(feats), "random directions", say)
    table = score_table(scores, job.bootstrap, job.seed)
    seconds = time.perf_counter() - t0
    stem = f"scores-{job.explainer}-{judge.name}".replace(":", "_").replace("/", "_")
    out_json, out_png = path / f"{stem}.json", path / f"{stem}.png"
    atomic_write_json(out_json, {"explainer": job.explainer, "judge": judge.name, "features": feats,
                                 "table": table, "against": label, "comparison": comparison,
                                 "errors": {str(k): v for k, v in errors.items()},
                                 "seconds": seconds, "settings": settings})
    plot_scores(scores, out_png, f"{job.explainer} explanations, judged by {judge.name}")
    return Scored(job.explainer, judge.name, scores, table, errors, seconds, [out_json, out_png], comparison, label)


def against_analysis(spec: str, path: Path, db: FeatureDB, say: Callable[[str], None]) -> tuple[Path, str]:
    """The analysis ``--against`` names, and how the tables call it: the model's neurons
    (built on first use, :mod:`dictlens.interpret.controls`), or another dictionary's
    analysis, refused unless it was made over the same text of the same model."""
    from dictlens.interpret.controls import neuron_analysis, neuron_layer

    if spec.partition(":")[0] == "neurons":
        layer = neuron_layer(str(db.meta["hook"]), spec)
        return neuron_analysis(path, layer, say=say), f"neurons (mlp_hidden.{layer})"
    other = AnalysisDir(run=spec).path()
    if other.resolve() == path.resolve():
        raise ConfigError(f"against: {spec} is the analysis being scored; name another dictionary's")
    theirs = FeatureDB(other)
    try:
        mine, yours = db.meta["config"], theirs.meta["config"]
        if db.meta.get("model") != theirs.meta.get("model"):
            raise InputError(f"against: {other} analyses {theirs.meta.get('model')}, this analysis "
                             f"{db.meta.get('model')}; dictionaries of different models are not compared")
        for key in ("text", "text_field", "tokens", "skip_tokens", "context"):
            if mine.get(key) != yours.get(key):
                raise InputError(f"against: {other} was analysed with {key} {yours.get(key)!r}, this analysis with "
                                 f"{mine.get(key)!r}; analyse both over the same text to compare them")
    finally:
        theirs.close()
    return other, spec


def other_scores(job: ScoreJob, other: Path, n: int, label: str, say: Callable[[str], None], *,
                 shuffled: bool = False) -> list[Score]:
    """The scores of ``n`` features of another dictionary's analysis (a control, a baseline,
    another run), explained and judged as ``job`` explains and judges, and labelled ``label``
    (its shuffled control ``label, shuffled``)."""
    from dataclasses import replace

    kind = "tokens" if job.explainer == "tokens" else "llm"
    if kind == "llm" and not job.llm.given:
        raise ConfigError(f"{label} is explained as {job.explainer!r} explains: give the same --llm-url/--llm-model "
                          f"or --llm-local")
    explain_job(ExplainJob(run=str(other), explainer=kind, max_features=n, seed=job.seed, llm=job.llm), say=say)
    sub = score_job(replace(job, run=str(other), analysis=None, features=None, max_features=n, shuffled=shuffled,
                            random_control=False, against=None), say=say)
    return [replace(s, control=label if not s.control else f"{label}, {s.control}") for s in sub.scores]


def compare_table(scores: Sequence[Score], theirs: Sequence[Score], label: str, draws: int = BOOTSTRAP,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Per score, this dictionary's mean over its features beside ``label``'s, and their
    difference with its interval and Mann–Whitney p (own explanations only)."""
    rng = np.random.default_rng(seed)
    out = []
    for sc in [k for k in CHANCE if any(s.scorer == k and not s.control for s in scores)]:
        a = [s.value for s in scores if s.scorer == sc and not s.control]
        b = [s.value for s in theirs if s.scorer == sc and s.control == label]
        out.append({"scorer": sc, "chance": CHANCE[sc], "this": summary(a, rng, draws), "other": summary(b, rng, draws),
                    **difference(a, b, rng, draws)})
    return out


def plot_scores(scores: Sequence[Score], path: Path, title: str) -> Path:
    """One histogram over features per score: own explanations, the shuffled control, and
    every other dictionary scored beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dictlens.eval.plots import save_figure

    kinds = [k for k in CHANCE if any(s.scorer == k for s in scores)]
    controls = list(dict.fromkeys(s.control for s in sorted(scores, key=lambda s: s.control != "")))
    colours = ["tab:blue", "tab:grey", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(3.6 * max(len(kinds), 1), 3.0), squeeze=False)
    for ax, k in zip(axes[0], kinds, strict=False):
        lo = -1.0 if k == "simulation" else 0.0
        bins = np.linspace(lo, 1.0, 21)
        for control, colour in zip(controls, colours, strict=False):
            v = [s.value for s in scores if s.scorer == k and s.control == control and s.value is not None]
            if v:
                name = control or "this dictionary"
                ax.hist(v, bins=bins, alpha=0.55, color=colour, label=f"{name} (mean {np.mean(v):.2f})")
        ax.axvline(CHANCE[k], color="k", lw=0.8, ls="--")
        ax.set_title(k.replace("_", " "))
        ax.set_xlabel("score")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("features")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
