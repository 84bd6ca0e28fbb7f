"""Transcoders and cross-layer transcoders: dictlens beside sparsify's transcoder mode (issue 17).

Transcoder protocol: SmolLM2-135M's layer-15 MLP, its input (mlp_in.15) and output (mlp_out.15)
harvested together; TopK, k = 32, 9,216 features (16x), batches of 4,096 tokens in the same order for
every method, each in its own process (peak memory its own). dictlens trains with and without the
skip connection; sparsify with ``transcode=True`` (and ``skip_connection``) through its own trainer,
fed the cached rows. Held-out FVU of the MLP's output, L0 and dead fraction by one function.

CLT protocol: every one of the 30 layers' MLP inputs and outputs (harvested in float16 to fit on
disk), a TopK CLT with k = 16 and 1,152 features per layer; tokens/s, held-out FVU (aggregate and by
layer), peak memory, and the step against the 30 dense encoder products alone. sparsify has no CLT.

    bash bench/setup_peers.sh                           # once: .bench-venv with eai-sparsify
    .bench-venv/bin/python bench/transcoders.py         # harvests runs/bench/tc and runs/bench/clt
    .bench-venv/bin/python bench/transcoders.py --only clt --clt-tokens 32768
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# run as a script, bench/ is on the path: bench/train.py's protocol pieces (its batch order, the
# sparsify harness, the encoder floor) are reused, not copied
from train import B, D, F, K, Run, _FakeLM, encoder_floor

ROOT = Path(__file__).resolve().parent.parent
LAYER, L, F_CLT, K_CLT = 15, 30, 1152, 16
METHODS = ["dictlens", "dictlens-skip", "sparsify", "sparsify-skip", "clt"]


# ---- data ----------------------------------------------------------------------------------
def prepare_pair(out: Path, tokens: int, heldout: int) -> dict[str, Path]:
    """float32 .npy rows of mlp_in.15 / mlp_out.15, training and held-out (harvested if missing)."""
    import dictlens

    hooks = [f"mlp_in.{LAYER}", f"mlp_out.{LAYER}"]
    acts = out / "acts"
    files = {f"{h}.{part}": out / f"{h}.{part}.npy" for h in hooks for part in ("train", "held")}
    first = files[f"{hooks[0]}.train"]
    if all(f.is_file() for f in files.values()) and np.load(first, mmap_mode="r").shape[0] >= tokens:
        return files
    if not (acts / "manifest.json").is_file() or len(dictlens.ActivationStore(acts, hooks[0])) < tokens + heldout:
        dictlens.harvest(dictlens.HarvestConfig(hooks=hooks, out=str(acts), tokens=tokens + heldout, context=128,
                                                shard_tokens=16384, outlier_factor=10.0))
    for h in hooks:
        x = dictlens.ActivationStore(acts, h).read_all().numpy()
        np.save(files[f"{h}.train"], x[:tokens])
        np.save(files[f"{h}.held"], x[-heldout:])
    return files


def pair_batches(files: dict[str, Path], tokens: int, seed: int = 0):
    """The same shuffled ([B, D] input, [B, D] target) batches for every method."""
    x = np.load(files[f"mlp_in.{LAYER}.train"], mmap_mode="r")[:tokens]
    y = np.load(files[f"mlp_out.{LAYER}.train"], mmap_mode="r")[:tokens]
    order = np.random.default_rng(seed).permutation(len(x))
    for i in range(0, len(order) - B + 1, B):
        rows = np.sort(order[i:i + B])
        yield torch.from_numpy(np.ascontiguousarray(x[rows])), torch.from_numpy(np.ascontiguousarray(y[rows]))


@torch.no_grad()
def metrics(predict, files: dict[str, Path]) -> dict[str, float]:
    """Held-out FVU of the MLP output (about the held-out mean), L0 and dead fraction."""
    x_all = torch.from_numpy(np.load(files[f"mlp_in.{LAYER}.held"]))
    y_all = torch.from_numpy(np.load(files[f"mlp_out.{LAYER}.held"]))
    err, fired, nnz = 0.0, torch.zeros(F, dtype=torch.bool), 0
    for x, y in zip(x_all.split(2048), y_all.split(2048), strict=True):
        f, y_hat = predict(x)
        err += float((y.double() - y_hat.double()).pow(2).sum())
        nnz += int((f != 0).sum())
        fired |= (f != 0).any(0)
    total = float((y_all.double() - y_all.double().mean(0)).pow(2).sum())
    return {"fvu": err / total, "l0": nnz / len(x_all), "dead": 1 - float(fired.float().mean())}


# ---- the methods -----------------------------------------------------------------------------
def run_dictlens(files: dict[str, Path], tokens: int, skip: bool) -> Run:
    from dictlens import ArraySource, SAEConfig, TrainConfig
    from dictlens.train.trainer import Trainer

    pairs = list(pair_batches(files, tokens))
    src, tgt = ArraySource(torch.cat([x for x, _ in pairs])), ArraySource(torch.cat([y for _, y in pairs]))
    trainer = Trainer(SAEConfig(activation="topk", k=K, n_features=F, transcoder=True, skip=skip),
                      TrainConfig(tokens=tokens, batch_size=B, plots=False, log_every=10), src, target=tgt,
                      progress=False)
    trainer.start()   # initialise from the data, outside the timed loop
    t = time.perf_counter()
    for x, y in pair_batches(files, tokens):
        trainer.step(x, y)
    tc = trainer.finish()
    seconds = time.perf_counter() - t

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with tc.ranking("float32"):
            return tc.encode(x), tc(x)
    return Run(seconds, predict, None, tc)


class _PairLM(_FakeLM):
    """sparsify's trainer on cached pairs: the hooked module's input is the MLP's cached input and its
    output the cached output of the same rows (its 'tokens' are row numbers)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        super().__init__(x)
        self.y = y
        self.rows: torch.Tensor | None = None
        self.layers = torch.nn.ModuleList([_Cached(self)])

    def forward(self, input_ids):
        self.rows = input_ids
        return self.layers[0](self.data[input_ids])


class _Cached(torch.nn.Module):
    def __init__(self, lm: _PairLM):
        super().__init__()
        self.lm = [lm]   # (a list: not a submodule)

    def forward(self, x):
        lm = self.lm[0]
        return lm.y[lm.rows]


def run_sparsify(files: dict[str, Path], tokens: int, skip: bool) -> Run:
    from sparsify import SparseCoderConfig
    from sparsify import TrainConfig as SpTrainConfig
    from sparsify.trainer import Trainer

    pairs = list(pair_batches(files, tokens))
    x, y = torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])
    seq = 128
    dataset = [{"input_ids": row} for row in torch.arange(len(x)).view(-1, seq)]
    cfg = SpTrainConfig(SparseCoderConfig(k=K, num_latents=F, transcode=True, skip_connection=skip),
                        batch_size=B // seq, hookpoints=["layers.0"], log_to_wandb=False, save_every=10**9,
                        save_dir=str(ROOT / "runs" / "bench" / "sparsify-tc-ckpt"))
    trainer = Trainer(cfg, dataset, _PairLM(x, y))
    t = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t
    sc = next(iter(trainer.saes.values()))

    @torch.no_grad()
    def predict(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = sc.encode(xb)
        f = torch.zeros(len(xb), F).scatter(1, out.top_indices, out.top_acts)
        y_hat = sc.decode(out.top_acts, out.top_indices)
        return f, y_hat if sc.W_skip is None else y_hat + xb @ sc.W_skip.mT
    return Run(seconds, predict, None, sc)


def run_clt(out: Path, tokens: int, heldout: int) -> dict[str, Any]:
    """A TopK CLT over all 30 layers from a float16 cache of every layer's MLP input and output."""
    import dictlens
    from dictlens.data.hooks import Wiring
    from dictlens.data.store import CacheHooks, split_heldout, wiring_batches, wiring_sources
    from dictlens.eval.metrics import evaluate
    from dictlens.train.group import fit_together
    from dictlens.train.trainer import Trainer

    w = Wiring.clt([f"mlp_in.{i}" for i in range(L)], [f"mlp_out.{i}" for i in range(L)])
    acts = out / "acts"
    if not (acts / "manifest.json").is_file() or len(dictlens.ActivationStore(acts, w.reads[0])) < tokens + heldout:
        dictlens.harvest(dictlens.HarvestConfig(hooks=w.hooks, out=str(acts), tokens=tokens + heldout, context=128,
                                                shard_tokens=8192, outlier_factor=10.0, dtype="float16"))
    src, held = split_heldout(CacheHooks(acts, w.hooks), heldout)
    reads, writes = wiring_sources(src, w)
    trainer = Trainer(dictlens.SAEConfig(activation="topk", k=K_CLT, n_features=F_CLT, transcoder=True, clt_layers=L),
                      dictlens.TrainConfig(tokens=tokens, batch_size=B, plots=False, log_every=4), reads, target=writes,
                      progress=False)
    t = time.perf_counter()
    clt = fit_together([(w, trainer)], src, progress=False)[0]
    seconds = time.perf_counter() - t
    m = evaluate(clt, wiring_batches(held, w), outputs=list(w.writes))
    assert m.by_output is not None
    return {"seconds": seconds, "tokens": trainer.state.tokens, "fvu": m.fvu, "l0": m.l0, "dead": m.dead_fraction,
            "fvu_by_layer": [round(r["fvu"], 4) for r in m.by_output.values()], "step_seconds": trainer.step_seconds}


def worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    if method == "clt":
        r = run_clt(Path(args.clt_dir), args.clt_tokens, args.clt_heldout)
        r["tokens_per_s"] = r["tokens"] / r["step_seconds"]
    else:
        files = prepare_pair(Path(args.tc_dir), args.tokens, args.heldout)
        skip = method.endswith("-skip")
        run = (run_sparsify if method.startswith("sparsify") else run_dictlens)(files, args.tokens, skip)
        n = args.tokens // B * B
        r = {"seconds": run.seconds, "tokens": n, "tokens_per_s": n / run.seconds, **metrics(run.encode, files)}
    return {"method": method, **r, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tc-dir", default=str(ROOT / "runs" / "bench" / "tc"))
    p.add_argument("--clt-dir", default=str(ROOT / "runs" / "bench" / "clt"))
    p.add_argument("--tokens", type=int, default=32 * B)
    p.add_argument("--heldout", type=int, default=16384)
    p.add_argument("--clt-tokens", type=int, default=8 * B)
    p.add_argument("--clt-heldout", type=int, default=4096)
    p.add_argument("--only", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if any(m != "clt" for m in args.only):
        prepare_pair(Path(args.tc_dir), args.tokens, args.heldout)   # once, before the workers
    floor, floor_clt = encoder_floor(), encoder_floor(3, F_CLT, L)
    rows = []
    for m in args.only:
        keys = ("tc_dir", "clt_dir", "tokens", "heldout", "clt_tokens", "clt_heldout")
        cmd = [sys.executable, __file__, "--worker", m] + [
            a for k in keys for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not line:
            print(f"{m}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[-1]))
        print(f"done {m}: {rows[-1]['tokens_per_s']:,.0f} tok/s", file=sys.stderr)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; B={B}, D={D}")
    print(f"# transcoder (layer {LAYER}): k={K}, F={F}, {args.tokens:,} training tokens, {args.heldout:,} held out; "
          f"encoder product alone: float32 {floor['float32']:,.0f} tok/s, bfloat16 {floor['bfloat16']:,.0f}")
    print(f"# CLT ({L} layers): k={K_CLT}, F={F_CLT} per layer, {args.clt_tokens:,} training tokens, "
          f"{args.clt_heldout:,} held out; its {L} encoder products alone: float32 {floor_clt['float32']:,.0f} "
          f"tok/s, bfloat16 {floor_clt['bfloat16']:,.0f}")
    print("| method | tokens/s | step / fp32 encoders | step / bf16 encoders | held-out FVU | L0 | dead | "
          "peak RSS GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fl = floor_clt if r["method"] == "clt" else floor
        print(f"| {r['method']} | {r['tokens_per_s']:,.0f} | {fl['float32'] / r['tokens_per_s']:.2f} | "
              f"{fl['bfloat16'] / r['tokens_per_s']:.2f} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead']:.2%} | "
              f"{r['peak_rss_gb']:.2f} |")
        if r["method"] == "clt":
            print(f"  CLT FVU by layer: {r['fvu_by_layer']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"floor": floor, "floor_clt": floor_clt, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
