"""``dictlens explain`` and ``score``: what features mean, and how well that is said."""

from __future__ import annotations

from typing import Any

from dictlens.cli.common import command, written
from dictlens.interpret.jobs import ExplainJob, Scored, ScoreJob


def _interval(row: dict[str, Any]) -> str:
    if row["mean"] is None:
        return "–"
    ci = f" [{row['low']:.3f}, {row['high']:.3f}]" if row["low"] is not None else ""
    return f"{row['mean']:.3f}{ci}"


def _errors(errors: dict[int, str], what: str) -> int:
    if not errors:
        return 0
    for f, e in sorted(errors.items())[:5]:
        print(f"  feature {f}: {e}")
    print(f"{len(errors):,} features could not be {what} (kept out, nothing else lost): run the same command "
          f"again to retry them")
    return 1


def _explain(job: ExplainJob) -> int:
    from dictlens.analysis.db import FeatureDB
    from dictlens.interpret.jobs import explain_job
    from dictlens.interpret.store import Interpretations

    r = explain_job(job)
    print(f"{r.explainer}: {len(r.explained):,} features explained, {len(r.kept):,} already were "
          f"({r.seconds:.1f} s)" + (f"; {r.notes['cache_hits']:,} replies from the cache" if r.notes else ""))
    path = job.path()
    with Interpretations(path, readonly=True) as store:
        shown = store.explanations(r.explainer, features=(r.explained or r.kept)[:8])
    db = FeatureDB(path)
    for e in shown:
        print(f"  {e.feature:>6} (density {db.feature(e.feature)['density']:.2%}): {e.text}")
    print(written(r.written))
    return _errors(r.errors, "explained")


def _score(job: ScoreJob) -> int:
    from dictlens.interpret.jobs import score_job

    r = score_job(job)
    print_scores(r)
    print(written(r.written))
    return _errors(r.errors, "scored")


def print_scores(r: Scored) -> None:
    """The summary table of ``dictlens score`` (and of the demo)."""
    n = len({s.feature for s in r.scores})
    print(f"{r.explainer} explanations judged by {r.judge}: {n:,} features ({r.seconds:.1f} s); mean over features "
          f"with 95% bootstrap intervals:")
    print("| score | explanation | mean [95% CI] | features | chance |\n|---|---|---:|---:|---:|")
    for row in r.table:
        print(f"| {row['scorer'].replace('_', ' ')} | {row['control']} | {_interval(row)} | {row['features']:,} | "
              f"{row['chance']:g} |")


def add_parsers(sub: Any) -> None:
    command(sub, "explain", "explain features from their top examples (tokens pattern, or a chat model)",
            ExplainJob, _explain)
    command(sub, "score", "score explanations: detection, fuzzing, simulation, with a shuffled control",
            ScoreJob, _score)
