"""Data parallel training: one process against torchrun with N ranks, same global batches.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/distributed.py --acts runs/demo/acts --hook resid_post.15 \\
        --ranks 2 --json docs/distributed.json

Trains the same TopK SAE (``dictlens train``) once in one process and once under
``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPUs), each with the machine's cores
divided among its ranks, and prints wall time, training tokens/s (from ``log.jsonl``, the
steps alone) and how far the two SAEs' weights are apart. On a machine with fewer cores than
ranks × threads this shows the communication overhead only, not a speed-up.
Nothing else should run on the machine while it is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def rate(run_dir: Path) -> float:
    """Tokens per second over the logged steps (the last record's running rate)."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return float(json.loads(lines[-1])["tokens_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--acts", required=True)
    ap.add_argument("--hook", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=float, default=16)
    ap.add_argument("--select-dtype", default="auto", help="the SAE's ranking precision (dictlens train's flag)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    cores = os.cpu_count() or 1
    train = ["train", "--acts", args.acts, "--hook", args.hook, "--k", str(args.k), "--expansion",
             str(args.expansion), "--tokens", str(args.tokens), "--batch-size", str(args.batch), "--log-every", "4",
             "--no-plots", "--select-dtype", args.select_dtype]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        results["one process"] = {"wall_s": run([sys.executable, "-m", "dictlens", *train, "--out", str(one)], cores),
                                  "threads": cores}
        results["one process"]["tokens_per_s"] = rate(one)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
               "-m", "dictlens", *train, "--out", str(many)]
        threads = max(1, cores // args.ranks)
        results[f"{args.ranks} ranks"] = {"wall_s": run(cmd, threads), "threads": threads,
                                          "tokens_per_s": rate(many)}
        a, b = load_file(str(one / "sae.safetensors")), load_file(str(many / "sae.safetensors"))
        apart = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
        fvu = [json.loads(line)["fvu"] for r in (one, many) for line in (r / "log.jsonl").read_text().splitlines()[-1:]]
    for name, r in results.items():
        print(f"{name:>12}: {r['wall_s']:.1f} s wall, {r['tokens_per_s']:,.0f} training tokens/s "
              f"({r['threads']} threads each)")
    print(f"weights apart (max relative): {apart:.2e}; last logged FVU {fvu[0]:.5f} (one) / {fvu[1]:.5f} (ranks)")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "max_relative_difference": apart, "last_fvu": fvu,
                                         "cores": cores,
                                         "args": {k: str(v) for k, v in vars(args).items()},
                                         "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
