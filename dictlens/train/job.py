"""``dictlens train`` as one library call: a :class:`TrainJob` names what to train on, the
dictionary, the optimisation and where the run goes; :func:`train_job` trains, saves and,
with held-out tokens, measures them into ``metrics.json``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dictlens.config import field
from dictlens.errors import ConfigError
from dictlens.sae.config import SAEConfig
from dictlens.train.config import TrainConfig

if TYPE_CHECKING:
    from dictlens.data.store import Source
    from dictlens.eval.metrics import Metrics
    from dictlens.sae.model import SAE
    from dictlens.train.trainer import Trainer

METRICS = "metrics.json"


@dataclass(kw_only=True)
class TrainJob:
    """Train one SAE on a harvested cache (``acts``) or on activations streamed from a model."""

    out: str = field(help="run directory: SAE, checkpoint, log.jsonl, curves.png, metrics.json")
    acts: str | None = field(None, help="activation cache directory written by `dictlens harvest`")
    hook: str | None = field(None, help="hook to read (required with several hooks in the cache, or to stream)")
    model: str | None = field(None, help="model to stream from (with --text), or to check the cache against")
    text: str | None = field(None, help="text to stream through --model (instead of --acts)")
    text_field: str = field("text", help="field of .jsonl / column of .parquet")
    context: int = field(128, help="tokens per context when streaming")
    resume: bool = field(False, help="continue the checkpoint in --out")
    heldout_tokens: int = field(0, help="tokens at the end of --acts held out of training and measured into "
                                        "metrics.json")
    sae: SAEConfig = field(default_factory=SAEConfig, help="the dictionary")
    train: TrainConfig = field(default_factory=TrainConfig, help="the optimisation")

    def __post_init__(self) -> None:
        if self.heldout_tokens < 0:
            raise ConfigError(f"heldout_tokens: expected a token count >= 0, found {self.heldout_tokens}")

    def source(self) -> Source:
        """The activation source the job names (it describes itself for the SAE's provenance)."""
        from dictlens.data.store import ActivationStore, StreamingSource

        if self.acts:
            return ActivationStore(self.acts, self.hook, model=self.model)
        if not (self.model and self.hook and self.text):
            raise ConfigError("train: give --acts DIR (a harvested cache), or --model, --hook and --text to stream")
        from dictlens.data.models import load_model

        return StreamingSource(load_model(self.model), self.hook, self.text, tokens=self.train.tokens,
                               context=self.context, text_field=self.text_field)


@dataclass
class Trained:
    """What :func:`train_job` leaves: the SAE (saved in ``out``), its trainer and, with held-out
    tokens, their metrics (saved as ``out/metrics.json``)."""

    sae: SAE
    trainer: Trainer
    out: Path
    metrics: Metrics | None


def train_job(job: TrainJob, *, progress: bool = True) -> Trained:
    """Train, save the SAE, its checkpoint, log and curves in ``job.out``; measure the held-out tail."""
    from dictlens.data.store import split_heldout
    from dictlens.eval.metrics import evaluate
    from dictlens.io import atomic_write_json
    from dictlens.train.trainer import Trainer

    source = job.source()
    heldout = None
    if job.heldout_tokens > 0:
        source, heldout = split_heldout(source, job.heldout_tokens)
    trainer = Trainer(job.sae, job.train, source, job.out, progress=progress)
    sae = trainer.fit(resume=job.resume)
    metrics = None
    if heldout is not None:
        metrics = evaluate(sae, heldout.batches(4096, shuffle=False))
        atomic_write_json(Path(job.out) / METRICS, metrics.to_dict())
    return Trained(sae, trainer, Path(job.out), metrics)
