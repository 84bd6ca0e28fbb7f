"""``dictlens train``, ``sweep``, ``synth``: training one SAE, a grid of them, and every method
on data whose features are known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dictlens.cli.common import command, print_heldout, written
from dictlens.eval.known_features import SynthJob
from dictlens.eval.sweep import SweepJob
from dictlens.train.job import TrainJob


def _train(job: TrainJob) -> int:
    from dictlens.train.job import train_job

    done = train_job(job)
    for t in done:
        on = f" on {t.hook}" if len(done) > 1 else ""
        print(f"trained {t.trainer.state.tokens:,} tokens in {t.trainer.state.step} steps{on}; {t.sae.cfg.family} "
              f"saved to {t.out}")
        if t.metrics is not None:
            print_heldout(t.metrics)
    return 0


def _sweep(job: SweepJob) -> int:
    from dictlens.data.cache import read_manifest
    from dictlens.eval import sweep

    grid = job.grid()
    into = job.model or read_manifest(Path(job.acts))["model"]
    print(f"sweep: {len(grid.points())} SAEs ({len(grid.hooks)} hook(s) × {', '.join(grid.activations)}), "
          f"{job.train.tokens:,} tokens each, judged on the last {job.heldout:,} tokens of {job.acts}"
          + (f", spliced into {into}" if job.splice.splice_text else ""))
    s = sweep.sweep_job(job)
    print(sweep.format_rows(s.rows))
    if len(set(grid.hooks)) > 1:
        print(sweep.format_layers(s.layers))
    print(written(s.written))
    return 0


def _synth(job: SynthJob) -> int:
    from dictlens.eval.known_features import format_table, synth_job

    s = synth_job(job)
    print(format_table(s.rows))
    if s.written:
        print(written(s.written))
    return 0


def add_parsers(sub: Any) -> None:
    command(sub, "train", "train SAEs on a cache (--acts) or streamed activations, several from one pass", TrainJob,
            _train)
    command(sub, "sweep", "train a grid of SAEs from one cache; CSV and sparsity-fidelity frontiers", SweepJob,
            _sweep)
    command(sub, "synth", "recover known features: SAEs beside baselines on synthetic data", SynthJob, _synth)
