"""``dictlens eval`` as one library call: :class:`EvalJob` names the SAE, the tokens it is
judged on and, optionally, the text it is spliced into the model over; :func:`eval_job`
measures and writes ``eval.json`` and the feature-density histogram."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dictlens.config import field
from dictlens.errors import ConfigError
from dictlens.eval.splice import SpliceConfig

if TYPE_CHECKING:
    from dictlens.eval.metrics import Metrics
    from dictlens.eval.splice import SpliceMetrics
    from dictlens.sae.model import SAE

EVAL = "eval.json"


@dataclass(kw_only=True)
class EvalJob:
    """Held-out metrics of a trained SAE on a cache; the splice into the model with ``splice.splice_text``."""

    run: str = field(help="run directory of a trained SAE (config.json + sae.safetensors)", positional=True)
    acts: str = field(help="activation cache to evaluate on")
    hook: str | None = field(None, help="hook to read (default: the one the SAE was trained on)")
    model: str | None = field(None, help="check the cache was harvested from this model (and splice into it)")
    heldout: int = field(0, help="evaluate on the last N tokens of the cache (the tail `train --heldout-tokens N` "
                                 "held out); 0: the whole cache, for a separate held-out cache")
    batch_size: int = field(4096, help="tokens per evaluation batch")
    out: str | None = field(None, help="where eval.json and feature_density.png go (default: the run directory)")
    splice: SpliceConfig = field(default_factory=SpliceConfig, help="the splice into the model")

    def __post_init__(self) -> None:
        if self.heldout < 0:
            raise ConfigError(f"heldout: expected a token count >= 0, found {self.heldout}")


@dataclass
class Evaluation:
    """What :func:`eval_job` measured and wrote (``record`` is eval.json's content)."""

    sae: SAE
    hook: str
    metrics: Metrics
    spliced: SpliceMetrics | None
    record: dict[str, Any]
    written: list[Path]


def eval_job(job: EvalJob) -> Evaluation:
    """Measure the SAE on the cache (and in the model), write eval.json and feature_density.png."""
    from dictlens.data.store import Source, split_heldout
    from dictlens.eval.metrics import evaluate
    from dictlens.eval.plots import density_histogram
    from dictlens.io import atomic_write_json
    from dictlens.load import load_sae, open_cache, own_directory

    sae = load_sae(job.run)
    store = open_cache(sae, job.run, job.acts, job.hook)
    source: Source = split_heldout(store, job.heldout)[1] if job.heldout else store
    m = evaluate(sae, source.batches(job.batch_size, shuffle=False))
    out = Path(job.out) if job.out else own_directory(job.run, "eval")
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"run": str(job.run), "acts": str(job.acts), "hook": store.hook,
                              "heldout": job.heldout or "whole cache", **m.to_dict()}
    spliced = None
    if job.splice.splice_text:
        from dictlens.data.models import load_model
        from dictlens.eval.splice import sae_replacement, splice_metrics
        from dictlens.load import check_model, model_of

        model_name = model_of(sae, job.run, job.model or store.model)
        lm = load_model(model_name)
        check_model(sae, job.run, lm, store.hook)
        spliced = splice_metrics(lm, store.hook, sae_replacement(sae), job.splice.batches(lm),
                                 max_norm=sae.provenance.outlier_limit)
        record["spliced"] = {"model": model_name, "text": job.splice.splice_text,
                             "skipped_tokens": job.splice.splice_skip, **spliced.to_dict()}
    atomic_write_json(out / EVAL, record)
    png = density_histogram(m, out / "feature_density.png", title=store.hook)
    return Evaluation(sae, store.hook, m, spliced, record, [out / EVAL, png])
