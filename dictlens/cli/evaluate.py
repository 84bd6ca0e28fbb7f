"""``dictlens eval``: held-out metrics of a trained SAE, and its splice into the model."""

from __future__ import annotations

from typing import Any

from dictlens.cli.common import command, print_metrics, written
from dictlens.eval.job import EvalJob


def _eval(job: EvalJob) -> int:
    from dictlens.eval.job import eval_job

    e = eval_job(job)
    part = f", last {job.heldout:,} tokens" if job.heldout else ""
    writes = e.record.get("writes")
    print(f"{job.run} on {job.acts} ({e.hook}{f' -> {writes}' if writes else ''}{part}):")
    print_metrics(e.metrics)
    s = e.spliced
    if s is not None:
        held = f"; {s.n_outliers:,} positions above the cache's outlier limit kept clean" if s.n_outliers else ""
        print(f"spliced into {e.record['spliced']['model']} at {e.record['spliced']['writes']} ({s.n_tokens:,} "
              f"predictions, {job.splice.splice_text}{held}):")
        print(f"  CE clean {s.ce_clean:.4f}  with SAE {s.ce_sae:.4f}  zero-ablated {s.ce_zero:.4f}"
              f"  mean-ablated {s.ce_mean:.4f} (nats)")
        print(f"  ΔLM loss {s.delta_lm_loss:+.4f} nats  KL {s.kl_sae:.4f}  loss recovered: "
              f"{s.recovered_vs_zero:.2%} vs zero, {s.recovered_vs_mean:.2%} vs mean  next-token agreement "
              f"{s.agreement:.2%}")
    if e.replaced is not None:
        swapped = e.record["replacement"]["runs"]
        what = f"{len(swapped)} dictionaries" if len(swapped) > 1 else "the cross-layer transcoder"
        print(f"replacement model ({what} spliced together, every MLP output it writes replaced):")
        for name, r in e.replaced.items():
            print(f"  {name.replace('_', ' '):14s} CE {r.ce_sae:.4f} (clean {r.ce_clean:.4f}, all ablated "
                  f"{r.ce_zero:.4f})  KL {r.kl_sae:.4f}  next-token agreement {r.agreement:.2%}")
    print(written(e.written))
    return 0


def add_parsers(sub: Any) -> None:
    command(sub, "eval", "held-out metrics of a trained SAE (JSON, table, density PNG)", EvalJob, _eval)
