"""Training-setting sweeps on the bench protocol: how the defaults of bench/train.py were chosen.

Each named variant trains dictlens on the same cached SmolLM2-135M activations and the
same batches as bench/train.py (TopK k = 32, 9,216 features, B = 4,096, 540,672 tokens)
and prints one JSON line: tokens/s, held-out FVU, L0, dead (never active on the
16,384 held-out tokens), the mean number of features the trainer counted as dead
during training and a few points of that curve. A variant is NAME or NAME=JSON, the
JSON holding TrainConfig fields and optionally "sae": {SAEConfig fields}.

    .venv/bin/python bench/sweep_train.py default 'auxk={"dead": "auxk"}' \
        'lr6e-3={"lr": 0.006}' 'relu={"sae": {"activation": "relu", "k": null}, "sparsity_coeff": 2}'
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as bench  # noqa: E402  (bench/train.py: the data and the metric function)

from dictlens import ArraySource, SAEConfig, TrainConfig  # noqa: E402
from dictlens.train.trainer import Trainer  # noqa: E402

TOKENS = 132 * bench.B


def run(name: str, train_kw: dict, sae_kw: dict) -> dict:
    train_f, held_f = bench.prepare(bench.ROOT / "runs" / "bench" / "acts", TOKENS, 16384)
    cfg = TrainConfig(tokens=TOKENS, batch_size=bench.B, plots=False, log_every=10, **train_kw)
    sae_args = {"activation": "topk", "k": bench.K, "n_features": bench.F, **sae_kw}
    data = torch.cat(list(bench.batches(train_f, TOKENS)))
    trainer = Trainer(SAEConfig(**sae_args), cfg, ArraySource(data), progress=False)
    trainer.start()  # initialise from the data, outside the timed loop
    dead_curve = []
    t = time.perf_counter()
    for x in bench.batches(train_f, TOKENS):
        dead_curve.append(int(trainer.dead.dead.sum()))
        trainer.step(x)  # what fit() runs: metrics measured and logged every 10 steps
    sae = trainer.finish()
    seconds = time.perf_counter() - t
    m = bench.metrics(sae.encode, sae.decode, held_f)
    return {"name": name, "tokens_per_s": round(TOKENS / seconds), "fvu": round(m["fvu"], 4),
            "l0": round(m["l0"], 1), "dead": round(m["dead"], 4),
            "train_dead_mean": round(sum(dead_curve) / len(dead_curve)), "train_dead_every_12": dead_curve[::12]}


def main() -> None:
    for arg in sys.argv[1:] or ["default"]:
        name, spec = arg.split("=", 1) if "=" in arg else (arg, "{}")
        kw = json.loads(spec)
        sae_kw = kw.pop("sae", {})
        print(json.dumps(run(name, kw, sae_kw)), flush=True)


if __name__ == "__main__":
    main()
