"""Training on several ranks: one process against torchrun with N ranks, same global batches.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/distributed.py --acts runs/demo/acts --hook resid_post.15 \\
        --ranks 2 --json docs/distributed.json
    HF_HUB_OFFLINE=1 .venv/bin/python bench/distributed.py --acts runs/demo/acts --hook resid_post.15 \\
        --ranks 2 --shard-latents --n-features 65536 --tokens 65536 --json docs/shards.json

Trains the same TopK SAE (``dictlens train``) once in one process and once under
``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPUs), each with the machine's cores
divided among its ranks, the ranks splitting each batch (data parallel) or, with
``--shard-latents``, the features; prints wall time, training tokens/s (from ``log.jsonl``, the
steps alone), the peak resident memory of the largest process, and how far the two SAEs'
weights are apart. On a machine with fewer cores than ranks × threads this shows the
communication overhead only, not a speed-up. Nothing else should run on the machine while it
is timed.
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


def _workers(root: int) -> list[int]:
    """The processes under ``root`` that train (``-m dictlens``, not torchrun's agent)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [root]
    while frontier:
        kids = [pid for pid, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    out = []
    for pid in found:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dictlens" in cmd and b"torch.distributed.run" not in cmd:
            out.append(pid)
    return out


def _hwm_gib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def run(cmd: list[str], threads: int) -> tuple[float, list[float]]:
    """Wall seconds, and each training process's peak resident memory (GiB; VmHWM, read every
    0.2 s while it runs), in the order they started (rank 0 first)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        for pid in [proc.pid, *_workers(proc.pid)]:
            hwm = _hwm_gib(pid)
            if hwm is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), hwm)
        time.sleep(0.2)
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed:\n{err[-3000:]}")
    if len(peaks) > 1:
        peaks.pop(proc.pid, None)   # torchrun's agent
    return time.perf_counter() - t0, [peaks[pid] for pid in sorted(peaks)]


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
    ap.add_argument("--n-features", type=int, default=0, help="F (overrides --expansion)")
    ap.add_argument("--shard-latents", action="store_true", help="the ranks split the features, not the batch")
    ap.add_argument("--select-dtype", default="auto", help="the SAE's ranking precision (dictlens train's flag)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    cores = os.cpu_count() or 1
    width = ["--n-features", str(args.n_features)] if args.n_features else ["--expansion", str(args.expansion)]
    train = ["train", "--acts", args.acts, "--hook", args.hook, "--k", str(args.k), *width,
             "--tokens", str(args.tokens), "--batch-size", str(args.batch), "--log-every", "4",
             "--no-plots", "--select-dtype", args.select_dtype]
    split = ["--shard-latents"] if args.shard_latents else []
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        wall, peak = run([sys.executable, "-m", "dictlens", *train, "--out", str(one)], cores)
        results["one process"] = {"wall_s": wall, "peak_gib": peak, "threads": cores, "tokens_per_s": rate(one)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
               "-m", "dictlens", *train, *split, "--out", str(many)]
        threads = max(1, cores // args.ranks)
        wall, peak = run(cmd, threads)
        name = f"{args.ranks} {'shards' if split else 'ranks'}"
        results[name] = {"wall_s": wall, "peak_gib": peak, "threads": threads, "tokens_per_s": rate(many)}
        a, b = load_file(str(one / "sae.safetensors")), load_file(str(many / "sae.safetensors"))
        apart = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)
        fvu = [json.loads(line)["fvu"] for r in (one, many) for line in (r / "log.jsonl").read_text().splitlines()[-1:]]
    for name, r in results.items():
        print(f"{name:>12}: {r['wall_s']:.1f} s wall, {r['tokens_per_s']:,.0f} training tokens/s, "
              f"peak memory {' / '.join(f'{g:.2f}' for g in r['peak_gib'])} GiB (per process, rank 0 first; "
              f"{r['threads']} threads each)")
    print(f"weights apart (max relative): {apart:.2e}; last logged FVU {fvu[0]:.5f} (one) / {fvu[1]:.5f} (ranks)")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "max_relative_difference": apart, "last_fvu": fvu,
                                         "cores": cores,
                                         "args": {k: str(v) for k, v in vars(args).items()},
                                         "torch": torch.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
