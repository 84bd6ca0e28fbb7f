"""The SAE spliced into the model: the definitions of loss recovered, pinned on tiny models."""

from __future__ import annotations

import pytest
import torch

from dictlens.errors import InputError
from dictlens.eval.splice import splice_metrics


def _batches(vocab, n=3, b=2, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (b, t), generator=g)
        keep = torch.ones(b, t, dtype=torch.bool)
        keep[:, 0] = False  # e.g. BOS: kept clean, not scored
        out.append((ids, keep))
    return out


@pytest.mark.parametrize(("arch", "hook"), [("llama", "resid_post.1"), ("llama", "resid_pre.1"),
                                            ("gpt2", "mlp_out.0"), ("gpt_neox", "attn_out.1")])
def test_identity_recovers_everything_and_ablations_nothing(tiny_models, arch, hook):
    lm = tiny_models[arch]
    data = _batches(lm.model.config.vocab_size)
    same = splice_metrics(lm, hook, lambda x: x, data)
    assert same.ce_sae == pytest.approx(same.ce_clean, abs=1e-5)
    assert same.recovered_vs_zero == pytest.approx(1.0, abs=1e-4) and same.kl_sae == pytest.approx(0.0, abs=1e-5)
    assert same.n_tokens == 3 * 2 * 22  # 23 predictions per row, the first from the unscored position
    zero = splice_metrics(lm, hook, torch.zeros_like, data)
    assert zero.ce_sae == pytest.approx(zero.ce_zero, rel=1e-6) and zero.recovered_vs_zero == pytest.approx(0.0)
    assert zero.kl_sae > 0 and zero.delta_lm_loss == pytest.approx(zero.ce_zero - zero.ce_clean)
    # replacing by the mean (computed in a first pass) is exactly mean ablation
    mean_vec = torch.full((lm.model.config.hidden_size,), 0.25)
    by_mean = splice_metrics(lm, hook, lambda x: mean_vec.expand_as(x), data, mean=mean_vec)
    assert by_mean.recovered_vs_mean == pytest.approx(0.0, abs=1e-6)


def test_on_the_real_default_model_a_noisy_reconstruction_recovers_part(smollm2):
    text = "The capital of France is Paris. The capital of Germany is Berlin. Water boils at 100 degrees."
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 0] = False
    g = torch.Generator().manual_seed(3)

    def noisy(x):
        return x + 0.3 * x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5 * torch.randn(x.shape, generator=g)

    m = splice_metrics(smollm2, "resid_post.15", noisy, [(ids, keep)])
    assert m.ce_clean < m.ce_sae < m.ce_zero and m.kl_sae > 0
    assert 0 < m.recovered_vs_zero < 1 and 0 < m.recovered_vs_mean < 1
    assert m.ce_clean < 3.5  # the real model predicts this text well


def test_bad_input(llama):
    data = _batches(llama.model.config.vocab_size)
    with pytest.raises(InputError, match="no tokens to score"):
        splice_metrics(llama, "resid_post.1", lambda x: x, [])
    with pytest.raises(InputError, match="replacement has shape"):
        splice_metrics(llama, "resid_post.1", lambda x: x[..., :4], data)


def test_text_batches_skip_the_trained_part_and_keep_no_special_tokens(llama, corpus):
    from dictlens.data.tokens import text_batches

    first = text_batches(llama, str(corpus), tokens=150, context=32, batch_size=2)
    later = text_batches(llama, str(corpus), tokens=50, context=32, batch_size=2, skip_tokens=64)
    assert torch.equal(later[0][0][0], first[1][0][0])  # two contexts of 32 skipped: batch 2 starts there
    ids, keep = first[0]
    bos = llama.tokenizer.bos_token_id
    assert bos is None or not bool(keep[ids == bos].any())
    with pytest.raises(InputError, match="after the first"):
        text_batches(llama, str(corpus), tokens=50, context=32, batch_size=2, skip_tokens=10**9)


def test_positions_above_the_outlier_limit_stay_clean_and_unscored(llama):
    """An SAE never trained on attention-sink-sized activations must not be judged on them:
    a replacement that wrecks only the large-norm positions costs nothing under the limit."""
    from dictlens.data.activations import outlier_limit
    from dictlens.data.tap import Tap
    from dictlens.eval.splice import splice_reference

    hook = "resid_post.1"
    data = _batches(llama.model.config.vocab_size)
    norms = torch.cat([Tap(llama, [hook])(ids)[hook][keep].norm(dim=-1) for ids, keep in data])
    limit = float(norms.quantile(0.8))

    def wreck_big(x):
        return torch.where(x.norm(dim=-1, keepdim=True) > limit, 50 * x, x)

    plain = splice_metrics(llama, hook, wreck_big, data)
    assert plain.n_outliers == 0 and plain.kl_sae > 1e-4, plain
    limited = splice_metrics(llama, hook, wreck_big, data, max_norm=limit)
    assert limited.n_outliers == int((norms > limit).sum()) > 0
    assert limited.n_tokens < plain.n_tokens
    assert limited.ce_sae == pytest.approx(limited.ce_clean, abs=1e-5) and limited.kl_sae == pytest.approx(0, abs=1e-5)
    with pytest.raises(InputError, match="no tokens to score"):
        splice_reference(llama, hook, data, max_norm=0.0)
    manifest = {"filter": {"outlier_factor": 10.0, "median_norm": {hook: 2.5}}}
    assert outlier_limit(manifest, hook) == 25.0
    assert outlier_limit({"filter": {"outlier_factor": None}}, hook) is None and outlier_limit({}, hook) is None
