"""dictlens sweep: a grid from one multi-hook cache, evaluated, frontiers and the per-layer table."""

from __future__ import annotations

import csv
import json

import pytest

from dictlens.cli import main
from dictlens.errors import ConfigError
from dictlens.eval.sweep import Grid, at_l0, layer_table, pareto, parse_coeffs


def test_pareto_and_interpolation_by_hand():
    pts = [{"l0": 8, "fvu": 0.5}, {"l0": 16, "fvu": 0.3}, {"l0": 16, "fvu": 0.4}, {"l0": 32, "fvu": 0.2},
           {"l0": 40, "fvu": 0.25}]
    assert pareto(pts) == [True, True, False, True, False]
    line = [{"l0": 8, "fvu": 0.5}, {"l0": 32, "fvu": 0.2}]
    assert at_l0(line, "fvu", 16) == pytest.approx(0.35)       # halfway in log L0
    assert at_l0(line, "fvu", 33) == pytest.approx(0.2)         # an endpoint within 5%
    assert at_l0(line, "fvu", 64) is None                       # outside the swept range
    rows = [{"hook": h, "activation": "topk", "n_features": 64, "k": k, "coeff": None, "seed": s, "l0": k,
             "fvu": base / k + s * 0.01, "delta_lm_loss": None, "recovered_vs_mean": None, "dead_fraction": 0.0}
            for h, base in (("a", 4.0), ("b", 2.0)) for k in (4, 16) for s in (0, 1)]
    table = {t["hook"]: t for t in layer_table(rows, 8)}
    assert table["a"]["fvu"] == pytest.approx((1.005 + 0.255) / 2)   # seeds averaged, then log-interpolated
    assert table["b"]["fvu"] < table["a"]["fvu"]


def test_grid_points_and_config_errors():
    g = Grid(hooks=["h"], activations=["topk", "relu"], ks=[8, 16, 8], coeffs=[1, 3], expansions=[2], seeds=2)
    names = [p.name() for p in g.points()]
    assert len(names) == 8 and "h/topk-k8-x2-s1" in names and "h/relu-c3-x2-s0" in names
    with pytest.raises(ConfigError, match="--k is given but no --activation uses it"):
        Grid(hooks=["h"], activations=["relu"], ks=[8])
    with pytest.raises(ConfigError, match="activation: expected"):
        Grid(hooks=["h"], activations=["topkk"])
    common, per = parse_coeffs(["1", "relu:0.5,2", "gated:3"])
    g = Grid(hooks=["h"], activations=["relu", "gated", "jumprelu"], coeffs=common, activation_coeffs=per)
    assert sorted((p.activation, p.value) for p in g.points()) == [("gated", 3), ("jumprelu", 1), ("relu", 0.5),
                                                              ("relu", 2)]
    with pytest.raises(ConfigError, match="names an activation"):
        Grid(hooks=["h"], activations=["relu"], activation_coeffs={"gated": [1.0]})
    with pytest.raises(ConfigError, match="ARCH:N"):
        parse_coeffs(["relu=2"])
    with pytest.raises(ConfigError, match="not both"):
        Grid(hooks=["h"], widths=[8], expansions=[2])


def test_sweep_over_two_hooks_with_splicing(tiny_model_dirs, corpus, tmp_path, capsys):
    model = str(tiny_model_dirs["llama"])
    acts = tmp_path / "acts"
    assert main(["harvest", "--model", model, "--hook", "resid_post.1", "--hook", "resid_post.2", "--text",
                 str(corpus), "--tokens", "3000", "--context", "64", "--shard-tokens", "500", "--out",
                 str(acts)]) == 0
    out = tmp_path / "sweep"
    argv = ["sweep", "--acts", str(acts), "--activation", "topk", "--activation", "relu", "--k", "2", "--k", "8",
            "--coeff", "0.5", "--coeff", "5", "--expansion", "2", "--tokens", "6000", "--batch-size", "256",
            "--heldout", "500", "--splice-text", str(corpus), "--splice-tokens", "200", "--context", "64",
            "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 4 and {r["hook"] for r in rows} == {"resid_post.1", "resid_post.2"}
    topk = {int(r["k"]): r for r in rows if r["activation"] == "topk" and r["hook"] == "resid_post.2"}
    assert float(topk[2]["l0"]) <= 2 and float(topk[8]["fvu"]) < float(topk[2]["fvu"]) < 1
    relu = sorted((float(r["coeff"]), float(r["l0"])) for r in rows if r["activation"] == "relu"
                  and r["hook"] == "resid_post.2")
    assert relu[0][1] > relu[1][1]   # a larger penalty, fewer active features
    assert all(float(r["ce_clean"]) > 0 and r["recovered_vs_mean"] != "" for r in rows)
    assert all(r["ce_zero"] == rows[0]["ce_zero"] for r in rows if r["hook"] == rows[0]["hook"])  # one reference
    for name in ("frontier_resid_post.1.png", "frontier_resid_post.2.png", "layers.png"):
        assert (out / name).stat().st_size > 5000
    assert "FVU at L0 2" in text   # the per-layer table, at the middle k
    saved = json.loads((out / "sweep.json").read_text())
    assert {t["hook"] for t in saved["layers"]} == {"resid_post.1", "resid_post.2"}
    # run again: every point is read back, nothing retrained
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("sae.safetensors")}
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done before") == 8
    assert {p: p.stat().st_mtime_ns for p in out.rglob("sae.safetensors")} == mtimes
    # bad input: a hook the cache lacks, a typo'd architecture
    assert main(["sweep", "--acts", str(acts), "--hook", "resid_post.3", "--out", str(tmp_path / "x")]) == 2
    assert "not 'resid_post.3'" in capsys.readouterr().err
    assert main(["sweep", "--acts", str(acts), "--activation", "gatde", "--out", str(tmp_path / "x")]) == 2


def test_sweep_job_from_python_writes_every_output(tiny_model_dirs, corpus, tmp_path, capsys):
    """The library step writes what `dictlens sweep` writes: the command line only prints."""
    from dictlens.eval.sweep import SweepJob, sweep_job
    from dictlens.train.config import TrainConfig

    acts = tmp_path / "acts"
    assert main(["harvest", "--model", str(tiny_model_dirs["llama"]), "--hook", "resid_post.1", "--text",
                 str(corpus), "--tokens", "2000", "--context", "64", "--shard-tokens", "500", "--out",
                 str(acts)]) == 0
    job = SweepJob(acts=str(acts), out=str(tmp_path / "sweep"), ks=[2, 4, 8], expansions=[2], heldout=500,
                   train=TrainConfig(tokens=2048, batch_size=256, plots=False))
    s = sweep_job(job, progress=lambda _: None, bars=False)
    names = sorted(p.name for p in s.written)
    assert names == ["frontier_resid_post.1.png", "layers.csv", "sweep.csv", "sweep.json"]
    assert all(p.stat().st_size > 0 for p in s.written)
    assert [r["k"] for r in s.rows] == [2, 4, 8] and s.at_l0 == 4   # the middle k
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["layers"] == s.layers
