"""dictlens.use on the real default model, with a TopK SAE trained here on its layer-24
residual stream: splicing is exact, steering moves the tokens the logit lens names,
attribution predicts real ablation, the monitor reports exactly where a feature fires."""

from __future__ import annotations

import pytest
import torch

from dictlens.data.tap import Tap
from dictlens.provenance import Provenance
from dictlens.use import Edit, Monitor, Splice, Watch, ablate, attribute, make_metric
from dictlens.use.ablate import prompt_batches

HOOK = "resid_post.24"


@pytest.fixture(scope="module")
def real_sae(smollm2):
    """8k tokens of default text at resid_post.24 (outliers dropped as `harvest
    --outlier-factor 10` does), a TopK SAE (k 16, 1,152 features) trained 15 epochs on them."""
    from dictlens.data.store import ArraySource, StreamingSource
    from dictlens.sae.config import SAEConfig
    from dictlens.train.config import TrainConfig
    from dictlens.train.trainer import train

    src = StreamingSource(smollm2, HOOK, "default", tokens=8192, outlier_factor=10)
    x = torch.cat(list(src.batches(4096, shuffle=False)))
    sae = train(SAEConfig(activation="topk", k=16, n_features=1152), TrainConfig(tokens=120_000, batch_size=1024,
                                                                                  plots=False),
                ArraySource(x), progress=False, provenance=Provenance.of_sae("smollm2-135m", HOOK))
    return sae


def _ids(lm, text):
    return torch.tensor([[lm.tokenizer.bos_token_id, *lm.tokenizer(text, add_special_tokens=False).input_ids]])


@torch.no_grad()
def test_splicing_with_the_error_term_leaves_the_logits_unchanged(smollm2, real_sae):
    ids = _ids(smollm2, "The quick brown fox jumps over the lazy dog because it was bored.")
    clean = smollm2.model(ids).logits
    with Splice(smollm2, {HOOK: real_sae}, {HOOK: [Edit(0, "scale", 1.0)]}):
        same = smollm2.model(ids).logits
    with Splice(smollm2, {HOOK: real_sae}, error_term=False):
        recon = smollm2.model(ids).logits
    assert (same - clean).abs().max() < 1e-3 * clean.abs().max()
    loss = torch.nn.functional.cross_entropy
    assert float(loss(recon[0, :-1], ids[0, 1:])) > float(loss(clean[0, :-1], ids[0, 1:]))


@torch.no_grad()
def test_steering_raises_the_tokens_the_logit_lens_boosts(smollm2, real_sae):
    """The five features whose logit lens stands out most (top logit's z-score): adding
    each raises the probability of its ten top lens tokens, more with a larger coefficient."""
    from dictlens.analysis.lens import unembedding

    W_U, gain = unembedding(smollm2.model)
    lens = (real_sae.feature_directions().detach() * gain) @ W_U.T.float()
    z = (lens.max(1).values - lens.mean(1)) / lens.std(1)
    ids = _ids(smollm2, "I went to the market and bought some")
    base = smollm2.model(ids).logits[0, -1].softmax(-1)
    for f in z.argsort(descending=True)[:5].tolist():
        toks = lens[f].topk(10).indices
        mass = []
        for c in (10.0, 20.0):
            with Splice(smollm2, {HOOK: real_sae}, {HOOK: [Edit(f, "add", c)]}):
                p = smollm2.model(ids).logits[0, -1].softmax(-1)
            mass.append(float(p[toks].sum() / base[toks].sum()))
        assert 1.2 < mass[0] < mass[1], (f, mass)


def test_attribution_predicts_real_ablation(smollm2, real_sae):
    metric = make_metric(smollm2, "logprob", [" Paris"])
    r = attribute(smollm2, {HOOK: real_sae}, "The Eiffel Tower is in the city of", metric, top=10, check=8)
    checked = r.checked()
    assert len(checked) == 8
    same = [n for n in checked if (n.attribution > 0) == (n.ablation > 0)]
    assert len(same) >= 7, [(n.feature, n.attribution, n.ablation) for n in checked]
    assert r.agreement()["pearson_r"] > 0.8
    # the features + error + bias + untouched positions add up to Σ x·∂m/∂x
    assert sum(n.attribution for n in r.nodes[HOOK]) == pytest.approx(r.total[HOOK], rel=1e-3, abs=1e-3)
    # ablating the top feature moves the logit the way attribution said
    top = checked[0]
    a = ablate(smollm2, real_sae, HOOK, [top.feature], prompt_batches(smollm2, [r.prompt]), tokens=[" Paris"],
               last_only=True)
    change = a.tokens[0].logprob_clean - a.tokens[0].logprob_ablated
    assert change == pytest.approx(top.ablation, rel=1e-3, abs=1e-4) and (change > 0) == (top.attribution > 0)


@torch.no_grad()
def test_the_monitor_reports_where_a_feature_fires_and_nowhere_else(smollm2, real_sae):
    texts = ["Paris is the capital of France. London is the capital of England.",
             "def f(x):\n    return x + 1\n", "She said that she would come back tomorrow."]
    tap = Tap(smollm2, [HOOK])
    codes = []
    for t in texts:
        x = tap(_ids(smollm2, t))[HOOK][0, 1:].float()
        with real_sae.ranking("float32"):
            codes.append(real_sae.encode(x))
    allc = torch.cat(codes)
    # a feature that fires on some tokens but not most, at a threshold half its max
    fires = (allc > 0).float().mean(0)
    f = int(((fires > 0.05) & (fires < 0.4)).float().mul(allc.max(0).values).argmax())
    threshold = float(allc[:, f].max()) / 2
    events = list(Monitor(smollm2, real_sae, HOOK, [Watch(f, threshold)]).scan(texts))
    for i, c in enumerate(codes):
        want = set((c[:, f] > threshold).nonzero()[:, 0].tolist())
        got = {e.position for e in events if e.doc == i}
        assert got == want
    assert 0 < len(events) < allc.shape[0] / 2
