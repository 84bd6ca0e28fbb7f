"""What an explainer and a judge make of dictionaries that are not the SAE: controls and baselines.

Each is a dictionary analysed over the same text with the same settings as the SAE's
analysis, into a directory beside it, and then explained and scored exactly as the SAE's
features are.

- **Random directions** (``ANALYSIS/control-random``): as many random unit directions as
  the SAE has, centred as the SAE centres its input (its decoder bias) and read out with
  TopK at the SAE's average L0. A scorer that gives these high marks measures the
  explainer's or judge's generosity, not the dictionary.
- **The model's neurons** (``ANALYSIS/baseline-neurons-L``): the MLP's hidden units at
  ``mlp_hidden.L``, each as two one-sided features (where it is positive, where it is
  negative; an exact dictionary: relu(x) − relu(−x) = x), read out with TopK at the SAE's
  average L0 so that both are judged at the same sparsity. The question every SAE must
  answer: are its features more interpretable than the neurons it was meant to improve on?
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dictlens.analysis.db import DB_FILE, FeatureDB
from dictlens.data.hooks import NAMED_HOOK
from dictlens.errors import AnalysisError, ConfigError

CONTROL_DIR = "control-random"
NEURONS_DIR = "baseline-neurons-{layer}"
# the analysis of the neurons drops tokens whose neuron norm exceeds this × the median
# (attention sinks) when the SAE's own analysis dropped outliers at its hook
NEURON_OUTLIER_FACTOR = 10.0


def control_name(meta: dict[str, object], seed: int) -> str:
    return f"random directions (seed {seed}) for {meta.get('sae')}"


def _average_l0(db: FeatureDB) -> int:
    return max(1, int(round(float(np.sum(db.densities)))))       # over the analysed text


def _done(out: Path, name: str) -> bool:
    if not (out / DB_FILE).is_file():
        return False
    done = FeatureDB(out)
    same = done.meta.get("sae") == name
    done.close()
    return same


def _model(db: FeatureDB) -> Any:
    from dictlens.data.models import load_model

    return load_model(str(db.meta["model"]), device=db.meta["config"].get("device"))


def _analyse_like(analysis: Path, db: FeatureDB, dictionary: Any, hook: str, out: Path, name: str, lm: Any,
                  **changes: Any) -> Path:
    """Analyse ``dictionary`` at ``hook`` of ``lm`` over the text and with the settings of ``analysis``."""
    from dataclasses import replace

    from dictlens.analysis.collect import AnalysisConfig, analyze
    from dictlens.config import from_dict

    acfg = replace(from_dict(AnalysisConfig, db.meta["config"], source=f"{analysis}: config"), **changes)
    analyze(dictionary, lm, hook, acfg, out, run=name)
    return out


def _the_sae(analysis: Path, db: FeatureDB, what: str) -> Any:
    from dictlens.load import load_sae

    if not db.meta.get("sae"):
        raise AnalysisError(f"{analysis}: the analysis names no SAE run, so its {what} cannot be built")
    return load_sae(str(db.meta["sae"]))


def random_analysis(analysis: Path, seed: int = 0, *, say: Callable[[str], None] = print) -> Path:
    """The analysis of the random-directions dictionary of ``analysis``'s SAE
    (``ANALYSIS/control-random``), made on first use."""
    import torch

    from dictlens.sae.config import SAEConfig
    from dictlens.sae.model import SAE

    db = FeatureDB(analysis)
    out = analysis / CONTROL_DIR
    name = control_name(db.meta, seed)
    if _done(out, name):
        return out
    sae = _the_sae(analysis, db, "random control")
    k = _average_l0(db)
    cfg = SAEConfig(d_in=sae.d_in, n_features=sae.n_features, activation="topk", k=k)
    rand = SAE(cfg, seed=seed + 1, provenance=sae.provenance)
    with torch.no_grad():
        rand.b_dec.copy_(sae.b_dec)
        rand.input_scale.copy_(sae.input_scale)
    say(f"random-directions control: {sae.n_features:,} random directions, TopK k={k}, analysed as {analysis} was")
    return _analyse_like(analysis, db, rand, str(db.meta["hook"]), out, name, _model(db))


def neuron_layer(hook: str, spec: str) -> int:
    """The layer of the neurons ``neurons`` or ``neurons:L`` names for an SAE at ``hook``."""
    _, _, given = spec.partition(":")
    if given:
        if not given.isdigit():
            raise ConfigError(f"against: expected neurons or neurons:LAYER, found {spec!r}")
        return int(given)
    m = NAMED_HOOK.match(hook)
    if m is None:
        raise ConfigError(f"against: the SAE's hook {hook!r} names no layer; say which neurons: neurons:LAYER")
    return int(m.group(2))


def neuron_analysis(analysis: Path, layer: int, *, say: Callable[[str], None] = print) -> Path:
    """The analysis of the MLP neurons of block ``layer`` of ``analysis``'s model, as two
    one-sided features each at the SAE's average L0 (``ANALYSIS/baseline-neurons-L``),
    made on first use."""
    from dataclasses import replace

    import torch

    from dictlens.data.tap import Tap
    from dictlens.sae.config import SAEConfig
    from dictlens.sae.model import SAE

    db = FeatureDB(analysis)
    hook = f"mlp_hidden.{layer}"
    k = _average_l0(db)
    name = f"neurons of {db.meta['model']} at {hook}, both signs, TopK k={k}"
    out = analysis / NEURONS_DIR.format(layer=layer)
    if _done(out, name):
        return out
    sae = _the_sae(analysis, db, "neuron baseline")
    lm = _model(db)
    width = int(Tap(lm, [hook])(torch.tensor([[lm.tokenizer.eos_token_id or 0] * 2]))[hook].shape[-1])
    eye = torch.eye(width)
    cfg = SAEConfig(d_in=width, n_features=2 * width, activation="topk", k=k)
    neurons = SAE(cfg, provenance=replace(sae.provenance, hook_in=hook, hook_out=hook, outlier_limit=None,
                                          normalization="none", input_scale=1.0, source="dictlens",
                                          origin=f"{db.meta['model']} {hook}"))
    with torch.no_grad():
        for W in (neurons.W_dec, neurons.W_enc):
            W.copy_(torch.cat([eye, -eye]))
    skips = sae.provenance.outlier_limit is not None or db.meta["config"].get("outlier_factor") is not None
    say(f"neuron baseline: the {width:,} neurons at {hook} of {db.meta['model']}, both signs ({2 * width:,} "
        f"features), TopK k={k}, analysed as {analysis} was")
    return _analyse_like(analysis, db, neurons, hook, out, name, lm,
                         outlier_factor=NEURON_OUTLIER_FACTOR if skips else None)
