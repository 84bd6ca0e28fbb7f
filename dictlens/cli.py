"""The command line: one subcommand per pipeline step, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dictlens.config import add_arguments, from_namespace
from dictlens.errors import CacheError, CheckpointMismatch, DictlensError

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.data.store import ActivationStore, StreamingSource
    from dictlens.sae.model import SAE


def _cmd_hooks(args: argparse.Namespace) -> int:
    from dictlens.data.hooks import named_hooks
    from dictlens.data.models import load_skeleton

    model = load_skeleton(args.model)  # structure only: no weights are loaded
    cfg = model.config
    print(f"{args.model}: {type(model).__name__}, {cfg.num_hidden_layers} blocks, width {cfg.hidden_size}")
    print(f"{'hook':<16} {'reads':<7} module")
    for name, point in named_hooks(model).items():
        print(f"{name:<16} {point.io:<7} {point.module}")
    if args.modules:
        print("\nmodule paths (append :input to read a module's input):")
        for name, _ in model.named_modules():
            if name:
                print(f"  {name}")
    else:
        print("\nAny module path is a hook too (`--modules` lists them); append :input for its input.")
    return 0


def print_cache_summary(manifest: dict[str, Any], seconds: float | None = None, new_tokens: int = 0) -> None:
    filt = manifest.get("filter", {})
    print(f"cache: {manifest['tokens']:,} tokens in {len(manifest['shards'])} shards, "
          f"{manifest['dtype']}, context {manifest['context']}, model {manifest['model']}"
          + (" (text exhausted)" if manifest.get("exhausted") else ""))
    print(f"dropped: {filt.get('dropped_special', 0):,} special/BOS/pad, "
          f"{filt.get('dropped_outlier', 0):,} norm outliers, {filt.get('dropped_nonfinite', 0):,} NaN/Inf")
    print(f"{'hook':<24} {'width':>6} {'mean norm':>10} {'total var':>10} {'outlier var share':>18}")
    for h in manifest["hooks"]:
        s = manifest.get("stats", {}).get(h, {})
        share = manifest.get("outlier_variance_share", {}).get(h, 0.0)
        print(f"{h:<24} {manifest['widths'][h]:>6} {s.get('mean_norm', float('nan')):>10.3f} "
              f"{s.get('total_variance', float('nan')):>10.3f} {share:>17.1%}")
    if seconds:
        print(f"harvested {new_tokens:,} tokens in {seconds:.1f}s ({new_tokens / seconds:,.0f} tokens/s)")


def _cmd_harvest(args: argparse.Namespace) -> int:
    from dictlens.data.cache import HarvestConfig, harvest

    cfg = from_namespace(HarvestConfig, args)
    result = harvest(cfg)
    print_cache_summary(result.manifest, result.seconds, result.new_tokens)
    print(f"written to {result.path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dictlens.data.cache import read_manifest, verify_file

    root = Path(args.cache)
    manifest = read_manifest(root)
    if args.verify:
        for shard in manifest["shards"]:
            for entry in shard["files"].values():
                verify_file(root, entry)
        print(f"verified {len(manifest['shards'])} shards: sizes and sha256 match the manifest")
    print_cache_summary(manifest)
    if not manifest["complete"]:
        print("incomplete: run the same harvest command again to resume")
    return 0


def _train_source(args: argparse.Namespace) -> ActivationStore | StreamingSource:
    """The activation source named on the command line (it describes itself for the SAE's record)."""
    from dictlens.data.store import ActivationStore, StreamingSource
    from dictlens.errors import ConfigError

    if args.acts:
        return ActivationStore(args.acts, args.hook, model=args.model)
    if not (args.model and args.hook and args.text):
        raise ConfigError("train: give --acts DIR (a harvested cache), or --model, --hook and --text to stream")
    from dictlens.data.models import load_model

    lm = load_model(args.model)
    return StreamingSource(lm, args.hook, args.text, tokens=args.tokens, context=args.context,
                           text_field=args.text_field)


def _cmd_train(args: argparse.Namespace) -> int:
    from dictlens.data.store import Source, split_heldout
    from dictlens.eval.metrics import evaluate
    from dictlens.io import atomic_write_json
    from dictlens.sae.config import SAEConfig
    from dictlens.train.config import TrainConfig
    from dictlens.train.trainer import Trainer

    sae_cfg = from_namespace(SAEConfig, args)
    train_cfg = from_namespace(TrainConfig, args)
    source: Source = _train_source(args)
    heldout = None
    if train_cfg.heldout_tokens > 0:
        source, heldout = split_heldout(source, train_cfg.heldout_tokens)
    trainer = Trainer(sae_cfg, train_cfg, source, args.out)
    sae = trainer.fit(resume=args.resume)
    print(f"trained {trainer.state.tokens:,} tokens in {trainer.state.step} steps; SAE saved to {args.out}")
    if heldout is not None:
        m = evaluate(sae, heldout.batches(4096, shuffle=False))
        atomic_write_json(Path(args.out) / "metrics.json", m.to_dict())
        print_heldout(m)
    return 0


def print_heldout(m: Any) -> None:
    """The one-line held-out summary of dictlens train / demo."""
    print(f"held-out ({m.n_tokens:,} tokens): FVU {m.fvu:.4f}  explained variance {m.explained_variance:.4f}  "
          f"L0 {m.l0:.1f}  dead {m.dead_fraction:.2%}")


def print_metrics(m: Any) -> None:
    """The short terminal table of dictlens eval / train / demo."""
    rows = [("tokens (N)", f"{m.n_tokens:,}"), ("FVU", f"{m.fvu:.4f}"),
            ("explained variance", f"{m.explained_variance:.4f}"),
            ("  legacy (per-token, batch mean)", f"{m.explained_variance_legacy:.4f}"),
            ("MSE per token", f"{m.mse_per_token:.4g}"), ("uncentred normalised MSE", f"{m.nmse_uncentred:.4g}"),
            ("L0", f"{m.l0:.1f}"), ("L1", f"{m.l1:.4g}"), ("dead (never on N tokens)", f"{m.dead_fraction:.2%}"),
            ("dense (> 10% of tokens)", f"{m.dense_fraction:.2%}"), ("cosine(x, x̂)", f"{m.cosine:.4f}"),
            ("‖x̂‖/‖x‖", f"{m.l2_ratio:.4f}"), ("relative reconstruction bias", f"{m.relative_reconstruction_bias:.4f}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v:>10}")


def _cmd_eval(args: argparse.Namespace) -> int:
    """Held-out metrics of a trained SAE: JSON, a terminal table, the density histogram."""
    from dictlens.data.store import Source, split_heldout
    from dictlens.errors import ConfigError
    from dictlens.eval.metrics import evaluate
    from dictlens.eval.plots import density_histogram
    from dictlens.io import atomic_write_json
    from dictlens.load import load_sae, open_cache

    sae = load_sae(args.run)
    store = open_cache(sae, args.run, args.acts, args.hook)
    source: Source = store
    if args.heldout:
        if args.heldout < 0:
            raise ConfigError(f"heldout: expected a token count >= 0, found {args.heldout}")
        _, source = split_heldout(store, args.heldout)
    m = evaluate(sae, source.batches(args.batch_size, shuffle=False))
    out = Path(args.out) if args.out else Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"run": str(args.run), "acts": str(args.acts), "hook": store.hook,
                              "heldout": args.heldout or "whole cache", **m.to_dict()}
    spliced = None
    from dictlens.eval.splice import SpliceConfig

    splice_cfg = from_namespace(SpliceConfig, args)
    if splice_cfg.splice_text:
        from dictlens.data.models import load_model
        from dictlens.eval.splice import sae_replacement, splice_metrics
        from dictlens.load import check_model, model_of

        model_name = model_of(sae, args.run, args.model or store.model)
        lm = load_model(model_name)
        check_model(sae, args.run, lm, store.hook)
        batches = splice_cfg.batches(lm)
        spliced = splice_metrics(lm, store.hook, sae_replacement(sae), batches,
                                 max_norm=sae.provenance.outlier_limit)
        record["spliced"] = {"model": model_name, "text": args.splice_text, "skipped_tokens": args.splice_skip,
                             **spliced.to_dict()}
    atomic_write_json(out / "eval.json", record)
    png = density_histogram(m, out / "feature_density.png", title=store.hook)
    part = f", last {args.heldout:,} tokens" if args.heldout else ""
    print(f"{args.run} on {args.acts} ({store.hook}{part}):")
    print_metrics(m)
    if spliced is not None:
        held = (f"; {spliced.n_outliers:,} positions above the cache's outlier limit kept clean"
                if spliced.n_outliers else "")
        print(f"spliced into {record['spliced']['model']} at {store.hook} ({spliced.n_tokens:,} predictions, "
              f"{args.splice_text}{held}):")
        print(f"  CE clean {spliced.ce_clean:.4f}  with SAE {spliced.ce_sae:.4f}  zero-ablated {spliced.ce_zero:.4f}"
              f"  mean-ablated {spliced.ce_mean:.4f} (nats)")
        print(f"  ΔLM loss {spliced.delta_lm_loss:+.4f} nats  KL {spliced.kl_sae:.4f}  loss recovered: "
              f"{spliced.recovered_vs_zero:.2%} vs zero, {spliced.recovered_vs_mean:.2%} vs mean")
    print(f"written: {out / 'eval.json'}, {png}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    """One pass of a text through the model and the SAE: the feature database."""
    from dictlens.analysis.collect import AnalysisConfig, analyze
    from dictlens.load import load_run

    cfg = from_namespace(AnalysisConfig, args)
    loaded = load_run(args.run, model=args.model, device=cfg.device, hook=args.hook)
    sae, hook = loaded.sae, loaded.hook
    out = Path(args.out) if args.out else Path(args.run) / "analysis"
    print(f"analyze {args.run} at {hook} of {loaded.lm.name} over {cfg.text} ({cfg.tokens:,} tokens)")
    r = analyze(sae, loaded.lm, hook, cfg, out, run=str(args.run))
    alive = int((r.stats.count > 0).sum())
    print(f"{r.tokens:,} tokens in {r.contexts:,} contexts, {r.seconds:.1f} s ({r.tokens / r.seconds:,.0f} tok/s); "
          f"{alive:,} of {sae.n_features:,} features fired"
          + (f"; {r.outliers:,} outlier tokens skipped" if r.outliers else ""))
    print(f"feature database: {out / 'features.db'} (codes in {out / 'codes'})")
    if args.report:
        from dictlens.app.report import write_report

        index = write_report(out)
        print(f"report: {index.resolve()} (open it in a browser; `dictlens serve {args.run}` for the app)")
    return 0


def _analysis_dir(target: str, analysis: str | None) -> Path:
    """An analysis directory from ``--analysis``, or RUN itself, or RUN/analysis."""
    from dictlens.analysis.db import DB_FILE
    from dictlens.errors import AnalysisError

    for cand in ([Path(analysis)] if analysis else [Path(target), Path(target) / "analysis"]):
        if (cand / DB_FILE).is_file():
            return cand
    raise AnalysisError(f"no feature database in {analysis or target}: run `dictlens analyze {target}` first")


def _cmd_report(args: argparse.Namespace) -> int:
    """Write the static HTML report of an analysis."""
    from dictlens.app.report import write_report

    src = _analysis_dir(args.run, args.analysis)
    features = None
    if args.features:
        features = _parse_ids(args.features)
    index = write_report(src, args.out, features=features)
    print(f"report: {index.resolve()}")
    return 0


def _parse_ids(spec: str) -> list[int]:
    """'0-99,120,7' → ids."""
    from dictlens.errors import ConfigError

    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        except ValueError:
            raise ConfigError(f"features: expected numbers and ranges like 0-99,120, found {part!r}") from None
    return out


def _cmd_serve(args: argparse.Namespace) -> int:
    """The local web app over an analysis."""
    from dictlens.app.server import serve

    serve(_analysis_dir(args.run, args.analysis), host=args.host, port=args.port, model=args.model,
          device=args.device, compare=args.compare)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    """Which features fire on a text (live), or are most active on a token (analysed text)."""
    from dictlens.analysis.db import FeatureDB
    from dictlens.errors import ConfigError

    if (args.text is None) == (args.token is None):
        raise ConfigError("search: give exactly one of --text or --token")
    if args.token is not None:
        db = FeatureDB(_analysis_dir(args.run, args.analysis))
        hits = db.features_for_token(args.token, n=args.n)
        if not hits:
            print(f"{args.token!r} does not occur among the {db.meta['tokens']:,} analysed tokens")
            return 0
        print(f"features most active on {args.token!r} over its {hits[0]['occurrences']:,} occurrences:")
        print("| feature | mean activation | fires on | top logit-lens tokens |\n|---:|---:|---:|---|")
        for h in hits:
            lens = " ".join(repr(t["token"]) for t in db.feature(h["id"])["logit_top"][:5])
            print(f"| {h['id']} | {h['mean']:.3g} | {h['fires']:.1%} | {lens} |")
        return 0
    from dictlens.analysis.search import features_on_text
    from dictlens.load import load_run

    run = load_run(args.run, model=args.model)
    r = features_on_text(run.sae, run.lm, run.hook, args.text, max_norm=run.max_norm)
    print(f"{len(r.features):,} features fire on the text's {len(r.tokens)} tokens; strongest first:")
    print("| feature | max | tokens |\n|---:|---:|---:|")
    for f in r.features[:args.n]:
        print(f"| {f['id']} | {f['max']:.3g} | {f['tokens']} |")
    print("\ntoken by token:")
    for t in r.tokens:
        print(f"  {t.text!r:>16}  " + "  ".join(f"{i}:{v:.3g}" for i, v in t.features[:6]))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    """Match the features of SAEs pairwise (seeds, widths, layers); splitting with --acts."""
    from dictlens.analysis.compare import match_features, splitting
    from dictlens.io import atomic_write_json
    from dictlens.load import check_cache, load_sae, open_cache

    if len(args.runs) < 2:
        from dictlens.errors import ConfigError
        raise ConfigError("compare: give at least two SAE run directories")
    saes = [load_sae(r) for r in args.runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs: list[dict[str, Any]] = []
    for (ra, a), (rb, b) in zip(zip(args.runs, saes, strict=True), list(zip(args.runs, saes, strict=True))[1:],
                                strict=False):
        m = match_features(a.W_dec, b.W_dec)
        row: dict[str, Any] = {"a": ra, "b": rb, "hook_a": a.provenance.hook_in, "hook_b": b.provenance.hook_in,
                               **m.summary()}
        name = f"{Path(ra).name}__{Path(rb).name}"
        _write_matches(out / f"matches_{name}.csv", m)
        if args.acts and a.n_features != b.n_features and row["hook_a"] == row["hook_b"]:
            narrow, wide = (a, b) if a.n_features < b.n_features else (b, a)
            store = open_cache(a, ra, args.acts)
            check_cache(b, rb, store)
            batches = (x for _, x in zip(range(max(1, args.tokens // 4096)), store.batches(4096, shuffle=False),
                                         strict=False))
            row["splitting"] = splitting(narrow, wide, batches).summary()
        pairs.append(row)
    atomic_write_json(out / "compare.json", {"runs": args.runs, "pairs": pairs})
    png = _plot_matches(out / "compare.png", args.runs, saes)
    for r in pairs:
        print(f"{r['a']} ({r['hook_a']}, {r['features_a']:,}) ↔ {r['b']} ({r['hook_b']}, {r['features_b']:,}): "
              f"MMCS {r['mmcs_a_to_b']:.3f} / {r['mmcs_b_to_a']:.3f}, Hungarian mean cos "
              f"{r['hungarian_mean_cos']:.3f}, matched above 0.7: {r['matched_above_0.7']:.1%}")
        if "splitting" in r:
            sp = r["splitting"]
            print(f"  splitting: {sp['wide_features']:,} wide features; their cosine and co-activation parents "
                  f"agree for {sp['parents_agree']:.1%}; {sp['children_mean']:.2f} children per narrow feature "
                  f"(max {sp['children_max']}), {sp['narrow_without_children']:.1%} with none")
    print(f"written: {out / 'compare.json'}, {png}, matches_*.csv")
    return 0


def _write_matches(path: Path, m: Any) -> None:
    import csv
    import io

    from dictlens.io import atomic_write_bytes

    partner = dict(zip(m.pairs[:, 0].tolist(), zip(m.pairs[:, 1].tolist(), m.pair_cos.tolist(), strict=True),
                       strict=True))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["feature_a", "best_b", "cos", "hungarian_b", "hungarian_cos"])
    for f in range(len(m.best_ab)):
        hb, hc = partner.get(f, (-1, float("nan")))
        w.writerow([f, int(m.best_ab[f]), f"{m.cos_ab[f]:.4f}", hb, f"{hc:.4f}"])
    atomic_write_bytes(path, buf.getvalue().encode())


def _plot_matches(path: Path, runs: list[str], saes: list[Any]) -> Path:
    """Histogram of each feature's best cosine in the next SAE, one curve per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dictlens.analysis.compare import cosine_matrix
    from dictlens.eval.plots import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (ra, a), (rb, b) in zip(zip(runs, saes, strict=True), list(zip(runs, saes, strict=True))[1:], strict=False):
        best = cosine_matrix(a.W_dec, b.W_dec).max(dim=1).values.numpy()
        ax.hist(best, bins=50, range=(0, 1), histtype="step", linewidth=1.5,
                label=f"{Path(ra).name} → {Path(rb).name} (MMCS {best.mean():.3f})")
    ax.set_xlabel("cosine of each feature's best match in the other SAE")
    ax.set_ylabel("features")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def _cmd_synth(args: argparse.Namespace) -> int:
    """Every method on a synthetic setting with known features: one table."""
    import dataclasses

    from dictlens.errors import ConfigError
    from dictlens.eval.known_features import format_table, rows_to_json, run_synth
    from dictlens.eval.synthetic import SyntheticConfig, generate, setting
    from dictlens.eval.toy import ToyConfig, dimensionality_summary, plot_toy, train_toy_model
    from dictlens.io import atomic_write_json

    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)}
    described: dict[str, Any]
    if args.setting == "toy":
        stray = [k for k, v in given.items() if v is not None and k not in ("samples", "seed")]
        if stray:
            raise ConfigError(f"--setting toy: {', '.join('--' + k.replace('_', '-') for k in stray)} "
                              "describe the other generator; the toy model takes --toy-features, --toy-dims, "
                              "--sparsity, --importance-decay")
        toy_cfg = from_namespace(ToyConfig, args)
        print(f"toy model of superposition: training {toy_cfg.toy_features} features into {toy_cfg.toy_dims} "
              f"dimensions (sparsity {toy_cfg.sparsity:g}, importance decay {toy_cfg.importance_decay:g})")
        toy = train_toy_model(toy_cfg, progress=True)
        print(dimensionality_summary(toy))
        data = toy.data(given["samples"] or SyntheticConfig.samples, seed=toy_cfg.seed + 1)
        described = {"setting": "toy", **dataclasses.asdict(toy_cfg), "samples": len(data.x)}
        print(f"data: hidden activations h = W x, {data.x.shape[1]} dimensions, {len(data.features)} true features "
              f"(the represented columns of W), {data.mean_active:.2f} active on average, {len(data.x):,} samples")
        if out is not None:
            print(f"written: {plot_toy(toy, str(out / 'toy_model.png'))}")
    else:
        cfg = setting(args.setting, **given)
        data = generate(cfg)
        described = {"setting": args.setting, **dataclasses.asdict(cfg)}
        print(f"{args.setting}: {cfg.describe()}; measured {data.mean_active:.2f} active on average")
    G = len(data.features)
    widths = args.width or [G, 2 * G]
    print(f"SAEs trained on {args.tokens:,} tokens; the last tenth of the samples (at most 20,000) is held out")
    rows = run_synth(data, widths, tokens=args.tokens, sklearn_iters=args.sklearn_iters,
                     activations=tuple(args.activation) if args.activation else None, seed=given["seed"] or 0)
    print(format_table(rows))
    if out is not None:
        atomic_write_json(out / "synth.json", {"config": described, "rows": rows_to_json(rows)})
        print(f"written: {out / 'synth.json'}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Train a grid of SAEs from one cache, evaluate each, write the CSV and the frontier plots."""
    from dictlens.data.cache import read_manifest
    from dictlens.eval import sweep
    from dictlens.io import atomic_write_json
    from dictlens.sae.config import SAEConfig
    from dictlens.train.config import TrainConfig

    if not Path(args.acts).is_dir():
        raise CacheError(f"activation cache {args.acts} does not exist")
    hooks = args.hook or list(read_manifest(Path(args.acts))["hooks"])
    coeffs, per_activation = sweep.parse_coeffs(args.coeff or [])
    grid = sweep.Grid(hooks=hooks, activations=args.activation or ["topk"], ks=args.k or [], coeffs=coeffs,
                      activation_coeffs=per_activation,
                      widths=args.n_features or [], expansions=args.expansion or [], seeds=args.seeds)
    # the grid's own flags (lists) are not the base configuration's fields of the same names
    base = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                 if k not in ("k", "n_features", "expansion", "activation")})
    sae_base = from_namespace(SAEConfig, base)
    train_base = from_namespace(TrainConfig, base)
    from dictlens.eval.splice import SpliceConfig

    splice_cfg = from_namespace(SpliceConfig, args)
    splice = splice_cfg if splice_cfg.splice_text else None
    out = Path(args.out)
    n = len(grid.points())
    into = args.model or read_manifest(Path(args.acts))["model"]
    print(f"sweep: {n} SAEs ({len(hooks)} hook(s) × {', '.join(grid.activations)}), {train_base.tokens:,} tokens "
          f"each, judged on the last {args.heldout:,} tokens of {args.acts}"
          + (f", spliced into {into}" if splice else ""))
    rows = sweep.run_sweep(args.acts, grid, sae_base, train_base, out, heldout_tokens=args.heldout, splice=splice,
                           model=args.model)
    print(sweep.format_rows(rows))
    written = [out / "sweep.csv", *sweep.plot_frontiers(rows, out)]
    l0 = args.at_l0 or sweep.default_l0(grid, rows)
    table = sweep.layer_table(rows, l0)
    sweep.write_csv(table, out / "layers.csv", columns=list(table[0]))
    written.append(out / "layers.csv")
    if len(hooks) > 1:
        print(sweep.format_layers(table))
        written.append(sweep.plot_layers(table, list(dict.fromkeys(r["hook"] for r in rows)), out))
    atomic_write_json(out / "sweep.json", {"acts": str(args.acts), "hooks": hooks, "rows": rows,
                                           "layers": table, "at_l0": l0})
    written.append(out / "sweep.json")
    print("written: " + ", ".join(str(p) for p in written))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Harvest the default model's activations, train a TopK SAE on them, analyse it: the report."""
    from dictlens.data.cache import HarvestConfig, harvest
    from dictlens.data.store import ActivationStore, split_heldout
    from dictlens.data.text import describe_default
    from dictlens.eval.metrics import evaluate
    from dictlens.io import atomic_write_json
    from dictlens.sae.config import SAEConfig
    from dictlens.train.config import TrainConfig
    from dictlens.train.trainer import Trainer

    out = Path(args.out)
    print(f"demo 1/4: harvest smollm2-135m over the default text ({describe_default()})")
    cfg = HarvestConfig(hooks=["resid_post.15", "mlp_out.15"], out=str(out / "acts"), tokens=args.tokens,
                        context=128, outlier_factor=10.0, shard_tokens=8192)
    result = harvest(cfg)
    print_cache_summary(result.manifest, result.seconds, result.new_tokens)
    print(f"activation cache: {result.path}")

    print("\ndemo 2/4: train a TopK SAE (k=32, 16x = 9,216 features) on resid_post.15")
    store = ActivationStore(out / "acts", "resid_post.15", model="smollm2-135m")
    train_src, heldout = split_heldout(store, 8192)
    run = out / "sae"
    train_cfg = TrainConfig(tokens=args.train_tokens, batch_size=4096, log_every=5, heldout_tokens=8192)

    def trainer() -> Trainer:
        return Trainer(SAEConfig(activation="topk", k=32, expansion=16), train_cfg, train_src, run)

    try:
        sae = trainer().fit(resume=(run / "checkpoint.safetensors").is_file())
    except CheckpointMismatch:
        # A demo run from an older dictlens (other defaults): keep it aside, train afresh.
        previous = run.with_name(run.name + ".previous")
        if previous.exists():
            shutil.rmtree(previous)
        run.rename(previous)
        print(f"the SAE in {run} was trained with other settings; moved it to {previous}, training afresh")
        sae = trainer().fit()
    m = evaluate(sae, heldout.batches(4096, shuffle=False))
    atomic_write_json(run / "metrics.json", m.to_dict())
    print_heldout(m)
    print(f"SAE: {run} (config.json, sae.safetensors); curves: {run / 'curves.png'}")

    print(f"\ndemo 3/4: what the features fire on: {args.analyze_tokens:,} tokens the SAE never saw, the report")
    from dictlens.analysis.collect import AnalysisConfig, analyze
    from dictlens.app.report import write_report
    from dictlens.data.models import load_model

    lm = load_model("smollm2-135m")
    an = analyze(sae, lm, "resid_post.15", AnalysisConfig(tokens=args.analyze_tokens, skip_tokens=args.tokens),
                 run / "analysis", run=str(run))
    print(f"{an.tokens:,} tokens at {an.tokens / an.seconds:,.0f} tok/s; "
          f"{int((an.stats.count > 0).sum()):,} of {sae.n_features:,} features fired")
    index = write_report(an.path)
    print(f"report: {index.resolve()}\n(browse it with `dictlens serve {run}`: live text, search by token, "
          "steering)")
    _demo_steer(sae, lm, an.path, run)
    return 0


def _demo_steer(sae: SAE, lm: LoadedModel, analysis: Path, run: Path) -> None:
    """Step 4: the feature most active on a topical word, added to the residual stream while
    the model continues a neutral prompt."""
    from dictlens.analysis.db import FeatureDB
    from dictlens.use.commands import side_by_side
    from dictlens.use.splice import Edit
    from dictlens.use.steer import GenerateConfig, steered_generation

    db = FeatureDB(analysis)
    for word in (" money", " love", " war", " water"):
        hits = db.features_for_token(word, n=1)
        if hits:
            break
    else:
        print("\ndemo 4/4: skipped (none of the topical words occurs in the analysed text)")
        return
    f = db.feature(hits[0]["id"])
    coeff = float(f"{f['max']:.3g}")
    prompt = "I went to the market and"
    print(f"\ndemo 4/4: steer with feature {f['id']}, the one most active on {word!r}: add {coeff:g} × its "
          f"direction (its largest activation) at every position")
    g = steered_generation(lm, {"resid_post.15": sae}, {"resid_post.15": [Edit(int(f["id"]), "add", coeff)]}, prompt,
                           GenerateConfig(max_new_tokens=30), max_norm=sae.provenance.outlier_limit)
    print(f"prompt: {prompt!r}\n")
    print(side_by_side(g.unsteered, g.steered, ("unsteered", "steered"), width=100))
    print(f"\n(`dictlens generate {run} --prompt \"...\" --steer {f['id']}:{coeff:g}` does this for any prompt)")


def build_parser() -> argparse.ArgumentParser:
    import dataclasses

    from dictlens import __version__
    from dictlens.analysis.collect import AnalysisConfig
    from dictlens.data.cache import HarvestConfig
    from dictlens.eval.splice import SpliceConfig
    from dictlens.eval.synthetic import SyntheticConfig
    from dictlens.eval.toy import ToyConfig
    from dictlens.sae import activations
    from dictlens.sae.config import SAEConfig
    from dictlens.train.config import TrainConfig

    parser = argparse.ArgumentParser(prog="dictlens", allow_abbrev=False,
                                     description="Dictionary learning on neural-network activations.")
    parser.add_argument("--version", action="version", version=f"dictlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("hooks", help="list the hook points of a model", allow_abbrev=False)
    p.add_argument("model", help="hub id, model directory, .gguf file or smollm2-135m")
    p.add_argument("--modules", action="store_true", help="also list every module path")
    p.set_defaults(func=_cmd_hooks)

    p = sub.add_parser("harvest", help="write an activation cache from a model and a text",
                       allow_abbrev=False)
    add_arguments(p, HarvestConfig)
    p.set_defaults(func=_cmd_harvest)

    p = sub.add_parser("train", help="train an SAE on a cache (--acts) or streamed activations",
                       allow_abbrev=False)
    p.add_argument("--acts", help="activation cache directory written by `dictlens harvest`")
    p.add_argument("--hook", help="hook to read (required with several hooks in the cache, or to stream)")
    p.add_argument("--model", help="model to stream from (with --text), or to check the cache against")
    p.add_argument("--text", help="text to stream through --model (instead of --acts)")
    p.add_argument("--text-field", default="text", help="field of .jsonl / column of .parquet")
    p.add_argument("--context", type=int, default=128, help="tokens per context when streaming")
    p.add_argument("--out", required=True, help="run directory: SAE, checkpoint, log.jsonl, curves.png")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    add_arguments(p, SAEConfig)
    add_arguments(p, TrainConfig)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="held-out metrics of a trained SAE (JSON, table, density PNG)",
                       allow_abbrev=False)
    p.add_argument("run", help="run directory of a trained SAE (config.json + sae.safetensors)")
    p.add_argument("--acts", required=True, help="activation cache to evaluate on")
    p.add_argument("--hook", help="hook to read (default: the one the SAE was trained on)")
    p.add_argument("--model", help="check the cache was harvested from this model (and splice into it)")
    p.add_argument("--heldout", type=int, default=0,
                   help="evaluate on the last N tokens of the cache (the tail `train --heldout-tokens N` "
                        "held out); 0: the whole cache, for a separate held-out cache")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per evaluation batch")
    add_arguments(p, SpliceConfig)
    p.add_argument("--out", help="where eval.json and feature_density.png go (default: the run directory)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("analyze", help="per-feature statistics, examples, logit lens: the feature database",
                       allow_abbrev=False)
    p.add_argument("run", help="run directory of a trained SAE")
    p.add_argument("--model", help="model to run (default: the one the SAE was trained on)")
    p.add_argument("--hook", help="hook (default: the one the SAE was trained on)")
    p.add_argument("--out", help="analysis directory (default: RUN/analysis)")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="do not write the HTML report (OUT/report) after the database")
    add_arguments(p, AnalysisConfig)
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("report", help="write the static HTML report of an analysis", allow_abbrev=False)
    p.add_argument("run", help="run directory (its analysis/ is read) or analysis directory")
    p.add_argument("--analysis", help="analysis directory (default: RUN or RUN/analysis)")
    p.add_argument("--out", help="report directory (default: ANALYSIS/report)")
    p.add_argument("--features", help="only these features' pages, e.g. 0-99,120 (default: all)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("serve", help="browse features, run text, search: the local web app", allow_abbrev=False)
    p.add_argument("run", help="run directory (its analysis/ is read) or analysis directory")
    p.add_argument("--analysis", help="analysis directory (default: RUN or RUN/analysis)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model", help="model for live text (default: the analysis's)")
    p.add_argument("--device", help="cpu or cuda for live text")
    p.add_argument("--compare", help="another SAE run to match this one against (seeds, widths, layers)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("search", help="features that fire on a text (--text) or on a token (--token)",
                       allow_abbrev=False)
    p.add_argument("run", help="SAE run directory (for --token: its analysis)")
    p.add_argument("--text", help="a text to run through the model and the SAE")
    p.add_argument("--token", help="a token of the analysed text, e.g. the")
    p.add_argument("--analysis", help="analysis directory for --token (default: RUN or RUN/analysis)")
    p.add_argument("--model", help="model for --text (default: the SAE's)")
    p.add_argument("-n", "--n", type=int, default=20, help="features listed (default 20)")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("compare", help="match the features of SAEs (seeds, widths, layers): MMCS, Hungarian, "
                                       "splitting", allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="SAE run directories, compared in order (A↔B, B↔C, ...)")
    p.add_argument("--acts", help="activation cache of their hook: also find each wide feature's parent by "
                                  "co-activation (SAEs of different widths)")
    p.add_argument("--tokens", type=int, default=65536, help="tokens of --acts to read for co-activation")
    p.add_argument("--out", required=True, help="directory for compare.json, compare.png, matches_*.csv")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("synth", help="recover known features: SAEs beside baselines on synthetic data",
                       allow_abbrev=False)
    p.add_argument("--setting", default="sharkey",
                   help="sharkey (Sharkey et al.: unit features, p ∝ 0.99^i), zipf, correlated, hierarchy, noisy, "
                        "or toy (hidden activations of a toy model of superposition); the flags below override it")
    p.add_argument("--width", type=int, action="append", help="dictionary width (repeat; default: G and 2G)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="SAE training tokens")
    p.add_argument("--activation", action="append",
                   help="SAE rows (repeat): topk, 'topk, no dead handling', relu, batchtopk, jumprelu, gated "
                        "(default: the first four)")
    p.add_argument("--sklearn-iters", type=int, default=5, help="MiniBatchDictionaryLearning epochs")
    p.add_argument("--out", help="directory for synth.json (and toy_model.png)")
    add_arguments(p, SyntheticConfig)
    add_arguments(p, ToyConfig, skip=("seed",))
    # unset flags stay None, so that a named setting's own values are not overwritten by defaults
    p.set_defaults(func=_cmd_synth, **{f.name: None for f in dataclasses.fields(SyntheticConfig)})

    p = sub.add_parser("sweep", help="train a grid of SAEs from one cache; CSV and sparsity-fidelity frontiers",
                       allow_abbrev=False)
    p.add_argument("--acts", required=True, help="activation cache (one or several hooks, one harvest)")
    p.add_argument("--hook", action="append", help="hook to sweep (repeat; default: every hook of the cache)")
    p.add_argument("--activation", action="append",
                   help="activation to sweep (repeat): " + ", ".join(activations.NAMES))
    p.add_argument("--k", type=int, action="append", help="k for " + ", ".join(activations.with_k())
                   + " (repeat; default 32)")
    p.add_argument("--coeff", action="append",
                   help="penalty coefficient for relu / gated / jumprelu (repeat): N for all of them, or "
                        "ARCH:N,N,... for one (default: the penalty's own)")
    p.add_argument("--n-features", type=int, action="append", help="width F (repeat)")
    p.add_argument("--expansion", type=float, action="append", help="width as F / D (repeat; default 16)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per point (seed, seed + 1, ...)")
    p.add_argument("--heldout", type=int, default=8192, help="tokens held out (the cache's last shards)")
    p.add_argument("--model", help="check the cache came from this model (and splice into it)")
    add_arguments(p, SpliceConfig)
    p.add_argument("--at-l0", type=float, help="L0 at which hooks are compared (default: the middle --k, "
                                               "else the median L0)")
    p.add_argument("--out", required=True, help="sweep directory: one run per point, sweep.csv, PNGs")
    add_arguments(p, SAEConfig, skip=("activation", "k", "expansion", "n_features"))
    add_arguments(p, TrainConfig, skip=("sparsity_coeff", "heldout_tokens"))
    p.set_defaults(func=_cmd_sweep)

    from dictlens.use.commands import add_parsers as add_use_parsers

    add_use_parsers(sub)

    p = sub.add_parser("info", help="summarise (and --verify) an activation cache", allow_abbrev=False)
    p.add_argument("cache", help="cache directory")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="the main job on the embedded default model and text",
                       allow_abbrev=False)
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to harvest (default: 100000)")
    p.add_argument("--train-tokens", type=int, default=1_000_000, help="SAE training tokens (default: 1M)")
    p.add_argument("--analyze-tokens", type=int, default=40_000,
                   help="tokens analysed for the report, after the harvested ones (default: 40000)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DictlensError as e:
        print(f"dictlens {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dictlens {args.command}: interrupted; finished shards are kept: "
              "run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
