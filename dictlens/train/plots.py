"""PNG plots of the training curves in a run's log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_log(log: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not records:
        return None
    tokens = [r["tokens"] for r in records]
    panels = [("fvu", "FVU (batch)"), ("l0", "L0"), ("dead_fraction", "dead fraction"), ("lr", "learning rate")]
    loss_keys = [k for k in records[-1] if k in ("total", "mse", "auxk", "gated_aux", "dead_penalty",
                                                 "diversity", "pre_act") or k.startswith("sparsity_")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.2))
    for key in loss_keys:
        axes[0].plot(tokens, [r.get(key, float("nan")) for r in records], label=key)
    axes[0].set_yscale("log")
    axes[0].set_title("loss terms")
    axes[0].legend(fontsize=7)
    for ax, (key, title) in zip(axes[1:], panels, strict=True):
        ax.plot(tokens, [r[key] for r in records])
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
