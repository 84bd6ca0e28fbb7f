"""The command line: thin over the API, one-line errors and non-zero exits for expected mistakes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from dictlens.cli import main
from dictlens.config import field


def test_hooks_lists_the_scheme(tiny_model_dirs, capsys):
    assert main(["hooks", str(tiny_model_dirs["gpt2"])]) == 0
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel, 4 blocks, width 32" in out
    assert "resid_post.3" in out and "transformer.h.3.mlp" in out


def test_harvest_then_info(tiny_model_dirs, corpus, tmp_path, capsys):
    model = str(tiny_model_dirs["gpt_neox"])
    rc = main(["harvest", "--model", model, "--hook", "resid_post.2", "--hook", "attn_out.0",
               "--text", str(corpus), "--tokens", "300", "--context", "64", "--out", str(tmp_path / "c"),
               "--dtype", "float16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cache: 300 tokens" in out and "resid_post.2" in out and "attn_out.0" in out
    assert main(["info", str(tmp_path / "c"), "--verify"]) == 0
    assert "verified 1 shards" in capsys.readouterr().out


def test_errors_are_one_line(tiny_model_dirs, tmp_path, capsys):
    model = str(tiny_model_dirs["llama"])
    cases = [
        (["harvest", "--model", model, "--hook", "resid_post.99", "--out", str(tmp_path / "a")],
         "hook 'resid_post.99' does not exist"),
        (["harvest", "--model", model, "--hook", "resid_post.0", "--text", str(tmp_path / "missing.txt"),
          "--out", str(tmp_path / "b")], "missing.txt does not exist"),
        (["harvest", "--model", str(tmp_path / "nomodel"), "--hook", "resid_post.0", "--out", str(tmp_path / "c")],
         "nomodel is neither a model directory nor a .gguf file"),
        (["info", str(tmp_path)], "no manifest.json"),
        (["harvest", "--model", model, "--hook", "resid_post.0", "--out", str(tmp_path / "d"),
          "--outlier-factor", "0.5"], "outlier_factor: expected a factor above 1, found 0.5"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # earlier lines: transformers' loading bars
        assert last.startswith("dictlens ") and message in last and "Traceback" not in err, err


def test_entry_point_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dictlens.cli", "info", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""  # the error goes to stderr, once
    assert proc.stderr.strip().splitlines() == [f"dictlens info: error: {tmp_path / 'none'} is not an activation "
                                                "cache: no manifest.json"]
    proc = subprocess.run([sys.executable, "-m", "dictlens.cli", "harvest", "--hook", "x", "--out", "y",
                           "--tokns", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --tokns" in proc.stderr


def test_train_from_a_cache_and_from_a_stream(tiny_model_dirs, corpus, tmp_path, capsys):
    import json

    model = str(tiny_model_dirs["llama"])
    assert main(["harvest", "--model", model, "--hook", "resid_post.2", "--text", str(corpus), "--tokens", "2000",
                 "--context", "64", "--shard-tokens", "400", "--out", str(tmp_path / "acts")]) == 0
    argv = ["train", "--acts", str(tmp_path / "acts"), "--activation", "topk", "--k", "4", "--expansion", "4",
            "--tokens", "8000", "--batch-size", "256", "--heldout-tokens", "400", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "L0 4.0" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["fvu"] < 1.0 and metrics["n_tokens"] >= 400
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    prov = meta["provenance"]
    assert prov["hook_in"] == prov["hook_out"] == "resid_post.2" and meta["sae"]["d_in"] == 32
    assert prov["model"] == model and prov["acts"] == str(tmp_path / "acts") and prov["context"] == 64
    assert prov["tokenizer"]["vocab_size"] > 0 and prov["normalization"] == "sqrt_d" and prov["input_scale"] > 0
    assert "outlier_limit" in prov and prov["outlier_limit"] is None  # harvested unfiltered
    # eval on the same held-out tail reproduces the training command's figure, and writes JSON + PNG
    assert main(["eval", str(tmp_path / "run"), "--acts", str(tmp_path / "acts"), "--heldout", "400",
                 "--out", str(tmp_path / "ev"), "--model", model, "--splice-text", str(corpus),
                 "--splice-tokens", "200", "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert "relative reconstruction bias" in out and "loss recovered" in out
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["spliced"]["n_tokens"] >= 200 and ev["spliced"]["ce_clean"] > 0
    assert ev["n_tokens"] == metrics["n_tokens"] and abs(ev["fvu"] - metrics["fvu"]) < 1e-3
    assert (tmp_path / "ev" / "feature_density.png").stat().st_size > 1000
    assert main(["eval", str(tmp_path / "run"), "--acts", str(tmp_path / "acts"), "--hook", "resid_post.1"]) == 2
    other = str(tiny_model_dirs["gpt2"])
    assert main(["eval", str(tmp_path / "run"), "--acts", str(tmp_path / "acts"), "--splice-text", str(corpus),
                 "--model", other]) == 2
    err = capsys.readouterr().err
    assert "resid_post" in err and "trained on activations of" in err  # the hook error, then the model
    assert main(argv) == 2  # the run exists: resume it or choose another --out
    assert "--resume" in capsys.readouterr().err
    assert main(argv[:-2] + ["--tokens", "9000", "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert main(["train", "--model", model, "--hook", "mlp_out.1", "--text", str(corpus), "--tokens", "1024",
                 "--batch-size", "256", "--activation", "relu", "--expansion", "2", "--out", str(tmp_path / "s")]) == 0
    assert main(["train", "--acts", str(tmp_path / "acts"), "--activation", "relu", "--k", "4",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "k: applies to topk, batchtopk, groupmax only" in capsys.readouterr().err


def test_a_flag_that_means_the_same_thing_has_one_name_default_and_help():
    """eval and sweep take their splice flags from one dataclass (SpliceConfig)."""
    from dictlens.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    flags = {}
    for name in ("eval", "sweep"):
        sp = sub.choices[name]
        flags[name] = {a.dest: (a.option_strings, a.default, a.help) for a in sp._actions
                       if a.dest in ("splice_text", "splice_tokens", "splice_skip", "context")}
    assert flags["eval"] == flags["sweep"] and len(flags["eval"]) == 4
    assert flags["eval"]["splice_tokens"][1] == 4096


def _flat_fields(cls, skip=()):
    """The flag dests a config dataclass contributes (nested dataclasses flattened)."""
    import dataclasses
    import typing

    from dictlens.config import _nested

    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        sub = _nested(hints[f.name]) or f.metadata.get("overrides")
        out |= _flat_fields(sub, f.metadata.get("skip", ())) if sub else {f.name}
    return out


def test_every_command_takes_its_arguments_from_one_dataclass():
    """No flag is added by hand: each subcommand's arguments are exactly its job's fields."""
    from dictlens.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert len(sub.choices) == 23
    for name, sp in sub.choices.items():
        job = sp.get_default("job")
        dests = {a.dest for a in sp._actions if a.dest != "help"}
        assert dests == _flat_fields(job), name


@dataclasses.dataclass
class _Inner:
    width: int = field(8, help="w")
    seed: int = field(0, help="s")


@dataclasses.dataclass(kw_only=True)
class _Job:
    runs: list[str] = field(positional=True, help="runs")
    mode: str = field("zero", choices=("zero", "mean"), help="m")
    n: int = field(20, short="-n", help="n")
    inner: _Inner = field(default_factory=_Inner, skip=("seed",), help="inner")
    given: dict = field(default_factory=dict, overrides=_Inner, skip=("width",), help="overrides")


def test_config_flags_positional_nested_overrides_and_choices():
    import argparse

    from dictlens.config import add_arguments, from_dict, from_namespace
    from dictlens.errors import ConfigError

    Job, Inner = _Job, _Inner
    p = argparse.ArgumentParser()
    add_arguments(p, Job)
    job = from_namespace(Job, p.parse_args(["a", "b", "-n", "3", "--width", "16", "--mode", "mean"]))
    assert job == Job(runs=["a", "b"], mode="mean", n=3, inner=Inner(width=16), given={})
    job = from_namespace(Job, p.parse_args(["a", "--seed", "5"]))
    assert job.given == {"seed": 5} and job.inner == Inner()   # only what was given; seed skipped in inner
    with pytest.raises(SystemExit):
        p.parse_args(["a", "--mode", "median"])
    assert from_dict(Job, {"runs": ["a"], "inner": {"width": 4}}).inner == Inner(width=4)
    with pytest.raises(ConfigError, match="inner: unknown field 'widht' \\(did you mean 'width'\\?\\)"):
        from_dict(Job, {"runs": ["a"], "inner": {"widht": 4}})


def test_demo_through_the_command_line(smollm2, tmp_path, capsys):
    """`dictlens demo` end to end on the real default model, small: every step's output lands."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--tokens", "20000", "--train-tokens", "8192",
                 "--analyze-tokens", "2048", "--no-report"]) == 0
    text = capsys.readouterr().out
    for step in ("demo 1/4", "demo 2/4", "demo 3/4"):
        assert step in text
    assert "features by their tokens" in text and "| detection auc | own explanation |" in text
    import re

    held = re.search(r"held-out \(([\d,]+) tokens\): FVU", text)
    assert held is not None, text
    assert (out / "acts" / "manifest.json").is_file() and (out / "sae" / "sae.safetensors").is_file()
    metrics = json.loads((out / "sae" / "metrics.json").read_text())
    assert metrics["n_tokens"] == int(held.group(1).replace(",", "")) >= 8192
    assert 0 < metrics["fvu"] < 1 and metrics["l0"] == pytest.approx(32)
    assert (out / "sae" / "analysis" / "features.db").is_file() and not (out / "sae" / "analysis" / "report").exists()
    from dictlens.analysis.db import FeatureDB

    db = FeatureDB(out / "sae" / "analysis")
    if any(db.features_for_token(w, n=1) for w in (" money", " love", " war", " water")):
        assert "demo 4/4: steer with feature" in text and "unsteered" in text and "--steer" in text
    else:
        assert "demo 4/4: skipped (none of the topical words occurs in the analysed text)" in text
