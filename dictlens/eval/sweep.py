"""Sweeps: a grid of SAEs trained from one activation cache, evaluated, compared along frontiers.

A point of the grid is (hook, architecture, sparsity, width, seed); sparsity is k for TopK
and BatchTopK and the penalty coefficient for ReLU, gated and JumpReLU SAEs. Every point is
trained into its own run directory, evaluated on the same held-out tokens (and, with a
model and text, spliced into the model over the same predictions), and written as one row
of ``sweep.csv``. A finished point is not retrained when the sweep runs again, and an
interrupted one resumes from its checkpoint.

Architectures are compared along their sparsity-fidelity frontiers (L0 against FVU and
against ΔLM loss), not at single points; several hooks of one cache answer "which layer":
each (architecture, width) frontier is read at a fixed L0 by interpolation in log L0.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dictlens.config import field, to_dict
from dictlens.errors import CacheError, ConfigError
from dictlens.eval.plots import save_figure
from dictlens.eval.splice import SpliceConfig
from dictlens.io import atomic_write_bytes, atomic_write_json, read_json
from dictlens.sae import activations as registry
from dictlens.sae.config import SAEConfig
from dictlens.train.config import TrainConfig
from dictlens.train.grid import Grid, Point, parse_coeffs, safe_name, unique

ROW = "sweep_row.json"
# Bumped when what an evaluated figure means changes, so that a sweep recomputes old rows
# (without retraining). 2: positions above the cache's outlier limit stay clean and unscored.
# 3: SAEs are evaluated in inference mode (BatchTopK by its threshold, not per batch).
# 4: the BatchTopK threshold is calibrated at the end of training (fit on a finished run redoes it).
# 5: the column "arch" is called "activation" (one name for one concept; rows are rewritten).
EVAL_RULES = 5


COLUMNS = ["hook", "activation", "k", "coeff", "n_features", "seed", "l0", "fvu", "explained_variance",
           "mse_per_token", "dead_fraction", "dense_fraction", "cosine", "relative_reconstruction_bias",
           "ce_clean", "ce_sae", "ce_zero", "ce_mean", "delta_lm_loss", "recovered_vs_zero", "recovered_vs_mean",
           "kl_sae", "n_outliers", "train_tokens", "train_seconds", "tokens_per_second", "heldout_tokens", "run"]


def run_sweep(acts: str | Path, grid: Grid, sae_base: Any, train_base: Any, out: str | Path, *,
              heldout_tokens: int = 8192, splice: SpliceConfig | None = None, model: str | None = None,
              together: int = 0, progress: Callable[[str], None] = print, bars: bool = True) -> list[dict[str, Any]]:
    """Train and evaluate every point of ``grid``; returns the rows (also written to ``out/sweep.csv``).

    The points still to train are trained side by side, ``together`` at a time (0: all), each
    group from one read of the cache (:func:`dictlens.train.group.fit_together`)."""
    from dictlens.data.store import CacheHooks, split_heldout
    from dictlens.eval.metrics import evaluate
    from dictlens.load import load_sae
    from dictlens.train.group import fit_together
    from dictlens.train.trainer import CHECKPOINT, Trainer

    if heldout_tokens <= 0:
        raise ConfigError(f"heldout: a sweep is judged on held-out tokens; expected a count > 0, found "
                          f"{heldout_tokens}")
    if together < 0:
        raise ConfigError(f"together: expected a count >= 0 (0: the whole grid), found {together}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = grid.points()
    hooks = unique(grid.hooks)
    whole = CacheHooks(acts, hooks, model=model)   # every hook opened first: a wrong name fails before training
    stores = whole.views
    train_src, heldout = split_heldout(whole, heldout_tokens)
    splicer = _Splicer(splice, model) if splice is not None else None
    rows: dict[int, dict[str, Any]] = {}
    pending: list[tuple[int, Point, Any, Any, Path, dict[str, Any], dict[str, Any] | None]] = []
    for i, point in enumerate(points, 1):
        sae_dict, train_dict = point.configs(sae_base, train_base)
        sae_cfg = SAEConfig(**sae_dict)
        train_cfg = TrainConfig(**train_dict)
        run = out / point.name()
        key = {"sae": to_dict(sae_cfg), "train": to_dict(train_cfg), "acts": str(acts),
               "heldout_tokens": heldout_tokens, "splice": dataclasses.asdict(splice) if splice else None,
               "eval_rules": EVAL_RULES}
        previous: dict[str, Any] | None = None
        if (run / ROW).is_file():
            saved = read_json(run / ROW)
            previous = saved.get("row")
            if saved.get("key") == key:
                rows[i] = saved["row"]
                progress(f"[{i}/{len(points)}] {point.name()}: done before, "
                         f"FVU {saved['row']['fvu']:.4f} L0 {saved['row']['l0']:.1f}")
                continue
        pending.append((i, point, sae_cfg, train_cfg, run, key, previous))
    size = together or len(pending) or 1
    for start in range(0, len(pending), size):
        group = pending[start:start + size]
        if len(group) > 1:
            progress(f"training {len(group)} SAEs side by side from one read of {acts}")
        trainers, resumed = [], []
        for _, point, sae_cfg, train_cfg, run, _, _ in group:
            store = stores[point.hook]
            trainers.append((point.hook, Trainer(sae_cfg, train_cfg, train_src.view(point.hook), run, progress=False,
                                                 provenance=store.provenance().replace(notes={"sweep": str(out)}))))
            resumed.append((run / CHECKPOINT).is_file())
        fit_together(trainers, train_src, resume=True, progress=bars)
        for (i, point, sae_cfg, train_cfg, run, key, previous), (_, trainer), was in zip(group, trainers, resumed,
                                                                                        strict=True):
            store = stores[point.hook]
            seconds = trainer.seconds
            if was and previous and previous.get("train_tokens") == trainer.state.tokens:
                seconds = previous["train_seconds"]   # trained before, only re-evaluated now: keep its time
            sae = load_sae(run)
            m = evaluate(sae, heldout.view(point.hook).batches(4096, shuffle=False))
            row = _row(point, store.hook, sae, sae_cfg, train_cfg, m, trainer.state.tokens, seconds, run)
            if splicer is not None:
                row.update(splicer.score(sae, run, store))
            atomic_write_json(run / ROW, {"key": key, "row": row})
            rows[i] = row
            line = (f"[{i}/{len(points)}] {point.name()}: FVU {m.fvu:.4f}  L0 {m.l0:.1f}  "
                    f"dead {m.dead_fraction:.2%}  ({seconds:.0f} s)")
            if splicer is not None:
                line += f"  ΔLM {row['delta_lm_loss']:+.4f}  recovered {row['recovered_vs_mean']:.2%} vs mean"
            progress(line)
    ordered = [rows[i] for i in sorted(rows)]
    write_csv(ordered, out / "sweep.csv")
    return ordered


def _row(point: Point, hook: str, sae: Any, sae_cfg: Any, train_cfg: Any, m: Any, tokens: int, seconds: float,
         run: Path) -> dict[str, Any]:
    """One point's row of sweep.csv, before the splice columns."""
    return {
        "hook": hook, "activation": point.activation, "k": sae_cfg.k if sae_cfg.uses_k else None,
        "coeff": None if sae_cfg.uses_k else train_cfg.penalty_coeff(sae_cfg),
        "n_features": sae.n_features, "seed": train_cfg.seed, "l0": m.l0, "fvu": m.fvu,
        "explained_variance": m.explained_variance, "mse_per_token": m.mse_per_token,
        "dead_fraction": m.dead_fraction, "dense_fraction": m.dense_fraction, "cosine": m.cosine,
        "relative_reconstruction_bias": m.relative_reconstruction_bias,
        "train_tokens": tokens, "train_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "heldout_tokens": m.n_tokens, "run": str(run)}


class _Splicer:
    """Splice columns of a sweep: the model loaded once, each hook's SAE-independent
    reference (clean, zero- and mean-ablated) computed once for all of its points."""

    def __init__(self, splice: SpliceConfig, model: str | None):
        self.splice, self.model = splice, model
        self.lm: Any = None
        self.references: dict[str, Any] = {}

    def score(self, sae: Any, run: Path, store: Any) -> dict[str, Any]:
        from dictlens.data.models import load_model
        from dictlens.eval.splice import sae_replacement, splice_metrics, splice_reference
        from dictlens.load import check_model

        if self.lm is None:
            self.lm = load_model(self.model or store.model)
        check_model(sae, run, self.lm, store.hook)
        if store.hook not in self.references:
            self.references[store.hook] = splice_reference(self.lm, store.hook, self.splice.batches(self.lm),
                                                           max_norm=sae.provenance.outlier_limit)
        scored = splice_metrics(self.lm, store.hook, sae_replacement(sae),
                                reference=self.references[store.hook]).to_dict()
        scored.pop("n_tokens", None)
        return scored


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str] | None = None) -> Path:
    columns = columns or COLUMNS
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def _family(row: dict[str, Any]) -> tuple[str, str, int]:
    return (row["hook"], row["activation"], int(row["n_features"]))


def aggregate(rows: list[dict[str, Any]], metrics: tuple[str, ...] = ("l0", "fvu", "delta_lm_loss",
                                                                       "recovered_vs_mean", "dead_fraction")
              ) -> list[dict[str, Any]]:
    """Seeds averaged: one row per (hook, activation, width, k/coeff) with ``<metric>`` means and
    ``<metric>_std`` (0 for one seed)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((*_family(r), r.get("k"), r.get("coeff")), []).append(r)
    out = []
    for (hook, activation, width, k, coeff), rs in groups.items():
        agg: dict[str, Any] = {"hook": hook, "activation": activation, "n_features": width, "k": k, "coeff": coeff,
                               "seeds": len(rs)}
        for name in metrics:
            vals = [float(r[name]) for r in rs if r.get(name) is not None]
            agg[name] = statistics.fmean(vals) if vals else None
            agg[name + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out.append(agg)
    return out


def pareto(points: list[dict[str, Any]], y: str = "fvu") -> list[bool]:
    """Whether each point is on the frontier: no other has both lower-or-equal L0 and ``y``, one lower."""
    flags = []
    for p in points:
        if p.get(y) is None:
            flags.append(False)
            continue
        dominated = any(q is not p and q.get(y) is not None and q["l0"] <= p["l0"] and q[y] <= p[y]
                        and (q["l0"] < p["l0"] or q[y] < p[y]) for q in points)
        flags.append(not dominated)
    return flags


def at_l0(points: list[dict[str, Any]], metric: str, l0: float, tolerance: float = 0.05) -> float | None:
    """``metric`` along one frontier (points of one family) read at ``l0``: linear in log L0
    between the two neighbours; an endpoint within ``tolerance`` (relative) counts; else None."""
    pts = sorted((p["l0"], p[metric]) for p in points if p.get(metric) is not None and p["l0"] > 0)
    if not pts:
        return None
    for a, b in zip(pts, pts[1:], strict=False):
        if a[0] <= l0 <= b[0]:
            if b[0] == a[0]:
                return (a[1] + b[1]) / 2
            t = (math.log(l0) - math.log(a[0])) / (math.log(b[0]) - math.log(a[0]))
            return a[1] + t * (b[1] - a[1])
    for x, v in (pts[0], pts[-1]):
        if abs(x - l0) <= tolerance * l0:
            return v
    return None


def layer_table(rows: list[dict[str, Any]], l0: float) -> list[dict[str, Any]]:
    """Per hook and (activation, width): FVU, ΔLM loss and loss recovered read at ``l0``."""
    agg = aggregate(rows)
    fams: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for a in agg:
        fams.setdefault(_family(a), []).append(a)
    out = []
    for (hook, activation, width), pts in fams.items():
        out.append({"hook": hook, "activation": activation, "n_features": width, "at_l0": l0,
                    "fvu": at_l0(pts, "fvu", l0), "delta_lm_loss": at_l0(pts, "delta_lm_loss", l0),
                    "recovered_vs_mean": at_l0(pts, "recovered_vs_mean", l0),
                    "l0_range": f"{min(p['l0'] for p in pts):.1f}-{max(p['l0'] for p in pts):.1f}"})
    return out


def default_l0(grid: Grid, rows: list[dict[str, Any]]) -> float:
    """The middle swept k when TopK is swept, else the median measured L0."""
    if grid.ks:
        ks = sorted(unique(grid.ks))
        return float(ks[(len(ks) - 1) // 2])
    return float(statistics.median(r["l0"] for r in rows))


def _labels(fams: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], str]:
    widths = {f[2] for f in fams}
    return {f: f[1] + (f" F={f[2]:,}" if len(widths) > 1 else "") for f in fams}


def plot_frontiers(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per hook: L0 (log) against FVU and, when spliced, against ΔLM loss; one line per
    (activation, width), seed spread as error bars, frontier points ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    paths = []
    for hook in unique([a["hook"] for a in agg]):
        pts = [a for a in agg if a["hook"] == hook]
        ys = ["fvu"] + (["delta_lm_loss"] if any(p.get("delta_lm_loss") is not None for p in pts) else [])
        fig, axes = plt.subplots(1, len(ys), figsize=(5.2 * len(ys), 4.2), squeeze=False)
        fams = unique([_family(p) for p in pts])
        labels = _labels(fams)
        for ax, y in zip(axes[0], ys, strict=True):
            front = pareto(pts, y)
            for fam in fams:
                fp = sorted((p for p in pts if _family(p) == fam and p.get(y) is not None), key=lambda p: p["l0"])
                if not fp:
                    continue
                ax.errorbar([p["l0"] for p in fp], [p[y] for p in fp], yerr=[p[y + "_std"] for p in fp],
                            xerr=[p["l0_std"] for p in fp], marker="o", ms=4, capsize=2, label=labels[fam])
            on = [p for p, f in zip(pts, front, strict=True) if f]
            ax.scatter([p["l0"] for p in on], [p[y] for p in on], s=110, facecolors="none", edgecolors="black",
                       linewidths=1, label="frontier", zorder=3)
            ax.set_xscale("log")
            ax.set_xlabel("L0 (features active per token, held out)")
            ax.set_ylabel({"fvu": "FVU (1 − explained variance)", "delta_lm_loss": "ΔLM loss (nats)"}[y])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{hook}: sparsity against fidelity", fontsize=10)
        fig.tight_layout()
        paths.append(save_figure(fig, out / f"frontier_{safe_name(hook)}.png"))
    return paths


def plot_layers(table: list[dict[str, Any]], hooks: list[str], out: Path) -> Path:
    """FVU and loss recovered at a fixed L0 against the hook (layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = ["fvu"] + (["recovered_vs_mean"] if any(t.get("recovered_vs_mean") is not None for t in table) else [])
    fig, axes = plt.subplots(1, len(ys), figsize=(5.2 * len(ys), 4.2), squeeze=False)
    fams = unique([(t["activation"], t["n_features"]) for t in table])
    for ax, y in zip(axes[0], ys, strict=True):
        for activation, width in fams:
            vals = {t["hook"]: t[y] for t in table if (t["activation"], t["n_features"]) == (activation, width)}
            xs = [i for i, h in enumerate(hooks) if vals.get(h) is not None]
            label = activation + (f" F={width:,}" if len({w for _, w in fams}) > 1 else "")
            ax.plot(xs, [vals[hooks[i]] for i in xs], marker="o", label=label)
        ax.set_xticks(range(len(hooks)), hooks, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel({"fvu": "FVU", "recovered_vs_mean": "loss recovered vs mean ablation"}[y])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    l0 = table[0]["at_l0"] if table else 0
    fig.suptitle(f"per hook, read off each frontier at L0 = {l0:g}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out / "layers.png")


def format_rows(rows: list[dict[str, Any]]) -> str:
    spliced = any(r.get("delta_lm_loss") is not None for r in rows)
    head = ("| hook | activation | k / coeff | F | seed | L0 | FVU | dead |"
            + (" ΔLM | recovered (mean) |" if spliced else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = {h: i for i, h in enumerate(unique([r["hook"] for r in rows]))}   # hooks in sweep order
    for r in sorted(rows, key=lambda r: (order[r["hook"]], r["activation"], r["n_features"], r["l0"], r["seed"])):
        kc = r["k"] if r.get("k") is not None else (f"{r['coeff']:g}" if r.get("coeff") is not None else "")
        line = (f"| {r['hook']} | {r['activation']} | {kc} | {r['n_features']:,} | {r['seed']} | {r['l0']:.1f} | "
                f"{r['fvu']:.4f} | {r['dead_fraction']:.2%} |")
        if spliced:
            line += f" {r['delta_lm_loss']:+.4f} | {r['recovered_vs_mean']:.2%} |"
        lines.append(line)
    return "\n".join(lines)


def format_layers(table: list[dict[str, Any]]) -> str:
    def f(v: float | None, fmt: str) -> str:
        return "outside the swept range" if v is None else format(v, fmt)

    lines = [f"| hook | activation | F | FVU at L0 {table[0]['at_l0']:g} | ΔLM | recovered (mean) | L0 swept |",
             "|---|---|---:|---:|---:|---:|---|"]
    for t in table:
        lines.append(f"| {t['hook']} | {t['activation']} | {t['n_features']:,} | {f(t['fvu'], '.4f')} | "
                     f"{f(t['delta_lm_loss'], '+.4f')} | {f(t['recovered_vs_mean'], '.2%')} | {t['l0_range']} |")
    return "\n".join(lines)


@dataclass(kw_only=True)
class SweepJob:
    """``dictlens sweep``: the grid, the held-out judgement, and the base configuration each
    point varies."""

    acts: str = field(help="activation cache (one or several hooks, one harvest)")
    out: str = field(help="sweep directory: one run per point, sweep.csv, layers.csv, sweep.json, PNGs")
    hooks: list[str] = field(default_factory=list, flag="--hook",
                             help="hook to sweep (default: every hook of the cache)")
    activations: list[str] = field(default_factory=list, flag="--activation",
                                   help="activation to sweep: " + ", ".join(registry.NAMES) + " (default: topk)")
    ks: list[int] = field(default_factory=list, flag="--k",
                          help="k for " + ", ".join(registry.with_k()) + " (default 32)")
    coeffs: list[str] = field(default_factory=list, flag="--coeff",
                              help="penalty coefficient for the penalised activations: N for all of them, or "
                                   "ACTIVATION:N,N,... for one (default: the penalty's own)")
    widths: list[int] = field(default_factory=list, flag="--n-features", help="width F")
    expansions: list[float] = field(default_factory=list, flag="--expansion", help="width as F / D (default 16)")
    seeds: int = field(1, help="seeds per point (seed, seed + 1, ...)")
    together: int = field(0, help="SAEs trained side by side from one read of the cache (0: every point "
                                  "still to train; fewer bound the memory of the SAEs held at once)")
    heldout: int = field(8192, help="tokens held out (the cache's last shards)")
    model: str | None = field(None, help="check the cache came from this model (and splice into it)")
    at_l0: float | None = field(None, help="L0 at which hooks are compared (default: the middle --k, "
                                           "else the median L0)")
    splice: SpliceConfig = field(default_factory=SpliceConfig, help="the splice into the model")
    sae: SAEConfig = field(default_factory=SAEConfig, skip=("activation", "k", "expansion", "n_features"),
                           help="the dictionary every point starts from")
    train: TrainConfig = field(default_factory=TrainConfig, skip=("sparsity_coeff",),
                               help="the optimisation every point starts from")

    def grid(self) -> Grid:
        from dictlens.data.cache import read_manifest

        if not Path(self.acts).is_dir():
            raise CacheError(f"activation cache {self.acts} does not exist")
        hooks = self.hooks or list(read_manifest(Path(self.acts))["hooks"])
        coeffs, per_activation = parse_coeffs(self.coeffs)
        return Grid(hooks=hooks, activations=self.activations or ["topk"], ks=self.ks, coeffs=coeffs,
                    activation_coeffs=per_activation, widths=self.widths, expansions=self.expansions,
                    seeds=self.seeds)


@dataclass
class Swept:
    """What :func:`sweep_job` leaves: every point's row, the per-hook table at ``at_l0``, the files."""

    grid: Grid
    rows: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    at_l0: float
    written: list[Path]


def sweep_job(job: SweepJob, *, progress: Callable[[str], None] = print, bars: bool = True) -> Swept:
    """Train and judge every point, then write sweep.csv, the frontier PNGs, layers.csv (and
    the per-layer PNG with several hooks) and sweep.json into ``job.out``."""
    grid = job.grid()
    out = Path(job.out)
    splice = job.splice if job.splice.splice_text else None
    rows = run_sweep(job.acts, grid, job.sae, job.train, out, heldout_tokens=job.heldout, splice=splice,
                     model=job.model, together=job.together, progress=progress, bars=bars)
    written = [out / "sweep.csv", *plot_frontiers(rows, out)]
    l0 = job.at_l0 or default_l0(grid, rows)
    table = layer_table(rows, l0)
    written.append(write_csv(table, out / "layers.csv", columns=list(table[0])))
    if len(unique(grid.hooks)) > 1:
        written.append(plot_layers(table, unique([r["hook"] for r in rows]), out))
    atomic_write_json(out / "sweep.json", {"acts": str(job.acts), "hooks": grid.hooks, "rows": rows,
                                           "layers": table, "at_l0": l0})
    written.append(out / "sweep.json")
    return Swept(grid, rows, table, l0, written)
