"""``dictlens demo``: the main job on the embedded default model and text, composed of the
library's steps: harvest, train (with a held-out tail), analyze, explain and score, the report, steer."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dictlens.cli.common import command, print_cache_summary, print_heldout, side_by_side
from dictlens.config import field

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE

MODEL, HOOK = "smollm2-135m", "resid_post.15"


@dataclass(kw_only=True)
class Demo:
    """Harvest the default model's activations, train a TopK SAE on them, analyse it (the report),
    steer the model with one of its features."""

    out: str = field("runs/demo", help="output directory")
    tokens: int = field(100_000, help="tokens to harvest")
    train_tokens: int = field(1_000_000, help="SAE training tokens")
    analyze_tokens: int = field(40_000, help="tokens analysed for the report, after the harvested ones")
    scored: int = field(1_000, help="features whose explanations are scored (a random sample; all are explained)")
    report: bool = field(True, help="write the HTML report (one page per feature)")


def _demo(job: Demo) -> int:
    from dictlens.data.cache import HarvestConfig, harvest
    from dictlens.data.text import describe_default

    out = Path(job.out)
    print(f"demo 1/4: harvest {MODEL} over the default text ({describe_default()})")
    result = harvest(HarvestConfig(hooks=[HOOK, "mlp_out.15"], out=str(out / "acts"), tokens=job.tokens,
                                   context=128, outlier_factor=10.0, shard_tokens=8192))
    print_cache_summary(result.manifest, result.seconds, result.new_tokens)
    print(f"activation cache: {result.path}")
    sae = _step_train(job, out)
    lm, analysis = _step_analyze(job, sae, out / "sae")
    _step_steer(sae, lm, analysis, out / "sae")
    return 0


def _step_train(job: Demo, out: Path) -> SAE:
    """Step 2; a run left by an older dictlens with other defaults is moved aside, not lost."""
    from dictlens.errors import CheckpointMismatch
    from dictlens.sae.config import SAEConfig
    from dictlens.sae.model import SAE
    from dictlens.train.config import TrainConfig
    from dictlens.train.job import TrainJob, train_job

    print(f"\ndemo 2/4: train a TopK SAE (k=32, 16x = 9,216 features) on {HOOK}")
    run = out / "sae"
    train = TrainJob(out=str(run), acts=str(out / "acts"), hooks=[HOOK], model=MODEL, resume=True,
                     heldout_tokens=8192, ks=[32], expansions=[16], sae=SAEConfig(activation="topk"),
                     train=TrainConfig(tokens=job.train_tokens, batch_size=4096, log_every=5))
    try:
        [t] = train_job(train)
    except CheckpointMismatch:
        previous = run.with_name(run.name + ".previous")
        if previous.exists():
            shutil.rmtree(previous)
        run.rename(previous)
        print(f"the SAE in {run} was trained with other settings; moved it to {previous}, training afresh")
        [t] = train_job(train)
    assert t.metrics is not None and isinstance(t.sae, SAE)
    print_heldout(t.metrics)
    print(f"SAE: {run} (config.json, sae.safetensors); curves: {run / 'curves.png'}")
    return t.sae


def _step_analyze(job: Demo, sae: SAE, run: Path) -> tuple[LoadedModel, Path]:
    """Step 3: text the SAE never saw (after the harvested tokens) through the analysis and the report."""
    from dictlens.analysis.collect import AnalysisConfig, analyze
    from dictlens.data.models import load_model

    print(f"\ndemo 3/4: what the features fire on: {job.analyze_tokens:,} tokens the SAE never saw"
          + (", the report" if job.report else ""))
    lm = load_model(MODEL)
    an = analyze(sae, lm, HOOK, AnalysisConfig(tokens=job.analyze_tokens, skip_tokens=job.tokens),
                 run / "analysis", run=str(run))
    print(f"{an.tokens:,} tokens at {an.tokens / an.seconds:,.0f} tok/s; "
          f"{int((an.stats.count > 0).sum()):,} of {sae.n_features:,} features fired")
    _step_explain(job, sae, run)
    if job.report:
        from dictlens.app.report import write_report

        print(f"report: {write_report(an.path).resolve()}")
    print(f"(browse it with `dictlens serve {run}`: live text, search by token, steering)")
    return lm, an.path


def _step_explain(job: Demo, sae: SAE, run: Path) -> None:
    """Step 3, continued: every feature explained by the offline pattern explainer; a sample's
    explanations scored by their own patterns, beside the shuffled control."""
    from dictlens.cli.interpret import print_scores
    from dictlens.interpret.jobs import ExplainJob, ScoreJob, explain_job, score_job

    e = explain_job(ExplainJob(run=str(run), max_features=sae.n_features))
    print(f"explained {len(e.explained) + len(e.kept):,} features by their tokens ({e.seconds:.1f} s); "
          f"scoring {min(job.scored, len(e.explained) + len(e.kept)):,} of them:")
    print_scores(score_job(ScoreJob(run=str(run), max_features=job.scored)))
    print(f"(`dictlens score {run} --judge llm --llm-url URL --llm-model NAME` has a chat model judge them)")


def _step_steer(sae: SAE, lm: LoadedModel, analysis: Path, run: Path) -> None:
    """Step 4: the feature most active on a topical word, added to the residual stream while
    the model continues a neutral prompt."""
    from dictlens.analysis.db import FeatureDB
    from dictlens.use.splice import Edit
    from dictlens.use.steer import GenerateConfig, steered_generation

    db = FeatureDB(analysis)
    hits = next(((w, h) for w in (" money", " love", " war", " water") if (h := db.features_for_token(w, n=1))), None)
    if hits is None:
        print("\ndemo 4/4: skipped (none of the topical words occurs in the analysed text)")
        return
    word, f = hits[0], db.feature(hits[1][0]["id"])
    coeff = float(f"{f['max']:.3g}")
    prompt = "I went to the market and"
    print(f"\ndemo 4/4: steer with feature {f['id']}, the one most active on {word!r}: add {coeff:g} × its "
          f"direction (its largest activation) at every position")
    g = steered_generation(lm, {HOOK: sae}, {HOOK: [Edit(int(f["id"]), "add", coeff)]}, prompt,
                           GenerateConfig(max_new_tokens=30), max_norm=sae.provenance.outlier_limit)
    print(f"prompt: {prompt!r}\n")
    print(side_by_side(g.unsteered, g.steered, ("unsteered", "steered"), width=100))
    print(f"\n(`dictlens generate {run} --prompt \"...\" --steer {f['id']}:{coeff:g}` does this for any prompt)")


def add_parsers(sub: Any) -> None:
    command(sub, "demo", "the main job on the embedded default model and text", Demo, _demo)
