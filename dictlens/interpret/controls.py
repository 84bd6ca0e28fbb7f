"""The random-directions control: what an explainer and a judge make of features with no structure.

A dictionary of random unit directions (as many as the SAE has), centred as the SAE centres
its input (its decoder bias) and read out with TopK at the SAE's average L0, is analysed
over the same text at the same hook with the same settings. Its "features" are then
explained and scored exactly as the SAE's are. A scorer that gives these high marks
measures the explainer's or judge's generosity, not the dictionary.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from dictlens.analysis.db import DB_FILE, FeatureDB
from dictlens.errors import AnalysisError

CONTROL_DIR = "control-random"


def control_name(meta: dict[str, object], seed: int) -> str:
    return f"random directions (seed {seed}) for {meta.get('sae')}"


def random_analysis(analysis: Path, seed: int = 0, *, say: Callable[[str], None] = print) -> Path:
    """The analysis of the random-directions dictionary of ``analysis``'s SAE
    (``ANALYSIS/control-random``), made on first use."""
    import torch

    from dictlens.analysis.collect import AnalysisConfig, analyze
    from dictlens.config import from_dict
    from dictlens.data.models import load_model
    from dictlens.load import load_sae
    from dictlens.sae.config import SAEConfig
    from dictlens.sae.model import SAE

    db = FeatureDB(analysis)
    out = analysis / CONTROL_DIR
    name = control_name(db.meta, seed)
    if (out / DB_FILE).is_file():
        done = FeatureDB(out)
        same = done.meta.get("sae") == name
        done.close()
        if same:
            return out
    if not db.meta.get("sae"):
        raise AnalysisError(f"{analysis}: the analysis names no SAE run, so its random control cannot be built")
    sae = load_sae(str(db.meta["sae"]))
    k = max(1, int(round(float(np.sum(db.densities)))))          # the SAE's average L0 over the analysed text
    cfg = SAEConfig(d_in=sae.d_in, n_features=sae.n_features, activation="topk", k=k)
    rand = SAE(cfg, seed=seed + 1, provenance=sae.provenance)
    with torch.no_grad():
        rand.b_dec.copy_(sae.b_dec)
        rand.input_scale.copy_(sae.input_scale)
    lm = load_model(str(db.meta["model"]), device=db.meta["config"].get("device"))
    acfg = from_dict(AnalysisConfig, db.meta["config"], source=f"{analysis}: config")
    say(f"random-directions control: {sae.n_features:,} random directions, TopK k={k}, analysed as {analysis} was")
    analyze(rand, lm, str(db.meta["hook"]), acfg, out, run=name)
    return out
