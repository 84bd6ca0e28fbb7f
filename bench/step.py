"""One TopK training step against its floor, the bfloat16 encoder product, and where the rest goes.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python bench/step.py [--features 9216] [--json F]

The shapes of the issue-3 protocol (B = 4,096, D = 576, F = 9,216, k = 32) on synthetic rows
with a mean offset (as residual streams have). Prints the CPU's relevant features (AMX and
AVX-512 bfloat16 make bf16 products several times faster than float32), the encoder product
alone in float32 and bfloat16 (as one allocating ``addmm``, and as the trainer forms it: in
1,024-row chunks into one reused buffer), the trainer's step (``Trainer.step``, schedule-free
Adam, dead-feature boost) on the compiled kernels (dictlens/sae/native.c) and on eager PyTorch
alone, both ratios, and the operators that take the step's time (torch's
profiler). Nothing else should run on the machine while it is timed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

B, D, K = 4096, 576, 32
FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")


def cpu_features() -> dict[str, Any]:
    """The CPU's model name and which of the flags that matter for bf16 products it has."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set()
    model = ""
    for line in text.splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    return {"model": model, **{f: f in flags for f in FLAGS}}


def _time(fn: Any, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def floors(F: int, repeats: int = 5) -> dict[str, float]:
    """Seconds of the B×F encoder product: allocating (addmm) and chunked into a reused buffer."""
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(B, D, generator=g), torch.randn(F, D, generator=g), torch.zeros(F)
    out = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        xd, Wd, bd = x.to(dt), W.to(dt), b.to(dt)
        out[name] = _time(lambda xd=xd, Wd=Wd, bd=bd: torch.addmm(bd, xd, Wd.T), repeats)
        buf = torch.empty(1024, F, dtype=dt)

        def chunked(xd: torch.Tensor = xd, Wd: torch.Tensor = Wd, buf: torch.Tensor = buf) -> None:
            for s in range(0, B, 1024):
                torch.mm(xd[s:s + 1024], Wd.T, out=buf)
        out[name + "_chunked"] = _time(chunked, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=9216)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from dictlens.data.store import ArraySource
    from dictlens.sae import native
    from dictlens.sae.config import SAEConfig
    from dictlens.train.config import TrainConfig
    from dictlens.train.trainer import Trainer

    F = args.features
    cpu = cpu_features()
    floor = floors(F)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(B * 4, D, generator=g) @ torch.randn(D, D, generator=g) / D ** 0.5 + 3.0
    batches = [rows[i * B:(i + 1) * B] for i in range(4)]

    def trainer_for(backward_dtype: str) -> Trainer:
        t = Trainer(SAEConfig(n_features=F, k=K), TrainConfig(batch_size=B, tokens=B * 1000, log_every=10**6,
                                                               backward_dtype=backward_dtype),
                    ArraySource(rows.numpy()), progress=False)
        for i in range(3):
            t.step(batches[i % 4])
        return t

    def steps(t: Trainer) -> float:
        return _time(lambda: [t.step(batches[i % 4]) for i in range(args.steps)], 1) / args.steps

    step_bf16 = steps(trainer_for("bfloat16"))   # (freed before the float32 one is built)
    trainer = trainer_for("float32")
    step = steps(trainer)
    kernels = native.status()
    with native.disabled():  # the same step on eager PyTorch alone (no C compiler, DICTLENS_NATIVE=0)
        trainer.step(batches[0])
        eager = _time(lambda: [trainer.step(batches[i % 4]) for i in range(args.steps)], 1) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(4):
            trainer.step(batches[i % 4])
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    ops = sorted(((e.key, e.self_cpu_time_total / total) for e in prof.key_averages()), key=lambda t: -t[1])[:12]
    print(f"# CPU: {cpu['model']}; " + ", ".join(f"{f} {'yes' if cpu[f] else 'no'}" for f in FLAGS)
          + f"; {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# B={B}, D={D}, F={F}, k={K}; {kernels}")
    print("| | ms |\n|---|---:|")
    for name in ("float32", "float32_chunked", "bfloat16", "bfloat16_chunked"):
        print(f"| encoder product, {name.replace('_', ', ')} | {floor[name] * 1e3:.1f} |")
    print(f"| training step | {step * 1e3:.1f} |")
    print(f"| training step, --backward-dtype bfloat16 | {step_bf16 * 1e3:.1f} |")
    print(f"| training step, eager PyTorch only | {eager * 1e3:.1f} |")
    print(f"step / bf16 product: {step / floor['bfloat16']:.2f} (allocating), "
          f"{step / floor['bfloat16_chunked']:.2f} (chunked); step / fp32 product: {step / floor['float32']:.2f}; "
          f"with --backward-dtype bfloat16: {step_bf16 / floor['bfloat16']:.2f} (allocating)")
    print("share of the step's CPU time: " + ", ".join(f"{k} {v:.0%}" for k, v in ops))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "floor_s": floor, "step_s": step,
                                         "step_bf16_backward_s": step_bf16, "ops": ops, "F": F,
                                         "eager_step_s": eager, "kernels": kernels,
                                         "threads": torch.get_num_threads(), "torch": torch.__version__},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
