"""The command line: one subcommand per pipeline step, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from dictlens.config import add_arguments, from_namespace
from dictlens.errors import DictlensError


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


def _cmd_demo(args: argparse.Namespace) -> int:
    from dictlens.data.cache import HarvestConfig, harvest
    from dictlens.data.text import describe_default

    print(f"demo: model smollm2-135m, text: {describe_default()}")
    cfg = HarvestConfig(hooks=["resid_post.15", "mlp_out.15"], out=args.out, tokens=args.tokens,
                        context=128, outlier_factor=10.0)
    result = harvest(cfg)
    print_cache_summary(result.manifest, result.seconds, result.new_tokens)
    print(f"activation cache: {result.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dictlens import __version__
    from dictlens.data.cache import HarvestConfig

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

    p = sub.add_parser("info", help="summarise (and --verify) an activation cache", allow_abbrev=False)
    p.add_argument("cache", help="cache directory")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="the main job on the embedded default model and text",
                       allow_abbrev=False)
    p.add_argument("--out", default="runs/demo/acts", help="cache directory (default: runs/demo/acts)")
    p.add_argument("--tokens", type=int, default=50_000, help="tokens to harvest (default: 50000)")
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
