"""``dictlens explain`` and ``score``: what features mean, and how well that is said."""

from __future__ import annotations

from typing import Any

from dictlens.cli.common import command, written
from dictlens.interpret.agreement import AgreementJob
from dictlens.interpret.contrast import ContrastJob
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
    n = len({s.feature for s in r.scores if not s.control})
    print(f"{r.explainer} explanations judged by {r.judge}: {n:,} features ({r.seconds:.1f} s); mean over features "
          f"with 95% bootstrap intervals:")
    print("| score | explanation | mean [95% CI] | features | chance |\n|---|---|---:|---:|---:|")
    for row in r.table:
        print(f"| {row['scorer'].replace('_', ' ')} | {row['control']} | {_interval(row)} | {row['features']:,} | "
              f"{row['chance']:g} |")
    if r.comparison:
        print(f"\nthis dictionary against {r.against} (own explanations; the difference is this minus that, "
              f"with a 95% bootstrap interval over features, and Mann-Whitney's p):")
        print(f"| score | this | {r.against} | difference | p | chance |\n|---|---:|---:|---:|---:|---:|")
        for c in r.comparison:
            d = "–" if c["difference"] is None else _interval({"mean": c["difference"], "low": c["low"],
                                                               "high": c["high"]})
            p = "–" if c["p"] is None else f"{c['p']:.2g}"
            print(f"| {c['scorer'].replace('_', ' ')} | {_interval(c['this'])} | {_interval(c['other'])} | {d} | "
                  f"{p} | {c['chance']:g} |")


def _stat(d: dict[str, Any]) -> str:
    if d["value"] is None:
        return f"– ({d['units']:,} units)"
    ci = f" [{d['low']:.3f}, {d['high']:.3f}]" if d["low"] is not None else ""
    return f"{d['value']:.3f}{ci} ({d['units']:,} units)"


def _agreement(job: AgreementJob) -> int:
    from dictlens.interpret.agreement import agreement_job

    a = agreement_job(job)
    r = a.result
    if a.imported:
        print(f"imported {a.imported:,} labels from {job.import_csv}")
    print(f"{len(r['raters'])} raters ({', '.join(f'{k}: {v:,}' for k, v in r['labels'].items())} labels) "
          f"on {r['features']:,} features; 95% bootstrap intervals over features")
    rt, cx = r["ratings"], r["contexts"]
    print("| statistic | ratings (1–5) | context marks |\n|---|---:|---:|")
    print(f"| Krippendorff's alpha, ordinal | {_stat(rt['krippendorff_alpha_ordinal'])} | |")
    print(f"| Krippendorff's alpha, nominal | {_stat(rt['krippendorff_alpha_nominal'])} | "
          f"{_stat(cx['krippendorff_alpha_nominal'])} |")
    for k, kq, kc in zip(rt["cohen_kappa"], rt["cohen_kappa_quadratic"], cx["cohen_kappa"], strict=True):
        pair = " & ".join(k["raters"])
        print(f"| Cohen's kappa, {pair} | {_stat(k)}; quadratic {_stat(kq)} | {_stat(kc)} |")
    for rater, d in cx["human_detection"].items():
        ba = "–" if d["balanced_accuracy"] is None else f"{d['balanced_accuracy']:.3f}"
        print(f"human detection of {rater}: balanced accuracy {ba} over {d['contexts']:,} marked contexts")
    auto = r["automated"]
    for k, d in r["against_automated"].items():
        print(f"Spearman of {k.replace('_', ' ')} with {auto['explainer']} {auto['score']} by {auto['judge']}: "
              f"{_stat(d)}")
    print(written(a.written))
    return 0


def _contrast(job: ContrastJob) -> int:
    from dictlens.interpret.contrast import contrast_job

    c = contrast_job(job)
    r, t = c.result, c.result["texts"]
    print(f"{t['pos']:,} positive and {t['neg']:,} negative texts ({t['shared']:,} in both), split {t['train']:,} "
          f"train / {t['test']:,} test; {r['significant']:,} features separate them at FDR {r['fdr']:g} "
          f"({r['significant_pos']:,} fire more on the positive texts)")
    print("| feature | q (BH) | effect (rank-biserial) | AUC train | AUC test | fires pos / neg | strongest text |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for f in r["features"]:
        ex = f["examples"][0] if f["examples"] else None
        shown = f"[{ex['set']}] {ex['text'][:60]!r}" if ex else ""
        print(f"| {f['id']} | {f['q']:.2g} | {f['effect']:+.3f} | {f['auc_train']:.3f} | {f['auc_test']:.3f} | "
              f"{f['fires_pos']:.0%} / {f['fires_neg']:.0%} | {shown} |")
    print("\nlogistic-regression probes, trained on the train texts, scored on the test texts:")
    for name, pr in r["probes"].items():
        print(f"  {name} ({pr['inputs']:,} inputs): accuracy {pr['accuracy']:.3f}, AUC {pr['auc']:.3f}")
    up = [f for f in r["features"] if f["direction"] == "pos"][:3]
    if up:
        watch = " ".join(f"--feature {f['id']}" for f in up)
        strongest = up[0]["examples"][0]["value"] if up[0]["examples"] else up[0]["mean_pos"]
        print(f"\n(`dictlens monitor {job.run} {watch}` watches them; "
              f"`dictlens generate {job.run} --prompt \"...\" --steer {up[0]['id']}:{strongest:.3g}` "
              f"steers with the first, at its largest activation on the positive texts)")
    print(written(c.written))
    return 0


def add_parsers(sub: Any) -> None:
    command(sub, "explain", "explain features from their top examples (tokens pattern, or a chat model)",
            ExplainJob, _explain)
    command(sub, "score", "score explanations: detection, fuzzing, simulation, with a shuffled control",
            ScoreJob, _score)
    command(sub, "agreement", "inter-rater reliability of the labels, human detection, humans against the scores",
            AgreementJob, _agreement)
    command(sub, "contrast", "features that separate two text sets (rank test, FDR), beside a dense probe",
            ContrastJob, _contrast)
