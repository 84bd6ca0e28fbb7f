"""PNG plots of evaluation results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dictlens.eval.metrics import Metrics


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG atomically (temp file + rename) and close it."""
    import io

    import matplotlib.pyplot as plt

    from dictlens.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getbuffer())
    return Path(path)


def density_histogram(m: Metrics, out: Path, title: str = "") -> Path:
    """Histogram of log10(feature density) over the features that fired; dead ones counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    density = m.feature_density()
    alive = density[density > 0]
    n_dead = int((density == 0).sum())
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if len(alive):
        logs = alive.log10().numpy()
        lo = math.floor(min(logs.min(), math.log10(1 / max(1, m.n_tokens))))
        ax.hist(logs, bins=60, range=(lo, 0))
    ax.axvline(math.log10(0.1), color="grey", linestyle="--", linewidth=1)  # the dense threshold
    ax.set_xlabel("log10(share of tokens the feature fires on)")
    ax.set_ylabel("features")
    ax.set_title(f"{title}{' — ' if title else ''}{len(density):,} features, {n_dead:,} dead, "
                 f"N = {m.n_tokens:,} tokens", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)
