"""Training speed on a GPU: TopK (k = 32) steps against the bf16 encoder GEMM, the largest F.

    .venv/bin/python bench/gpu.py --json docs/gpu.json      # (bench/gpu.sh runs it on a lent GPU)

For each (D, F) of the issue's table, on synthetic rows already on the device (batch 4,096):
the time of one training step (``Trainer.step``: selection, sparse encode/decode, loss,
backward, optimiser, decoder projection) and of the bf16 encoder product alone
(x [B, D] @ W_enc [F, D]ᵀ), both as CUDA-synchronised medians, the step as a fraction of
that floor (target ≥ 50%), tokens/s and peak memory. Then F doubles at D = 576 until a
step no longer fits: the largest F that trains on this GPU (target: 1M latents).

``--dry-run``: the same code on CPU at toy sizes, to check the script before device time is spent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, n: int) -> float:
    """Median seconds of ``n`` calls after three warm-ups, synchronised."""
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_time(d: int, f: int, batch: int, steps: int) -> dict[str, float]:
    from dictlens import ArraySource, SAEConfig, TrainConfig
    from dictlens.train.trainer import Trainer

    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    x = torch.randn(batch * 4, d, device=DEVICE)
    trainer = Trainer(SAEConfig(activation="topk", k=32, n_features=f, d_in=d),
                      TrainConfig(tokens=batch * (steps + 10), batch_size=batch, device=DEVICE, plots=False,
                                  log_every=10**9), ArraySource(x[:batch].cpu()), progress=False)
    trainer.start()
    i = [0]

    def one() -> None:
        trainer.step(x[(i[0] % 4) * batch:(i[0] % 4 + 1) * batch])
        i[0] += 1

    step = timed(one, steps)
    xb, wb = x[:batch].bfloat16(), trainer.sae.W_enc.detach().bfloat16()
    gemm = timed(lambda: xb @ wb.T, steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {"d": d, "f": f, "step_ms": step * 1e3, "gemm_ms": gemm * 1e3, "fraction_of_floor": gemm / step,
            "tokens_per_s": batch / step, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-f", type=int, default=1 << 22)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: check the script, measure nothing")
    args = ap.parse_args()
    global DEVICE
    shapes = ((576, 16384), (576, 131072), (2304, 65536))
    first_f = 262144
    if args.dry_run:
        DEVICE, shapes, first_f = "cpu", ((64, 512), (32, 1024)), 2048
        args.batch, args.steps, args.max_f = 256, 2, 4096
    else:
        assert torch.cuda.is_available(), "no CUDA device"
    rows = []
    for d, f in shapes:
        r = step_time(d, f, args.batch, args.steps)
        rows.append(r)
        print(f"D={d:>5} F={f:>8,}: step {r['step_ms']:.2f} ms, bf16 GEMM {r['gemm_ms']:.2f} ms "
              f"({r['fraction_of_floor']:.0%} of the floor), {r['tokens_per_s']:,.0f} tok/s, "
              f"peak {r['peak_gib']:.1f} GiB", flush=True)
    largest, f = 0, first_f
    while f <= args.max_f:
        try:
            r = step_time(576, f, args.batch, 3)
        except torch.cuda.OutOfMemoryError:
            break
        largest = f
        print(f"D=576 F={f:>9,} trains: step {r['step_ms']:.1f} ms, peak {r['peak_gib']:.1f} GiB", flush=True)
        f *= 2
    print(f"largest F that trains at D=576 (batch {args.batch}): {largest:,}")
    if args.json:
        name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
        args.json.write_text(json.dumps({"rows": rows, "largest_f": largest, "device": name,
                                         "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
