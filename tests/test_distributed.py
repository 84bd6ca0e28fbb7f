"""Data parallel training on torch.distributed (gloo on CPU), launched by torchrun as users do:
two ranks train to the weights one process reaches on the same global batches, and a run
checkpointed by one world size resumes under another to the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dictlens.cli import main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(n: int, argv: list[str], timeout: int = 240) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node", str(n), "-m", "dictlens", *argv], env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "sae.safetensors"))


def _close(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-5 * float(wb[key].abs().max()) + 1e-7,
                                   msg=key)


@pytest.fixture(scope="module")
def acts(tiny_model_dirs, tmp_path_factory) -> Path:
    from dictlens.data.text import default_documents

    root = tmp_path_factory.mktemp("dp")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(default_documents()[:40]))
    assert main(["harvest", "--model", str(tiny_model_dirs["llama"]), "--hook", "resid_post.2", "--text",
                 str(corpus), "--tokens", "3000", "--context", "64", "--shard-tokens", "500",
                 "--out", str(root / "acts")]) == 0
    return root / "acts"


@pytest.mark.parametrize("flags", [["--activation", "topk", "--k", "4"],
                                   ["--activation", "topk", "--k", "4", "--dead", "auxk", "--dead-tokens", "512"],
                                   ["--activation", "batchtopk", "--k", "4", "--select-dtype", "float32"],
                                   ["--activation", "jumprelu"]],
                         ids=["topk-boost", "topk-auxk", "batchtopk-float32-ranking", "jumprelu-resample"])
def test_two_ranks_train_to_the_weights_of_one_process(acts, tmp_path, flags):
    """(BatchTopK ranks in float32 here: in bfloat16, values tied at the batch cut are frequent,
    and the ranks break ties in rank order where one process breaks them in torch.topk's.)"""
    common = ["train", "--acts", str(acts), *flags, "--expansion", "4", "--tokens", "4096", "--batch-size", "256",
              "--log-every", "4", "--no-plots"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    torchrun(2, [*common, "--out", str(tmp_path / "two")])
    _close(tmp_path / "two", tmp_path / "one")
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one]       # rank 0 alone logs
    for a, b in zip(one, two, strict=True):                           # the global batch's metrics
        assert b["tokens"] == a["tokens"]
        assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-4) and b["l0"] == pytest.approx(a["l0"], rel=1e-4)
        assert b["dead_fraction"] == a["dead_fraction"]


def test_a_checkpoint_resumes_with_another_world_size(acts, tmp_path):
    common = ["train", "--acts", str(acts), "--activation", "topk", "--k", "4", "--expansion", "4",
              "--batch-size", "256", "--checkpoint-every", "1024", "--no-plots"]
    assert main([*common, "--tokens", "4096", "--out", str(tmp_path / "whole")]) == 0
    torchrun(2, [*common, "--tokens", "2048", "--out", str(tmp_path / "part")])   # two ranks, halfway
    assert main([*common, "--tokens", "4096", "--resume", "--out", str(tmp_path / "part")]) == 0   # one rank on
    _close(tmp_path / "part", tmp_path / "whole")
    torchrun(2, [*common, "--tokens", "2048", "--out", str(tmp_path / "again")])
    torchrun(2, [*common, "--tokens", "4096", "--resume", "--out", str(tmp_path / "again")])
    _close(tmp_path / "again", tmp_path / "whole")


def test_bad_launches_are_one_line_errors_on_every_rank(acts, tmp_path):
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "-m", "dictlens", "train", "--acts", str(acts),
                           "--k", "4", "--expansion", "2", "--tokens", "1024", "--batch-size", "255",
                           "--out", str(tmp_path / "bad")], env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    # (both ranks write to one stderr: their lines can run together)
    assert proc.stderr.count("dictlens train: error: batch_size: the global batch of 255 rows does not divide "
                             "among 2 ranks") == 2, proc.stderr[-2000:]


def _rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of the workers under a torchrun process (read from /proc)."""
    found: dict[int, int] = {}
    for child in Path("/proc").iterdir():
        if not child.name.isdigit():
            continue
        try:
            stat = (child / "stat").read_text()
            env = (child / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        ranks = [e for e in env if e.startswith(b"RANK=")]
        if ppid == parent and ranks:
            found[int(ranks[0][5:])] = int(child.name)
    return found


def _wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 120) -> None:
    import time

    end = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode} before {path} appeared"
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


def test_a_stalled_rank_stops_the_others_with_its_name(acts, tmp_path):
    """Rank 1 frozen (SIGSTOP) mid-run: rank 0 stops within the timeout, naming rank 1."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "dictlens", "train", "--acts", str(acts), "--k", "4", "--expansion", "4",
            "--tokens", "2000000", "--batch-size", "256", "--log-every", "1", "--no-plots", "--dist-timeout", "5",
            "--out", str(tmp_path / "run")]
    logs = [tmp_path / f"rank{r}.txt" for r in range(2)]   # files: a full pipe would block a rank
    outs = [open(path, "w") for path in logs]  # noqa: SIM115 - closed below
    procs = [subprocess.Popen(argv, env={**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                         "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.DEVNULL, stderr=outs[r], text=True) for r in range(2)]
    try:
        _wait_for(tmp_path / "run" / "log.jsonl", procs[0])
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        procs[0].wait(timeout=90)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in outs:
            f.close()
    err = logs[0].read_text()
    assert procs[0].returncode == 2 and waited < 60
    line = [x for x in err.splitlines() if "dictlens train: error:" in x]
    assert len(line) == 1 and "rank 0:" in line[0] and ": rank 1 stopped answering" in line[0] \
        and "stopped answering" in line[0], err[-2000:]


def test_a_killed_rank_restarts_and_resumes_to_the_uninterrupted_weights(acts, tmp_path):
    """torchrun --max-restarts 1: rank 1 killed after the first checkpoint; the restarted workers
    resume from it (no --resume needed) and finish with the weights of a run never killed."""
    import signal

    common = ["train", "--acts", str(acts), "--k", "4", "--expansion", "16", "--tokens", "262144",
              "--batch-size", "256", "--checkpoint-every", "16384", "--no-plots"]
    torchrun(2, [*common, "--out", str(tmp_path / "whole")])   # (a thousand steps: 1 and 2 ranks drift apart)
    log = tmp_path / "stderr.txt"   # a file, not a pipe: a full pipe would block the workers' progress bars
    with open(log, "w") as stderr:
        proc = subprocess.Popen([*TORCHRUN, "--max-restarts", "1", "--monitor-interval", "0.2", "--nproc-per-node",
                                 "2", "-m", "dictlens", *common, "--out", str(tmp_path / "run")],
                                env=_env(), stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            _wait_for(tmp_path / "run" / "checkpoint.safetensors", proc)
            ranks = _rank_pids(proc.pid)
            assert set(ranks) == {0, 1}, ranks
            os.kill(ranks[1], signal.SIGKILL)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "torchrun restarted the workers (restart 1)" in err
    for key, value in _weights(tmp_path / "whole").items():   # the same ranks, the same sums: bit for bit
        assert torch.equal(value, _weights(tmp_path / "run")[key]), key


# ---- latent parallel: the ranks split the features (--shard-latents) ----------------------

def test_initial_weights_do_not_depend_on_how_the_features_are_split(monkeypatch):
    import dictlens.sae.shard as shard

    whole = shard.initial_directions(100, 8, seed=3)
    monkeypatch.setattr(shard, "INIT_BLOCK", 16)   # many blocks: each shard draws only its own
    blocked = shard.initial_directions(100, 8, seed=3)
    assert torch.equal(blocked[:16], whole[:16])   # block 0 is the one-draw initialisation
    for n in (2, 4, 5):
        parts = [shard.initial_directions(100, 8, 3, r * 100 // n, (r + 1) * 100 // n) for r in range(n)]
        assert torch.equal(torch.cat(parts), blocked)


@pytest.mark.parametrize("flags", [["--activation", "topk", "--k", "4", "--select-dtype", "float32",
                                    "--expansion", "4"],
                                   ["--activation", "topk", "--k", "2", "--select-dtype", "float32", "--dead", "auxk",
                                    "--dead-tokens", "256", "--expansion", "16"],   # half the features dead
                                   ["--activation", "jumprelu", "--expansion", "4"],
                                   ["--activation", "batchtopk", "--k", "4", "--select-dtype", "float32",
                                    "--expansion", "4"],
                                   ["--activation", "topk", "--k", "4", "--select-dtype", "float32", "--n-features",
                                    "128", "--prefix", "16", "--prefix", "80"],   # a prefix inside each shard
                                   ["--activation", "relu", "--clip-grad", "0.5", "--expansion", "4"]],
                         ids=["topk-boost-float32-ranking", "topk-auxk-float32-ranking", "jumprelu-resample",
                              "batchtopk-float32-ranking", "topk-matryoshka",
                              "relu-l1-clipped"])
def test_two_shards_train_to_the_weights_of_one_process(acts, tmp_path, flags):
    """(TopK ranks in float32 here: ranked in bfloat16, values tied at a row's k-th place are frequent,
    and the merge of the shards' candidates breaks such ties otherwise than one torch.topk does: both
    are top-k selections of the same ranking.)"""
    common = ["train", "--acts", str(acts), *flags, "--tokens", "4096", "--batch-size", "256",
              "--log-every", "4", "--no-plots"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    torchrun(2, [*common, "--shard-latents", "--out", str(tmp_path / "two")])
    _close(tmp_path / "two", tmp_path / "one")   # one ordinary dictionary, gathered from the shards
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two, strict=True):       # the whole dictionary's metrics
        for key in ("fvu", "l0", "total", "mse"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        assert b["dead_fraction"] == a["dead_fraction"]
        if "auxk" in a:   # (AuxK really reconstructs from the dead features of both shards)
            assert b["auxk"] == pytest.approx(a["auxk"], rel=1e-4) and a["auxk"] > 0 and a["dead_fraction"] > 0.2


def test_a_sharded_checkpoint_resumes_in_one_process_and_back(acts, tmp_path):
    common = ["train", "--acts", str(acts), "--activation", "jumprelu", "--expansion", "4",
              "--batch-size", "256", "--checkpoint-every", "1024", "--no-plots"]
    assert main([*common, "--tokens", "4096", "--out", str(tmp_path / "whole")]) == 0
    torchrun(2, [*common, "--shard-latents", "--tokens", "2048", "--out", str(tmp_path / "part")])
    assert main([*common, "--tokens", "4096", "--resume", "--out", str(tmp_path / "part")]) == 0
    _close(tmp_path / "part", tmp_path / "whole")
    assert main([*common, "--tokens", "2048", "--out", str(tmp_path / "back")]) == 0
    torchrun(2, [*common, "--shard-latents", "--tokens", "4096", "--resume", "--out", str(tmp_path / "back")])
    _close(tmp_path / "back", tmp_path / "whole")


@pytest.mark.parametrize(("flags", "message"), [
    (["--n-features", "255"], "255 features do not divide among 2 ranks"),
    (["--activation", "groupmax"], "groupmax SAEs cannot be split across ranks yet"),
    (["--diversity-coeff", "0.1"], "--diversity-coeff (pairs of features from every shard) cannot be split")])
def test_bad_shardings_are_one_line_errors_on_every_rank(acts, tmp_path, flags, message):
    proc = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", "-m", "dictlens", "train", "--acts", str(acts),
                           "--k", "4", *flags, "--tokens", "1024", "--batch-size", "256", "--shard-latents",
                           "--out", str(tmp_path / "bad")], env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    # (both ranks write to one stderr: their lines can run together)
    assert proc.stderr.count("dictlens train: error: shard_latents: ") == 2, proc.stderr[-2000:]
    assert proc.stderr.count(message) == 2, proc.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


def test_on_the_default_model_two_ranks_split_the_batch_or_the_features_to_one_process_s_weights(
        smollm2, tmp_path):
    """SmolLM2's own activations (resid_post.15, D = 576, F = 2,304): data parallel and latent
    parallel each train to the SAE one process trains."""
    from dictlens import HarvestConfig, harvest

    harvest(HarvestConfig(hooks=["resid_post.15"], out=str(tmp_path / "acts"), model="smollm2-135m",
                          tokens=3072, context=128, batch_size=8), smollm2, progress=False)
    common = ["train", "--acts", str(tmp_path / "acts"), "--k", "16", "--select-dtype", "float32",
              "--expansion", "4", "--tokens", "3072", "--batch-size", "512", "--no-plots"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    torchrun(2, [*common, "--out", str(tmp_path / "batch")])
    torchrun(2, [*common, "--shard-latents", "--out", str(tmp_path / "features")])
    # relative 1e-5 as a whole: single elements drift further (float32 sums in another order, on
    # inputs whose mean norm is about 90), the tensors as a whole agree to within 1e-6
    one = _weights(tmp_path / "one")
    for run in ("batch", "features"):
        for key, w in _weights(tmp_path / run).items():
            assert float((w - one[key]).norm()) <= 1e-5 * float(one[key].norm()) + 1e-7, (run, key)
    from dictlens.sae.model import SAE

    sae = SAE.load(tmp_path / "features")   # one ordinary dictionary
    assert sae.n_features == 2304 and sae.W_dec.shape == (2304, 576)


@pytest.fixture(scope="module")
def paired_acts(tiny_model_dirs, tmp_path_factory) -> Path:
    """A tiny Llama's layer-2 MLP input and output, token for token."""
    from dictlens.data.text import default_documents

    root = tmp_path_factory.mktemp("tc")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(default_documents()[:40]))
    assert main(["harvest", "--model", str(tiny_model_dirs["llama"]), "--hook", "mlp_in.2", "--hook", "mlp_out.2",
                 "--text", str(corpus), "--tokens", "3000", "--context", "64", "--shard-tokens", "500",
                 "--out", str(root / "acts")]) == 0
    return root / "acts"


@pytest.mark.parametrize("mode", ["batch", "features"])
def test_two_ranks_train_a_skip_transcoder_to_the_weights_of_one_process(paired_acts, tmp_path, mode):
    """A skip transcoder (mlp_in.2 → mlp_out.2) under torchrun, the batch split among the ranks or its
    features (the skip connection replicated, its gradient summed once): one process's weights."""
    common = ["train", "--acts", str(paired_acts), "--reads", "mlp_in.2", "--writes", "mlp_out.2", "--skip",
              "--k", "4", "--select-dtype", "float32", "--expansion", "4", "--tokens", "4096", "--batch-size", "256",
              "--log-every", "4", "--no-plots"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    torchrun(2, [*common, *(["--shard-latents"] if mode == "features" else []), "--out", str(tmp_path / "two")])
    _close(tmp_path / "two", tmp_path / "one")
    assert float(_weights(tmp_path / "one")["W_skip"].abs().max()) > 0
