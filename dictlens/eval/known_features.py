"""``dictlens synth``: every method on a synthetic setting with known features, one table."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dictlens.eval import baselines
from dictlens.eval.metrics import ReconstructionStats
from dictlens.eval.recovery import recovery
from dictlens.eval.synthetic import SyntheticData
from dictlens.sae import activations as registry


@dataclass
class Row:
    method: str
    width: int
    mmcs: float
    mcc: float
    f1: float
    fvu: float
    seconds: float


DEFAULT_ACTIVATIONS = ("topk", "topk, no dead handling", "relu", "batchtopk")


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    stats = ReconstructionStats()
    stats.update(x, x_hat)
    return stats.result().fvu


def run_synth(data: SyntheticData, widths: list[int], *, tokens: int = 2_000_000, eval_n: int = 20_000,
              sklearn_n: int = 20_000, sklearn_iters: int = 5,
              activations: tuple[str, ...] | None = None,
              sklearn_code_methods: tuple[str, ...] = ("omp", "lasso"), k: int | None = None, seed: int = 0,
              progress: Any = print) -> list[Row]:
    """Every method at every width on ``data``; the last tenth (at most ``eval_n`` samples) is held
    out for scoring. ``k`` (TopK, OMP) defaults to the data's mean number of active features."""
    from dictlens.data.store import ArraySource
    from dictlens.sae.config import SAEConfig
    from dictlens.train import train
    from dictlens.train.config import TrainConfig

    activations = activations or DEFAULT_ACTIVATIONS
    if k is None:
        k = max(1, round(data.mean_active))
    n_eval = min(eval_n, len(data.x) // 10)
    x_train, x_eval = data.x[:-n_eval], data.x[-n_eval:]
    codes_eval = data.codes[-n_eval:]
    true = data.features
    rows: list[Row] = []

    def add(method: str, width: int, dictionary: torch.Tensor, codes: torch.Tensor | None, x_hat: torch.Tensor | None,
            seconds: float) -> None:
        r = recovery(true, dictionary, codes_eval if codes is not None else None, codes)
        rows.append(Row(method, width, r.mmcs, r.mcc, r.f1, _fvu(x_eval, x_hat) if x_hat is not None else float("nan"),
                        seconds))
        progress(f"  {method} (width {width}): MCC {r.mcc:.4f} in {seconds:.1f} s")

    for width in widths:
        t = time.perf_counter()
        add("random", width, baselines.random_dictionary(width, true.shape[1], seed), None, None,
            time.perf_counter() - t)
        t = time.perf_counter()
        add("PCA", width, baselines.pca_dictionary(x_train[:50_000], width), None, None, time.perf_counter() - t)
        t = time.perf_counter()
        D = baselines.sklearn_dictionary(x_train[:sklearn_n], width, max_iter=sklearn_iters, seed=seed)
        seconds = time.perf_counter() - t
        for codes in sklearn_code_methods:
            t = time.perf_counter()
            C = baselines.sklearn_codes(x_eval, D, codes=codes, n_nonzero=k)
            add(f"sklearn dictionary learning ({codes} codes)", width, D, C, C @ D,
                seconds + time.perf_counter() - t)
        for name in activations:
            activation, _, variant = name.partition(",")
            activation_k = k if registry.get(activation).uses_k else None
            dead = "none" if "no dead" in variant else "auto"
            t = time.perf_counter()
            sae = train(SAEConfig(activation=activation, n_features=width, k=activation_k),
                        TrainConfig(tokens=tokens, batch_size=1024, plots=False, seed=seed, dead=dead),
                        ArraySource(x_train), progress=False)
            seconds = time.perf_counter() - t
            with torch.no_grad():
                f = sae.encode(x_eval)
                add(f"dictlens {name}", width, sae.W_dec, f, sae.decode(f), seconds)
                t = time.perf_counter()
                b = sae.b_dec / sae.input_scale
                fista = baselines.fista_codes(x_eval, sae.W_dec, bias=b)
                add("  FISTA codes on its decoder", width, sae.W_dec, fista, fista @ sae.W_dec + b,
                    time.perf_counter() - t)
    return rows


def rows_to_json(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (NaN, for metrics a method has no codes for, as null)."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(r).items()} for r in rows]


def format_table(rows: list[Row]) -> str:
    lines = ["| method | width | MMCS | MCC | F1 | FVU | seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.width} | {r.mmcs:.4f} | {r.mcc:.4f} | {r.f1:.3f} | {r.fvu:.4f} | "
                     f"{r.seconds:.1f} |")
    return "\n".join(lines).replace("nan", "–")
