"""In-memory and streaming sources share the cache's batch interface and filtering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dictlens import ActivationStore, ArraySource, HarvestConfig, StreamingSource, harvest
from dictlens.errors import InputError


def test_array_source_batches_and_stats():
    x = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
    src = ArraySource(x)
    batches = list(src.batches(128, seed=1))
    assert sum(len(b) for b in batches) == 1000 and batches[0].dtype == torch.float32
    got = torch.cat(batches)
    assert torch.equal(got[torch.argsort(got[:, 0])], torch.from_numpy(x)[torch.argsort(torch.from_numpy(x)[:, 0])])
    np.testing.assert_allclose(src.stats.mean, x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    assert len(list(src.batches(128, drop_last=True))) == 7


def test_array_source_rejects_wrong_rank():
    with pytest.raises(InputError, match="2-D"):
        ArraySource(np.zeros(5))


def test_streaming_gives_the_cached_rows(llama, corpus, tmp_path):
    cfg = HarvestConfig(hooks=["mlp_out.2"], out=str(tmp_path / "c"), model=llama.name, text=str(corpus),
                        tokens=500, context=32, batch_size=4)
    harvest(cfg, llama, progress=False)
    cached = ActivationStore(tmp_path / "c").read_all()
    stream = StreamingSource(llama, "mlp_out.2", str(corpus), tokens=500, context=32, batch_contexts=4)
    streamed = torch.cat(list(stream.batches(100, shuffle=False)))
    torch.testing.assert_close(streamed, cached, rtol=1e-6, atol=1e-6)
    shuffled = torch.cat(list(stream.batches(100, shuffle=True, seed=0)))
    assert len(shuffled) == 500 and not torch.equal(shuffled, streamed)
    assert stream.stats.count == 500
