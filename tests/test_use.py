"""dictlens.use: splice, steer, clamp, ablate, monitor, attribute — on tiny models, then on
the real default model with an SAE trained here on its activations."""

from __future__ import annotations

import json

import pytest
import torch

from dictlens.data.tap import Tap
from dictlens.errors import ConfigError, InputError
from dictlens.load import check_model
from dictlens.provenance import Provenance
from dictlens.sae.config import SAEConfig
from dictlens.sae.model import SAE
from dictlens.use import (
    Edit,
    GenerateConfig,
    Metric,
    Monitor,
    Splice,
    Watch,
    ablate,
    attribute,
    make_metric,
    parse_edit,
    parse_watch,
    steered_generation,
)
from dictlens.use.ablate import prompt_batches
from dictlens.use.steer import generate, prompt_ids

HOOK = "resid_post.1"


@pytest.fixture
def sae(llama):
    s = SAE(SAEConfig(d_in=32, n_features=48, activation="topk", k=4, normalize="none"), seed=0,
            provenance=Provenance.of_sae(llama.name, HOOK)).eval()
    with torch.no_grad():
        s.b_dec.copy_(0.1 * torch.randn(32))
    return s


def _ids(lm, text="The cat sat on the mat, and the dog sat on the log."):
    tok = lm.tokenizer
    return torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids]])


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids, use_cache=False).logits


def _codes(sae, x):
    with sae.ranking("float32"):
        return sae.encode(x.float())


# ---- splice and edits ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_splice_with_the_error_term_leaves_the_outputs_unchanged(tiny_models, arch):
    lm = tiny_models[arch]
    sae = SAE(SAEConfig(d_in=32, n_features=48, activation="topk", k=4), seed=1,
              provenance=Provenance.of_sae(lm.name, "resid_post.2")).eval()
    ids = _ids(lm)
    clean = _logits(lm, ids)
    with Splice(lm, {"resid_post.2": sae}):
        same = _logits(lm, ids)
    # an edit that changes nothing still runs the whole encode/decode path
    with Splice(lm, {"resid_post.2": sae}, {"resid_post.2": [Edit(3, "scale", 1.0)]}):
        computed = _logits(lm, ids)
    with Splice(lm, {"resid_post.2": sae}, error_term=False):
        recon = _logits(lm, ids)
    assert torch.equal(clean, same)
    torch.testing.assert_close(computed, clean, rtol=0, atol=1e-5)
    assert (recon - clean).abs().max() > 1e-2       # the reconstruction alone is not the model


def test_edits_change_exactly_what_they_touch(llama, sae):
    ids = _ids(llama)
    x = Tap(llama, [HOOK])(ids)[HOOK][0]
    f = _codes(sae, x)
    active = int(f[1:].sum(0).argmax())            # the feature with the most mass (not at BOS)
    W = sae.W_dec.detach()
    edits = {"zero": [Edit(active, "zero")], "clamp": [Edit(active, "clamp", 2.5)],
             "scale": [Edit(active, "scale", 3.0)], "mean": [Edit(active, "mean", 0.7)],
             "add": [Edit(active, "add", 1.5)]}
    target = {"zero": 0.0 * f[:, active], "clamp": torch.full_like(f[:, active], 2.5),
              "scale": 3.0 * f[:, active], "mean": torch.full_like(f[:, active], 0.7)}
    for name, es in edits.items():
        with Splice(llama, {HOOK: sae}, {HOOK: es}):
            y = Tap(llama, [HOOK], stop_early=False)(ids)[HOOK][0]
        if name == "add":
            want = x + 1.5 * W[active] / W[active].norm()
        else:
            want = x + (target[name] - f[:, active])[:, None] * W[active]
        want[0] = x[0]                               # BOS is left as it is
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, msg=name)
    # from a position on
    with Splice(llama, {HOOK: sae}, {HOOK: [Edit(active, "add", 1.5, start=5)]}):
        y = Tap(llama, [HOOK])(ids)[HOOK][0]
    assert torch.equal(y[:5], x[:5]) and not torch.allclose(y[5:], x[5:])
    # without the error term: the reconstruction, with the edit applied to the codes
    with Splice(llama, {HOOK: sae}, {HOOK: [Edit(active, "zero")]}, error_term=False):
        y = Tap(llama, [HOOK])(ids)[HOOK][0]
    f0 = f.clone()
    f0[:, active] = 0
    torch.testing.assert_close(y[1:], sae.decode(f0)[1:].detach(), rtol=1e-5, atol=1e-5)


def test_edits_of_one_feature_apply_in_order_and_hooks_do_not_share_limits(llama, sae):
    ids = _ids(llama)
    x = Tap(llama, [HOOK])(ids)[HOOK][0]
    f = _codes(sae, x)
    active = int(f[1:].sum(0).argmax())
    W = sae.W_dec.detach()
    with Splice(llama, {HOOK: sae}, {HOOK: [Edit(active, "clamp", 3.0), Edit(active, "scale", 2.0)]}):
        y = Tap(llama, [HOOK])(ids)[HOOK][0]
    torch.testing.assert_close(y[1:], (x + (6.0 - f[:, active])[:, None] * W[active])[1:], rtol=1e-5, atol=1e-5)
    with Splice(llama, {HOOK: sae}, {HOOK: [Edit(active, "zero")] * 2}):
        twice = Tap(llama, [HOOK])(ids)[HOOK][0]
    with Splice(llama, {HOOK: sae}, {HOOK: [Edit(active, "zero")]}):
        once = Tap(llama, [HOOK])(ids)[HOOK][0]
    assert torch.equal(twice, once)
    # a limit at the first hook that leaves every position alone there changes nothing at the second
    other = SAE(SAEConfig(d_in=32, n_features=40, activation="relu"), seed=3).eval()
    edits = {HOOK: [Edit(active, "zero")], "resid_post.2": [Edit(0, "clamp", 5.0)]}
    with Splice(llama, {HOOK: sae, "resid_post.2": other}, edits, max_norm={HOOK: 0.0}):
        both = Tap(llama, [HOOK, "resid_post.2"], stop_early=False)(ids)
    with Splice(llama, {"resid_post.2": other}, {"resid_post.2": edits["resid_post.2"]}):
        alone = Tap(llama, ["resid_post.2"])(ids)["resid_post.2"]
    assert torch.equal(both[HOOK][0], x) and torch.equal(both["resid_post.2"], alone)


def test_several_saes_at_several_hooks(llama, sae):
    other = SAE(SAEConfig(d_in=32, n_features=40, activation="relu"), seed=3,
                provenance=Provenance.of_sae(llama.name, "resid_post.2")).eval()
    ids = _ids(llama)
    clean = _logits(llama, ids)
    with Splice(llama, {HOOK: sae, "resid_post.2": other}):
        assert torch.equal(_logits(llama, ids), clean)
    with Splice(llama, {HOOK: sae}, error_term=False):
        one = _logits(llama, ids)
    with Splice(llama, {HOOK: sae, "resid_post.2": other}, error_term=False):
        two = _logits(llama, ids)
    assert not torch.allclose(one, two) and not torch.allclose(one, clean)


def test_positions_count_through_the_kv_cache(llama, sae):
    """Steering from position P during cached generation equals steering the whole
    sequence in one uncached forward pass: the positions generate feeds one at a time are
    counted from the sequence's start."""
    ids = _ids(llama, "Once upon a time")
    cfg = GenerateConfig(max_new_tokens=12, temperature=0)
    start = ids.shape[1] + 3                         # from the 4th generated token on
    splice = Splice(llama, {HOOK: sae}, {HOOK: [Edit(7, "add", 40.0, start=start)]})
    plain = generate(llama, ids, cfg)
    with splice:
        steered = generate(llama, ids, cfg)
        full = torch.cat([ids[0], steered])[None]
        logits = _logits(llama, full)
    assert torch.equal(plain[:3], steered[:3]) and not torch.equal(plain, steered)
    predicted = logits[0, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(predicted, steered)


def test_steered_generation_is_deterministic_with_a_seed(llama, sae):
    cfg = GenerateConfig(max_new_tokens=10, temperature=1.0, seed=3)
    edits = {HOOK: [Edit(5, "add", 30.0)]}
    a = steered_generation(llama, {HOOK: sae}, edits, "The dog", cfg)
    b = steered_generation(llama, {HOOK: sae}, edits, "The dog", cfg)
    c = steered_generation(llama, {HOOK: sae}, edits, "The dog", GenerateConfig(max_new_tokens=10, seed=4))
    assert (a.steered, a.unsteered) == (b.steered, b.unsteered)
    assert a.steered != a.unsteered and (c.steered, c.unsteered) != (a.steered, a.unsteered)


def test_bad_input_is_named(llama, sae):
    with pytest.raises(InputError, match="feature 48 .* out of range: the SAE has 48 features"):
        Splice(llama, {HOOK: sae}, {HOOK: [Edit(48, "add", 1.0)]})
    with pytest.raises(ConfigError, match="'abc' is not a number"):
        parse_edit("3:abc", "add")
    with pytest.raises(ConfigError, match="'nan' is not a finite number"):
        parse_edit("3:nan", "clamp")
    with pytest.raises(ConfigError, match="expected FEATURE:COEFF"):
        parse_edit("3", "add")
    with pytest.raises(ConfigError, match="'x' is not an integer"):
        parse_edit("x:1", "add")
    with pytest.raises(ConfigError, match="threshold '3:high': 'high' is not a number"):
        parse_watch("3:high")
    with pytest.raises(InputError, match="exceeds .*context of 256"):
        prompt_ids(llama, "word " * 300, GenerateConfig(max_new_tokens=10))
    with pytest.raises(ConfigError, match="edits at resid_post.2, where no SAE is spliced"):
        Splice(llama, {HOOK: sae}, {"resid_post.2": [Edit(1, "zero")]})
    from dictlens.errors import HookError

    with pytest.raises(HookError, match="resid_post.9"):
        Splice(llama, {"resid_post.9": sae})
    with pytest.raises(InputError, match="trained on resid_post.1, not resid_post.2"):
        check_model(sae, "run", llama, "resid_post.2")
    stranger = SAE(SAEConfig(d_in=32, n_features=8, activation="relu"), provenance=Provenance.of_sae("gpt2-xl", HOOK))
    with pytest.raises(InputError, match="trained on activations of gpt2-xl, not"):
        check_model(stranger, "run", llama, HOOK)
    narrow = SAE(SAEConfig(d_in=16, n_features=8, activation="relu"), provenance=Provenance.of_sae(hook=HOOK))
    with pytest.raises(InputError, match="is 32 wide; the SAE in run reads 16"):
        check_model(narrow, "run", llama, HOOK)
    with pytest.raises(ConfigError, match="temperature: expected a finite number"):
        GenerateConfig(temperature=float("nan"))
    with pytest.raises(ConfigError, match="seed"):
        GenerateConfig(seed=2**80)
    with pytest.raises(ConfigError, match="batch_size and sort_windows must be at least 1"):
        list(Monitor(llama, sae, HOOK, [Watch(1)]).scan(["text"], batch_size=0))
    n = len(llama.tokenizer("the cat", add_special_tokens=False).input_ids)
    assert n > 1
    with pytest.raises(InputError, match=f"token 'the cat' is {n} tokens for .*give a single token"):
        ablate(llama, sae, HOOK, [1], prompt_batches(llama, ["a b c"]), tokens=["the cat"])


# ---- ablation ------------------------------------------------------------------------

def test_ablation_reports_loss_and_token_logits(llama, sae):
    ids = _ids(llama)
    x = Tap(llama, [HOOK])(ids)[HOOK][0]
    f = _codes(sae, x)
    active = int(f[1:].sum(0).argmax())
    word = llama.tokenizer.decode([int(ids[0, 3])])
    batches = [(ids, torch.ones_like(ids, dtype=torch.bool).index_fill_(1, torch.tensor([0]), False))]
    r = ablate(llama, sae, HOOK, [active], batches, tokens=[word])
    assert r.n_predictions == ids.shape[1] - 2 and r.fired[active] == int((f[1:, active] > 0).sum())
    with Splice(llama, {HOOK: sae}, {HOOK: [Edit(active, "zero")]}):
        logits = _logits(llama, ids)
    logp = logits[0, :-1].log_softmax(-1)
    ce = -logp[1:].gather(1, ids[0, 2:, None]).mean()
    assert r.ce_ablated == pytest.approx(float(ce), abs=1e-4) and r.ce_ablated != r.ce_clean
    assert r.tokens[0].logit_ablated == pytest.approx(float(logits[0, 1:, r.tokens[0].id].mean()), abs=1e-4)
    m = ablate(llama, sae, HOOK, [active], batches, mode="mean")
    assert m.means[active] == pytest.approx(float(f[1:, active].mean()), rel=1e-4)
    twice = ablate(llama, sae, HOOK, [active, active], batches)
    assert twice.features == [active] and twice.ce_ablated == pytest.approx(r.ce_ablated)


# ---- monitor -------------------------------------------------------------------------

def _brute_force(lm, sae, text, watches):
    return _brute_force_ids(lm, sae, lm.tokenizer(text, add_special_tokens=False).input_ids, watches)


def _brute_force_ids(lm, sae, ids, watches):
    x = Tap(lm, [HOOK])(torch.tensor([[lm.tokenizer.bos_token_id, *ids]]))[HOOK][0, 1:]
    f = _codes(sae, x)
    return {(t, w.feature) for w in watches for t in range(len(ids)) if f[t, w.feature] > w.threshold}


def test_monitor_reports_every_firing_and_nothing_else(llama, sae):
    docs = ["The cat sat on the mat.", "A much longer document about dogs, logs and frogs, " * 3, "Short."]
    x = Tap(llama, [HOOK])(_ids(llama, docs[1]))[HOOK][0]
    f = _codes(sae, x)[1:]
    busy = f.gt(0).sum(0).argsort(descending=True)[:2].tolist()
    watches = [Watch(busy[0], 0.0), Watch(busy[1], float(f[:, busy[1]].median()))]
    events = list(Monitor(llama, sae, HOOK, watches).scan(docs, context=256, batch_size=2))
    for i, text in enumerate(docs):
        got = {(e.position, e.feature) for e in events if e.doc == i}
        assert got == _brute_force(llama, sae, text, watches)
    e = events[0]
    tokens = llama.tokenizer(docs[e.doc], add_special_tokens=False).input_ids
    assert e.token == llama.tokenizer.decode(tokens[e.position:e.position + 1])
    assert (e.left + e.token + e.right) in docs[e.doc] and json.loads(json.dumps(e.to_dict()))["feature"] == e.feature
    # a document longer than the context is read in windows; positions keep counting
    long = list(Monitor(llama, sae, HOOK, watches).scan([docs[1]], context=16))
    assert max(e.position for e in long) > 16 and all(e.doc == 0 for e in long)
    # callback
    seen = []
    list(Monitor(llama, sae, HOOK, watches).scan(docs[:1], callback=seen.append))
    assert len(seen) == sum(e.doc == 0 for e in events)


def test_monitor_attached_to_generation_sees_prompt_and_new_tokens(llama, sae):
    watches = [Watch(f, 0.0) for f in range(48)]
    mon = Monitor(llama, sae, HOOK, watches)
    ids = _ids(llama, "Once upon a time")
    seen = []
    with mon.attached(seen.append):
        new = generate(llama, ids, GenerateConfig(max_new_tokens=6, temperature=0))
    full = torch.cat([ids[0], new])
    # positions are positions in the sequence (BOS is 0); the last token sampled is never
    # fed back through the model, so it is not seen
    want = {(t + 1, f) for t, f in _brute_force_ids(llama, sae, full[1:-1].tolist(), watches)}
    assert {(e.position, e.feature) for e in seen} == want


# ---- attribution ---------------------------------------------------------------------

def test_attribution_is_the_gradient_and_edges_are_linear_effects(llama, sae):
    """A_i is the first-order change of m under scaling f_i; the pieces sum to Σ x·g; an
    edge is the first-order change of the downstream attribution under scaling f_u."""
    up = sae
    down = SAE(SAEConfig(d_in=32, n_features=40, activation="topk", k=4), seed=5,
               provenance=Provenance.of_sae(llama.name, "resid_post.2")).eval()
    saes = {HOOK: up, "resid_post.2": down}
    prompt = "The cat sat on the mat"
    token = llama.tokenizer.decode([int(_ids(llama, " the")[0, -1])])
    metric = make_metric(llama, "logprob", [token])
    r = attribute(llama, saes, prompt, metric, top=5, check=3, edges=3)
    ids = _ids(llama, prompt)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[0, 0] = False
    eps = 1e-3
    for hook in saes:
        feats = [n for n in r.nodes[hook] if isinstance(n.feature, int)]
        assert sum(n.attribution for n in r.nodes[hook] if isinstance(n.feature, int)) != 0
        n = feats[0]
        with Splice(llama, {hook: saes[hook]}, {hook: [Edit(n.feature, "scale", 1 - eps)]}):
            m_eps = float(metric(_logits(llama, ids), ids, keep))
        assert (r.value - m_eps) / eps == pytest.approx(n.attribution, rel=0.02, abs=1e-4)
        assert sum(n.ablation is not None for n in feats) == 3
    # the downstream attribution s_d as a function of upstream edits, by finite differences
    e = max((e for e in r.edges if isinstance(e.up, int)), key=lambda e: abs(e.weight))
    g_down = _grad_at(llama, ids, metric, keep, "resid_post.2")

    def s_d(edits):
        with Splice(llama, {HOOK: up}, {HOOK: edits}):
            x = Tap(llama, ["resid_post.2"])(ids)[("resid_post.2")][0]
        f = _codes(down, x)[:, e.down]
        return float((f[1:] * (g_down[1:] @ down.W_dec[e.down].detach())).sum())

    fd = (s_d([]) - s_d([Edit(int(e.up), "scale", 1 - eps)])) / eps
    assert fd == pytest.approx(e.weight, rel=0.05, abs=1e-4)


def _grad_at(lm, ids, metric, keep, hook):
    from dictlens.use.attribute import _captured_forward, _frozen

    with _frozen(lm.model), torch.enable_grad():
        logits, acts = _captured_forward(lm, [hook], ids)
        metric(logits, ids, keep).backward()
    return acts[hook].grad[0].detach()


def test_metric_definitions(llama):
    ids = _ids(llama)
    keep = torch.ones_like(ids, dtype=torch.bool)
    logits = _logits(llama, ids)
    a, b = int(ids[0, 2]), int(ids[0, 3])
    assert float(Metric("logit", (a,))(logits, ids, keep)) == pytest.approx(float(logits[0, -1, a]))
    assert float(Metric("logit_diff", (a, b))(logits, ids, keep)) == pytest.approx(
        float(logits[0, -1, a] - logits[0, -1, b]))
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert float(Metric("loss")(logits, ids, keep)) == pytest.approx(float(loss), rel=1e-5)
    with pytest.raises(ConfigError, match="expected 2 token"):
        Metric("logit_diff", (a,))


# ---- the command line ------------------------------------------------------------------

@pytest.fixture
def runs(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    out = {}
    for hook, seed in ((HOOK, 0), ("resid_post.2", 1)):
        s = SAE(SAEConfig(d_in=32, n_features=48, activation="topk", k=4), seed=seed,
                provenance=Provenance.of_sae(model, hook)).eval()
        out[hook] = str(s.save(tmp_path / hook))
    return out


def test_cli_generate_ablate_attribute(runs, tmp_path, capsys):
    from dictlens.cli import main

    run = runs[HOOK]
    assert main(["generate", run, "--prompt", "Once upon a time", "--steer", "3:40", "--clamp", "5:2",
                 "--temperature", "0", "--max-new-tokens", "8", "--json", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert "unsteered" in out and "steered" in out and "add 3 40, clamp 5 2" in out
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["steered"] != g["unsteered"] and len(g["edits"]) == 2
    # two runs: an edit prefixed with its hook goes there, one without to the first run
    assert main(["generate", run, runs["resid_post.2"], "--prompt", "Once upon a time", "--steer",
                 "resid_post.2/3:40", "--ablate", "5", "--temperature", "0", "--max-new-tokens", "8",
                 "--json", str(tmp_path / "g2.json")]) == 0
    out = capsys.readouterr().out
    assert "at resid_post.2 of" in out and "add 3 40" in out and "at resid_post.1 of" in out and "zero 5" in out
    g2 = json.loads((tmp_path / "g2.json").read_text())
    assert {(e["hook"], e["kind"]) for e in g2["edits"]} == {("resid_post.2", "add"), (HOOK, "zero")}
    assert main(["ablate", run, "--feature", "3", "--feature", "7", "--prompt", "The cat sat on the",
                 "--token", " the", "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "zero-ablating 3, 7" in out and "| ' the' |" in out
    assert main(["ablate", run, "--feature", "3", "--mode", "mean", "--text", "default", "--tokens", "200"]) == 0
    assert "set to their means" in capsys.readouterr().out
    assert main(["attribute", runs[HOOK], runs["resid_post.2"], "--prompt", "The cat sat on the", "--metric", "loss",
                 "--top", "5", "--check", "2", "--edges", "2", "--out", str(tmp_path / "attr")]) == 0
    out = capsys.readouterr().out
    assert "loss =" in out and "strongest edges" in out and "same sign" in out
    saved = json.loads((tmp_path / "attr" / "attribution.json").read_text())
    assert set(saved["nodes"]) == {HOOK, "resid_post.2"} and saved["edges"]
    assert (tmp_path / "attr" / "graph.png").stat().st_size > 1000


def test_cli_monitor_streams_json_events(runs, tmp_path, capsys, monkeypatch):
    import io

    from dictlens.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("The cat sat on the mat.\n\nA dog.\n"))
    watch = [a for f in range(0, 48, 2) for a in ("--feature", f"{f}:0.0")]
    assert main(["monitor", runs[HOOK], *watch]) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert events and all(e["feature"] % 2 == 0 for e in events) and {e["doc"] for e in events} == {1, 3}
    assert "events from 2 documents" in captured.err
    monkeypatch.setattr("sys.stdin", io.StringIO('{"id": "p1", "prompt": "The cat"}\n'))
    assert main(["monitor", runs[HOOK], *watch, "--jsonl", "--text-field", "prompt",
                 "--out", str(tmp_path / "ev.jsonl")]) == 0
    lines = (tmp_path / "ev.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["doc"] == "p1" for line in lines)


def test_cli_errors_are_one_line(runs, tiny_model_dirs, capsys):
    from dictlens.cli import main

    run = runs[HOOK]
    for argv, message in [
        (["generate", run, "--prompt", "Hi", "--steer", "3:abc"], "'abc' is not a number"),
        (["generate", run, "--prompt", "Hi", "--steer", "99:1"], "feature 99 (at resid_post.1) is out of range"),
        (["generate", run, "--prompt", "Hi"], "give at least one --steer"),
        (["generate", run, "--prompt", "word " * 300, "--steer", "1:1"], "exceeds"),
        (["generate", run, "--prompt", "Hi", "--steer", "1:1", "--model", str(tiny_model_dirs["gpt2"])],
         "trained on activations of"),
        (["monitor", run, "--feature", "3:x"], "'x' is not a number"),
        (["ablate", run, "--feature", "1"], "exactly one of --prompt or --text"),
        (["attribute", run, "--prompt", "Hi", "--metric", "logit-diff", "--token", "a"], "expected 2 token"),
        (["attribute", run, run, "--prompt", "Hi"], "two SAEs at resid_post.1"),
        (["generate", run, "--prompt", "Hi", "--steer", "resid_post.9/1:1"], "an edit at resid_post.9, where none"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err.strip().splitlines()[-1] and "Traceback" not in err, (argv, err)


def test_monitor_attached_to_a_cache_filled_before(llama, sae):
    """A serving stack that continues a prefix cache: the first call it makes inside the
    block starts past position 0; tokens and positions still match the sequence's."""
    watches = [Watch(f, 0.0) for f in range(48)]
    ids = _ids(llama, "Once upon a time there was")
    with torch.no_grad():
        prefix = llama.model(input_ids=ids[:, :-2], use_cache=True).past_key_values
    seen = []
    with Monitor(llama, sae, HOOK, watches).attached(seen.append), torch.no_grad():
        llama.model(input_ids=ids[:, -2:], past_key_values=prefix, use_cache=True)
    want = {(t + 1, f) for t, f in _brute_force_ids(llama, sae, ids[0, 1:].tolist(), watches)
            if t + 1 >= ids.shape[1] - 2}
    assert seen and {(e.position, e.feature) for e in seen} == want
    tokens = {e.position: e.token for e in seen}
    assert all(tokens[p] == llama.tokenizer.decode([int(ids[0, p])]) for p in tokens)
