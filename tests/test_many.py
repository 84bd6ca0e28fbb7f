"""Many dictionaries from one pass: every hook and configuration trained side by side from one
read of a cache or one forward pass per batch, each exactly what it would be alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dictlens.cli import main
from dictlens.data.store import CacheHooks, StreamingSource
from dictlens.errors import HookError
from dictlens.sae.config import SAEConfig
from dictlens.train.config import TrainConfig
from dictlens.train.group import fit_together
from dictlens.train.trainer import Trainer


def _harvest(model: str, corpus: Path, out: Path, hook: str = "resid_post.*", tokens: int = 2400) -> None:
    assert main(["harvest", "--model", model, "--hook", hook, "--text", str(corpus), "--tokens", str(tokens),
                 "--context", "64", "--shard-tokens", "500", "--out", str(out)]) == 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "sae.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_every_hook_and_k_from_one_read_of_the_cache_each_as_if_alone(tiny_model_dirs, corpus, tmp_path, capsys):
    model = str(tiny_model_dirs["llama"])
    acts = tmp_path / "acts"
    _harvest(model, corpus, acts)
    manifest = json.loads((acts / "manifest.json").read_text())
    assert manifest["hooks"] == [f"resid_post.{i}" for i in range(4)]   # the pattern, in forward order
    common = ["--tokens", "3072", "--batch-size", "256", "--expansion", "2", "--no-plots", "--heldout-tokens", "500"]
    assert main(["train", "--acts", str(acts), "--hook", "resid_post.[12]", "--k", "4", "--k", "8", *common,
                 "--out", str(tmp_path / "many")]) == 0
    out = capsys.readouterr().out
    many = tmp_path / "many"
    runs = sorted(p.parent.relative_to(many).as_posix() for p in many.rglob("sae.safetensors"))
    assert runs == ["resid_post.1/topk-k4-x2-s0", "resid_post.1/topk-k8-x2-s0",
                    "resid_post.2/topk-k4-x2-s0", "resid_post.2/topk-k8-x2-s0"]
    assert out.count("held-out") == 4 and "on resid_post.2" in out
    for run in runs:
        cfg = json.loads((tmp_path / "many" / run / "config.json").read_text())
        assert cfg["provenance"]["hook_in"] == run.split("/")[0]
        metrics = json.loads((tmp_path / "many" / run / "metrics.json").read_text())
        assert metrics["fvu"] < 0.9 and metrics["l0"] == pytest.approx(float(run.split("-k")[1].split("-")[0]))
    # the same SAE trained alone on its hook: the same weights, bit for bit
    assert main(["train", "--acts", str(acts), "--hook", "resid_post.2", "--k", "8", *common,
                 "--out", str(tmp_path / "alone")]) == 0
    _same(_weights(tmp_path / "alone"), _weights(tmp_path / "many" / "resid_post.2/topk-k8-x2-s0"))
    # patterns that match nothing, and a missing hook, are one-line errors
    assert main(["train", "--acts", str(acts), "--hook", "mlp_out.*", *common, "--out", str(tmp_path / "x")]) == 2
    assert "hook pattern 'mlp_out.*' matches no hook of" in capsys.readouterr().err
    assert main(["train", "--acts", str(acts), *common, "--out", str(tmp_path / "x")]) == 2
    assert "name the one to read (--hook), or several" in capsys.readouterr().err


def test_a_group_resumes_exactly_even_when_one_member_saved_ahead(tiny_model_dirs, corpus, tmp_path):
    model = str(tiny_model_dirs["llama"])
    acts = tmp_path / "acts"
    _harvest(model, corpus, acts, hook="resid_post.1", tokens=1600)
    _harvest(model, corpus, tmp_path / "acts2", hook="resid_post.*", tokens=1600)
    source = CacheHooks(tmp_path / "acts2", ["resid_post.1", "resid_post.3"])
    sae = SAEConfig(activation="topk", k=4, expansion=2)

    def group(root: Path, tokens: tuple[int, int], resume: bool) -> list:
        members = [(h, Trainer(sae, TrainConfig(tokens=t, batch_size=128, checkpoint_every=256, plots=False),
                               source.view(h), root / h, progress=False))
                   for h, t in zip(source.hooks, tokens, strict=True)]
        return fit_together(members, source, resume=resume, progress=False)

    # uninterrupted: 3 epochs of the 1,500-odd rows for both (epoch boundaries crossed)
    whole = group(tmp_path / "whole", (4608, 4608), resume=False)
    # interrupted: the first member stopped at 2,048 tokens, the second at 3,072 (ahead), then resumed
    group(tmp_path / "part", (2048, 3072), resume=False)
    resumed = group(tmp_path / "part", (4608, 4608), resume=True)
    for a, b in zip(whole, resumed, strict=True):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key
    # and each is what it is alone
    alone = Trainer(sae, TrainConfig(tokens=4608, batch_size=128, plots=False), source.view("resid_post.3"),
                    tmp_path / "alone", progress=False).fit()
    for key, value in alone.state_dict().items():
        assert torch.equal(value, whole[1].state_dict()[key]), key


def test_one_stream_feeds_every_hook(tiny_model_dirs, tiny_models, corpus, tmp_path):
    """Several hooks streamed through one forward pass per batch; each SAE equals the one trained
    on a stream of its hook alone (no outlier filter: the same rows)."""
    llama = tiny_models["llama"]
    model = str(tiny_model_dirs["llama"])
    assert main(["train", "--model", model, "--hook", "mlp_out.*", "--hook", "resid_post.3", "--text", str(corpus),
                 "--tokens", "1024", "--batch-size", "256", "--k", "4", "--expansion", "2", "--no-plots",
                 "--out", str(tmp_path / "s")]) == 0
    runs = sorted(p.parent.name for p in (tmp_path / "s").glob("*/*/sae.safetensors"))
    assert len(runs) == 5
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [f"mlp_out.{i}" for i in range(4)] + ["resid_post.3"]
    stream = StreamingSource(llama, "mlp_out.2", str(corpus), tokens=1024, context=128)
    Trainer(SAEConfig(activation="topk", k=4, expansion=2), TrainConfig(tokens=1024, batch_size=256, plots=False),
            stream, tmp_path / "alone", progress=False).fit()
    _same(_weights(tmp_path / "alone"), _weights(tmp_path / "s" / "mlp_out.2" / "topk-k4-x2-s0"))
    with pytest.raises(HookError, match="does not exist on this model"):
        StreamingSource(llama, ["attn_out.*"], str(corpus), tokens=10)  # not expanded here: the tap refuses


def test_the_real_default_model_trains_a_dictionary_per_layer_from_one_stream(smollm2):
    """Six layers of SmolLM2 from one forward pass per batch: each SAE reconstructs its own hook."""
    from dictlens.eval.metrics import evaluate

    hooks = [f"resid_post.{i}" for i in range(0, 12, 2)]
    stream = StreamingSource(smollm2, hooks, "default", tokens=6144, context=128, outlier_factor=10)
    members = [(h, Trainer(SAEConfig(activation="topk", k=16, expansion=2),
                           TrainConfig(tokens=6144, batch_size=512, plots=False), stream.view(h), progress=False))
               for h in hooks]
    saes = fit_together(members, stream, progress=False)
    rows = list(stream.batches_by_hook(2048, shuffle=False))   # one more pass, for every hook
    for (hook, trainer), sae in zip(members, saes, strict=True):
        m = evaluate(sae, [r[hook] for r in rows])
        assert m.fvu < 0.7 and m.l0 == 16, (hook, m.fvu)  # 12 steps: far from converged, far from 1
        assert sae.provenance.hook_in == hook and sae.provenance.outlier_limit is not None
        assert trainer.state.tokens == 6144
