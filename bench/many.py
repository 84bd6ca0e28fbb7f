"""Many dictionaries from one pass: an SAE for every residual-stream layer of SmolLM2 from one
stream, against one hook at a time.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/many.py --tokens 2048 --json docs/many.json

Two ways to train the same 30 TopK SAEs (one per ``resid_post.L``) on the same streamed text,
each in its own process so that its peak memory is its own:

  together  one ``StreamingSource`` over every hook, ``fit_together``: one forward pass of the
            model per batch feeds all 30 (what ``dictlens train --hook 'resid_post.*'`` runs)
  each      for each hook, a stream of that hook alone and ``Trainer.fit``: 30 passes, each
            stopping at its block (what a loop over ``dictlens train --hook resid_post.L`` runs)

Printed per mode: wall time, stream tokens/s, dictionary-tokens/s (tokens × dictionaries /
wall), the seconds spent in SAE steps, peak RSS. Without an outlier filter both modes read the
same rows in the same order, so the 30 SAEs must come out identical: the bench checks it.
Nothing else should run on the machine while it is timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(mode: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    import torch

    import dictlens
    from dictlens.data.store import StreamingSource
    from dictlens.train.group import fit_together
    from dictlens.train.trainer import Trainer

    torch.manual_seed(0)
    lm = dictlens.load_model(args.model)
    hooks = [f"resid_post.{i}" for i in range(lm.n_layers)][: args.layers or None]
    sae = dictlens.SAEConfig(activation="topk", k=args.k, expansion=args.expansion)
    cfg = dictlens.TrainConfig(tokens=args.tokens, batch_size=args.batch, plots=False)
    t0 = time.perf_counter()
    if mode == "together":
        stream = StreamingSource(lm, hooks, "default", tokens=args.tokens, context=128)
        members = [(h, Trainer(sae, cfg, stream.view(h), out / h, progress=False)) for h in hooks]
        fit_together(members, stream, progress=False)
    else:
        members = []
        for h in hooks:
            stream = StreamingSource(lm, h, "default", tokens=args.tokens, context=128)
            members.append((h, Trainer(sae, cfg, stream, out / h, progress=False)))
            members[-1][1].fit()
    wall = time.perf_counter() - t0
    step_seconds = sum(t.step_seconds for _, t in members)   # inside the SAEs' own steps
    return {"wall_s": wall, "dictionaries": len(hooks), "tokens": args.tokens,
            "stream_tokens_per_s": args.tokens / wall, "dictionary_tokens_per_s": args.tokens * len(hooks) / wall,
            "sae_step_s": step_seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=float, default=4)
    ap.add_argument("--layers", type=int, default=0, help="the first N layers only (0: all)")
    ap.add_argument("--mode", choices=("together", "each"), help="(internal) run one mode in this process")
    ap.add_argument("--out", type=Path, help="(internal) where the mode saves its SAEs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(train(args.mode, args, args.out)))
        return
    import torch
    from safetensors.torch import load_file

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("together", "each"):
            cmd = [sys.executable, __file__, "--mode", mode, "--out", f"{tmp}/{mode}", "--model", args.model,
                   "--tokens", str(args.tokens), "--batch", str(args.batch), "--k", str(args.k),
                   "--expansion", str(args.expansion), "--layers", str(args.layers)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(f"{mode:>9}: {r['dictionaries']} SAEs on {r['tokens']:,} tokens in {r['wall_s']:.1f} s "
                  f"({r['stream_tokens_per_s']:.0f} stream tok/s, {r['dictionary_tokens_per_s']:.0f} "
                  f"dictionary-tok/s; SAE steps {r['sae_step_s']:.1f} s), peak RSS {r['peak_rss_gb']:.2f} GB",
                  flush=True)
        identical = all(
            all(torch.equal(a, b) for a, b in zip(load_file(str(p / "sae.safetensors")).values(),
                                                   load_file(str(Path(tmp) / "each" / p.name / "sae.safetensors"))
                                                   .values(), strict=True))
            for p in sorted((Path(tmp) / "together").iterdir()))
    speedup = results["each"]["wall_s"] / results["together"]["wall_s"]
    print(f"one pass is {speedup:.1f}x faster; the SAEs are {'identical' if identical else 'DIFFERENT'}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "speedup": speedup, "identical": identical,
                                         "args": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
                                         "cpu": platform.processor() or platform.machine(),
                                         "torch": torch.__version__}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
