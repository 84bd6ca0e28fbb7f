"""Feature analysis: the streamed statistics equal brute force, examples are real and
uniformly sampled, the database and code store read back what the model and SAE gave."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch

from dictlens.analysis import AnalysisConfig, FeatureDB, analyze
from dictlens.analysis.codes import CodeStore, CodeWriter
from dictlens.analysis.lens import coactivation, final_norm, logit_lens, nearest, residual_directions, unembedding
from dictlens.analysis.stats import FeatureCollector
from dictlens.errors import AnalysisError, ConfigError, InputError
from dictlens.provenance import Provenance
from dictlens.sae.config import SAEConfig
from dictlens.sae.model import SAE


def _random_codes(n_ctx, T, F, seed, density=0.05):
    g = np.random.default_rng(seed)
    vals = np.where(g.random((n_ctx, T, F)) < density, g.lognormal(0.0, 1.5, (n_ctx, T, F)), 0.0)
    return vals.astype(np.float32)


def _feed(col: FeatureCollector, codes: np.ndarray, batch: int):
    n_ctx, T, F = codes.shape
    for s in range(0, n_ctx, batch):
        block = torch.from_numpy(codes[s:s + batch]).reshape(-1, F)
        rows, cols = block.nonzero(as_tuple=True)
        vals = block[rows, cols]
        positions = torch.arange(len(block)) + s * T
        contexts = torch.arange(len(block)) // T
        col.update(len(block), rows, cols, vals, positions, contexts)


def test_streamed_statistics_equal_brute_force():
    n_ctx, T, F, K = 37, 16, 12, 5
    codes = _random_codes(n_ctx, T, F, seed=1)
    col = FeatureCollector(F, scale=1.0, top_k=K, bins_per_decade=4, lo=-3, hi=2, reservoir=3, seed=0)
    _feed(col, codes, batch=5)
    s = col.result()
    flat = codes.reshape(-1, F)
    assert s.n_tokens == n_ctx * T
    np.testing.assert_array_equal(s.count, (flat > 0).sum(0))
    np.testing.assert_allclose(s.total, flat.sum(0, dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(s.max, flat.max(0))
    bins = np.clip(np.floor((np.log10(np.where(flat > 0, flat, 1)) + 3) * 4), 0, s.hist.shape[1] - 1).astype(int)
    for f in range(F):
        np.testing.assert_array_equal(s.hist[f], np.bincount(bins[flat[:, f] > 0, f], minlength=s.hist.shape[1]))
        # top contexts: the K largest per-context maxima, each with the position of its peak
        ctx_max = codes[:, :, f].max(1)
        np.testing.assert_allclose(s.top_val[f], np.sort(ctx_max)[::-1][:K])
        for v, p in zip(s.top_val[f], s.top_pos[f], strict=True):
            assert flat[p, f] == v and codes[p // T, :, f].max() == v
        # every reservoir entry is a real firing of this feature in its bin; none repeats
        for b in range(s.hist.shape[1]):
            used = np.isfinite(s.res_key[f, b])
            assert used.sum() == min(3, s.hist[f, b])
            pos, val = s.res_pos[f, b][used], s.res_val[f, b][used]
            assert len(set(pos.tolist())) == len(pos)
            np.testing.assert_array_equal(flat[pos, f], val)
            assert (bins[pos, f] == b).all()


def test_reservoir_sample_is_uniform_across_the_stream():
    """A feature fires 40 times in one bin over 8 batches; over many seeds every firing is
    kept about R/40 of the time — early and late batches alike."""
    n_ctx, T = 8, 5
    codes = np.zeros((n_ctx, T, 1), np.float32)
    codes[:, :, 0] = 1.0
    kept = np.zeros(n_ctx * T)
    runs, R = 400, 4
    for seed in range(runs):
        col = FeatureCollector(1, scale=1.0, top_k=1, reservoir=R, seed=seed)
        _feed(col, codes, batch=1)
        s = col.result()
        pos = s.res_pos[0][np.isfinite(s.res_key[0])]
        kept[pos] += 1
    freq = kept / runs
    assert freq.sum() == pytest.approx(R)
    expected = R / (n_ctx * T)  # 0.1; binomial sd over 400 runs ≈ 0.015
    assert np.abs(freq - expected).max() < 0.06
    first, last = freq[:T * 2].mean(), freq[-T * 2:].mean()
    assert abs(first - last) < 0.04


def test_quantile_groups_split_the_mass_and_sample_inside():
    codes = _random_codes(60, 16, 3, seed=2, density=0.3)
    col = FeatureCollector(3, scale=1.0, top_k=4, bins_per_decade=8, lo=-3, hi=2, reservoir=4, seed=0)
    _feed(col, codes, batch=7)
    s = col.result()
    groups = s.quantile_groups(0, groups=5, examples=4)
    assert 3 <= len(groups) <= 5
    assert sum(g["fraction"] for g in groups) == pytest.approx(1.0)
    for a, b in zip(groups, groups[1:], strict=False):
        assert a["hi"] <= b["lo"] + 1e-6
    for g in groups:
        assert 1 <= len(g["positions"]) <= 4 and g["values"] == sorted(g["values"], reverse=True)
        assert all(g["lo"] - 1e-6 <= v <= g["hi"] + 1e-6 for v in g["values"])
        assert 0.1 < g["fraction"] < 0.35  # equal mass up to bin resolution
    assert s.quantile_groups(1, 5, 4)[-1]["hi"] == pytest.approx(float(s.max[1]))


def test_code_store_round_trip_and_truncation(tmp_path):
    w = CodeWriter(tmp_path / "codes", context=4, n_features=10)
    tokens = np.array([[0, 5, 6, 7], [0, 8, 9, 2]])
    kept = np.array([[0, 1, 1, 1], [0, 1, 1, 0]], bool)
    counts = np.array([0, 2, 0, 1, 0, 1, 3, 0])
    feats = np.array([3, 7, 3, 1, 0, 3, 9])
    vals = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], np.float32)
    w.append(tokens, kept, counts, feats, vals)
    w.commit()
    assert not (tmp_path / "codes.partial").exists()
    s = CodeStore(tmp_path / "codes")
    np.testing.assert_array_equal(s.feature_values(3, 0, 8), [0, 1, 0, 3, 0, 0, 6, 0])
    toks, acts, center = s.window(3, 6, left=5, right=5)
    assert toks.tolist() == [8, 9] and acts.tolist() == [0, 6] and center == 1  # BOS and padding left out
    assert s.codes_at(1)[0].tolist() == [3, 7]
    ctx = s.context_features().toarray()
    assert ctx[0, 3] == 1 and ctx[1, 3] == 1 and ctx[0, 0] == 0 and ctx[1, 9] == 1
    np.testing.assert_allclose(s.token_features().toarray()[6], np.bincount([0, 3, 9], weights=[5, 6, 7],
                                                                            minlength=10))
    with open(tmp_path / "codes" / "value.bin", "r+b") as f:
        f.truncate(12)
    with pytest.raises(AnalysisError, match="value.bin: expected 28 bytes .* found 12 bytes"):
        CodeStore(tmp_path / "codes")


def test_lens_helpers():
    d = torch.eye(4)[:3]
    W_U = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, -1.0, 0], [0.5, 0.5, 0.1, 0]])
    top, topv, bot, botv = logit_lens(d, W_U, None, n=2)
    assert top[0].tolist() == [0, 3] and top[1].tolist() == [1, 3] and bot[2][0] == 2
    assert botv[2][0] == -1.0
    top_g = logit_lens(d, W_U, torch.tensor([1.0, -1.0, 1.0, 1.0]), n=1)[0]
    assert top_g[1].tolist() == [0]  # the gain flips feature 1: token 1 is now suppressed
    ids, cos = nearest(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0]]), n=1)
    assert ids[:, 0].tolist() == [1, 0, 1] and cos[0, 0] == pytest.approx(0.9939, abs=1e-4)
    from scipy import sparse
    A = sparse.csr_matrix(np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 0, 1]], np.float32))
    cid, jac = coactivation(A, n=2)
    assert cid[1].tolist() == [0, -1] and jac[1, 0] == pytest.approx(2 / 3)
    assert cid[0].tolist() == [1, 2] and jac[0, 1] == pytest.approx(1 / 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_final_norm_found(tiny_models, arch):
    norm = final_norm(tiny_models[arch].model)
    assert norm is not None and "norm" in type(norm).__name__.lower()
    W_U, gain = unembedding(tiny_models[arch].model)
    assert gain is not None and W_U.shape[1] == gain.shape[0]


@pytest.fixture
def tiny_sae(llama):
    sae = SAE(SAEConfig(d_in=32, n_features=48, activation="topk", k=4), seed=0,
              provenance=Provenance.of_sae(llama.name, "resid_post.1"))
    return sae.eval()


def test_analyze_on_a_tiny_model_reads_back_what_the_model_and_sae_give(llama, tiny_sae, corpus, tmp_path):
    from dictlens.data.tap import Tap

    cfg = AnalysisConfig(text=str(corpus), tokens=600, context=32, batch_size=4, top_k=5, random_examples=2,
                         coactivation=True)
    # ranked in float32: in bfloat16, the product of a 31-row batch and of the pass's larger ones
    # can round a value differently, and a tie at the k-th place go either way
    with tiny_sae.ranking("float32"):
        r = analyze(tiny_sae, llama, "resid_post.1", cfg, tmp_path / "an", progress=False)
    db = FeatureDB(tmp_path / "an")
    store = db.codes
    assert r.tokens >= 600 and db.meta["tokens"] == r.tokens and store.n_contexts == r.contexts
    bos = llama.tokenizer.bos_token_id
    assert (store.tokens[:, 0] == bos).all() and not store.kept[:, 0].any()
    # the codes are the SAE's codes of the model's real activations
    ids = torch.from_numpy(np.asarray(store.tokens[:2]).astype(np.int64))
    acts = Tap(llama, ["resid_post.1"])(ids)["resid_post.1"]
    with tiny_sae.ranking("float32"):
        dense = tiny_sae.encode(acts[1, 1:].float())
    for t in range(1, 32):
        if store.kept[1, t]:
            f, v = store.codes_at(32 + t)
            want = dense[t - 1].nonzero()[:, 0]
            assert f.tolist() == want.tolist()
            np.testing.assert_allclose(v, dense[t - 1, want].numpy(), rtol=1e-5, atol=1e-6)
    # statistics in the database are those of the stored codes
    M = store.token_features().toarray()
    feats = db.features(order="-count", limit=48)
    assert len(feats) == 48
    for row in feats[:5]:
        f = row["id"]
        full = db.feature(f)
        assert full["count"] == int((M[:, f] > 0).sum())
        assert full["max"] == pytest.approx(float(M[:, f].max()), rel=1e-6)
        assert full["density"] == pytest.approx(full["count"] / r.tokens)
        assert sum(full["hist"]) == full["count"] and len(full["logit_top"]) == 10
        assert sum(q["fraction"] for q in full["quantiles"]) == pytest.approx(1.0)
        ex = db.examples(f)
        tops = [e for e in ex if e.kind == "top"]
        assert tops[0].value == pytest.approx(full["max"], rel=1e-6)
        for e in ex:
            assert e.acts[e.center] == pytest.approx(e.value, rel=1e-6)  # the window holds the example
            assert store.kept[e.position // 32, e.position % 32]
            if e.kind == "random":
                c = e.position // 32
                assert (M[c * 32:(c + 1) * 32, f] == 0).all()
        assert all(n[0] != f for n in full["neighbours"])
    # logit lens as computed directly
    W_U, gain = unembedding(llama.model)
    f0 = db.feature(0)
    logits = W_U @ (tiny_sae.feature_directions()[0] * gain).detach()
    assert f0["logit_top"][0]["logit"] == pytest.approx(float(logits.max()), rel=1e-4)
    assert f0["logit_top"][0]["token"] == db.token_text(int(logits.argmax()))
    # search by token
    common = llama.tokenizer.decode([int(np.bincount(np.asarray(store.tokens[store.kept])).argmax())])
    hits = db.features_for_token(common)
    assert hits and hits[0]["mean"] >= hits[-1]["mean"] and hits[0]["occurrences"] > 0
    with pytest.raises(InputError, match="out of range.*48 features"):
        db.feature(48)
    with pytest.raises(InputError, match="no token"):
        db.features_for_token("\u2603\u2603 not a token")
    summary = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert summary["alive"] == int((M.max(0) > 0).sum())


def test_analyze_bad_input(llama, tiny_sae, corpus, tmp_path):
    wide = SAE(SAEConfig(d_in=16, n_features=32, activation="topk", k=4), seed=0)
    with pytest.raises(InputError, match="is 32 wide; the SAE in memory reads 16"):
        analyze(wide, llama, "resid_post.1", AnalysisConfig(text=str(corpus), tokens=64), tmp_path / "a",
                progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.txt is empty"):
        analyze(tiny_sae, llama, "resid_post.1", AnalysisConfig(text=str(empty), tokens=64, context=16),
                tmp_path / "b", progress=False)
    with pytest.raises(InputError, match="holds no text after the first 10,000,000 tokens"):
        analyze(tiny_sae, llama, "resid_post.1", AnalysisConfig(text=str(corpus), tokens=64, context=16,
                                                                skip_tokens=10_000_000), tmp_path / "b",
                progress=False)
    assert not (tmp_path / "b" / "codes").exists() and not (tmp_path / "b" / "codes.partial").exists()
    from dictlens.errors import HookError
    with pytest.raises(InputError, match="trained on resid_post.1, not resid_post.2"):
        analyze(tiny_sae, llama, "resid_post.2", AnalysisConfig(text=str(corpus), tokens=64), tmp_path / "c",
                progress=False)
    with pytest.raises(HookError, match="resid_post.9"):  # an SAE that records no hook, at one the model lacks
        analyze(SAE(tiny_sae.cfg), llama, "resid_post.9", AnalysisConfig(text=str(corpus), tokens=64),
                tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="top_k"):
        AnalysisConfig(top_k=0)
    with pytest.raises(AnalysisError, match="no features.db"):
        FeatureDB(tmp_path / "b")
    # a damaged database is named
    good = tmp_path / "an"
    analyze(tiny_sae, llama, "resid_post.1", AnalysisConfig(text=str(corpus), tokens=100, context=16), good,
            progress=False)
    (good / "features.db").write_bytes(b"not sqlite" * 100)
    with pytest.raises(AnalysisError, match="not a readable feature database"):
        FeatureDB(good)
    fresh = tmp_path / "an2"
    analyze(tiny_sae, llama, "resid_post.1", AnalysisConfig(text=str(corpus), tokens=100, context=16), fresh,
            progress=False)
    with sqlite3.connect(f"file:{fresh / 'features.db'}?mode=ro", uri=True) as con:  # plain SQLite, any reader
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        n = con.execute("select count(*) from features").fetchone()[0]
    assert {"meta", "features", "examples", "vocab"} <= tables and n == tiny_sae.n_features


def test_cli_analyze(llama, tiny_model_dirs, corpus, tmp_path, capsys):
    from dictlens.cli import main

    sae = SAE(SAEConfig(d_in=32, n_features=40, activation="topk", k=4), seed=1,
              provenance=Provenance.of_sae(str(tiny_model_dirs["llama"]), "resid_post.2"))
    sae.save(tmp_path / "run")
    rc = main(["analyze", str(tmp_path / "run"), "--text", str(corpus), "--tokens", "300", "--context", "32",
               "--top-k", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "features fired" in out and (tmp_path / "run" / "analysis" / "features.db").is_file()
    assert main(["analyze", str(tmp_path / "run"), "--hook", "resid_post.1", "--text", str(corpus)]) == 2
    assert "trained on resid_post.2" in capsys.readouterr().err
    # the report and the app, through the command line
    assert main(["report", str(tmp_path / "run"), "--features", "0-4", "--out", str(tmp_path / "rep")]) == 0
    assert f"report: {(tmp_path / 'rep' / 'index.html').resolve()}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "rep").glob("f*.html")) == [f"f{i}.html" for i in range(5)]
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no feature database" in capsys.readouterr().err
    _serve_through_the_cli(tmp_path / "run")


def _serve_through_the_cli(run):
    """`dictlens serve RUN` in its own process answers the index and a feature, then stops on SIGINT."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dictlens.cli", "serve", str(run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for _ in range(300):
            try:
                index = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.2)
        else:
            raise AssertionError("dictlens serve did not answer")
        assert "feature" in index.lower()
        feature = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/feature/0", timeout=10).read())
        assert feature["id"] == 0
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert f"dictlens app on http://127.0.0.1:{port}/" in out


@pytest.mark.slow
def test_analyze_on_the_real_default_model(smollm2, tmp_path):
    """SmolLM2's final RMSNorm gain is found, and a decoder direction planted to raise one
    token's logit (least squares through W_U, divided by the gain) reads back as that token."""
    W_U, gain = unembedding(smollm2.model)
    assert gain is not None and type(final_norm(smollm2.model)).__name__.endswith("RMSNorm")
    paris = smollm2.tokenizer(" Paris", add_special_tokens=False).input_ids
    assert len(paris) == 1
    sae = SAE(SAEConfig(d_in=576, n_features=64, activation="topk", k=8), seed=0,
              provenance=Provenance.of_sae("smollm2-135m", "resid_post.15")).eval()
    with torch.no_grad():
        one_hot = torch.zeros(W_U.shape[0])
        one_hot[paris[0]] = 1.0
        planted = torch.linalg.lstsq(W_U.float(), one_hot[:, None]).solution[:, 0] / gain
        sae.W_dec[0] = planted / planted.norm()
    text = tmp_path / "t.txt"
    text.write_text("The capital of France is Paris. The capital of Germany is Berlin. " * 20)
    r = analyze(sae, smollm2, "resid_post.15", AnalysisConfig(text=str(text), tokens=200, context=64,
                                                              batch_size=2), tmp_path / "an", progress=False)
    db = FeatureDB(tmp_path / "an")
    assert db.feature(0)["logit_top"][0]["token"] == " Paris"
    assert r.tokens >= 200 and (r.stats.count > 0).any()
    codes = db.codes
    assert not codes.kept[:, 0].any() and (codes.tokens[:, 0] == smollm2.tokenizer.bos_token_id).all()


def _sae_with(dec: torch.Tensor, k: int) -> SAE:
    sae = SAE(SAEConfig(d_in=dec.shape[1], n_features=dec.shape[0], activation="topk", k=k, normalize="none"),
              seed=0).eval()
    with torch.no_grad():
        sae.W_dec.copy_(dec)
        sae.W_enc.copy_(dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_matching_recovers_a_permutation():
    from dictlens.analysis.compare import match_features

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 24, generator=g)
    perm = torch.randperm(40, generator=g)
    b = a[perm] + 0.05 * torch.randn(40, 24, generator=g)
    m = match_features(a, b)
    inverse = torch.argsort(perm).numpy()
    assert (m.pairs[:, 1] == inverse[m.pairs[:, 0]]).all() and (m.best_ab == inverse).all()
    assert m.mmcs_ab > 0.99 and m.mmcs_ba > 0.99 and m.summary()["matched_above_0.9"] == 1.0
    same = match_features(a, a)
    assert same.mmcs_ab == pytest.approx(1.0, abs=1e-6)
    # a wider B: every A feature matched once, MMCS both ways
    wide = match_features(a, torch.cat([b, torch.randn(20, 24, generator=g)]))
    assert len(wide.pairs) == 40 and wide.mmcs_ab > 0.99 and wide.mmcs_ba < wide.mmcs_ab
    with pytest.raises(InputError, match="different widths"):
        match_features(a, torch.randn(5, 7))


def test_splitting_finds_each_childs_parent():
    from dictlens.analysis.compare import splitting

    eye = torch.eye(16)
    parents = eye[:8]
    # each parent splits into two children, tilted apart along an unused direction
    children = torch.cat([torch.nn.functional.normalize(parents + s * 0.3 * eye[8:], dim=1) for s in (1, -1)])
    narrow, wide = _sae_with(parents, k=1), _sae_with(children, k=1)
    g = torch.Generator().manual_seed(0)
    which = torch.randint(0, 16, (2000,), generator=g)
    x = children[which] * (1 + torch.rand(2000, 1, generator=g))
    s = splitting(narrow, wide, [x[:1000], x[1000:]])
    truth = np.arange(16) % 8
    assert (s.parent_cos == truth).all() and (s.parent_coact == truth).all()
    assert (s.coact == 1.0).all() and (s.children == 2).all()
    summary = s.summary()
    assert summary["parents_agree"] == 1.0 and summary["children_max"] == 2 and summary["wide_fired"] == 16


def test_cli_compare(tmp_path, capsys):
    from dictlens.cli import main

    g = torch.Generator().manual_seed(1)
    dec = torch.randn(32, 16, generator=g)
    for name, d in (("a", dec), ("b", dec[torch.randperm(32, generator=g)] + 0.1 * torch.randn(32, 16, generator=g)),
                    ("c", torch.randn(48, 16, generator=g))):
        _sae_with(d, k=2).save(tmp_path / name)
    rc = main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--out",
               str(tmp_path / "cmp")])
    assert rc == 0
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(data["pairs"]) == 2 and data["pairs"][0]["mmcs_a_to_b"] > 0.95 > data["pairs"][1]["mmcs_a_to_b"]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    lines = (tmp_path / "cmp" / "matches_a__b.csv").read_text().splitlines()
    assert lines[0] == "feature_a,best_b,cos,hungarian_b,hungarian_cos" and len(lines) == 33
    assert "MMCS" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), "--out", str(tmp_path / "x")]) == 2


def test_features_on_text_and_cli_search(llama, tiny_model_dirs, corpus, tmp_path, capsys):
    from dictlens.analysis.search import features_on_text
    from dictlens.cli import main
    from dictlens.data.tap import Tap

    sae = SAE(SAEConfig(d_in=32, n_features=40, activation="topk", k=4), seed=1,
              provenance=Provenance.of_sae(str(tiny_model_dirs["llama"]), "resid_post.1")).eval()
    r = features_on_text(sae, llama, "resid_post.1", "The cat sat on the mat.")
    ids = llama.tokenizer("The cat sat on the mat.", add_special_tokens=False).input_ids
    assert len(r.tokens) == len(ids)  # BOS left out
    codes = sae.encode(Tap(llama, ["resid_post.1"])(torch.tensor([[llama.tokenizer.bos_token_id, *ids]]))
                       ["resid_post.1"][0])
    assert r.features[0]["max"] == pytest.approx(float(codes[1:].max()), rel=1e-5)
    assert [f for f, _ in r.tokens[0].features] == codes[1].nonzero()[:, 0][codes[1][codes[1] > 0]
                                                                            .argsort(descending=True)].tolist()
    with pytest.raises(InputError, match="at most 256"):
        features_on_text(sae, llama, "resid_post.1", "word " * 400)
    acts = Tap(llama, ["resid_post.1"])(torch.tensor([[llama.tokenizer.bos_token_id, *ids]]))["resid_post.1"][0, 1:]
    limit = float(acts.norm(dim=1).median())       # about half the tokens are above it: left out
    capped = features_on_text(sae, llama, "resid_post.1", "The cat sat on the mat.", max_norm=limit)
    assert len(capped.tokens) == int((acts.norm(dim=1) <= limit).sum()) < len(ids)
    sae.save(tmp_path / "run")
    assert main(["search", str(tmp_path / "run"), "--text", "The cat sat."]) == 0
    assert "strongest first" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "run"), "--token", "the"]) == 2
    assert "no feature database" in capsys.readouterr().err
    analyze(sae, llama, "resid_post.1", AnalysisConfig(text=str(corpus), tokens=300, context=32),
            tmp_path / "run" / "analysis", progress=False)
    assert main(["search", str(tmp_path / "run"), "--token", "the"]) == 0
    assert "features most active on 'the'" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "run")]) == 2


def test_analyze_skips_norm_outliers(llama, tiny_sae, corpus, tmp_path):
    from dictlens.data.tap import Tap

    cfg = AnalysisConfig(text=str(corpus), tokens=300, context=32, batch_size=4, outlier_factor=1.1)
    r = analyze(tiny_sae, llama, "resid_post.1", cfg, tmp_path / "an", progress=False)
    store = CodeStore(tmp_path / "an" / "codes")
    ids = torch.from_numpy(np.asarray(store.tokens[:4]).astype(np.int64))
    norms = Tap(llama, ["resid_post.1"])(ids)["resid_post.1"].norm(dim=-1)
    special = {llama.tokenizer.bos_token_id, llama.tokenizer.eos_token_id, llama.tokenizer.pad_token_id}
    text = ~np.isin(np.asarray(store.tokens[:4]), list(special))
    median = float(norms[:, 1:][torch.from_numpy(text[:, 1:])].median())
    kept = store.kept[:4]
    assert r.outliers > 0 and kept.sum() + r.outliers >= text.sum()
    assert (norms[torch.from_numpy(kept)] <= 1.1 * median * 1.0001).all()  # the first batch fixes the limit
    assert r.tokens == int(store.kept.sum())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_directions_at_the_neurons_reach_the_residual_through_the_output_projection(tiny_models, arch):
    """A dictionary at mlp_hidden.L writes into the residual stream what the MLP's output
    projection makes of its directions (without the bias); residual-width ones are themselves."""
    lm = tiny_models[arch]
    W = dict(lm.model.named_modules())[{"llama": "model.layers.1.mlp.down_proj",
                                         "gpt2": "transformer.h.1.mlp.c_proj"}[arch]].weight.detach()
    hidden = W.shape[1] if arch == "llama" else W.shape[0]      # Linear [out, in]; GPT-2's Conv1D [in, out]
    d = torch.randn(5, hidden)
    want = d @ W.T if arch == "llama" else d @ W
    torch.testing.assert_close(residual_directions(d, lm.model, "mlp_hidden.1"), want, rtol=1e-5, atol=1e-5)
    r = torch.randn(5, lm.d_model)
    assert residual_directions(r, lm.model, "resid_post.1") is r
    assert residual_directions(torch.randn(5, hidden), lm.model, "mlp_out.1") is None     # an output: no way in
