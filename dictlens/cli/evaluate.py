"""``dictlens eval``: held-out metrics of a trained SAE, and its splice into the model."""

from __future__ import annotations

from typing import Any

from dictlens.cli.common import command, print_metrics, written
from dictlens.eval.job import EvalJob


def _eval(job: EvalJob) -> int:
    from dictlens.eval.job import eval_job

    e = eval_job(job)
    part = f", last {job.heldout:,} tokens" if job.heldout else ""
    print(f"{job.run} on {job.acts} ({e.hook}{part}):")
    print_metrics(e.metrics)
    s = e.spliced
    if s is not None:
        held = f"; {s.n_outliers:,} positions above the cache's outlier limit kept clean" if s.n_outliers else ""
        print(f"spliced into {e.record['spliced']['model']} at {e.hook} ({s.n_tokens:,} predictions, "
              f"{job.splice.splice_text}{held}):")
        print(f"  CE clean {s.ce_clean:.4f}  with SAE {s.ce_sae:.4f}  zero-ablated {s.ce_zero:.4f}"
              f"  mean-ablated {s.ce_mean:.4f} (nats)")
        print(f"  ΔLM loss {s.delta_lm_loss:+.4f} nats  KL {s.kl_sae:.4f}  loss recovered: "
              f"{s.recovered_vs_zero:.2%} vs zero, {s.recovered_vs_mean:.2%} vs mean")
    print(written(e.written))
    return 0


def add_parsers(sub: Any) -> None:
    command(sub, "eval", "held-out metrics of a trained SAE (JSON, table, density PNG)", EvalJob, _eval)
