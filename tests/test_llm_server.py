"""The HTTP chat client against a real OpenAI-compatible server: llama.cpp's (llama-cpp-python[server]
from PyPI) on the embedded SmolLM2 GGUF.

The server builds from source (about 40 minutes on 2 cores), so it lives in a bench environment
(``bash bench/setup_llama_server.sh``) and not in CI's: this test runs where that environment
exists and is skipped elsewhere. ``bench/llm_server.py`` records its scores and speed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "llm_server.py"


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("llm_server", BENCH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _bench()
pytestmark = pytest.mark.skipif(not bench.LLAMA_PYTHON.is_file(),   # type: ignore[attr-defined]
                                reason="no llama.cpp server here (bash bench/setup_llama_server.sh)")


@pytest.fixture(scope="module")
def server():
    with bench.llama_server() as url:                                  # type: ignore[attr-defined]
        yield url


def test_http_client_talks_to_a_real_llama_cpp_server(server):
    import math

    from dictlens.interpret.llm import HTTPChat

    name = bench.MODEL_NAME                                              # type: ignore[attr-defined]
    chat = HTTPChat(server, name)
    question = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    reply = chat._post({"model": name, "messages": question, "max_tokens": 1, "temperature": 0.0,
                        "logprobs": True, "top_logprobs": 20})
    tops = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    p = {w: sum(math.exp(t["logprob"]) for t in tops if t["token"].strip().lower() == w) for w in ("yes", "no")}
    assert p["yes"] + p["no"] > 0                       # the server's logprobs carry the answer
    assert chat.yes(question, seed=0) == pytest.approx(p["yes"] / (p["yes"] + p["no"]))
    text = chat.complete([{"role": "user", "content": "Name a colour."}], temperature=0.0, seed=0, max_tokens=12)
    assert text.strip()
    # greedy decoding is not repeatable across requests on llama.cpp's server (its prompt cache
    # changes the batch shapes, and so the float sums); reproducibility is the disk cache's job
    # (interpret.llm.Cached, tested offline), and without the prompt cache the reply repeats:
    again = [chat._post({"model": name, "messages": [{"role": "user", "content": "Name a colour."}],
                         "max_tokens": 12, "temperature": 0.0, "seed": 0, "cache_prompt": False})
             ["choices"][0]["message"]["content"] for _ in range(2)]
    assert again[0] == again[1]


def test_explain_and_score_through_the_server(server, analysed_run, capsys):
    from dictlens.cli import main
    from dictlens.interpret.store import Interpretations

    run = analysed_run
    llm = ["--llm-url", server, "--llm-model", bench.MODEL_NAME, "--max-tokens", "24"]    # type: ignore[attr-defined]
    assert main(["explain", str(run), "--explainer", "llm", "--max-features", "3", *llm]) == 0
    label = f"llm:{bench.MODEL_NAME}"                                                         # type: ignore[attr-defined]
    assert f"{label}: 3 features explained" in capsys.readouterr().out
    with Interpretations(run / "analysis", readonly=True) as st:
        ex = st.explanations(label)
    assert len(ex) == 3 and all(e.text for e in ex) and all(e.settings["backend"].startswith("http:") for e in ex)
    assert main(["score", str(run), "--explainer", label, "--judge", "llm", "--scorers", "detection",
                 "--hard-negatives", "2", *llm]) == 0
    table = json.loads((run / "analysis" / f"scores-llm_{bench.MODEL_NAME}-llm_{bench.MODEL_NAME}.json")  # type: ignore[attr-defined]
                       .read_text())["table"]
    assert {(r["scorer"], r["control"]) for r in table} >= {("detection_auc", "own explanation"),
                                                           ("detection_auc", "shuffled")}
    assert all(0 <= r["mean"] <= 1 for r in table if r["mean"] is not None)
