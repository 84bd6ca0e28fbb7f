"""``dictlens generate``, ``ablate``, ``monitor``, ``attribute``: using a dictionary's features."""

from __future__ import annotations

import sys
from typing import Any

from dictlens.cli.common import command, side_by_side, written
from dictlens.use.jobs import AblateJob, AttributeJob, GenerateJob, MonitorJob


def _generate(job: GenerateJob) -> int:
    from dictlens.use.jobs import generate_job

    s = generate_job(job)
    cfg = job.generation
    for hook, es in s.edits.items():
        what = ", ".join(f"{e.kind} {e.feature}" + (f" {e.value:g}" if e.kind != "zero" else "") for e in es)
        print(f"{s.runs[hook]} at {hook} of {s.model}: {what}"
              + (f" from position {job.from_pos}" if job.from_pos else "")
              + f" (activation norm on the prompt: median {s.median_norm[hook]:.3g})")
    print((f"sampled with seed {cfg.seed}, temperature {cfg.temperature:g}" if cfg.temperature > 0 else "greedy")
          + (", error term kept" if job.error_term else ", on the SAE reconstruction (no error term)"))
    print(f"prompt: {job.prompt!r}\n")
    print(side_by_side(s.generation.unsteered, s.generation.steered, ("unsteered", "steered"), width=job.width))
    return 0


def _ablate(job: AblateJob) -> int:
    from dictlens.use.jobs import ablate_job

    r = ablate_job(job)
    where = f"{job.prompt!r}" if job.prompt is not None else f"{job.text} ({r.n_predictions:,} predictions)"
    print(f"{job.mode}-ablating {', '.join(map(str, r.features))} of {job.run} at {r.hook} on {where}")
    print("  positions where each fired: " + ", ".join(f"{f}: {n:,}" for f, n in r.fired.items()))
    if r.means:
        print("  set to their means: " + ", ".join(f"{f}: {v:.4g}" for f, v in r.means.items()))
    if r.n_predictions:
        print(f"  next-token loss: clean {r.ce_clean:.4f}  ablated {r.ce_ablated:.4f}  Δ {r.delta_loss:+.4f} nats")
    if r.tokens:
        print(f"  tokens {'at the last position' if job.prompt is not None else 'averaged over positions'}:")
        print("  | token | logit clean | ablated | Δ logit | log p clean | ablated |\n  |---|---:|---:|---:|---:|---:|")
        for t in r.tokens:
            print(f"  | {t.token!r} | {t.logit_clean:.3f} | {t.logit_ablated:.3f} | {t.delta_logit:+.3f} | "
                  f"{t.logprob_clean:.3f} | {t.logprob_ablated:.3f} |")
    return 0


def _monitor(job: MonitorJob) -> int:
    from dictlens.use.jobs import monitor_job

    m = monitor_job(job)
    print(f"monitor: {m.events:,} events from {m.documents:,} documents in {m.seconds:.1f} s", file=sys.stderr)
    return 0


def _attribute(job: AttributeJob) -> int:
    from dictlens.use.jobs import attribute_job

    a = attribute_job(job)
    r = a.result
    print(f"{r.metric} = {r.value:.4f} on {job.prompt!r}")
    for hook, nodes in r.nodes.items():
        print(f"\n{hook}: Σ x·∂m/∂x = {r.total[hook]:+.4f}; features by attribution (ablation: m − m with the "
              f"feature zeroed, error term kept)")
        print("| feature | attribution | ablation | max code | strongest at |\n|---:|---:|---:|---:|---|")
        for n in nodes:
            abl = f"{n.ablation:+.4f}" if n.ablation is not None else "–"
            at = f"{n.token!r} (pos {n.position})" if n.position >= 0 else ""
            print(f"| {n.feature} | {n.attribution:+.4f} | {abl} | "
                  f"{f'{n.activation:.3g}' if isinstance(n.feature, int) else ''} | {at} |")
    print("\nrest: the features not listed; error: x − x̂; bias: b_dec; untouched: special tokens and outlier "
          "positions (no codes). Each hook's rows add up to Σ x·∂m/∂x.")
    _print_checks(r, job.top)
    if a.written:
        print("\n" + written(a.written))
    return 0


def _print_checks(r: Any, top: int) -> None:
    """How well attribution agrees with real ablation, and the strongest edges."""
    agree = r.agreement()
    if agree:
        print(f"\nattribution vs real ablation over {agree['checked']} features: same sign "
              f"{agree['same_sign']:.0%}, Pearson r {agree['pearson_r']:.3f}")
    if r.edges:
        print("\nstrongest edges (linear effect of the upstream feature on the downstream one's attribution):")
        print("| from | to | weight |\n|---|---|---:|")
        for e in sorted(r.edges, key=lambda e: -abs(e.weight))[:top]:
            print(f"| {e.hook_up}/{e.up} | {e.hook_down}/{e.down} | {e.weight:+.4f} |")


def add_parsers(sub: Any) -> None:
    command(sub, "generate", "continue a prompt with and without steering, side by side", GenerateJob, _generate)
    command(sub, "ablate", "zero or mean-ablate features: change in loss and in chosen tokens' logits", AblateJob,
            _ablate)
    command(sub, "monitor", "stream text through the model; one JSON event per firing above threshold", MonitorJob,
            _monitor)
    command(sub, "attribute", "rank features by attribution patching, check by ablation; edges across SAEs",
            AttributeJob, _attribute)
