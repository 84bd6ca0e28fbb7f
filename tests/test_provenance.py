"""The record of where a dictionary came from, and the one loader that checks it."""

from __future__ import annotations

import json

import pytest
import torch

from dictlens import SAE, ActivationStore, HarvestConfig, SAEConfig, TrainConfig, harvest
from dictlens.errors import ConfigError, InputError
from dictlens.load import check_cache, check_model, hook_of, load_run, model_of, open_cache
from dictlens.provenance import Provenance
from dictlens.train import train

HOOK = "resid_post.1"


@pytest.fixture
def cache(tiny_model_dirs, corpus, tmp_path):
    model = str(tiny_model_dirs["llama"])
    harvest(HarvestConfig(model=model, hooks=[HOOK, "resid_post.2"], text=str(corpus), tokens=1500, context=32,
                          shard_tokens=500, outlier_factor=3.0, out=str(tmp_path / "acts")), progress=False)
    return tmp_path / "acts"


def test_training_records_where_the_sae_came_from(cache, tmp_path):
    store = ActivationStore(cache, HOOK)
    train(SAEConfig(activation="topk", k=4, n_features=64), TrainConfig(tokens=2048, batch_size=256, plots=False),
          store, tmp_path / "run", progress=False)
    prov = SAE.load(tmp_path / "run").provenance
    manifest = store.manifest
    f = manifest["filter"]
    assert prov.model == manifest["model"] and prov.hook_in == prov.hook_out == prov.hook == HOOK
    assert prov.tokenizer == manifest["tokenizer"] and prov.context == 32 and prov.acts == str(cache)
    assert prov.outlier_limit == pytest.approx(f["outlier_factor"] * f["median_norm"][HOOK])
    assert prov.normalization == "sqrt_d" and prov.input_scale > 0 and prov.source == "dictlens"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert Provenance.from_json(saved["provenance"]) == prov and "metadata" not in saved


def test_a_run_written_by_dictlens_0_1_still_loads(cache, tmp_path):
    """Its untyped ``metadata``; the outlier limit, when not recorded, from the training cache."""
    store = ActivationStore(cache, HOOK)
    sae = SAE(SAEConfig(d_in=32, activation="relu", n_features=16))
    sae.save(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    del cfg["provenance"]
    cfg["metadata"] = {"model": store.model, "hook": HOOK, "acts": str(cache), "context": 32, "sweep": "runs/s"}
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    prov = SAE.load(tmp_path / "old").provenance
    assert (prov.model, prov.hook_in, prov.hook_out, prov.context) == (store.model, HOOK, HOOK, 32)
    assert prov.outlier_limit == pytest.approx(store.provenance().outlier_limit) and prov.notes == {"sweep": "runs/s"}
    cfg["metadata"]["outlier_limit"] = None  # recorded as "no filter": kept so
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    assert SAE.load(tmp_path / "old").provenance.outlier_limit is None


def test_a_record_from_a_newer_dictlens_or_with_a_typo_is_named():
    with pytest.raises(ConfigError, match="format_version: expected at most 1"):
        Provenance.from_json({"format_version": 9})
    with pytest.raises(ConfigError, match="unknown field 'hook_inn' \\(did you mean 'hook_in'\\?\\)"):
        Provenance.from_json({"hook_inn": HOOK})


def test_every_mismatch_is_refused_by_the_one_loader(cache, tiny_models, tiny_model_dirs, tmp_path):
    llama = tiny_models["llama"]
    store = ActivationStore(cache, HOOK)
    good = SAE(SAEConfig(d_in=32, activation="relu", n_features=16), provenance=store.provenance())
    check_cache(good, "run", store)
    check_model(good, "run", llama, HOOK)
    with pytest.raises(InputError, match="trained on resid_post.1, not resid_post.2"):
        check_cache(good, "run", ActivationStore(cache, "resid_post.2"))
    with pytest.raises(InputError, match="trained on resid_post.1, not resid_post.2"):
        hook_of(good, "run", "resid_post.2")
    other = good.provenance.replace(model="gpt2-xl")
    with pytest.raises(InputError, match="trained on activations of gpt2-xl; the cache"):
        check_cache(SAE(good.cfg, provenance=other), "run", store)
    with pytest.raises(InputError, match="trained on activations of gpt2-xl, not"):
        check_model(SAE(good.cfg, provenance=other), "run", llama, HOOK)
    with pytest.raises(InputError, match="trained on activations of gpt2-xl, not x"):
        model_of(SAE(good.cfg, provenance=other), "run", "x")
    renamed = good.provenance.replace(tokenizer={"vocab_size": 7, "sha256": "ab" * 32})
    with pytest.raises(InputError, match="has another tokenizer .* than the SAE in run was trained with"):
        check_model(SAE(good.cfg, provenance=renamed), "run", llama, HOOK)
    with pytest.raises(InputError, match="has another tokenizer"):
        check_cache(SAE(good.cfg, provenance=renamed), "run", store)
    narrow = SAE(SAEConfig(d_in=16, activation="relu", n_features=8), provenance=store.provenance())
    with pytest.raises(InputError, match="reads width 16, the cache's resid_post.1 has width 32"):
        open_cache(narrow, "run", cache)
    unknown = SAE(good.cfg)
    with pytest.raises(InputError, match="does not record its hook; pass --hook"):
        hook_of(unknown, "run")
    with pytest.raises(InputError, match="does not record its model; pass --model"):
        model_of(unknown, "run")


def test_load_run_uses_the_record_everywhere(cache, tmp_path):
    store = ActivationStore(cache, HOOK)
    train(SAEConfig(activation="topk", k=4, n_features=64), TrainConfig(tokens=2048, batch_size=256, plots=False),
          store, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run", device="cpu")
    assert run.hook == HOOK and run.lm.name == store.model
    assert run.max_norm == pytest.approx(store.provenance().outlier_limit)
    # the record is what counts once the training cache is gone (no re-derivation from the cache)
    for p in cache.rglob("*"):
        if p.is_file():
            p.unlink()
    assert load_run(tmp_path / "run", device="cpu").max_norm == pytest.approx(run.max_norm)
    with pytest.raises(InputError, match="trained on resid_post.1, not resid_post.2"):
        load_run(tmp_path / "run", hook="resid_post.2")
    x = torch.randn(3, 32)
    torch.testing.assert_close(run.sae(x), SAE.load(tmp_path / "run")(x))
