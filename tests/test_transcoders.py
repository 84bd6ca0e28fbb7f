"""Transcoders: a cache pairs each MLP's input with its output, token for token; a transcoder trained
on a tiny model's MLP predicts that MLP's output; its saved form (training scales folded in) predicts
exactly what the trained one did, for every activation and with the skip connection; it resumes
exactly; bad wiring is refused with a one-line error."""

from __future__ import annotations

import json

import pytest
import torch

from dictlens.cli import main
from dictlens.data.cache import HarvestConfig, harvest
from dictlens.data.hooks import Wiring, named_hooks, wirings
from dictlens.data.store import ActivationStore, ArraySource, CacheHooks, Paired, split_heldout
from dictlens.errors import CacheError, ConfigError, HookError, InputError
from dictlens.sae.config import SAEConfig
from dictlens.sae.model import SAE
from dictlens.train.config import TrainConfig
from dictlens.train.trainer import Trainer, train

from .conftest import ARCHS, interrupted

LAYER = 1


def _mlp(lm, layer=LAYER):
    return dict(lm.model.named_modules())[named_hooks(lm.model)[f"mlp_out.{layer}"].module]


def _paired_cache(lm, path, corpus, tokens=6000, hooks=None):
    cfg = HarvestConfig(hooks=hooks or [f"mlp_in.{LAYER}", f"mlp_out.{LAYER}"], out=str(path), model=lm.name,
                        text=str(corpus), tokens=tokens, context=32, batch_size=8, shard_tokens=1000)
    harvest(cfg, lm, progress=False)
    return path


@pytest.mark.parametrize("arch", ARCHS)
def test_a_paired_harvest_holds_each_mlps_input_and_output(tiny_models, corpus, tmp_path, arch):
    """Row i of mlp_in.L and of mlp_out.L are the same token: the MLP applied to the cached inputs
    gives the cached outputs."""
    lm = tiny_models[arch]
    path = _paired_cache(lm, tmp_path / "acts", corpus, tokens=1500)
    x = ActivationStore(path, f"mlp_in.{LAYER}").read_all()
    y = ActivationStore(path, f"mlp_out.{LAYER}").read_all()
    assert x.shape == y.shape == (1500, lm.d_model)
    with torch.no_grad():
        torch.testing.assert_close(_mlp(lm)(x), y, rtol=1e-5, atol=1e-5)


def _mlp_data(n=24_000, seed=0):
    """A small MLP's inputs and outputs: y = W₂ ReLU(W₁ x − 0.5) + c, D = 16 in, 24 out."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(16, 48, generator=g) / 4, torch.randn(48, 24, generator=g) / 7
    x = torch.randn(n, 16, generator=g) * 3 + 1
    return x, (x @ w1 - 0.5).relu() @ w2 * 0.1 + 0.3


def _fvu(y, y_hat):
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch", ARCHS)
def test_a_transcoder_predicts_a_tiny_models_mlp_output(tiny_models, corpus, tmp_path, arch):
    """Trained through `dictlens train --reads mlp_in.1 --writes mlp_out.1` on a paired cache: the saved
    transcoder reads raw MLP inputs and writes raw MLP outputs, predicting the held-out outputs far
    better than their mean; its record names both hooks."""
    lm = tiny_models[arch]
    acts = _paired_cache(lm, tmp_path / "acts", corpus)
    run = tmp_path / "run"
    assert main(["train", "--acts", str(acts), "--reads", f"mlp_in.{LAYER}", "--writes", f"mlp_out.{LAYER}",
                 "--arch", "topk", "--k", "8", "--expansion", "8", "--tokens", "60000", "--batch-size", "256",
                 "--heldout-tokens", "1000", "--out", str(run), "--no-plots"]) == 0
    tc = SAE.load(run)
    assert tc.cfg.transcoder and (tc.cfg.d_in, tc.cfg.d_out, tc.cfg.n_features) == (32, 32, 256)
    assert (tc.provenance.hook_in, tc.provenance.hook_out) == (f"mlp_in.{LAYER}", f"mlp_out.{LAYER}")
    metrics = json.loads((run / "metrics.json").read_text())
    held = split_heldout(CacheHooks(acts, [f"mlp_in.{LAYER}", f"mlp_out.{LAYER}"]), 1000)[1]
    x, y = held.view(f"mlp_in.{LAYER}").read_all(), held.view(f"mlp_out.{LAYER}").read_all()
    with torch.no_grad(), tc.ranking("float32"):
        fvu = _fvu(y, tc(x))
    assert fvu == pytest.approx(metrics["fvu"], rel=1e-4)   # metrics.json measured the prediction of mlp_out
    assert fvu < 0.5, fvu
    assert metrics["l0"] == pytest.approx(8.0)


# the penalised ones at a lighter coefficient than the default, which leaves these 16-wide inputs L0 ≈ 1
ACTIVATIONS = [
    (SAEConfig(activation="topk", k=6, n_features=96, transcoder=True), {}),
    (SAEConfig(activation="batchtopk", k=6, n_features=96, transcoder=True), {}),
    (SAEConfig(activation="jumprelu", n_features=96, transcoder=True, jumprelu_threshold=0.2), {}),
    (SAEConfig(activation="relu", n_features=96, transcoder=True), {"sparsity_coeff": 0.3}),
    (SAEConfig(activation="gated", n_features=96, transcoder=True), {"sparsity_coeff": 0.3}),
    (SAEConfig(activation="topk", k=6, n_features=96, transcoder=True, skip=True), {}),
    (SAEConfig(activation="jumprelu", n_features=96, transcoder=True, jumprelu_threshold=0.2, skip=True), {}),
]


@pytest.mark.parametrize("setup", ACTIVATIONS, ids=lambda s: s[0].activation + ("-skip" if s[0].skip else ""))
def test_every_activation_trains_a_transcoder_whose_saved_form_predicts_the_same(setup, tmp_path):
    """Input and output have different scales (training normalises each): folding both into the saved
    weights changes no prediction and no code, and leaves the decoder as it was."""
    sae_cfg, extra = setup
    x, y = _mlp_data()
    cfg = TrainConfig(tokens=120_000, batch_size=512, plots=False, **extra)
    trained = train(sae_cfg, cfg, x[:-4000], tmp_path / "r",
                    target=y[:-4000], progress=False)
    assert float(trained.input_scale) != pytest.approx(float(trained.output_scale), rel=0.1)
    back = SAE.load(tmp_path / "r")
    xs, ys = x[-4000:], y[-4000:]
    with torch.no_grad(), trained.ranking("float32"), back.ranking("float32"):
        before, after = trained(xs), back(xs)
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
        (p1, v1), (p2, v2) = trained.encode_sparse(xs), back.encode_sparse(xs)
        assert torch.equal(p1.cols, p2.cols)
        torch.testing.assert_close(v2, v1, rtol=1e-4, atol=1e-6)
        # the codes decode (with the skip of the same inputs) to the prediction
        torch.testing.assert_close(back.decode_sparse(p2, v2, xs), after, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back.decode(back.encode(xs), xs), after, rtol=1e-4, atol=1e-5)
        fvu = _fvu(ys, after)
    assert fvu < 0.6, fvu
    assert torch.equal(back.W_dec, trained.W_dec.detach())


def test_the_skip_connection_is_learned_and_lowers_the_loss():
    """Same data, same seed: the skip transcoder ends with a nonzero W_skip and a lower held-out FVU
    (the affine part of the map needs no features)."""
    x, y = _mlp_data()
    cfg = TrainConfig(tokens=120_000, batch_size=512, plots=False)
    fvus = {}
    for skip in (False, True):
        tc = train(SAEConfig(k=4, n_features=64, transcoder=True, skip=skip), cfg, x[:-4000], target=y[:-4000],
                   progress=False)
        with torch.no_grad(), tc.ranking("float32"):
            fvus[skip] = _fvu(y[-4000:], tc(x[-4000:]))
        if skip:
            assert float(tc.W_skip.abs().max()) > 0
    assert fvus[True] < fvus[False], fvus


def test_an_interrupted_transcoder_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    x, y = _mlp_data(3000)
    sae_cfg = SAEConfig(k=4, n_features=64, transcoder=True, skip=True)
    cfg = TrainConfig(tokens=30 * 256, batch_size=256, lr=3e-3, log_every=5, plots=False, checkpoint_every=2560,
                      dead_tokens=512)
    whole = train(sae_cfg, cfg, x, tmp_path / "whole", target=y, progress=False)
    interrupted(monkeypatch, lambda: train(sae_cfg, cfg, x, tmp_path / "part", target=y, progress=False))
    resumed = train(sae_cfg, cfg, x, tmp_path / "part", target=y, progress=False, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_every_layers_transcoder_trains_from_one_stream(tiny_model_dirs, corpus, tmp_path):
    """`--reads 'mlp_in.*' --writes 'mlp_out.*'` streamed from the model: one transcoder per layer, in a
    run directory each, beside an SAE named by --hook, all from one forward pass per batch."""
    out = tmp_path / "runs"
    assert main(["train", "--model", str(tiny_model_dirs["llama"]), "--text", str(corpus), "--context", "32",
                 "--reads", "mlp_in.*", "--writes", "mlp_out.*", "--hook", "resid_post.2", "--k", "4",
                 "--expansion", "2", "--tokens", "2048", "--batch-size", "256", "--out", str(out), "--no-plots"]) == 0
    names = sorted(p.parent.relative_to(out).as_posix() for p in out.rglob("config.json"))
    assert names == sorted([f"mlp_in.{i}_mlp_out.{i}/topk-k4-x2-s0" for i in range(4)] + ["resid_post.2/topk-k4-x2-s0"])
    tc = SAE.load(out / "mlp_in.3_mlp_out.3" / "topk-k4-x2-s0")
    assert tc.cfg.transcoder and tc.provenance.hook_out == "mlp_out.3"
    assert not SAE.load(out / "resid_post.2" / "topk-k4-x2-s0").cfg.transcoder


def test_bad_wiring_is_named(tiny_models, corpus, tmp_path):
    available = list(named_hooks(tiny_models["llama"].model))
    with pytest.raises(HookError, match="--writes mlp_out.1 is computed before --reads mlp_in.2"):
        wirings([], ["mlp_in.2"], ["mlp_out.1"], available)
    with pytest.raises(HookError, match="--writes resid_pre.2 is computed before --reads mlp_in.2"):
        Wiring.transcoder("mlp_in.2", "resid_pre.2")
    with pytest.raises(HookError, match="--reads and --writes go together"):
        wirings([], ["mlp_in.2"], [], available)
    with pytest.raises(HookError, match="--reads names 4 hooks .* and --writes 1"):
        wirings([], ["mlp_in.*"], ["mlp_out.3"], available)
    assert [w.name for w in wirings([], ["mlp_in.*"], ["mlp_out.*"], available)] == [
        f"mlp_in.{i}>mlp_out.{i}" for i in range(4)]
    acts = _paired_cache(tiny_models["llama"], tmp_path / "acts", corpus, tokens=600)
    rc_out = tmp_path / "r"
    with pytest.raises(CacheError, match=r"holds no hook 'mlp_out.2' \(it holds mlp_in.1, mlp_out.1\)"):
        from dictlens.train.job import TrainJob

        TrainJob(out=str(rc_out), acts=str(acts), reads=["mlp_in.1"], writes=["mlp_out.2"]).plan()
    with pytest.raises(ConfigError, match="skip: applies to transcoders"):
        SAEConfig(skip=True)
    with pytest.raises(ConfigError, match="tied: a transcoder"):
        SAEConfig(transcoder=True, tied=True)
    with pytest.raises(ConfigError, match="transcoder: give the activations it writes"):
        Trainer(SAEConfig(transcoder=True), TrainConfig(), ArraySource(torch.randn(10, 4)))
    with pytest.raises(InputError, match="a transcoder reads and writes the same tokens"):
        Paired(ArraySource(torch.randn(10, 4)), ArraySource(torch.randn(12, 4)))
    t = Trainer(SAEConfig(n_features=8, k=2), TrainConfig(tokens=64, batch_size=8, plots=False),
                ArraySource(torch.randn(64, 4)), target=ArraySource(torch.randn(64, 6)))
    with pytest.raises(InputError, match="a transcoder's step takes its target batch too"):
        t.step(torch.randn(8, 4))
    with pytest.raises(InputError, match=r"target batch shape \[8, 5\] does not match \[8, 6\]"):
        t.step(torch.randn(8, 4), torch.randn(8, 5))
    assert not rc_out.exists()   # nothing was written by a refused run


def test_a_transcoder_of_the_default_models_layer_15_mlp(smollm2, tmp_path):
    """SmolLM2's layer-15 MLP: 16k tokens of the default text streamed once through both hooks, a TopK
    transcoder (k 32, 2,304 features) and a skip transcoder trained on 14k of them, measured on the
    other 2k: both predict the MLP's held-out output far better than its mean, the skip one better;
    spliced in place of the MLP on later text they recover most of the loss the MLP's ablation costs."""
    from dictlens.data.store import StreamingSource
    from dictlens.data.tokens import text_batches
    from dictlens.eval.metrics import evaluate
    from dictlens.eval.splice import dictionary_swap, splice_metrics, splice_reference
    from dictlens.provenance import Provenance

    hooks = ["mlp_in.15", "mlp_out.15"]
    src = StreamingSource(smollm2, hooks, "default", tokens=16384)
    rows = list(src.batches_by_hook(4096, shuffle=False))
    x, y = (torch.cat([r[h] for r in rows]) for h in hooks)
    with torch.no_grad():
        torch.testing.assert_close(_mlp(smollm2, 15)(x[:64]), y[:64], rtol=1e-4, atol=1e-4)
    reference = splice_reference(smollm2, "mlp_out.15", text_batches(smollm2, "default", tokens=1024,
                                                                      skip_tokens=20_000))
    fvu, recovered = {}, {}
    for skip in (False, True):
        tc = train(SAEConfig(k=32, n_features=2304, transcoder=True, skip=skip),
                   TrainConfig(tokens=200_000, batch_size=1024, plots=False), x[:-2048], target=y[:-2048],
                   progress=False, provenance=Provenance(model="smollm2-135m", hook_in=hooks[0], hook_out=hooks[1]))
        fvu[skip] = evaluate(tc, [(x[-2048:], y[-2048:])]).fvu
        m = splice_metrics(smollm2, [dictionary_swap(tc)], reference=reference)
        recovered[skip] = m.recovered_vs_zero
        print(f"layer-15 {'skip ' if skip else ''}transcoder: held-out FVU {fvu[skip]:.3f}, spliced CE "
              f"{m.ce_sae:.4f} (clean {m.ce_clean:.4f}, MLP zeroed {m.ce_zero:.4f}), loss recovered "
              f"{m.recovered_vs_zero:.1%}, next-token agreement {m.agreement:.1%}")
        assert m.ce_sae < m.ce_zero   # (it may beat clean on 1,024 tokens: the skip one did, by 0.002)
    assert fvu[False] < 0.7 and fvu[True] < fvu[False], fvu
    assert min(recovered.values()) > 0.6, recovered


@pytest.fixture(scope="module")
def layer_transcoders(tiny_models, tmp_path_factory):
    """For each tiny model, a TopK transcoder per layer (mlp_in.L → mlp_out.L), all trained from one
    stream of the default text."""
    from dictlens.data.store import StreamingSource
    from dictlens.train.group import fit_together

    out = {}
    for arch, lm in tiny_models.items():
        wires = [Wiring.transcoder(f"mlp_in.{i}", f"mlp_out.{i}") for i in range(lm.n_layers)]
        src = StreamingSource(lm, [h for w in wires for h in w.hooks], "default", tokens=12_288, context=32)
        members = [(w, Trainer(SAEConfig(k=8, n_features=128), TrainConfig(tokens=60_000, batch_size=512,
                                                                            plots=False),
                               src.view(w.reads[0]), target=src.view(w.writes[0]), progress=False))
                   for w in wires]
        out[arch] = fit_together(members, src, progress=False)
    return out


def _text_batches(lm):
    from dictlens.data.tokens import text_batches

    return text_batches(lm, "default", tokens=600, context=32, skip_tokens=12_288)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_mlp_replaced_by_its_transcoder_plus_error_leaves_the_logits(tiny_models, layer_transcoders, arch):
    """The replacement model with error terms is the model (within float32 rounding); without them it
    moves, and the first replaced MLP's output moves by exactly that transcoder's error."""
    from dictlens.data.hooks import read_into, resolve_hook
    from dictlens.eval.splice import dictionary_swap, splice_metrics, swapped_logits

    lm, tcs = tiny_models[arch], layer_transcoders[arch]
    assert [tc.provenance.hook_out for tc in tcs] == [f"mlp_out.{i}" for i in range(lm.n_layers)]
    data = _text_batches(lm)
    ids, keep = data[0]
    with torch.no_grad():
        clean = swapped_logits(lm, [], ids, keep)
        exact = swapped_logits(lm, [dictionary_swap(tc, error_term=True) for tc in tcs], ids, keep)
        torch.testing.assert_close(exact, clean, rtol=1e-5, atol=1e-5)
    with_error = splice_metrics(lm, [dictionary_swap(tc, error_term=True) for tc in tcs], batches=data)
    assert with_error.kl_sae == pytest.approx(0, abs=1e-6) and with_error.agreement == 1.0
    replaced_all = splice_metrics(lm, [dictionary_swap(tc) for tc in tcs], batches=data)
    # (a random-weight model's next tokens hardly depend on its MLPs: small, but far from rounding)
    assert replaced_all.kl_sae > 1e-6 and 0.5 < replaced_all.agreement < 1
    # one MLP replaced, without its error term: its output becomes the transcoder's prediction
    seen: dict[str, torch.Tensor] = {}
    first = tcs[1]
    points = [resolve_hook(lm.model, h) for h in ("mlp_in.1", "mlp_out.1")]
    with torch.no_grad():
        with read_into(lm.model, points[0], seen), read_into(lm.model, points[1], seen):
            lm.model(input_ids=ids)
            x, y = seen["mlp_in.1"].clone(), seen["mlp_out.1"].clone()
        from dictlens.data.hooks import replaced
        from dictlens.eval.splice import sae_replacement

        pred = sae_replacement(first)(x)
        with replaced(lm.model, points[1], lambda out: sae_replacement(first)(seen["mlp_in.1"])), \
                read_into(lm.model, points[0], seen), read_into(lm.model, points[1], seen):
            lm.model(input_ids=ids)
            torch.testing.assert_close(seen["mlp_in.1"], x, rtol=0, atol=0)   # upstream unchanged
            torch.testing.assert_close(seen["mlp_out.1"] - y, pred - y, rtol=1e-6, atol=1e-6)
        assert float((pred - y).norm()) > 0


def test_a_transcoders_splice_from_its_record(tiny_models, layer_transcoders):
    """A single transcoder spliced at its MLP (its hooks from its record) changes the next-token
    distributions; the reference it is judged against zero-ablates that MLP's output (what splicing
    zeros at mlp_out.2 gives)."""
    from dictlens.eval.splice import dictionary_swap, splice_metrics

    lm = tiny_models["llama"]
    tc = layer_transcoders["llama"][2]
    m = splice_metrics(lm, [dictionary_swap(tc)], batches=_text_batches(lm))
    assert m.kl_sae > 0 and m.agreement < 1
    zeros = splice_metrics(lm, "mlp_out.2", torch.zeros_like, _text_batches(lm))
    assert m.ce_zero == pytest.approx(zeros.ce_sae, rel=1e-9) and m.ce_clean == pytest.approx(zeros.ce_clean)
    with pytest.raises(InputError, match="two dictionaries write mlp_out.2"):
        splice_metrics(lm, [dictionary_swap(tc), dictionary_swap(tc)], batches=_text_batches(lm))


def test_dictlens_eval_measures_a_transcoder_and_the_replacement_model(tiny_model_dirs, corpus, tmp_path, capsys):
    """`dictlens eval` on a transcoder run: FVU of its prediction of mlp_out, its splice at mlp_out;
    with --replacement the other layers' transcoders join it: with their error terms the model is
    unchanged (KL 0, every next token agrees), without them it moves."""
    model = str(tiny_model_dirs["llama"])
    hooks = [f"{k}.{i}" for i in range(4) for k in ("mlp_in", "mlp_out")]
    acts = tmp_path / "acts"
    assert main(["harvest", "--model", model, "--text", str(corpus), "--tokens", "4000", "--context", "32",
                 *[a for h in hooks for a in ("--hook", h)], "--out", str(acts), "--shard-tokens", "1000"]) == 0
    runs = tmp_path / "runs"
    assert main(["train", "--acts", str(acts), "--reads", "mlp_in.*", "--writes", "mlp_out.*", "--k", "4",
                 "--expansion", "2", "--tokens", "20000", "--batch-size", "256", "--heldout-tokens", "1000",
                 "--out", str(runs), "--no-plots"]) == 0
    run = [runs / f"mlp_in.{i}_mlp_out.{i}" / "topk-k4-x2-s0" for i in range(4)]
    capsys.readouterr()
    assert main(["eval", str(run[0]), "--acts", str(acts), "--heldout", "1000", "--model", model,
                 "--splice-text", str(corpus), "--splice-tokens", "300", "--context", "32",
                 *[a for r in run[1:] for a in ("--replacement", str(r))]]) == 0
    printed = capsys.readouterr().out
    assert "(mlp_in.0 -> mlp_out.0, last 1,000 tokens)" in printed and "spliced into" in printed
    record = json.loads((run[0] / "eval.json").read_text())
    assert record["writes"] == "mlp_out.0" and record["spliced"]["writes"] == "mlp_out.0"
    assert record["fvu"] == pytest.approx(json.loads((run[0] / "metrics.json").read_text())["fvu"], rel=1e-6)
    rep = record["replacement"]
    assert rep["with_error"]["kl_sae"] == pytest.approx(0, abs=1e-6) and rep["with_error"]["agreement"] == 1.0
    assert rep["without_error"]["kl_sae"] > 0 and len(rep["runs"]) == 4
    assert "replacement model (4 dictionaries spliced together" in printed


def _trained_clt(src, w, out, *, k, n_features, tokens, batch_size):
    """A CLT over ``w``'s layers trained on ``src`` into ``out`` (fit_together, as dictlens train does),
    and its saved form loaded back."""
    from dictlens.data.store import wiring_sources
    from dictlens.sae.clt import CLT
    from dictlens.train.group import fit_together

    x_src, y_src = wiring_sources(src, w)
    t = Trainer(SAEConfig(k=k, n_features=n_features, transcoder=True, clt_layers=len(w.reads)),
                TrainConfig(tokens=tokens, batch_size=batch_size, plots=False), x_src, out, target=y_src,
                progress=False)
    trained = fit_together([(w, t)], src, progress=False)[0]
    return trained, CLT.load(out)


def test_a_cross_layer_transcoder_trains_keeps_causality_and_saves(tiny_models, tmp_path):
    """A CLT over a tiny Llama's four MLPs (Python API): it learns (FVU of every layer's output below
    its mean's), no feature writes an earlier layer (changing layer 2's input moves only layers 2-3's
    predictions), and its saved form predicts what the trained one did."""
    from dictlens.data.store import StreamingSource

    lm = tiny_models["llama"]
    w = Wiring.clt([f"mlp_in.{i}" for i in range(4)], [f"mlp_out.{i}" for i in range(4)])
    assert w.name == "mlp_in.0-3>mlp_out.0-3"
    src = StreamingSource(lm, w.hooks, "default", tokens=8192, context=32)
    clt, back = _trained_clt(src, w, tmp_path / "clt", k=8, n_features=128, tokens=60_000, batch_size=512)
    rows = next(iter(src.batches_by_hook(1024, shuffle=False)))
    x, y = w.inputs(rows), w.targets(rows)
    with torch.no_grad(), clt.ranking("float32"), back.ranking("float32"):
        pred = back(x)
        torch.testing.assert_close(pred, clt(x), rtol=1e-4, atol=1e-5)
        for j in range(4):
            assert _fvu(y[:, 32 * j:32 * (j + 1)], pred[:, 32 * j:32 * (j + 1)]) < 0.9, j
        moved = x.clone()
        moved[:, 64:96] += 3.0
        diff = (back(moved) - pred).abs().amax(0)
    assert float(diff[:64].max()) == 0.0 and float(diff[64:].max()) > 0
    assert [b.W_dec.shape for _, b in back.each()] == [(128, 32 * (4 - layer)) for layer in range(4)]
    with pytest.raises(HookError, match="layers must be consecutive"):
        Wiring.clt(["mlp_in.0", "mlp_in.2"], ["mlp_out.0", "mlp_out.2"])


def test_a_spliced_cross_layer_transcoder_writes_each_layer_what_its_features_predict(tiny_models, tmp_path):
    """Spliced in (no error terms), each MLP output of a CLT's layers becomes exactly the CLT's prediction
    for that layer from the MLP inputs of the same (replaced) pass; with error terms the logits are the
    model's."""
    from contextlib import ExitStack

    from dictlens.data.hooks import read_into, replaced, resolve_hook
    from dictlens.data.store import StreamingSource
    from dictlens.eval.splice import clt_swaps, dictionary_swaps, splice_metrics, swapped_logits

    lm = tiny_models["llama"]
    w = Wiring.clt([f"mlp_in.{i}" for i in range(1, 4)], [f"mlp_out.{i}" for i in range(1, 4)])
    src = StreamingSource(lm, w.hooks, "default", tokens=4096, context=32)
    clt = _trained_clt(src, w, tmp_path / "clt", k=4, n_features=64, tokens=8192, batch_size=512)[1]
    swaps = dictionary_swaps(clt)
    assert [(s.reads, s.writes) for s in swaps] == list(zip(w.reads, w.writes, strict=True))
    ids, keep = _text_batches(lm)[0]
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad(), ExitStack() as stack:
        for s in swaps:
            stack.enter_context(replaced(lm.model, resolve_hook(lm.model, s.writes),
                                         lambda x, s=s: s.fn(seen[s.reads])))
        for h in w.hooks:
            stack.enter_context(read_into(lm.model, resolve_hook(lm.model, h), seen))
        lm.model(input_ids=ids)
        x = torch.cat([seen[h] for h in w.reads], -1).reshape(-1, 3 * lm.d_model)
        with clt.ranking("float32"):
            want = clt(x)
        got = torch.cat([seen[h] for h in w.writes], -1).reshape(-1, 3 * lm.d_model)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        clean = swapped_logits(lm, [], ids, keep)
        exact = swapped_logits(lm, clt_swaps(clt, error_term=True), ids, keep)
        torch.testing.assert_close(exact, clean, rtol=1e-5, atol=1e-5)
    moved = splice_metrics(lm, swaps, batches=_text_batches(lm))
    assert moved.kl_sae > 1e-6 and moved.agreement < 1


def test_dictlens_trains_and_evaluates_a_cross_layer_transcoder(tiny_model_dirs, corpus, tmp_path, capsys):
    """`dictlens train --arch clt` over a tiny Llama's four MLPs: one dictionary, every layer's output
    measured on its own (metrics.json by_output, printed); `dictlens eval` measures the same figures, and
    splices it in: with error terms the model is unchanged, without them it moves. Commands that take
    one-layer dictionaries refuse it by name; bad wiring is a one-line error."""
    from dictlens.load import load_sae

    model = str(tiny_model_dirs["llama"])
    hooks = [f"{k}.{i}" for i in range(4) for k in ("mlp_in", "mlp_out")]
    acts = tmp_path / "acts"
    assert main(["harvest", "--model", model, "--text", str(corpus), "--tokens", "4000", "--context", "32",
                 *[a for h in hooks for a in ("--hook", h)], "--out", str(acts), "--shard-tokens", "1000"]) == 0
    run = tmp_path / "clt"
    capsys.readouterr()
    assert main(["train", "--acts", str(acts), "--arch", "clt", "--reads", "mlp_in.*", "--writes", "mlp_out.*",
                 "--k", "4", "--expansion", "2", "--tokens", "30000", "--batch-size", "256", "--heldout-tokens",
                 "1000", "--out", str(run), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "cross-layer transcoder saved to" in printed and "FVU by output: mlp_out.0" in printed
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["by_output"]) == [f"mlp_out.{i}" for i in range(4)]
    assert all(r["fvu"] < 1 for r in metrics["by_output"].values()), metrics["by_output"]
    config = json.loads((run / "config.json").read_text())
    assert config["format"] == "dictlens-clt" and config["sae"]["clt_layers"] == 4
    assert config["sae"]["n_features"] == 2 * 32   # --expansion per layer
    assert main(["eval", str(run), "--acts", str(acts), "--heldout", "1000", "--model", model,
                 "--splice-text", str(corpus), "--splice-tokens", "300", "--context", "32"]) == 0
    printed = capsys.readouterr().out
    assert "FVU by output: mlp_out.0" in printed and "replacement model (the cross-layer transcoder" in printed
    record = json.loads((run / "eval.json").read_text())
    assert record["hook"] == "mlp_in.0,mlp_in.1,mlp_in.2,mlp_in.3"
    assert record["spliced"]["writes"] == "mlp_out.0,mlp_out.1,mlp_out.2,mlp_out.3"
    for hook, r in metrics["by_output"].items():
        assert record["by_output"][hook]["fvu"] == pytest.approx(r["fvu"], rel=1e-6)
    rep = record["replacement"]
    assert rep["with_error"]["kl_sae"] == pytest.approx(0, abs=1e-6) and rep["with_error"]["agreement"] == 1.0
    assert rep["without_error"]["kl_sae"] > 0
    assert rep["without_error"]["ce_sae"] == pytest.approx(record["spliced"]["ce_sae"], rel=1e-6)
    with pytest.raises(InputError, match="holds a cross-layer transcoder"):
        load_sae(run)
    for args, error in ((["--hook", "resid_post.0", "--reads", "mlp_in.*", "--writes", "mlp_out.*"], "--hook names"),
                        (["--reads", "mlp_in.[02]", "--writes", "mlp_out.[02]"], "layers must be consecutive"),
                        (["--reads", "mlp_in.*", "--writes", "mlp_out.*", "--skip"], "no skip connection")):
        assert main(["train", "--acts", str(acts), "--arch", "clt", *args, "--out", str(tmp_path / "bad")]) == 2
        assert error in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_cross_layer_transcoder_over_four_of_the_default_models_mlps(smollm2, tmp_path):
    """SmolLM2's MLPs 12-15: a TopK CLT (k 16, 1,152 features per layer) trained on 14k harvested tokens
    of the default text, measured on the 2k after them: every layer's output predicted better than its
    mean (FVU per layer); spliced in place of all four MLPs on later text it recovers most of the loss
    their ablation costs, and with its error terms it is the model."""
    from dictlens.data.store import wiring_batches
    from dictlens.data.tokens import text_batches
    from dictlens.eval.metrics import evaluate
    from dictlens.eval.splice import clt_swaps, splice_metrics, splice_reference

    layers = range(12, 16)
    w = Wiring.clt([f"mlp_in.{i}" for i in layers], [f"mlp_out.{i}" for i in layers])
    harvest(HarvestConfig(hooks=w.hooks, out=str(tmp_path / "acts"), model=smollm2.name, text="default",
                          tokens=16384, shard_tokens=2048), smollm2, progress=False)
    src, heldout = split_heldout(CacheHooks(tmp_path / "acts", w.hooks), 2048)
    clt = _trained_clt(src, w, tmp_path / "clt", k=16, n_features=1152, tokens=80_000, batch_size=1024)[1]
    m = evaluate(clt, wiring_batches(heldout, w), outputs=list(w.writes))
    assert m.by_output is not None
    fvu = {h: round(r["fvu"], 3) for h, r in m.by_output.items()}
    reference = splice_reference(smollm2, list(w.writes), text_batches(smollm2, "default", tokens=1024,
                                                                         skip_tokens=20_000))
    s = splice_metrics(smollm2, clt_swaps(clt), reference=reference)
    exact = splice_metrics(smollm2, clt_swaps(clt, error_term=True), reference=reference)
    print(f"CLT over MLPs 12-15: held-out FVU {m.fvu:.3f}, by layer {fvu}; L0 {m.l0:.1f}; spliced CE "
          f"{s.ce_sae:.4f} (clean {s.ce_clean:.4f}, all four MLPs zeroed {s.ce_zero:.4f}), loss recovered "
          f"{s.recovered_vs_zero:.1%}, next-token agreement {s.agreement:.1%}")
    assert m.fvu < 0.8 and all(v < 1 for v in fvu.values()), fvu
    assert s.ce_sae < s.ce_zero and s.recovered_vs_zero > 0.5
    assert exact.kl_sae == pytest.approx(0, abs=1e-4) and exact.agreement > 0.999
