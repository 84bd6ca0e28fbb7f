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
    from dictlens.sae.clt import Dictionary

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
    replacement: list[str] = field(default_factory=list, flag="--replacement",
                                   help="with --splice-text: other dictionaries (e.g. every other layer's transcoder) "
                                        "spliced in together with this one, the replacement model: its CE, KL and "
                                        "next-token agreement with and without error terms")
    splice: SpliceConfig = field(default_factory=SpliceConfig, help="the splice into the model")

    def __post_init__(self) -> None:
        if self.heldout < 0:
            raise ConfigError(f"heldout: expected a token count >= 0, found {self.heldout}")
        if self.replacement and not self.splice.splice_text:
            raise ConfigError("--replacement splices dictionaries into the model: give --splice-text")


@dataclass
class Evaluation:
    """What :func:`eval_job` measured and wrote (``record`` is eval.json's content)."""

    sae: Dictionary
    hook: str   # what it reads (and a transcoder writes hook_out; a CLT's hooks comma-joined)
    metrics: Metrics
    spliced: SpliceMetrics | None
    record: dict[str, Any]
    written: list[Path]
    # the replacement model (--replacement): without and with error terms
    replaced: dict[str, SpliceMetrics] | None = None


def eval_job(job: EvalJob) -> Evaluation:
    """Measure the dictionary on the cache (and in the model), write eval.json and feature_density.png."""
    from dictlens.data.hooks import Wiring
    from dictlens.data.store import CacheHooks, split_heldout, wiring_batches
    from dictlens.eval.metrics import evaluate
    from dictlens.eval.plots import density_histogram
    from dictlens.io import atomic_write_json
    from dictlens.load import (
        check_joint_cache,
        load_dictionary,
        model_of,
        open_cache,
        open_written,
        own_directory,
    )
    from dictlens.sae.clt import CLT

    sae = load_dictionary(job.run)
    if isinstance(sae, CLT) or sae.cfg.crosscoder:   # a CLT's hooks (one read, one written per layer), a crosscoder's
        if job.hook:
            raise ConfigError("--hook: a dictionary of several hooks reads the hooks it records")
        wiring, cache_model = check_joint_cache(sae, job.run, job.acts)
        hook = ",".join(wiring.reads)
    else:
        store = open_cache(sae, job.run, job.acts, job.hook)
        wiring = Wiring.sae(store.hook)
        if sae.cfg.transcoder:   # measured on its prediction of what it writes
            wiring = Wiring.transcoder(store.hook, open_written(sae, job.run, job.acts).hook)
        hook, cache_model = store.hook, store.model
    source = CacheHooks(job.acts, wiring.hooks)
    if job.heldout:
        source = split_heldout(source, job.heldout)[1]
    m = evaluate(sae, wiring_batches(source, wiring, job.batch_size),
                 outputs=list(wiring.writes) if len(wiring.writes) > 1 else None)
    out = Path(job.out) if job.out else own_directory(job.run, "eval")
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"run": str(job.run), "acts": str(job.acts), "hook": hook,
                              **({"writes": ",".join(wiring.writes)} if sae.cfg.transcoder else {}),
                              "heldout": job.heldout or "whole cache", **m.to_dict()}
    spliced, replaced = None, None
    if job.splice.splice_text:
        from dictlens.data.models import load_model
        from dictlens.eval.splice import dictionary_swap, dictionary_swaps, splice_metrics

        model_name = model_of(sae, job.run, job.model or cache_model)
        lm = load_model(model_name)
        check_dictionary(sae, job.run, lm, hook)
        batches = job.splice.batches(lm)
        swaps = (dictionary_swaps(sae) if isinstance(sae, CLT) or sae.cfg.crosscoder
                 else [dictionary_swap(sae, reads=hook)])
        spliced = splice_metrics(lm, swaps, batches=batches, max_norm=sae.provenance.outlier_limit)
        record["spliced"] = {"model": model_name, "text": job.splice.splice_text,
                             "writes": ",".join(s.writes for s in swaps),
                             "skipped_tokens": job.splice.splice_skip, **spliced.to_dict()}
        if job.replacement or isinstance(sae, CLT):   # (a CLT alone replaces every MLP of its layers)
            replaced = _replacement_model(job, sae, lm, batches)
            record["replacement"] = {"runs": [str(job.run), *job.replacement],
                                     **{k: v.to_dict() for k, v in replaced.items()}}
    atomic_write_json(out / EVAL, record)
    png = density_histogram(m, out / "feature_density.png", title=wiring.name)
    return Evaluation(sae, hook, m, spliced, record, [out / EVAL, png], replaced)


def check_dictionary(d: Dictionary, run: str | Path, lm: Any, hook: str | None = None) -> None:
    """Refuse a model that is not the dictionary's (by name, tokenizer, and the widths of its hooks)."""
    from dictlens.load import check_joint_model, check_model, check_written, hook_of
    from dictlens.sae.clt import CLT

    if isinstance(d, CLT) or d.cfg.crosscoder:
        check_joint_model(d, run, lm)
        return
    check_model(d, run, lm, hook or hook_of(d, run))
    if d.cfg.transcoder:
        check_written(d, run, lm)


def _replacement_model(job: EvalJob, sae: Dictionary, lm: Any, batches: list[Any]) -> dict[str, SpliceMetrics]:
    """The job's dictionary and its ``--replacement`` ones spliced in together (each checked against
    the model), without and with their error terms."""
    from dictlens.eval.splice import dictionary_swaps, splice_metrics, splice_reference
    from dictlens.load import load_dictionary

    others = [(run, load_dictionary(run)) for run in job.replacement]
    for run, other in others:
        check_dictionary(other, run, lm)
    dictionaries = [sae] + [other for _, other in others]
    written = [s.writes for d in dictionaries for s in dictionary_swaps(d)]
    reference = splice_reference(lm, written, batches)
    return {error: splice_metrics(lm, [s for d in dictionaries
                                       for s in dictionary_swaps(d, error_term=error == "with_error")],
                                  reference=reference)
            for error in ("without_error", "with_error")}
