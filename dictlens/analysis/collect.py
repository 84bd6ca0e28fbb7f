"""`dictlens analyze`: one streaming pass of a text through the model and the SAE.

The pass taps the SAE's hook, encodes every analysed token (not BOS, padding or other
special tokens; not norm outliers when the SAE's training cache dropped them), appends the
codes to the code store and feeds :class:`~dictlens.analysis.stats.FeatureCollector`.
Afterwards, from the decoder alone: logit lens and nearest features; from the code store:
random contexts where each feature is silent and, optionally, co-activation. Everything
lands in ``OUT/features.db`` + ``OUT/codes/`` (see :mod:`dictlens.analysis.db`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dictlens.analysis.codes import CodeStore, CodeWriter
from dictlens.analysis.db import CODES_DIR, DB_FILE, write_db
from dictlens.analysis.lens import coactivation, logit_lens, nearest, residual_directions, unembedding
from dictlens.analysis.stats import CollectedStats, FeatureCollector
from dictlens.config import check, field, to_dict
from dictlens.errors import ActivationError, InputError
from dictlens.formats.preflight import FORCE_HELP
from dictlens.io import atomic_write_json

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE


@dataclass
class AnalysisConfig:
    """What `dictlens analyze` reads and keeps; saved in the feature database."""

    text: str = field("default", help="text to analyse: file, folder, .jsonl, .parquet, dataset, - or default")
    text_field: str = field("text", help="field of .jsonl records / column of .parquet and datasets")
    tokens: int = field(100_000, help="tokens to analyse")
    skip_tokens: int = field(0, help="skip the contexts that hold the text's first N tokens")
    context: int = field(128, help="tokens per context")
    batch_size: int = field(16, help="contexts per forward pass")
    top_k: int = field(20, help="top-activating contexts kept per feature")
    quantile_groups: int = field(5, help="activation quantile groups shown per feature")
    quantile_examples: int = field(4, help="examples per quantile group (reservoir size per activation bin)")
    random_examples: int = field(5, help="random contexts where the feature does not fire, for contrast")
    bins_per_decade: int = field(8, help="activation histogram bins per decade")
    window_left: int = field(24, help="tokens shown before an example's position")
    window_right: int = field(8, help="tokens shown after it")
    logit_tokens: int = field(10, help="tokens listed per side of the logit lens")
    neighbours: int = field(10, help="nearest features listed per feature (cosine of what they write into "
                                     "the residual stream)")
    coactivation: bool = field(False, help="also list the features that fire together with each (Jaccard)")
    outlier_factor: float | None = field(None, help="skip tokens whose norm exceeds this × the median norm "
                                                    "of the text's first batch (default: the outlier limit "
                                                    "the SAE's record gives, if any)")
    seed: int = field(0, help="seed of the example sampling")
    device: str | None = field(None, help="cpu or cuda (default: cuda when present)")

    def __post_init__(self) -> None:
        check(self.tokens > 0, "tokens", "a positive count", self.tokens)
        check(self.context >= 2, "context", "at least 2", self.context)
        check(self.batch_size >= 1, "batch_size", "at least 1", self.batch_size)
        for name in ("top_k", "quantile_groups", "quantile_examples", "bins_per_decade"):
            check(getattr(self, name) >= 1, name, "at least 1", getattr(self, name))
        for name in ("random_examples", "window_left", "window_right", "logit_tokens", "neighbours", "skip_tokens"):
            check(getattr(self, name) >= 0, name, "zero or more", getattr(self, name))
        check(self.outlier_factor is None or self.outlier_factor > 1, "outlier_factor", "a factor above 1",
              self.outlier_factor)


# log10(activation / mean input norm) histogram range: codes of a unit-norm dictionary
# rarely exceed the input's norm, and below 1e-5 of it they change nothing.
HIST_LO, HIST_HI = -5.0, 1.0


@dataclass
class AnalysisResult:
    path: Path
    tokens: int
    contexts: int
    seconds: float
    outliers: int
    stats: CollectedStats


def decode_vocab(tokenizer: Any) -> list[str]:
    """Each token id decoded on its own (byte-level pieces of a character show as �)."""
    n = len(tokenizer)
    return [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in range(n)]


def analyze(sae: SAE, lm: LoadedModel, hook: str, cfg: AnalysisConfig, out: str | Path, *, progress: bool = True,
            run: str | None = None) -> AnalysisResult:
    """Run the analysis pass of ``sae`` at ``hook`` of ``lm`` over ``cfg.text``; write ``out``."""
    from tqdm.auto import tqdm

    from dictlens.data.tap import Tap
    from dictlens.data.tokens import context_batch, special_ids, text_contexts
    from dictlens.load import check_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_model(sae, run or "memory", lm, hook)
    tap = Tap(lm, [hook])
    device = torch.device(cfg.device) if cfg.device else sae.device
    sae = sae.to(device).eval()
    special = special_ids(lm.tokenizer)
    F = sae.n_features
    (out / DB_FILE).unlink(missing_ok=True)  # the old database would not match the new codes
    writer = CodeWriter(out / CODES_DIR, cfg.context, F)
    collector: FeatureCollector | None = None
    contexts = text_contexts(lm, cfg.text, cfg.context, text_field=cfg.text_field, skip_tokens=cfg.skip_tokens)
    n_ctx, kept_total, outliers = 0, 0, 0
    # the SAE's own record (what its training data left out), unless --outlier-factor sets a rule
    limit = sae.provenance.outlier_limit if cfg.outlier_factor is None else None
    t0 = time.perf_counter()
    try:
        with tqdm(total=cfg.tokens, unit="tok", unit_scale=True, disable=not progress, desc="analyze") as bar:
            while kept_total < cfg.tokens:
                batch = [c for _, c in zip(range(cfg.batch_size), contexts, strict=False)]
                if not batch:
                    break
                ids, keep = context_batch(batch, special)
                B, T = ids.shape
                acts = tap(ids)[hook].float()
                if acts.shape[-1] != sae.d_in:
                    raise InputError(f"hook {hook} of {lm.name} gives {acts.shape[-1]}-wide activations; "
                                     f"the SAE reads {sae.d_in}")
                x = acts[keep.to(acts.device)]  # keep stays on the CPU (it goes to disk)
                bad = ~torch.isfinite(x).all(dim=1)
                if bool(bad.any()):
                    c, t = keep.nonzero()[int(bad.nonzero()[0, 0])].tolist()
                    raise ActivationError(f"hook {hook}: {int(bad.sum())} activation rows contain NaN or Inf "
                                          f"(first at context {n_ctx + c}, position {t})")
                norms = x.norm(dim=1)
                if collector is None:
                    if cfg.outlier_factor is not None:
                        limit = cfg.outlier_factor * float(norms.median())
                    collector = FeatureCollector(F, scale=float(norms.mean().clamp_min(1e-12)), top_k=cfg.top_k,
                                                 bins_per_decade=cfg.bins_per_decade, lo=HIST_LO, hi=HIST_HI,
                                                 reservoir=cfg.quantile_examples, seed=cfg.seed, device=device)
                if limit is not None:
                    inlier = norms <= limit
                    outliers += int((~inlier).sum())
                    drop = keep.nonzero()[~inlier.cpu()]
                    keep[drop[:, 0], drop[:, 1]] = False
                    x = x[inlier]
                with sae.ranking("float32"):
                    p, vals = sae.encode_sparse(x.to(device))
                rows, cols = p.rows, p.cols
                flat = keep.reshape(-1).nonzero()[:, 0]  # kept row → position in the batch
                counts = torch.bincount(flat[rows.cpu()], minlength=B * T)
                writer.append(ids.numpy(), keep.numpy(), counts.numpy(), cols.cpu().numpy(),
                              vals.float().cpu().numpy())
                ctx_of = (flat // T).to(device)
                collector.update(len(x), rows, cols, vals, (flat + n_ctx * T).to(device), ctx_of)
                n_ctx += B
                kept_total += len(x)
                bar.update(len(x))
        if collector is None:
            raise InputError(f"analyze: {cfg.text!r} holds no text"
                             + (f" after the first {cfg.skip_tokens:,} tokens" if cfg.skip_tokens else ""))
        seconds = time.perf_counter() - t0
        writer.commit({"hook": hook, "model": lm.name})
    except BaseException:
        writer.abort()
        raise
    stats = collector.result()
    _write_database(sae, lm, hook, cfg, out, stats, outliers, seconds, run, limit)
    summary = {"tokens": kept_total, "contexts": n_ctx, "seconds": seconds, "tokens_per_second": kept_total / seconds,
               "outliers_skipped": outliers, "alive": int((stats.count > 0).sum()), "n_features": F,
               "hook": hook, "model": lm.name, "sae": run}
    atomic_write_json(out / "analysis.json", summary)
    return AnalysisResult(out, kept_total, n_ctx, seconds, outliers, stats)


def _sig(v: Any) -> float:
    """Five significant digits (enough to show; keeps the JSON columns short)."""
    return float(f"{float(v):.5g}")


def _random_examples(store: CodeStore, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """For each feature, ``n`` positions in random contexts where it never fires (the middle
    of the context's analysed tokens), or fewer when it fires almost everywhere."""
    F = store.n_features
    if n == 0:
        return [np.zeros(0, np.int64)] * F
    has = store.context_features().tocsc()
    kept = store.kept
    valid = np.flatnonzero(kept.any(axis=1))
    out = []
    for f in range(F):
        fires = has.indices[has.indptr[f]:has.indptr[f + 1]]
        pool = rng.choice(valid, size=min(len(valid), 4 * n), replace=False) if len(valid) else valid
        chosen = pool[~np.isin(pool, fires)][:n]
        pos = []
        for c in chosen:
            k = np.flatnonzero(kept[c])
            pos.append(c * store.context + int(k[rng.integers(len(k))]))
        out.append(np.asarray(pos, np.int64))
    return out


def _write_database(sae: SAE, lm: LoadedModel, hook: str, cfg: AnalysisConfig, out: Path, stats: CollectedStats,
                    outliers: int, seconds: float, run: str | None, limit: float | None) -> None:
    store = CodeStore(out / CODES_DIR)
    # the lens and the nearest features see what each feature writes into the residual stream
    directions = sae.feature_directions().detach()
    resid = residual_directions(directions, lm.model, hook)
    if resid is None:            # no way into the residual from this hook: no lens
        empty = np.zeros((sae.n_features, 0))
        top_ids, top_v, bot_ids, bot_v = empty.astype(np.int64), empty, empty.astype(np.int64), empty
    else:
        W_U, gain = unembedding(lm.model)
        top_ids, top_v, bot_ids, bot_v = logit_lens(resid.to(W_U.device), W_U, gain, n=cfg.logit_tokens)
    nb_ids, nb_cos = nearest(directions if resid is None else resid, n=cfg.neighbours)
    if cfg.coactivation:
        co_ids, co_j = coactivation(store.token_features(), n=cfg.neighbours)
    rng = np.random.default_rng(cfg.seed)
    randoms = _random_examples(store, cfg.random_examples, rng)
    density, mean = stats.density, stats.mean

    def rows() -> Any:
        for f in range(sae.n_features):
            groups = stats.quantile_groups(f, cfg.quantile_groups, cfg.quantile_examples)
            quant = [{k: g[k] for k in ("lo", "hi", "fraction")} for g in groups]
            co = ([[int(i), _sig(j)] for i, j in zip(co_ids[f], co_j[f], strict=True) if i >= 0]
                  if cfg.coactivation else [])
            yield (f, int(stats.count[f]), float(density[f]), float(stats.max[f]), float(mean[f]),
                   json.dumps(stats.hist[f].tolist()), json.dumps(quant),
                   json.dumps([[int(i), _sig(v)] for i, v in zip(top_ids[f], top_v[f], strict=True)]),
                   json.dumps([[int(i), _sig(v)] for i, v in zip(bot_ids[f], bot_v[f], strict=True)]),
                   json.dumps([[int(i), _sig(c)] for i, c in zip(nb_ids[f], nb_cos[f], strict=True)]),
                   json.dumps(co))

    def examples() -> Any:
        for f in range(sae.n_features):
            live = stats.top_val[f] > 0
            for r, (p, v) in enumerate(zip(stats.top_pos[f][live], stats.top_val[f][live], strict=True)):
                yield (f, "top", 0, r, int(p), float(v))
            for g, grp in enumerate(stats.quantile_groups(f, cfg.quantile_groups, cfg.quantile_examples)):
                for r, (p, v) in enumerate(zip(grp["positions"], grp["values"], strict=True)):
                    yield (f, "quantile", g, r, int(p), float(v))
            for r, p in enumerate(randoms[f]):
                yield (f, "random", 0, r, int(p), 0.0)

    meta = {"n_features": sae.n_features, "d_in": sae.d_in, "sae": run, "sae_config": to_dict(sae.cfg),
            "sae_provenance": sae.provenance.to_json(), "model": lm.name, "hook": hook, "config": to_dict(cfg),
            "tokens": stats.n_tokens, "contexts": store.n_contexts, "context": store.context,
            "outliers_skipped": outliers, "outlier_limit": limit, "seconds": seconds,
            "hist_edges": stats.edges.tolist(), "window_left": cfg.window_left, "window_right": cfg.window_right,
            "final_norm_gain": gain is not None, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_db(out / DB_FILE, meta, rows(), examples(), decode_vocab(lm.tokenizer))


@dataclass(kw_only=True)
class AnalyzeJob:
    """``dictlens analyze``: the feature database of a run (and its static report)."""

    run: str = field(positional=True, help="run directory of a trained SAE")
    model: str | None = field(None, help="model to run (default: the one the SAE was trained on)")
    hook: str | None = field(None, help="hook (default: the one the SAE was trained on)")
    out: str | None = field(None, help="analysis directory (default: RUN/analysis)")
    report: bool = field(True, help="write the HTML report (OUT/report) after the database")
    force: bool = field(False, help=FORCE_HELP)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig, help="the pass")


@dataclass
class Analysed:
    """The pass's result, what was analysed, and the report's index page (None: no report)."""

    result: AnalysisResult
    sae: SAE
    hook: str
    model: str
    report: Path | None


def analyze_job(job: AnalyzeJob, *, say: Callable[[str], None] = print) -> Analysed:
    """Load the run and its model, write the feature database (OUT/features.db, OUT/codes) and the report."""
    from dictlens.load import load_run, own_directory

    cfg = job.analysis
    loaded = load_run(job.run, model=job.model, device=cfg.device, hook=job.hook, force=job.force)
    out = Path(job.out) if job.out else own_directory(job.run, "analyze") / "analysis"
    say(f"analyze {job.run} at {loaded.hook} of {loaded.lm.name} over {cfg.text} ({cfg.tokens:,} tokens)")
    r = analyze(loaded.sae, loaded.lm, loaded.hook, cfg, out, run=str(job.run))
    index = None
    if job.report:
        from dictlens.app.report import write_report

        index = write_report(out)
    return Analysed(r, loaded.sae, loaded.hook, loaded.lm.name, index)
