"""What the command's modules share: one subcommand per config dataclass, and the terminal
summaries more than one command prints."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dictlens.config import add_arguments

if TYPE_CHECKING:
    from dictlens.eval.metrics import Metrics

Handler = Callable[[Any], int]


def command(sub: Any, name: str, help: str, job: type, func: Handler) -> argparse.ArgumentParser:
    """Subcommand ``name``: its arguments are the fields of ``job`` (a config dataclass, whose
    docstring describes the command); ``func`` receives the built dataclass."""
    about = (job.__doc__ or help).strip().replace("``", "")
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=about, allow_abbrev=False)
    add_arguments(p, job)
    p.set_defaults(func=func, job=job)
    return p


def written(paths: list[Path]) -> str:
    return "written: " + ", ".join(str(p) for p in paths)


def print_cache_summary(manifest: dict[str, Any], seconds: float | None = None, new_tokens: int = 0) -> None:
    """The cache summary of dictlens harvest / info / demo."""
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


def print_heldout(m: Metrics) -> None:
    """The one-line held-out summary of dictlens train / demo."""
    print(f"held-out ({m.n_tokens:,} tokens): FVU {m.fvu:.4f}  explained variance {m.explained_variance:.4f}  "
          f"L0 {m.l0:.1f}  dead {m.dead_fraction:.2%}")
    print_by_output(m)


def print_by_output(m: Metrics) -> None:
    """Each written hook's FVU, for a dictionary that writes several (a CLT's layers)."""
    if m.by_output:
        print("  FVU by output: " + "  ".join(f"{hook} {r['fvu']:.4f}" for hook, r in m.by_output.items()))
    shares = m.hook_shares
    if shares:
        only = "  ".join(f"{hook} {v:.1%}" for hook, v in shares["exclusive"].items())
        print(f"  features ({shares['live_features']:,} live): shared by several hooks {shares['shared']:.1%}; "
              f"exclusive to one ({shares['exclusive_at']:.0%} of the decoder norm there): {only}")


def print_metrics(m: Metrics) -> None:
    """The short terminal table of dictlens eval."""
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
    print_by_output(m)


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int = 100) -> str:
    """Two texts in two columns, each wrapped to half the width."""
    half = (width - 3) // 2
    a = textwrap.wrap(left, half, replace_whitespace=True) or [""]
    b = textwrap.wrap(right, half, replace_whitespace=True) or [""]
    rows = [f"{titles[0]:<{half}} | {titles[1]}", f"{'-' * half}-+-{'-' * half}"]
    for i in range(max(len(a), len(b))):
        rows.append(f"{a[i] if i < len(a) else '':<{half}} | {b[i] if i < len(b) else ''}")
    return "\n".join(rows)
