"""Speed of dictlens.use beside the forward passes it rides on.

Monitoring, on the same documents (default text after the SAE's training part, windows of
≤256 tokens, 64 read ahead and batched 8 a forward by length, as scan does):
  tap                the model stopped after the SAE's hook (what harvesting pays)
  monitor.scan       the same forward, the SAE's encode and the event bookkeeping
  full forward       the whole model (what a serving stack pays anyway)
Generation, greedy, one prompt at a time (KV cache):
  generate           plain
  + steering         inside Splice with one `add` edit
  + clamp            inside Splice with one `clamp` edit (encode and decode at every step)
  + monitor          inside Monitor.attached

    python bench/use.py [--run runs/demo/sae] [--tokens 20000] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from dictlens.data.tap import Tap
from dictlens.data.text import iter_documents
from dictlens.use import Edit, GenerateConfig, Monitor, Splice, Watch, load_run
from dictlens.use.steer import generate, prompt_ids


def documents(lm: object, skip: int, tokens: int) -> list[str]:
    """Whole default-text documents after the first ``skip`` tokens, ``tokens`` in all."""
    tok = lm.tokenizer  # type: ignore[attr-defined]
    docs, seen, total = [], 0, 0
    for d in iter_documents("default"):
        n = len(tok(d, add_special_tokens=False).input_ids)
        seen += n
        if seen <= skip:
            continue
        docs.append(d)
        total += n
        if total >= tokens:
            break
    return docs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo/sae")
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--skip", type=int, default=150_000)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)

    run = load_run(args.run, device=args.device)
    lm, sae, hook = run.lm, run.sae, run.hook
    docs = documents(lm, args.skip, args.tokens)
    mon = Monitor(lm, sae, hook, [Watch(f, 0.0) for f in range(0, sae.n_features, 97)], max_norm=run.max_norm)
    windows = list(mon._windows(docs, 256))
    n_tok = sum(len(ids) for _, ids, _ in windows)
    tap, full = Tap(lm, [hook]), Tap(lm, [hook], stop_early=False)
    bos = lm.tokenizer.bos_token_id

    def batches() -> list[torch.Tensor]:
        """The batches scan forms: 64 windows read ahead, sorted by length, 8 a batch."""
        out = []
        ordered = [w for s in range(0, len(windows), 64) for w in sorted(windows[s:s + 64], key=lambda w: len(w[1]))]
        for s in range(0, len(ordered), 8):
            part = ordered[s:s + 8]
            T = 1 + max(len(ids) for _, ids, _ in part)
            ids = torch.zeros(len(part), T, dtype=torch.long)
            for b, (_, w, _) in enumerate(part):
                ids[b, 0] = bos
                ids[b, 1:1 + len(w)] = torch.tensor(w)
            out.append(ids)
        return out

    data = batches()

    def timed(fn: object) -> float:
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(lambda: [tap(b) for b in data[:2]])   # warm-up
    t_tap = timed(lambda: [tap(b) for b in data])
    events: list[object] = []
    t_mon = timed(lambda: events.extend(mon.scan(docs, context=256, batch_size=8)))
    t_full = timed(lambda: [full(b) for b in data])

    cfg = GenerateConfig(max_new_tokens=args.new_tokens, temperature=0)
    ids = prompt_ids(lm, "I went to the market and", cfg)
    feature = 0
    gen = {
        "generate": lambda: generate(lm, ids, cfg),
        "+ steering (add)": lambda: _inside(Splice(lm, {hook: sae}, {hook: [Edit(feature, "add", 10.0)]},
                                                   max_norm=run.max_norm), lambda: generate(lm, ids, cfg)),
        "+ clamp": lambda: _inside(Splice(lm, {hook: sae}, {hook: [Edit(feature, "clamp", 10.0)]},
                                          max_norm=run.max_norm), lambda: generate(lm, ids, cfg)),
        "+ monitor (attached)": lambda: _attached(mon, lambda: generate(lm, ids, cfg)),
    }
    generate(lm, ids, GenerateConfig(max_new_tokens=4, temperature=0))   # warm-up
    gen_s = {name: min(timed(fn) for _ in range(3)) for name, fn in gen.items()}

    print(f"{lm.name} {hook}, SAE {sae.n_features:,} features ({sae.cfg.activation}), {platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {lm.device}")
    print(f"\nmonitoring {len(docs):,} documents, {n_tok:,} tokens in {len(windows):,} windows of ≤256, "
          f"{len(mon.features)} features watched, {len(events):,} events")
    print("| pass | seconds | tokens/s | vs tap |\n|---|---:|---:|---:|")
    for name, s in (("tap (stopped after the hook)", t_tap), ("monitor.scan", t_mon), ("full forward", t_full)):
        print(f"| {name} | {s:.1f} | {n_tok / s:,.0f} | {s / t_tap:.2f}x |")
    print(f"\ngreedy generation of {args.new_tokens} tokens after a {ids.shape[1]}-token prompt (best of 3)")
    print("| run | seconds | new tokens/s | vs plain |\n|---|---:|---:|---:|")
    base = gen_s["generate"]
    for name, s in gen_s.items():
        print(f"| {name} | {s:.2f} | {args.new_tokens / s:,.1f} | {s / base:.2f}x |")


def _inside(splice: Splice, fn: object) -> object:
    with splice:
        return fn()  # type: ignore[operator]


def _attached(mon: Monitor, fn: object) -> object:
    with mon.attached(lambda e: None):
        return fn()  # type: ignore[operator]


if __name__ == "__main__":
    main()
