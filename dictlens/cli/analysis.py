"""``dictlens analyze``, ``report``, ``serve``, ``search``, ``compare``: the feature database,
its report and app, and matching dictionaries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dictlens.analysis.collect import AnalyzeJob
from dictlens.analysis.compare import CompareJob
from dictlens.analysis.db import AnalysisDir, feature_ranges
from dictlens.cli.common import command, written
from dictlens.config import field
from dictlens.errors import ConfigError
from dictlens.formats.preflight import FORCE_HELP


@dataclass(kw_only=True)
class Report(AnalysisDir):
    """The static HTML report of an analysis: an index and one page per feature."""

    out: str | None = field(None, help="report directory (default: ANALYSIS/report)")
    features: str | None = field(None, help="only these features' pages, e.g. 0-99,120 (default: all)")

    def feature_ids(self) -> list[int] | None:
        return feature_ranges(self.features)


@dataclass(kw_only=True)
class Serve(AnalysisDir):
    """The local web app over an analysis: features, live text, token search, steering."""

    host: str = field("127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    port: int = field(8000, help="port")
    model: str | None = field(None, help="model for live text (default: the analysis's)")
    device: str | None = field(None, help="cpu or cuda for live text")
    compare: str | None = field(None, help="another SAE run to match this one against (seeds, widths, layers)")


@dataclass(kw_only=True)
class Search(AnalysisDir):
    """The features that fire on a text (run live), that are most active on a token (analysed
    text), or whose explanation says something."""

    text: str | None = field(None, help="a text to run through the model and the SAE")
    token: str | None = field(None, help="a token of the analysed text, e.g. the")
    explanation: str | None = field(None, help="words of an explanation (`dictlens explain`), e.g. 'after the'")
    model: str | None = field(None, help="model for --text (default: the SAE's)")
    n: int = field(20, short="-n", help="features listed")
    force: bool = field(False, help=FORCE_HELP)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.text, self.token, self.explanation)) != 1:
            raise ConfigError("search: give exactly one of --text, --token or --explanation")


def _analyze(job: AnalyzeJob) -> int:
    from dictlens.analysis.collect import analyze_job

    a = analyze_job(job)
    r = a.result
    print(f"{r.tokens:,} tokens in {r.contexts:,} contexts, {r.seconds:.1f} s ({r.tokens / r.seconds:,.0f} tok/s); "
          f"{int((r.stats.count > 0).sum()):,} of {a.sae.n_features:,} features fired"
          + (f"; {r.outliers:,} outlier tokens skipped" if r.outliers else ""))
    print(f"feature database: {r.path / 'features.db'} (codes in {r.path / 'codes'})")
    if a.report is not None:
        print(f"report: {a.report.resolve()} (open it in a browser; `dictlens serve {job.run}` for the app)")
    return 0


def _report(job: Report) -> int:
    from dictlens.app.report import write_report

    index = write_report(job.path(), job.out, features=job.feature_ids())
    print(f"report: {index.resolve()}")
    return 0


def _serve(job: Serve) -> int:
    from dictlens.app.server import serve

    serve(job.path(), host=job.host, port=job.port, model=job.model, device=job.device, compare=job.compare)
    return 0


def _search(job: Search) -> int:
    if job.token is not None:
        return _search_token(job, job.token)
    if job.explanation is not None:
        return _search_explanation(job, job.explanation)
    from dictlens.analysis.search import features_on_text
    from dictlens.load import load_run

    run = load_run(job.run, model=job.model, force=job.force)
    r = features_on_text(run.sae, run.lm, run.hook, str(job.text), max_norm=run.max_norm)
    print(f"{len(r.features):,} features fire on the text's {len(r.tokens)} tokens; strongest first:")
    print("| feature | max | tokens |\n|---:|---:|---:|")
    for f in r.features[:job.n]:
        print(f"| {f['id']} | {f['max']:.3g} | {f['tokens']} |")
    print("\ntoken by token:")
    for t in r.tokens:
        print(f"  {t.text!r:>16}  " + "  ".join(f"{i}:{v:.3g}" for i, v in t.features[:6]))
    return 0


def _search_token(job: Search, token: str) -> int:
    from dictlens.analysis.db import FeatureDB

    db = FeatureDB(job.path())
    hits = db.features_for_token(token, n=job.n)
    if not hits:
        print(f"{token!r} does not occur among the {db.meta['tokens']:,} analysed tokens")
        return 0
    print(f"features most active on {token!r} over its {hits[0]['occurrences']:,} occurrences:")
    print("| feature | mean activation | fires on | top logit-lens tokens |\n|---:|---:|---:|---|")
    for h in hits:
        lens = " ".join(repr(t["token"]) for t in db.feature(h["id"])["logit_top"][:5])
        print(f"| {h['id']} | {h['mean']:.3g} | {h['fires']:.1%} | {lens} |")
    return 0


def _search_explanation(job: Search, words: str) -> int:
    from dictlens.analysis.db import FeatureDB
    from dictlens.app.render import interpretation
    from dictlens.interpret.store import Interpretations

    path = job.path()
    db = FeatureDB(path)
    with Interpretations(path, readonly=True) as st:
        hits = st.search(words, limit=job.n)
    if not hits:
        print(f"no explanation says {words!r}" + ("" if st.present else " (nothing is explained yet: run "
                                                  "`dictlens explain` first)"))
        return 0
    explained = interpretation(db, [e.feature for e in hits])
    print(f"explanations that say {words!r}:")
    print("| feature | density | explainer | explanation | detection AUC |\n|---:|---:|---|---|---:|")
    for e in hits:
        auc = next((s["value"] for x in explained.get(e.feature, []) if x["explainer"] == e.explainer
                    for s in x["scores"] if s["scorer"] == "detection auc"), None)
        print(f"| {e.feature} | {db.feature(e.feature)['density']:.2%} | {e.explainer} | {e.text} | "
              f"{'–' if auc is None else f'{auc:.3f}'} |")
    return 0


def _compare(job: CompareJob) -> int:
    from dictlens.analysis.compare import compare_job

    c = compare_job(job)
    for r in c.pairs:
        print(f"{r['a']} ({r['hook_a']}, {r['features_a']:,}) ↔ {r['b']} ({r['hook_b']}, {r['features_b']:,}): "
              f"MMCS {r['mmcs_a_to_b']:.3f} / {r['mmcs_b_to_a']:.3f}, Hungarian mean cos "
              f"{r['hungarian_mean_cos']:.3f}, matched above 0.7: {r['matched_above_0.7']:.1%}")
        if "splitting" in r:
            sp = r["splitting"]
            print(f"  splitting: {sp['wide_features']:,} wide features; their cosine and co-activation parents "
                  f"agree for {sp['parents_agree']:.1%}; {sp['children_mean']:.2f} children per narrow feature "
                  f"(max {sp['children_max']}), {sp['narrow_without_children']:.1%} with none")
    print(written(c.written))
    return 0


def add_parsers(sub: Any) -> None:
    command(sub, "analyze", "per-feature statistics, examples, logit lens: the feature database", AnalyzeJob,
            _analyze)
    command(sub, "report", "write the static HTML report of an analysis", Report, _report)
    command(sub, "serve", "browse features, run text, search: the local web app", Serve, _serve)
    command(sub, "search", "features that fire on a text (--text) or on a token (--token)", Search, _search)
    command(sub, "compare", "match the features of SAEs (seeds, widths, layers): MMCS, Hungarian, splitting",
            CompareJob, _compare)
