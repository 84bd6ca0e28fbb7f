"""Training speed and quality: dictlens beside sae-lens, eai-sparsify and dictionary-learning.

Protocol (issue 3): the same cached SmolLM2-135M activations (resid_post.15, width 576),
TopK with k = 32 and 16x = 9,216 features, batches of 4,096 tokens in the same order,
540,672 training tokens (132 steps), each library through its own training code, each
in its own process (so peak memory is its own). Held-out FVU, L0 and dead fraction are
computed by one function for all (FVU about the held-out mean; dead = never active on the
held-out tokens). The encoder matmul alone (2·B·D·F FLOPs) is timed in the same run.

    bash bench/setup_peers.sh                      # once: .bench-venv with the peers, torch 2.13.0
    .bench-venv/bin/python bench/train.py          # harvests runs/bench/acts on first use
    .bench-venv/bin/python bench/train.py --methods dictlens dense --tokens 135168
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
D, F, K, B = 576, 9216, 32, 4096
PUBLISHED_LR = 2e-4 / (F / 2**14) ** 0.5
METHODS = ["dictlens", "dictlens-auxk", "dictlens-signsgd", "dictlens-adam", "dense", "sparsify-adam",
           "sparsify-signum", "saelens", "dictionary-learning"]


@dataclass
class Run:
    """A trained method: its training seconds, encode and decode (raw rows in, raw rows out), and
    the trained object itself (the library's SAE; None for the dense reference)."""

    seconds: float
    encode: Any
    decode: Any
    model: Any

    def __iter__(self) -> Any:
        return iter((self.seconds, self.encode, self.decode, self.model))


# ---- data -------------------------------------------------------------------------------

def prepare(acts: Path, tokens: int, heldout: int) -> tuple[Path, Path]:
    """float32 .npy files of the training and held-out rows (harvested if missing)."""
    import dictlens

    need = tokens + heldout
    if not (acts / "manifest.json").is_file() or dictlens.ActivationStore(acts).__len__() < need:
        cfg = dictlens.HarvestConfig(hooks=["resid_post.15"], out=str(acts), tokens=need, context=128,
                                     shard_tokens=16384, outlier_factor=10.0)
        dictlens.harvest(cfg)
    train_f, held_f = acts.parent / "train.npy", acts.parent / "heldout.npy"
    if not train_f.is_file() or np.load(train_f, mmap_mode="r").shape[0] < tokens:
        x = dictlens.ActivationStore(acts).read_all().numpy()
        np.save(held_f, x[-heldout:])
        np.save(train_f, x[:tokens])
    return train_f, held_f


def batches(train_f: Path, tokens: int, seed: int = 0):
    """The same shuffled [B, D] float32 batches for every method."""
    x = np.load(train_f, mmap_mode="r")[:tokens]
    order = np.random.default_rng(seed).permutation(len(x))
    for i in range(0, len(order) - B + 1, B):
        yield torch.from_numpy(np.ascontiguousarray(x[np.sort(order[i:i + B])]))


# ---- one function for everyone's metrics ----------------------------------------------------

@torch.no_grad()
def metrics(encode, decode, held_f: Path) -> dict[str, float]:
    x_all = torch.from_numpy(np.load(held_f))
    err, fired, nnz = 0.0, torch.zeros(F, dtype=torch.bool), 0
    for x in x_all.split(2048):
        f = encode(x)
        x_hat = decode(f)
        err += float((x.double() - x_hat.double()).pow(2).sum())
        nnz += int((f != 0).sum())
        fired |= (f != 0).any(0)
    total = float((x_all.double() - x_all.double().mean(0)).pow(2).sum())
    return {"fvu": err / total, "l0": nnz / len(x_all), "dead": 1 - float(fired.float().mean()),
            "heldout_tokens": len(x_all)}


# ---- the methods (each runs in a worker process) ---------------------------------------------

def run_dictlens(train_f, tokens, variant):
    from dictlens import ArraySource, SAEConfig, TrainConfig
    from dictlens.train.trainer import Trainer

    # "default": dictlens's defaults (schedule-free Adam, dead features boosted); "auxk": the
    # same with AuxK instead of the boost; "signsgd": the previous default (schedule-free
    # signSGD at sparsify's rate, AuxK); "adam": plain Adam at the published rate.
    extra = {
        "default": {},
        "auxk": {"dead": "auxk"},
        "signsgd": {"optimizer": "signsgd", "dead": "auxk", "warmup_steps": 10},
        "adam": {"optimizer": "adam", "schedule_free": False, "lr": PUBLISHED_LR},
    }[variant]
    cfg = TrainConfig(tokens=tokens, batch_size=B, plots=False, log_every=10, **extra)
    data = torch.cat(list(batches(train_f, tokens)))  # already in bench order: no reshuffle
    src = ArraySource(data)
    trainer = Trainer(SAEConfig(activation="topk", k=K, n_features=F), cfg, src, progress=False)
    trainer.start()  # initialise from the data, outside the timed loop
    t = time.perf_counter()
    for x in batches(train_f, tokens):
        trainer.step(x)  # what fit() runs: metrics measured and logged every 10 steps
    sae = trainer.finish()
    seconds = time.perf_counter() - t
    return Run(seconds, sae.encode, sae.decode, sae)


def run_dense(train_f, tokens):
    """A plain dense PyTorch TopK SAE: dense codes, dense decoder, autograd, Adam."""
    torch.manual_seed(0)
    W_dec = torch.randn(F, D)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec.requires_grad_()
    W_enc = W_dec.detach().clone().requires_grad_()
    b_enc, b_dec = torch.zeros(F, requires_grad=True), torch.zeros(D, requires_grad=True)
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=PUBLISHED_LR)

    def encode(x):
        pre = (x - b_dec) @ W_enc.T + b_enc
        v, i = pre.topk(K, dim=1)
        return torch.zeros_like(pre).scatter(1, i, v.relu())

    def decode(f):
        return f @ W_dec + b_dec

    first = True
    t = time.perf_counter()
    for x in batches(train_f, tokens):
        if first:
            with torch.no_grad():
                b_dec.copy_(x.mean(0))
            first = False
        loss = (decode(encode(x)) - x).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    return Run(time.perf_counter() - t, lambda x: encode(x).detach(), lambda f: decode(f).detach(), None)


class _FakeLM(torch.nn.Module):
    """Lets sparsify's model-bound Trainer run on cached rows: 'tokens' are row indices."""

    def __init__(self, data: torch.Tensor):
        super().__init__()
        self.data = data
        self.layers = torch.nn.ModuleList([torch.nn.Identity()])
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 2, dtype=torch.long)}

    @property
    def base_model(self):
        return self

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids):
        return self.layers[0](self.data[input_ids])


def run_sparsify(train_f, tokens, optimizer):
    from sparsify import SparseCoderConfig
    from sparsify import TrainConfig as SpTrainConfig
    from sparsify.trainer import Trainer

    data = torch.cat(list(batches(train_f, tokens)))  # bench order
    seq = 128
    ids = torch.arange(len(data)).view(-1, seq)
    dataset = [{"input_ids": row} for row in ids]
    cfg = SpTrainConfig(SparseCoderConfig(k=K, num_latents=F), batch_size=B // seq, optimizer=optimizer,
                        hookpoints=["layers.0"], log_to_wandb=False, save_every=10**9,
                        save_dir=str(ROOT / "runs" / "bench" / "sparsify-ckpt"),
                        lr=None if optimizer == "signum" else PUBLISHED_LR)
    trainer = Trainer(cfg, dataset, _FakeLM(data))
    t = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t
    sae = next(iter(trainer.saes.values()))

    def encode(x):
        out = sae.encode(x)
        return torch.zeros(len(x), F).scatter(1, out.top_indices, out.top_acts)

    return Run(seconds, encode, lambda f: f @ sae.W_dec + sae.b_dec, sae)


def run_saelens(train_f, tokens):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=F, k=K, dtype="float32", device="cpu"))
    cfg = SAETrainerConfig(total_training_samples=tokens, train_batch_size_samples=B, lr=PUBLISHED_LR,
                           lr_end=PUBLISHED_LR / 10, device="cpu")
    trainer = SAETrainer(cfg, sae, data_provider=batches(train_f, tokens))
    t = time.perf_counter()
    trained = trainer.fit()
    seconds = time.perf_counter() - t
    return Run(seconds, lambda x: trained.encode(x).detach(), lambda f: trained.decode(f).detach(), trained)


def run_dictionary_learning(train_f, tokens):
    from dictionary_learning.trainers.top_k import TopKTrainer

    steps = tokens // B
    trainer = TopKTrainer(steps=steps, activation_dim=D, dict_size=F, k=K, layer=15, lm_name="smollm2-135m",
                          lr=PUBLISHED_LR, device="cpu", warmup_steps=max(1, steps // 10))
    t = time.perf_counter()
    for step, x in enumerate(batches(train_f, tokens)):
        trainer.update(step, x)
    seconds = time.perf_counter() - t
    ae = trainer.ae
    return Run(seconds, lambda x: ae.encode(x).detach(), lambda f: ae.decode(f).detach(), ae)


def worker(method: str, train_f: Path, held_f: Path, tokens: int) -> dict[str, Any]:
    torch.manual_seed(0)
    runners = {
        "dictlens": lambda: run_dictlens(train_f, tokens, "default"),
        "dictlens-auxk": lambda: run_dictlens(train_f, tokens, "auxk"),
        "dictlens-signsgd": lambda: run_dictlens(train_f, tokens, "signsgd"),
        "dictlens-adam": lambda: run_dictlens(train_f, tokens, "adam"),
        "dense": lambda: run_dense(train_f, tokens),
        "sparsify-adam": lambda: run_sparsify(train_f, tokens, "adam"),
        "sparsify-signum": lambda: run_sparsify(train_f, tokens, "signum"),
        "saelens": lambda: run_saelens(train_f, tokens),
        "dictionary-learning": lambda: run_dictionary_learning(train_f, tokens),
    }
    seconds, encode, decode, _ = runners[method]()
    n = tokens // B * B
    result = {"method": method, "seconds": seconds, "tokens": n, "tokens_per_s": n / seconds,
              **metrics(encode, decode, held_f),
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return result


# ---- the floor and the table -------------------------------------------------------------------

def encoder_floor(repeats: int = 5, n_features: int = F, products: int = 1) -> dict[str, float]:
    """Tokens/s of a step's dense encoder products alone: ``products`` of [B, D] × [D, n_features]
    (a CLT has one per layer), in float32 and bfloat16."""
    x, W, b = torch.randn(B, D), torch.randn(n_features, D), torch.zeros(n_features)
    out = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        xd, Wd, bd = x.to(dt), W.to(dt), b.to(dt)
        torch.addmm(bd, xd, Wd.T)
        t = time.perf_counter()
        for _ in range(repeats * products):
            torch.addmm(bd, xd, Wd.T)
        sec = (time.perf_counter() - t) / repeats
        out[name] = B / sec
        out[name + "_gflops"] = 2 * B * D * n_features * products / sec / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", default=str(ROOT / "runs" / "bench" / "acts"))
    p.add_argument("--tokens", type=int, default=132 * B)
    p.add_argument("--heldout", type=int, default=16384)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    train_f, held_f = prepare(Path(args.acts), args.tokens, args.heldout)
    if args.worker:
        print(json.dumps(worker(args.worker, train_f, held_f, args.tokens)))
        return
    floor = encoder_floor()
    # run as a script, bench/ is on the path: bench/step.py times the step against its floor in detail
    from step import FLAGS, cpu_features

    from dictlens.sae import native

    cpu = cpu_features()
    results = []
    for m in args.methods:
        proc = subprocess.run([sys.executable, __file__, "--worker", m, "--acts", args.acts, "--tokens",
                               str(args.tokens), "--heldout", str(args.heldout)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not line:
            print(f"{m}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[-1]))
        print(f"done {m}: {results[-1]['tokens_per_s']:,.0f} tok/s", file=sys.stderr)
    fastest_peer = max((r["tokens_per_s"] for r in results if not r["method"].startswith(("dictlens", "dense"))),
                       default=float("nan"))
    print(f"# {args.tokens:,} training tokens, B={B}, D={D}, F={F}, k={K}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"# CPU: {cpu['model']}; " + ", ".join(f"{f} {'yes' if cpu[f] else 'no'}" for f in FLAGS)
          + f"; dictlens on {native.status()}")
    print(f"# encoder matmul alone: float32 {floor['float32']:,.0f} tok/s ({floor['float32_gflops']:.0f} GFLOP/s), "
          f"bfloat16 {floor['bfloat16']:,.0f} tok/s ({floor['bfloat16_gflops']:.0f} GFLOP/s)")
    print("| method | tokens/s | vs fastest peer | step / fp32 matmul | step / bf16 matmul | held-out FVU | L0 | "
          "dead | peak RSS GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / fastest_peer:.2f} | "
              f"{floor['float32'] / r['tokens_per_s']:.2f} | {floor['bfloat16'] / r['tokens_per_s']:.2f} | "
              f"{r['fvu']:.4f} | {r['l0']:.1f} | {r['dead']:.2%} | {r['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
