"""The activation cache: round trip, resume, corruption, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dictlens.data.cache as cache_mod
from dictlens import ActivationStore, HarvestConfig, Tap, harvest
from dictlens.config import from_dict
from dictlens.data.packing import pack_contexts
from dictlens.data.text import iter_documents
from dictlens.errors import ActivationError, CacheError, ConfigError, InputError


def _cfg(lm, out: Path, corpus: Path, **kw) -> HarvestConfig:
    base = {"hooks": ["resid_post.1"], "out": str(out), "model": lm.name, "text": str(corpus),
            "tokens": 600, "context": 32, "batch_size": 4, "shard_tokens": 100}
    return HarvestConfig(**{**base, **kw})


def _run(lm, out, corpus, **kw):
    return harvest(_cfg(lm, out, corpus, **kw), lm, progress=False)


def _reference(lm, corpus: Path, hooks, context=32):
    """Activations of non-special tokens, straight from the tap, in cache order."""
    contexts = list(pack_contexts(iter_documents(str(corpus)), lm.tokenizer, context, prepend_bos=True))
    ids = torch.from_numpy(np.stack([c.ids for c in contexts]))
    acts = Tap(lm, hooks)(ids)
    mask = ~torch.isin(ids, torch.tensor([0, 1, 2]))
    mask &= torch.arange(context)[None] < torch.tensor([c.n_valid for c in contexts])[:, None]
    return {h: a[mask] for h, a in acts.items()}, ids[mask]


def test_round_trip_matches_the_tap(llama, corpus, tmp_path):
    result = _run(llama, tmp_path / "c", corpus, hooks=["resid_post.1", "mlp_out.0"])
    ref, ref_ids = _reference(llama, corpus, ["resid_post.1", "mlp_out.0"])
    m = result.manifest
    assert m["complete"] and m["tokens"] == 600 and len(m["shards"]) >= 5
    for hook in ("resid_post.1", "mlp_out.0"):
        store = ActivationStore(tmp_path / "c", hook, model=llama.name)
        got = store.read_all()
        torch.testing.assert_close(got, ref[hook][:600], rtol=1e-5, atol=1e-6)
        stats = store.stats
        np.testing.assert_allclose(stats.mean, got.double().mean(0).numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(stats.var, got.double().var(0, unbiased=False).numpy(), rtol=1e-5, atol=1e-6)
        assert stats.mean_norm == pytest.approx(float(got.double().norm(dim=1).mean()), rel=1e-6)
    table = np.concatenate([store.token_table(i) for i in range(store.n_shards)])
    assert table[:, 0].tolist() == ref_ids[:600].tolist()
    assert not np.isin(table[:, 0], [0, 1, 2]).any()  # BOS/EOS/pad excluded
    assert (table[:, 1] > 0).all()  # position 0 holds BOS


def test_batches_visit_every_row_once(llama, corpus, tmp_path):
    _run(llama, tmp_path / "c", corpus)
    store = ActivationStore(tmp_path / "c")
    everything = store.read_all()
    plain = torch.cat(list(store.batches(64, shuffle=False)))
    torch.testing.assert_close(plain, everything, rtol=0, atol=0)
    batches = list(store.batches(64, shuffle=True, seed=3, buffer_rows=250))
    assert [len(b) for b in batches[:-1]] == [64] * (len(batches) - 1)
    shuffled = torch.cat(batches)
    assert not torch.equal(shuffled, everything)
    order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    torch.testing.assert_close(order(shuffled), order(everything), rtol=0, atol=0)
    again = torch.cat(list(store.batches(64, shuffle=True, seed=3, buffer_rows=250)))
    assert torch.equal(again, shuffled)
    assert all(len(b) == 64 for b in store.batches(64, drop_last=True))


def test_resume_after_interruption_gives_the_same_cache(llama, corpus, tmp_path, monkeypatch):
    _run(llama, tmp_path / "whole", corpus)
    real = cache_mod.iter_chunks

    def interrupted(*args, **kwargs):
        for i, chunk in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(cache_mod, "iter_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(llama, tmp_path / "part", corpus)
    partial = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert not partial["complete"] and 0 < partial["tokens"] < 600
    kept = {s["files"]["resid_post.1"]["path"]: (tmp_path / "part" / s["files"]["resid_post.1"]["path"]).stat()
            for s in partial["shards"]}
    monkeypatch.setattr(cache_mod, "iter_chunks", real)
    result = _run(llama, tmp_path / "part", corpus)
    assert result.new_tokens == 600 - partial["tokens"]
    for path, st in kept.items():  # finished shards were kept, not rewritten
        assert (tmp_path / "part" / path).stat().st_ino == st.st_ino
    a, b = ActivationStore(tmp_path / "whole"), ActivationStore(tmp_path / "part")
    assert torch.equal(a.read_all(), b.read_all())
    assert a.manifest["stats"] == b.manifest["stats"]
    assert a.manifest["filter"] == b.manifest["filter"]


def test_extending_a_complete_cache(llama, corpus, tmp_path):
    _run(llama, tmp_path / "c", corpus, tokens=300)
    again = _run(llama, tmp_path / "c", corpus, tokens=300)
    assert again.new_tokens == 0
    more = _run(llama, tmp_path / "c", corpus, tokens=500)
    assert more.manifest["tokens"] == 500 and more.new_tokens == 200


def test_truncated_shard_is_named(llama, corpus, tmp_path):
    _run(llama, tmp_path / "c", corpus)
    shard = tmp_path / "c" / "resid_post.1" / "00002.npy"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheError, match=r"resid_post.1/00002.npy is truncated"):
        ActivationStore(tmp_path / "c")
    with pytest.raises(CacheError, match=r"00002.npy is truncated"):
        _run(llama, tmp_path / "c", corpus, tokens=700)


def test_altered_shard_is_named_and_never_read(llama, corpus, tmp_path):
    _run(llama, tmp_path / "c", corpus)
    shard = tmp_path / "c" / "resid_post.1" / "00001.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = ActivationStore(tmp_path / "c")  # same size: caught when read
    store.shard(0)
    with pytest.raises(CacheError, match=r"00001.npy is altered"):
        store.shard(1)
    with pytest.raises(CacheError, match=r"00001.npy is altered"):
        list(store.batches(32))


def test_manifest_mismatch(llama, corpus, tmp_path):
    _run(llama, tmp_path / "c", corpus)
    with pytest.raises(CacheError, match="harvested from model .* not 'other-model'"):
        ActivationStore(tmp_path / "c", model="other-model")
    with pytest.raises(CacheError, match=r"holds hooks \['resid_post.1'\], not 'mlp_out.2'"):
        ActivationStore(tmp_path / "c", "mlp_out.2")
    with pytest.raises(CacheError, match=r"hooks = \['resid_post.1'\], but this run asks for \['mlp_out.2'\]"):
        _run(llama, tmp_path / "c", corpus, hooks=["mlp_out.2"])
    overwritten = _run(llama, tmp_path / "c", corpus, hooks=["mlp_out.2"], overwrite=True)
    assert overwritten.manifest["hooks"] == ["mlp_out.2"]
    assert not (tmp_path / "c" / "resid_post.1" / "00000.npy").exists()
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="manifest.json is not valid JSON"):
        ActivationStore(tmp_path / "c")


def test_out_dir_with_other_files_is_left_alone(llama, corpus, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="not empty and holds no activation cache"):
        _run(llama, tmp_path / "c", corpus, overwrite=True)
    assert (tmp_path / "c" / "thesis.tex").read_text() == "precious"


def _inject(lm, hook_module: str, fn):
    module = dict(lm.model.named_modules())[hook_module]
    return module.register_forward_hook(lambda m, a, o: fn(o))


def test_nan_is_an_error_naming_where_unless_dropped(llama, corpus, tmp_path):
    def poison(out):
        if out.shape[0] < 3:  # the one-token width probe
            return
        out[1, 5, 3] = float("nan")
        out[2, 7, 0] = float("inf")

    handle = _inject(llama, "model.layers.1", poison)
    try:
        with pytest.raises(ActivationError, match=r"resid_post.1: 2 activation rows contain NaN or Inf "
                                                  r"\(first at context 1 position 5"):
            _run(llama, tmp_path / "c", corpus)
        assert json.loads((tmp_path / "c" / "manifest.json").read_text())["tokens"] == 0
        result = _run(llama, tmp_path / "d", corpus, drop_nonfinite=True)
    finally:
        handle.remove()
    assert result.manifest["filter"]["dropped_nonfinite"] > 0
    assert torch.isfinite(ActivationStore(tmp_path / "d").read_all()).all()


def test_float16_overflow_is_refused_and_bfloat16_round_trips(llama, corpus, tmp_path):
    handle = _inject(llama, "model.layers.1", lambda out: out.mul_(1e7))
    try:
        with pytest.raises(ActivationError, match="overflow float16; use --dtype bfloat16"):
            _run(llama, tmp_path / "c", corpus, dtype="float16")
        result = _run(llama, tmp_path / "b", corpus, dtype="bfloat16")
    finally:
        handle.remove()
    store = ActivationStore(result.path)
    got = store.read_all()
    ref, _ = _reference(llama, corpus, ["resid_post.1"])
    torch.testing.assert_close(got, (ref["resid_post.1"][:600] * 1e7).bfloat16().float(), rtol=0, atol=0)


def test_outliers_are_dropped_and_reported(llama, corpus, tmp_path):
    def sink(out):  # a massive activation at the first position, as in real LMs
        out[:, 0] *= 100

    handle = _inject(llama, "model.layers.1", sink)
    try:
        result = _run(llama, tmp_path / "c", corpus, prepend_bos="no", outlier_factor=10.0)
    finally:
        handle.remove()
    m = result.manifest
    table = np.concatenate([ActivationStore(tmp_path / "c").token_table(i) for i in range(len(m["shards"]))])
    assert (table[:, 1] > 0).all()  # every first-position token went
    assert m["filter"]["dropped_outlier"] >= m["contexts"] - 1
    assert m["outlier_variance_share"]["resid_post.1"] > 0.9


def test_bad_inputs(llama, corpus, tmp_path):
    with pytest.raises(ConfigError, match="context: 512 tokens is longer than .* allows \\(256\\)"):
        _run(llama, tmp_path / "c", corpus, context=512)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match="is empty"):
        _run(llama, tmp_path / "d", empty)
    with pytest.raises(ConfigError, match="dtype: expected float32, float16 or bfloat16, found 'int8'"):
        _cfg(llama, tmp_path / "e", corpus, dtype="int8")
    with pytest.raises(ConfigError, match="unknown field 'tokns' \\(did you mean 'tokens'\\?\\)"):
        from_dict(HarvestConfig, {"hooks": ["resid_post.1"], "out": "x", "tokns": 5})
    from dictlens.errors import HookError

    with pytest.raises(HookError, match="valid: resid_pre.0-3"):
        _run(llama, tmp_path / "f", corpus, hooks=["resid_post.7"])
    assert not (tmp_path / "f").exists()  # nothing written for a bad hook


def test_a_cache_refuses_a_tokenizer_with_other_ids(llama, corpus, tmp_path):
    import copy
    import dataclasses

    from dictlens.data.packing import check_tokenizer, tokenizer_fingerprint

    result = _run(llama, tmp_path / "c", corpus, tokens=300)
    saved = result.manifest["tokenizer"]
    assert saved == tokenizer_fingerprint(llama.tokenizer) and saved["vocab_size"] == len(llama.tokenizer)
    check_tokenizer(result.manifest, llama.tokenizer, llama.name, tmp_path / "c")   # the same: silent
    other = copy.deepcopy(llama.tokenizer)
    other.add_tokens(["<a-token-the-cache-never-saw>"])
    changed = dataclasses.replace(llama, tokenizer=other)
    with pytest.raises(InputError, match="tokenizer .* is not the one .* harvested with"):
        _run(changed, tmp_path / "c", corpus, tokens=500)     # extending the cache with other ids
