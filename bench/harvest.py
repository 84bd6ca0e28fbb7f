"""Harvesting speed: dictlens's early-stopping tap against a plain full forward pass.

For each layer L, on the same contexts of the default text, in one run:
  full+hidden   model(ids, output_hidden_states=True)  (what a naive harvester does)
  blocks only   model.base_model(ids, output_hidden_states=True)  (no unembedding)
  tap L         dictlens.Tap(lm, [f"resid_post.{L}"])  (stops after block L)
  harvest L     dictlens.harvest(...) end to end: tokenize, tap, filter, write shards
Early stopping at block L of N should approach N/(L+1) times the full forward's speed
(more, since the full pass also runs the unembedding).

    python bench/harvest.py [--model smollm2-135m] [--layers 5 15 25] [--contexts 64]

``--random-weights``: ``--model`` is a directory with a config.json and a tokenizer only (what
bench/gpu_prepare.py writes for the GPU machine, where the 98 MB default model cannot travel):
the model is built from the config with random weights, which costs what the trained one does.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch

import dictlens
from dictlens.data.packing import pack_contexts
from dictlens.data.text import iter_documents


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` wall-clock seconds (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def random_model(path: str, device: str | None) -> dictlens.LoadedModel:
    """The architecture of the config in ``path`` with random weights, loaded as load_model would
    (bfloat16 on CUDA, float32 on CPU, eval mode, no gradients)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dictlens.data.models import default_device

    dev = torch.device(device) if device else default_device()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    model.to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32).eval().requires_grad_(False)
    return dictlens.LoadedModel(name=path, model=model, tokenizer=AutoTokenizer.from_pretrained(path), device=dev)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, nargs="+", default=[5, 15, 25])
    p.add_argument("--contexts", type=int, default=64, help="contexts per timed pass")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="contexts per forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--random-weights", action="store_true",
                   help="build --model (a config.json and a tokenizer) with random weights")
    args = p.parse_args()

    torch.set_grad_enabled(False)
    lm = random_model(args.model, args.device) if args.random_weights else dictlens.load_model(args.model,
                                                                                               device=args.device)
    contexts = pack_contexts(iter_documents("default"), lm.tokenizer, args.context, prepend_bos=True)
    ids = torch.from_numpy(np.stack([next(contexts).ids for _ in range(args.contexts)])).to(lm.device)
    batches = ids.split(args.batch)
    n_tok = ids.numel()

    def full() -> None:
        for b in batches:
            lm.model(b, output_hidden_states=True, use_cache=False)

    def body() -> None:  # the blocks only, no unembedding: the fairest full-depth baseline
        for b in batches:
            lm.model.base_model(b, output_hidden_states=True, use_cache=False)

    t_full = timed(full, args.repeats)
    t_body = timed(body, args.repeats)
    print(f"# {args.model} ({lm.n_layers} blocks, width {lm.d_model}) on {lm.device}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.contexts} contexts x {args.context} tokens, "
          f"batch {args.batch}, best of {args.repeats}")
    print("| method | tokens/s | speed-up vs full | ideal N/(L+1) |")
    print("|---|---:|---:|---:|")
    print(f"| full forward + output_hidden_states | {n_tok / t_full:,.0f} | 1.00 | |")
    print(f"| blocks only (base model) + output_hidden_states | {n_tok / t_body:,.0f} | {t_full / t_body:.2f} | |")
    for layer in args.layers:
        tap = dictlens.Tap(lm, [f"resid_post.{layer}"])

        def run_tap(tap=tap) -> None:
            for b in batches:
                tap(b)

        t_tap = timed(run_tap, args.repeats)
        ideal = lm.n_layers / (layer + 1)
        print(f"| tap resid_post.{layer} | {n_tok / t_tap:,.0f} | {t_full / t_tap:.2f} | {ideal:.2f} |")
        with tempfile.TemporaryDirectory() as out:
            cfg = dictlens.HarvestConfig(hooks=[f"resid_post.{layer}"], out=out, model=args.model,
                                         tokens=n_tok, context=args.context, batch_size=args.batch,
                                         keep_special=True, overwrite=True)
            t_h = timed(lambda cfg=cfg: dictlens.harvest(cfg, lm, progress=False), 1)
            rows = dictlens.ActivationStore(out).__len__()
        print(f"| harvest resid_post.{layer} (tokenize, tap, filter, write) | {rows / t_h:,.0f} | "
              f"{(rows / t_h) / (n_tok / t_full):.2f} | {ideal:.2f} |")


if __name__ == "__main__":
    main()
