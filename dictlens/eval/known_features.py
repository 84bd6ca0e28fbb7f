"""``dictlens synth``: every method on a synthetic setting with known features, one table."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dictlens.config import field
from dictlens.errors import ConfigError
from dictlens.eval import baselines
from dictlens.eval.metrics import ReconstructionStats
from dictlens.eval.recovery import recovery
from dictlens.eval.synthetic import SyntheticConfig, SyntheticData
from dictlens.eval.toy import ToyConfig
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


@dataclass(kw_only=True)
class SynthJob:
    """``dictlens synth``: a named setting (refined by any generator flag given) or a toy model of
    superposition, and the methods run on it."""

    setting: str = field("sharkey", help="sharkey (Sharkey et al.: unit features, p ∝ 0.99^i), zipf, correlated, "
                                         "hierarchy, noisy, or toy (hidden activations of a toy model of "
                                         "superposition); the generator flags override it")
    widths: list[int] = field(default_factory=list, flag="--width", help="dictionary width (default: G and 2G)")
    tokens: int = field(2_000_000, help="SAE training tokens")
    activations: list[str] = field(default_factory=list, flag="--activation",
                                   help="SAE rows: " + ", ".join(registry.NAMES) + " or 'topk, no dead handling' "
                                        "(default: " + ", ".join(DEFAULT_ACTIVATIONS) + ")")
    sklearn_iters: int = field(5, help="MiniBatchDictionaryLearning epochs")
    out: str | None = field(None, help="directory for synth.json (and toy_model.png)")
    data: dict[str, Any] = field(default_factory=dict, overrides=SyntheticConfig,
                                 help="the generator's settings that differ from the named setting's")
    toy: ToyConfig = field(default_factory=ToyConfig, skip=("seed",), help="the toy model (--setting toy)")

    def __post_init__(self) -> None:
        stray = [k for k in self.data if k not in ("samples", "seed")]
        if self.setting == "toy" and stray:
            raise ConfigError(f"--setting toy: {', '.join('--' + k.replace('_', '-') for k in stray)} describe the "
                              "other generator; the toy model takes --toy-features, --toy-dims, --sparsity, "
                              "--importance-decay")


@dataclass
class Synthesised:
    """The rows of the table, what the data was (synth.json's ``config``) and the files written."""

    rows: list[Row]
    described: dict[str, Any]
    written: list[Path]


def synth_job(job: SynthJob, *, progress: Callable[[str], None] = print) -> Synthesised:
    """Generate the data (training the toy model first for ``toy``), run every method at every
    width, write synth.json (and toy_model.png) into ``job.out``."""
    from dictlens.eval.synthetic import generate, setting
    from dictlens.eval.toy import dimensionality_summary, plot_toy, train_toy_model
    from dictlens.io import atomic_write_json

    out = Path(job.out) if job.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    seed = int(job.data.get("seed", 0))
    if job.setting == "toy":
        toy_cfg = replace(job.toy, seed=seed)
        progress(f"toy model of superposition: training {toy_cfg.toy_features} features into {toy_cfg.toy_dims} "
                 f"dimensions (sparsity {toy_cfg.sparsity:g}, importance decay {toy_cfg.importance_decay:g})")
        toy = train_toy_model(toy_cfg, progress=True)
        progress(dimensionality_summary(toy))
        data = toy.data(int(job.data.get("samples", SyntheticConfig.samples)), seed=toy_cfg.seed + 1)
        described = {"setting": "toy", **asdict(toy_cfg), "samples": len(data.x)}
        progress(f"data: hidden activations h = W x, {data.x.shape[1]} dimensions, {len(data.features)} true "
                 f"features (the represented columns of W), {data.mean_active:.2f} active on average, "
                 f"{len(data.x):,} samples")
        if out is not None:
            written.append(Path(plot_toy(toy, str(out / "toy_model.png"))))
    else:
        cfg = setting(job.setting, **job.data)
        data = generate(cfg)
        described = {"setting": job.setting, **asdict(cfg)}
        progress(f"{job.setting}: {cfg.describe()}; measured {data.mean_active:.2f} active on average")
    widths = job.widths or [len(data.features), 2 * len(data.features)]
    progress(f"SAEs trained on {job.tokens:,} tokens; the last tenth of the samples (at most 20,000) is held out")
    rows = run_synth(data, widths, tokens=job.tokens, sklearn_iters=job.sklearn_iters,
                     activations=tuple(job.activations) or None, seed=seed, progress=progress)
    if out is not None:
        atomic_write_json(out / "synth.json", {"config": described, "rows": rows_to_json(rows)})
        written.append(out / "synth.json")
    return Synthesised(rows, described, written)
