"""The command line of :mod:`dictlens.use`: ``dictlens generate``, ``ablate``, ``monitor``,
``attribute``. Each is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dictlens.errors import ConfigError, InputError

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE


def _edits(args: argparse.Namespace) -> list[tuple[str | None, Any]]:
    """(hook or None for the first run's, Edit) of every edit flag: ``[HOOK/]F:VALUE``."""
    from dictlens.use.splice import parse_edit

    edits: list[tuple[str | None, Any]] = []
    for kind, specs in (("add", args.steer), ("clamp", args.clamp), ("scale", args.scale),
                        ("zero", args.ablate)):
        for spec in specs or ():
            hook, sep, rest = spec.rpartition("/")
            edits.append((hook if sep else None, parse_edit(rest, kind, args.from_pos)))  # type: ignore[arg-type]
    return edits


def _by_hook(edits: list[tuple[str | None, Any]], saes: dict[str, SAE]) -> dict[str, list[Any]]:
    from dictlens.use.splice import check_edits

    first = next(iter(saes))
    out: dict[str, list[Any]] = {}
    for hook, e in edits:
        hook = hook or first
        if hook not in saes:
            raise ConfigError(f"an edit at {hook}, where none of the runs is ({', '.join(saes)})")
        out.setdefault(hook, []).append(e)
    for hook, es in out.items():
        check_edits(saes[hook], es, f" (at {hook})")
    return out


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int = 100) -> str:
    """Two texts in two columns, each wrapped to half the width."""
    half = (width - 3) // 2
    a = textwrap.wrap(left, half, replace_whitespace=True) or [""]
    b = textwrap.wrap(right, half, replace_whitespace=True) or [""]
    rows = [f"{titles[0]:<{half}} | {titles[1]}", f"{'-' * half}-+-{'-' * half}"]
    for i in range(max(len(a), len(b))):
        rows.append(f"{a[i] if i < len(a) else '':<{half}} | {b[i] if i < len(b) else ''}")
    return "\n".join(rows)


def _cmd_generate(args: argparse.Namespace) -> int:

    from dictlens.data.tap import Tap
    from dictlens.data.tokens import not_special
    from dictlens.load import load_runs
    from dictlens.use.steer import GenerateConfig, prompt_ids, steered_generation

    edits = _edits(args)
    if not edits:
        raise ConfigError("generate: give at least one --steer, --clamp, --scale or --ablate")
    cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, chat=args.chat)
    by_hook: dict[str, list[Any]] = {}
    r = load_runs(args.runs, model=args.model, device=args.device,
                  check=lambda saes: by_hook.update(_by_hook(edits, saes)))
    ids = prompt_ids(r.lm, args.prompt, cfg)
    acts = Tap(r.lm, list(r.saes))(ids)
    g = steered_generation(r.lm, r.saes, by_hook, args.prompt, cfg, error_term=not args.no_error_term,
                           max_norm=r.max_norm)
    for hook, es in by_hook.items():
        norms = acts[hook][0][not_special(r.lm.tokenizer, ids[0])].float().norm(dim=-1)
        what = ", ".join(f"{e.kind} {e.feature}" + (f" {e.value:g}" if e.kind != "zero" else "") for e in es)
        print(f"{r.runs[hook]} at {hook} of {r.lm.name}: {what}"
              + (f" from position {args.from_pos}" if args.from_pos else "")
              + f" (activation norm on the prompt: median {float(norms.median()):.3g})")
    print(("sampled with seed " + f"{cfg.seed}, temperature {cfg.temperature:g}" if cfg.temperature > 0 else "greedy")
          + (", error term kept" if not args.no_error_term else ", on the SAE reconstruction (no error term)"))
    print(f"prompt: {args.prompt!r}\n")
    print(side_by_side(g.unsteered, g.steered, ("unsteered", "steered"), width=args.width))
    if args.json:
        from dictlens.io import atomic_write_json

        atomic_write_json(Path(args.json), {"runs": r.runs, "prompt": g.prompt, "unsteered": g.unsteered,
                                            "steered": g.steered, "edits": g.edits, "config": vars(cfg)})
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from dictlens.load import load_run
    from dictlens.use.ablate import ablate, prompt_batches

    if (args.prompt is None) == (args.text is None):
        raise ConfigError("ablate: give exactly one of --prompt or --text")
    run = load_run(args.run, model=args.model, device=args.device)
    if args.prompt is not None:
        batches = prompt_batches(run.lm, [args.prompt])
    else:
        from dictlens.data.tokens import text_batches

        batches = text_batches(run.lm, args.text, tokens=args.tokens, context=args.context,
                               skip_tokens=args.skip_tokens)
    r = ablate(run.lm, run.sae, run.hook, args.feature, batches, mode=args.mode, tokens=args.token or (),
               last_only=args.prompt is not None, max_norm=run.max_norm)
    where = f"{args.prompt!r}" if args.prompt is not None else f"{args.text} ({r.n_predictions:,} predictions)"
    print(f"{args.mode}-ablating {', '.join(map(str, r.features))} of {args.run} at {run.hook} on {where}")
    fired = ", ".join(f"{f}: {n:,}" for f, n in r.fired.items())
    print(f"  positions where each fired: {fired}")
    if r.means:
        print("  set to their means: " + ", ".join(f"{f}: {v:.4g}" for f, v in r.means.items()))
    if r.n_predictions:
        print(f"  next-token loss: clean {r.ce_clean:.4f}  ablated {r.ce_ablated:.4f}  Δ {r.delta_loss:+.4f} nats")
    if r.tokens:
        at = "at the last position" if args.prompt is not None else "averaged over positions"
        print(f"  tokens {at}:")
        print("  | token | logit clean | ablated | Δ logit | log p clean | ablated |")
        print("  |---|---:|---:|---:|---:|---:|")
        for t in r.tokens:
            print(f"  | {t.token!r} | {t.logit_clean:.3f} | {t.logit_ablated:.3f} | {t.delta_logit:+.3f} | "
                  f"{t.logprob_clean:.3f} | {t.logprob_ablated:.3f} |")
    if args.json:
        from dictlens.io import atomic_write_json

        atomic_write_json(Path(args.json), r.to_dict())
    return 0


def _monitor_docs(args: argparse.Namespace) -> Iterator[tuple[Any, str]]:
    """(id, text) of every document: stdin line by line (or JSON records with --jsonl),
    or each path's documents (a .jsonl file: one per record)."""
    from dictlens.data.text import iter_documents

    for source in args.inputs or ["-"]:
        if source != "-":
            for n, doc in enumerate(iter_documents(source, args.text_field)):
                yield f"{source}:{n}", doc
            continue
        for lineno, line in enumerate(sys.stdin, 1):
            if not line.strip():
                continue
            if not args.jsonl:
                yield lineno, line.rstrip("\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"stdin:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or args.text_field not in record:
                raise InputError(f"stdin:{lineno}: no field {args.text_field!r}; set --text-field")
            yield record.get("id", lineno), str(record[args.text_field])


def _cmd_monitor(args: argparse.Namespace) -> int:
    import time

    from dictlens.load import load_run
    from dictlens.use.monitor import Monitor, parse_watch
    from dictlens.use.splice import Edit, check_edits

    watches = [parse_watch(s) for s in args.feature]
    run = load_run(args.run, model=args.model, device=args.device,
                   check=lambda sae: check_edits(sae, [Edit(w.feature, "zero") for w in watches]))
    monitor = Monitor(run.lm, run.sae, run.hook, watches, window=args.window, max_norm=run.max_norm)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    n_events, t0 = 0, time.perf_counter()
    counter = _Counter(_monitor_docs(args))
    try:
        for event in monitor.scan(counter, context=args.context, batch_size=args.batch_size,
                                  sort_windows=1 if args.batch_size == 1 else 8 * args.batch_size):
            out.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")
            if args.flush:
                out.flush()
            n_events += 1
    finally:
        if out is not sys.stdout:
            out.close()
    seconds = time.perf_counter() - t0
    print(f"monitor: {n_events:,} events from {counter.docs:,} documents in {seconds:.1f} s", file=sys.stderr)
    return 0


class _Counter:
    """Passes documents through and counts them."""

    def __init__(self, docs: Iterator[tuple[Any, str]]):
        self._docs, self.docs = docs, 0

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        for d in self._docs:
            self.docs += 1
            yield d


def _cmd_attribute(args: argparse.Namespace) -> int:
    from dictlens.load import load_runs
    from dictlens.use.attribute import attribute, make_metric, plot_graph

    loaded = load_runs(args.runs, model=args.model, device=args.device)
    lm, saes, limits = loaded.lm, loaded.saes, loaded.max_norm
    metric = make_metric(lm, args.metric, args.token or ())
    r = attribute(lm, saes, args.prompt, metric, top=args.top, check=args.check, edges=args.edges,
                  max_norm=limits)
    print(f"{r.metric} = {r.value:.4f} on {args.prompt!r}")
    for hook, nodes in r.nodes.items():
        print(f"\n{hook}: Σ x·∂m/∂x = {r.total[hook]:+.4f}; features by attribution (ablation: m − m with the "
              f"feature zeroed, error term kept)")
        print("| feature | attribution | ablation | max code | strongest at |\n|---:|---:|---:|---:|---|")
        for n in nodes:
            abl = f"{n.ablation:+.4f}" if n.ablation is not None else "–"
            at = f"{n.token!r} (pos {n.position})" if n.position >= 0 else ""
            code = f"{n.activation:.3g}" if isinstance(n.feature, int) else ""
            print(f"| {n.feature} | {n.attribution:+.4f} | {abl} | {code} | {at} |")
    print("\nrest: the features not listed; error: x − x̂; bias: b_dec; untouched: special tokens and outlier "
          "positions (no codes). Each hook's rows add up to Σ x·∂m/∂x.")
    agree = r.agreement()
    if agree:
        print(f"\nattribution vs real ablation over {agree['checked']} features: same sign "
              f"{agree['same_sign']:.0%}, Pearson r {agree['pearson_r']:.3f}")
    if r.edges:
        print("\nstrongest edges (linear effect of the upstream feature on the downstream one's attribution):")
        print("| from | to | weight |\n|---|---|---:|")
        for e in sorted(r.edges, key=lambda e: -abs(e.weight))[:args.top]:
            print(f"| {e.hook_up}/{e.up} | {e.hook_down}/{e.down} | {e.weight:+.4f} |")
    out = Path(args.out) if args.out else None
    if out is not None:
        from dictlens.io import atomic_write_json

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "attribution.json", r.to_dict())
        png = plot_graph(r, out / "graph.png", labels=_lens_labels(lm, saes, r))
        print(f"\nwritten: {out / 'attribution.json'}, {png}")
    return 0


def _lens_labels(lm: LoadedModel, saes: dict[str, SAE], r: Any) -> dict[tuple[str, int | str], str]:
    """Each shown feature's three top logit-lens tokens."""
    import torch

    from dictlens.analysis.lens import logit_lens, unembedding

    W_U, gain = unembedding(lm.model)
    labels: dict[tuple[str, int | str], str] = {}
    for hook, nodes in r.nodes.items():
        feats = [n.feature for n in nodes if isinstance(n.feature, int)]
        if not feats:
            continue
        dirs = saes[hook].feature_directions().detach()[torch.tensor(feats)]
        top, _, _, _ = logit_lens(dirs, W_U, gain, n=3)
        for f, ids in zip(feats, top, strict=True):
            labels[(hook, f)] = " ".join(repr(lm.tokenizer.decode([int(i)])) for i in ids)
    return labels


def add_parsers(sub: Any) -> None:
    """The subcommands of this module, on the main parser's ``sub``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="model (default: the one the SAE was trained on; another is refused)")
    common.add_argument("--device", help="cpu or cuda (default: cuda when there is one, else cpu)")

    p = sub.add_parser("generate", parents=[common], allow_abbrev=False,
                       help="continue a prompt with and without steering, side by side")
    p.add_argument("runs", nargs="+", help="SAE run directories, one per hook (edits go to the first unless "
                                           "prefixed HOOK/)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steer", action="append", metavar="[HOOK/]F:COEFF",
                   help="add COEFF × feature F's unit decoder direction (raw activation units; repeat)")
    p.add_argument("--clamp", action="append", metavar="[HOOK/]F:VALUE",
                   help="clamp feature F's code to VALUE (repeat)")
    p.add_argument("--scale", action="append", metavar="[HOOK/]F:FACTOR", help="multiply feature F's code (repeat)")
    p.add_argument("--ablate", action="append", metavar="[HOOK/]F", help="zero feature F (repeat)")
    p.add_argument("--from-pos", type=int, default=0,
                   help="edit only from this token position on (0: every position, the prompt included)")
    p.add_argument("--no-error-term", action="store_true",
                   help="run the model on the SAE's reconstruction (default: keep x − x̂, so only the edits act)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="the same for both continuations")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--width", type=int, default=100, help="terminal width of the two columns")
    p.add_argument("--json", help="also write both continuations here")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("ablate", parents=[common], allow_abbrev=False,
                       help="zero or mean-ablate features: change in loss and in chosen tokens' logits")
    p.add_argument("run", help="SAE run directory")
    p.add_argument("--feature", type=int, action="append", required=True, help="feature to ablate (repeat)")
    p.add_argument("--mode", choices=("zero", "mean"), default="zero")
    p.add_argument("--prompt", help="a prompt: tokens' logits at its last position")
    p.add_argument("--text", help="a text source (path, `default`): loss over it, tokens' logits averaged")
    p.add_argument("--token", action="append", help="a token whose logit to follow, e.g. ' Paris' (repeat)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of --text to score")
    p.add_argument("--skip-tokens", type=int, default=0, help="skip the first N tokens of --text")
    p.add_argument("--context", type=int, default=128, help="context length for --text")
    p.add_argument("--json", help="also write the result here")
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser("monitor", parents=[common], allow_abbrev=False,
                       help="stream text through the model; one JSON event per firing above threshold")
    p.add_argument("run", help="SAE run directory")
    p.add_argument("inputs", nargs="*", help="text sources (a file, a folder, a .jsonl); none or -: stdin, "
                                             "one document per line")
    p.add_argument("--feature", action="append", required=True, metavar="F[:THRESHOLD]",
                   help="feature to watch, firing when its code exceeds THRESHOLD (default 0; repeat)")
    p.add_argument("--jsonl", action="store_true", help="stdin lines are JSON records (--text-field, optional id)")
    p.add_argument("--text-field", default="text", help="field of JSON records / .jsonl files")
    p.add_argument("--context", type=int, default=256, help="tokens per window of a long document")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (1 for interactive input)")
    p.add_argument("--window", type=int, default=8, help="tokens of text shown on each side of a firing")
    p.add_argument("--out", help="write events here instead of stdout")
    p.add_argument("--flush", action="store_true", help="flush after every event")
    p.set_defaults(func=_cmd_monitor)

    p = sub.add_parser("attribute", parents=[common], allow_abbrev=False,
                       help="rank features by attribution patching, check by ablation; edges across SAEs")
    p.add_argument("runs", nargs="+", help="SAE run directories, one per hook (several: feature circuits)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--metric", choices=("logit", "logprob", "logit-diff", "loss"), default="logprob",
                   help="what to explain, at the prompt's last position (loss: over the whole prompt)")
    p.add_argument("--token", action="append",
                   help="the token of logit/logprob, or the two of logit-diff (A − B), e.g. ' Paris'")
    p.add_argument("--top", type=int, default=20, help="features listed per hook")
    p.add_argument("--check", type=int, default=10, help="of them, checked by real ablation")
    p.add_argument("--edges", type=int, default=10, help="downstream features whose incoming edges are computed")
    p.add_argument("--out", help="directory for attribution.json and graph.png")
    p.set_defaults(func=_cmd_attribute)
