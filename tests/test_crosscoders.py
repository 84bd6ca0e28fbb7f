"""Crosscoders: one dictionary over several hooks at once. On planted data it finds the features
written to both hooks and those only one hook has, whatever the hooks' raw sizes (each hook is scaled
on its own in training); its saved form reads and writes raw activations; `dictlens train --arch
crosscoder` and `dictlens eval` measure each hook and how the features divide among them; bad
wiring is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch

from dictlens.cli import main
from dictlens.data.hooks import Wiring
from dictlens.data.store import ArrayHooks, wiring_batches, wiring_sources
from dictlens.errors import ConfigError, HookError, InputError
from dictlens.eval.metrics import EXCLUSIVE_AT, evaluate, relative_norms
from dictlens.sae.config import SAEConfig
from dictlens.sae.model import SAE
from dictlens.train.config import TrainConfig
from dictlens.train.group import fit_together
from dictlens.train.trainer import Trainer

D = 12
LARGER = 20.0   # hook b's raw size against hook a's


def _planted(n=40_000, seed=0):
    """Two hooks of width D written by 16 planted features: 8 write both hooks, 4 only a, 4 only b
    (each active on 8% of tokens, magnitude 1-3); hook b is LARGER times hook a in raw units."""
    g = torch.Generator().manual_seed(seed)

    def unit(k):
        v = torch.randn(k, D, generator=g)
        return v / v.norm(dim=1, keepdim=True)

    zeros = torch.zeros(4, D)
    dirs = torch.cat([torch.cat([unit(8), unit(8)], 1), torch.cat([unit(4), zeros], 1),
                      torch.cat([zeros, unit(4)], 1)])
    on = torch.rand(n, 16, generator=g) < 0.08
    codes = on * (1 + 2 * torch.rand(n, 16, generator=g))
    x = codes @ dirs + 0.01 * torch.randn(n, 2 * D, generator=g)
    x[:, D:] *= LARGER
    raw = dirs.clone()
    raw[:, D:] *= LARGER
    return x, raw, ["shared"] * 8 + ["a"] * 4 + ["b"] * 4


def test_a_crosscoder_recovers_features_planted_in_both_hooks_and_in_one(tmp_path):
    x, raw, kinds = _planted()
    src = ArrayHooks({"a": x[:-4000, :D], "b": x[:-4000, D:]})
    held = ArrayHooks({"a": x[-4000:, :D], "b": x[-4000:, D:]})
    w = Wiring.crosscoder(["a", "b"])
    reads, target = wiring_sources(src, w)
    assert target is None
    t = Trainer(SAEConfig(k=3, n_features=48, crosscoder=2), TrainConfig(tokens=300_000, batch_size=512, plots=False),
                reads, tmp_path / "cc", progress=False)
    trained = fit_together([(w, t)], src, progress=False)[0]
    cc = SAE.load(tmp_path / "cc")
    assert cc.cfg.crosscoder == 2 and cc.d_in == 2 * D and cc.provenance.hook_in == "a,b"
    m = evaluate(cc, wiring_batches(held, w), outputs=["a", "b"])
    assert m.by_output is not None and m.hook_shares is not None
    assert m.by_output["a"]["fvu"] < 0.15 and m.by_output["b"]["fvu"] < 0.15, m.by_output
    # the saved form predicts in raw units what the trained one did, and its norms are the trained ones
    with torch.no_grad(), cc.ranking("float32"), trained.ranking("float32"):
        torch.testing.assert_close(cc(x[:256]), trained(x[:256]), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(relative_norms(cc), relative_norms(trained), rtol=1e-4, atol=1e-5)
    # each planted feature: the learned feature that answers it points its way and is classed as it was planted
    rel = relative_norms(cc)
    with torch.no_grad(), cc.ranking("float32"):
        p, vals = cc.encode_sparse(2 * raw)
    dense = torch.zeros(len(raw), cc.n_features)
    dense[p.rows, p.cols] = vals
    best = dense.argmax(1)
    learned = cc.W_dec.detach()[best]
    cos = torch.nn.functional.cosine_similarity(learned, raw, dim=1)
    assert float(cos.min()) > 0.9, cos
    for i, kind in enumerate(kinds):
        share_a = float(rel[best[i], 0])
        if kind == "shared":
            assert 1 - EXCLUSIVE_AT < share_a < EXCLUSIVE_AT, (i, share_a)
        else:
            assert (share_a if kind == "a" else 1 - share_a) >= EXCLUSIVE_AT, (i, kind, share_a)
    shares = m.hook_shares
    live = shares["live_features"]
    assert all(round(v * live) >= 4 for v in shares["exclusive"].values()) and shares["shared"] * live >= 8, shares
    assert sum(shares["relative_norm_histogram"]) == shares["live_features"]


def test_dictlens_trains_and_evaluates_a_crosscoder(tiny_model_dirs, corpus, tmp_path, capsys):
    """`dictlens train --arch crosscoder` over a tiny Llama's residual stream at two layers: one dictionary,
    each hook's FVU and the features' division among the hooks in metrics.json and printed; `dictlens eval`
    the same figures; a splice, a one-hook command, one hook, or hooks of two widths are refused by name."""
    from dictlens.load import load_sae

    model = str(tiny_model_dirs["llama"])
    acts = tmp_path / "acts"
    hooks = ["resid_post.1", "resid_post.3", "mlp_hidden.1"]
    assert main(["harvest", "--model", model, "--text", str(corpus), "--tokens", "4000", "--context", "32",
                 *[a for h in hooks for a in ("--hook", h)], "--out", str(acts), "--shard-tokens", "1000"]) == 0
    run = tmp_path / "cc"
    capsys.readouterr()
    assert main(["train", "--acts", str(acts), "--arch", "crosscoder", "--hook", "resid_post.1", "--hook",
                 "resid_post.3", "--k", "8", "--expansion", "4", "--tokens", "30000", "--batch-size", "256",
                 "--heldout-tokens", "1000", "--out", str(run), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "crosscoder saved to" in printed and "FVU by output: resid_post.1" in printed
    assert "shared by several hooks" in printed
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["by_output"]) == ["resid_post.1", "resid_post.3"]
    assert all(r["fvu"] < 0.9 for r in metrics["by_output"].values()), metrics["by_output"]
    shares = metrics["hook_shares"]
    assert shares["shared"] + sum(shares["exclusive"].values()) == pytest.approx(1.0)
    config = json.loads((run / "config.json").read_text())
    assert config["sae"]["crosscoder"] == 2 and config["sae"]["n_features"] == 4 * 32   # --expansion per hook
    assert len(config["provenance"]["notes"]["input_scales"]) == 2
    assert main(["eval", str(run), "--acts", str(acts), "--heldout", "1000"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((run / "eval.json").read_text())
    assert record["hook"] == "resid_post.1,resid_post.3" and "shared by several hooks" in printed
    for hook, r in metrics["by_output"].items():
        assert record["by_output"][hook]["fvu"] == pytest.approx(r["fvu"], rel=1e-6)
    assert record["hook_shares"] == shares
    assert main(["eval", str(run), "--acts", str(acts), "--model", model, "--splice-text", str(corpus),
                 "--splice-tokens", "200", "--context", "32"]) == 2
    assert "a crosscoder's reconstruction of each hook reads every hook" in capsys.readouterr().err
    with pytest.raises(InputError, match="holds a crosscoder over 2 hooks"):
        load_sae(run)
    for args, error in ((["--hook", "resid_post.1"], "reads several hooks at once"),
                        (["--hook", "resid_post.1", "--hook", "mlp_hidden.1"], "must share one width"),
                        (["--reads", "resid_post.1", "--writes", "resid_post.3"], "--reads/--writes name transcoders")):
        assert main(["train", "--acts", str(acts), "--arch", "crosscoder", *args, "--out", str(tmp_path / "bad")]) == 2
        assert error in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="tied: not for a crosscoder"):
        SAEConfig(crosscoder=2, tied=True)
    with pytest.raises(HookError, match="reads several hooks"):
        Wiring.crosscoder(["resid_post.1"])
