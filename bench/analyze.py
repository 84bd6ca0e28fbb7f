"""Analysis speed: `dictlens analyze`'s pass beside plain harvesting, on the same contexts.

Four timings over the same tokens of the default text, in one run:
  tap            dictlens.Tap at the SAE's hook (the forward pass harvesting pays)
  tap + encode   the same plus the SAE's sparse codes
  analyze pass   dictlens.analysis.analyze's streaming pass: tap, encode, per-feature
                 bookkeeping (counts, histogram, top contexts, quantile reservoirs) and
                 the code store written to disk
  database       what analyze does after the pass: logit lens, nearest features, random
                 contexts, the SQLite file
The per-feature bookkeeping costs (analyze pass − tap + encode); the issue's bar is that
it costs no more than the forward pass (tap) itself.

    python bench/analyze.py [--run runs/demo/sae] [--tokens 20000] [--skip 100000]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dictlens
from dictlens.analysis import AnalysisConfig, analyze
from dictlens.data.packing import pack_contexts, special_token_ids
from dictlens.data.text import iter_documents
from dictlens.sae.model import SAE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo/sae", help="SAE run directory (make demo writes runs/demo/sae)")
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--skip", type=int, default=100_000, help="skip the text's first N tokens (the SAE's)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="contexts per forward")
    p.add_argument("--device", default=None)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    torch.set_grad_enabled(False)
    sae = SAE.load(args.run, device=args.device)
    hook, model = sae.provenance.hook_in, sae.provenance.model
    lm = dictlens.load_model(model, device=args.device)
    n_ctx = -(-args.tokens // (args.context - 1))
    contexts = pack_contexts(iter_documents("default"), lm.tokenizer, args.context, prepend_bos=True)
    for _ in range(args.skip // args.context):
        next(contexts)
    ids = torch.from_numpy(np.stack([next(contexts).ids for _ in range(n_ctx)]).astype(np.int64))
    special = torch.tensor(sorted(special_token_ids(lm.tokenizer)))
    keep = ~torch.isin(ids, special)
    n_tok = int(keep.sum())
    tap = dictlens.Tap(lm, [hook])

    def run_tap(encode: bool) -> float:
        t = time.perf_counter()
        for b, k in zip(ids.split(args.batch), keep.split(args.batch), strict=True):
            x = tap(b.to(lm.device))[hook][k.to(lm.device)].float()
            if encode:
                with sae.ranking("float32"):
                    sae.encode_sparse(x.to(sae.device))
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run_tap(False)  # warm-up
    t_tap = run_tap(False)
    t_enc = run_tap(True)
    skip_tokens = (args.skip // args.context) * args.context
    cfg = AnalysisConfig(tokens=n_tok, skip_tokens=skip_tokens, context=args.context, batch_size=args.batch,
                         device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = analyze(sae, lm, hook, cfg, Path(tmp) / "an", progress=False, run=args.run)
        t_total = time.perf_counter() - t
    t_pass = r.seconds
    rows = {"tap": (n_tok, t_tap), "tap + encode": (n_tok, t_enc), "analyze pass": (r.tokens, t_pass)}
    print(f"{model} {hook}, SAE {sae.n_features:,} features ({sae.cfg.activation}), {platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads, device {lm.device}")
    print("| step | tokens | seconds | tokens/s |\n|---|---:|---:|---:|")
    for name, (n, s) in rows.items():
        print(f"| {name} | {n:,} | {s:.1f} | {n / s:,.0f} |")
    db_s = t_total - t_pass
    print(f"| database (after the pass) | – | {db_s:.1f} | – |")
    per_tok_fwd = t_tap / n_tok
    per_tok_book = t_pass / r.tokens - t_enc / n_tok
    print(f"bookkeeping {per_tok_book * 1e6:.0f} µs/token vs forward {per_tok_fwd * 1e6:.0f} µs/token "
          f"({per_tok_book / per_tok_fwd:.2f}x the forward pass)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": model, "hook": hook, "n_features": sae.n_features, "device": str(lm.device),
            "threads": torch.get_num_threads(), "tokens": n_tok,
            "tap_tok_s": n_tok / t_tap, "encode_tok_s": n_tok / t_enc, "analyze_tok_s": r.tokens / t_pass,
            "database_s": db_s, "bookkeeping_over_forward": per_tok_book / per_tok_fwd}, indent=1))


if __name__ == "__main__":
    main()
