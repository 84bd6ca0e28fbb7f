"""Explainers and judges side by side on one analysis: scores, controls and wall time.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/interpret.py runs/demo/sae --features 300 --llm-features 20 \\
        --json docs/interpret.json

Runs, on the same seeded sample of features:
1. the offline ``tokens`` explainer judged by its own pattern (every scorer), with the
   shuffled and random-directions controls;
2. the same explanations judged by the local chat model (detection and fuzzing);
3. the local chat model's own explanations, judged by itself (detection and fuzzing).
The local model is the embedded SmolLM2-135M unless ``--llm-local`` names another.
Nothing else should run on the machine while it is timed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from dictlens.interpret.jobs import ExplainJob, ScoreJob, explain_job, score_job
from dictlens.interpret.llm import LLMConfig


def step(name: str, fn: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = fn()
    return {"step": name, "seconds": round(time.perf_counter() - t0, 1), "table": getattr(r, "table", None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--features", type=int, default=300)
    ap.add_argument("--llm-features", type=int, default=20)
    ap.add_argument("--llm-local", default="smollm2-135m")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    llm = LLMConfig(llm_local=a.llm_local, max_tokens=60)
    name = f"llm:{a.llm_local}"
    out = [
        step("tokens explainer", lambda: explain_job(ExplainJob(run=a.run, max_features=a.features, force=True))),
        step("tokens explanations, pattern judge, with controls",
             lambda: score_job(ScoreJob(run=a.run, max_features=a.features, force=True, random_control=True))),
        step(f"tokens explanations, {name} judge",
             lambda: score_job(ScoreJob(run=a.run, max_features=a.llm_features, judge="llm", llm=llm,
                                        scorers="detection,fuzzing", force=True))),
        step(f"{name} explainer",
             lambda: explain_job(ExplainJob(run=a.run, explainer="llm", llm=llm, max_features=a.llm_features))),
        step(f"{name} explanations, {name} judge",
             lambda: score_job(ScoreJob(run=a.run, explainer=name, judge="llm", llm=llm, max_features=a.llm_features,
                                        scorers="detection,fuzzing", force=True))),
    ]
    for s in out:
        print(f"\n## {s['step']} ({s['seconds']} s)")
        for row in s["table"] or []:
            ci = f" [{row['low']:.3f}, {row['high']:.3f}]" if row["low"] is not None else ""
            mean = "–" if row["mean"] is None else f"{row['mean']:.3f}"
            print(f"| {row['scorer']} | {row['control']} | {mean}{ci} | {row['features']} |")
    if a.json:
        a.json.write_text(json.dumps({"run": a.run, "features": a.features, "llm_features": a.llm_features,
                                      "llm": a.llm_local, "steps": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
