"""``dictlens train`` as one library call: a :class:`TrainJob` names what to train on, the
dictionary, the optimisation and where the run goes; :func:`train_job` trains, saves and,
with held-out tokens, measures them into ``metrics.json``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dictlens.config import field, to_dict
from dictlens.errors import CacheError, ConfigError
from dictlens.sae.config import SAEConfig
from dictlens.train.config import TrainConfig

if TYPE_CHECKING:
    from dictlens.data.store import HookSource
    from dictlens.eval.metrics import Metrics
    from dictlens.sae.model import SAE
    from dictlens.train.trainer import Trainer

METRICS = "metrics.json"


@dataclass(kw_only=True)
class TrainJob:
    """Train SAEs on a harvested cache (``acts``) or on activations streamed from a model: one,
    or one per hook and configuration, side by side from one pass over the data."""

    out: str = field(help="run directory: SAE, checkpoint, log.jsonl, curves.png, metrics.json (with several "
                          "SAEs, one run directory each under it, named hook/activation-k..-F..-s0)")
    acts: str | None = field(None, help="activation cache directory written by `dictlens harvest`")
    hooks: list[str] = field(default_factory=list, flag="--hook",
                             help="hook to read, or a pattern such as 'resid_post.*' (required with several hooks "
                                  "in the cache, or to stream); several train side by side from one pass")
    model: str | None = field(None, help="model to stream from (with --text), or to check the cache against")
    text: str | None = field(None, help="text to stream through --model (instead of --acts)")
    text_field: str = field("text", help="field of .jsonl / column of .parquet")
    context: int = field(128, help="tokens per context when streaming")
    resume: bool = field(False, help="continue the checkpoint in --out")
    heldout_tokens: int = field(0, help="tokens at the end of --acts held out of training and measured into "
                                        "metrics.json")
    ks: list[int] = field(default_factory=list, flag="--k",
                          help="active features per token (topk, batchtopk, groupmax; default 32); several "
                               "train side by side")
    widths: list[int] = field(default_factory=list, flag="--n-features",
                              help="number of features F (overrides --expansion); several train side by side")
    expansions: list[float] = field(default_factory=list, flag="--expansion",
                                    help="features per input dimension, F = expansion x D (default 16); several "
                                         "train side by side")
    together: int = field(0, help="SAEs trained side by side from one pass (0: all of them; fewer bound the "
                                  "memory, the data is then read once per group)")
    dist_timeout: float = field(300.0, help="under torchrun: seconds a rank waits for the others before it stops "
                                            "with an error naming the rank that stopped answering")
    shard_latents: bool = field(False, help="under torchrun: split each dictionary's features among the ranks (each "
                                            "holds F/N of them, every rank reads the whole batch) instead of "
                                            "splitting the batch: for dictionaries wider than one device holds")
    sae: SAEConfig = field(default_factory=SAEConfig, skip=("k", "expansion", "n_features"), help="the dictionary")
    train: TrainConfig = field(default_factory=TrainConfig, help="the optimisation")

    def __post_init__(self) -> None:
        if self.heldout_tokens < 0:
            raise ConfigError(f"heldout_tokens: expected a token count >= 0, found {self.heldout_tokens}")
        if self.together < 0:
            raise ConfigError(f"together: expected a count >= 0 (0: all), found {self.together}")
        if self.widths and self.expansions:
            raise ConfigError("train: give --n-features or --expansion, not both")

    def source(self) -> HookSource:
        """The data the job names: the cache's hooks read together, or one stream of every hook
        (each view describes itself for its SAE's provenance)."""
        from dictlens.data.hooks import expand_hooks
        from dictlens.data.store import CacheHooks, StreamingSource

        if self.acts:
            from dictlens.data.cache import read_manifest

            if not Path(self.acts).is_dir():
                raise CacheError(f"activation cache {self.acts} does not exist")
            available = list(read_manifest(Path(self.acts))["hooks"])
            if not self.hooks and len(available) > 1:
                raise CacheError(f"{self.acts} holds hooks {available}: name the one to read (--hook), or "
                                 "several")
            hooks = expand_hooks(self.hooks, available, where=self.acts) if self.hooks else available
            return CacheHooks(self.acts, hooks, model=self.model)
        if not (self.model and self.hooks and self.text):
            raise ConfigError("train: give --acts DIR (a harvested cache), or --model, --hook and --text to stream")
        from dictlens.data.hooks import named_hooks
        from dictlens.data.models import load_model

        lm = load_model(self.model)
        hooks = expand_hooks(self.hooks, list(named_hooks(lm.model)), where=lm.name)
        return StreamingSource(lm, hooks, self.text, tokens=max(t.tokens for _, _, _, t in self.points(hooks)),
                               context=self.context, text_field=self.text_field)

    def points(self, hooks: list[str]) -> list[tuple[str, str, SAEConfig, TrainConfig]]:
        """(hook, run directory, dictionary, optimisation) of every SAE to train on ``hooks``: one per
        hook and ``--k`` and width; a single one trains into ``out`` itself."""
        from dictlens.sae import activations
        from dictlens.train.grid import Grid

        if self.ks and not activations.get(self.sae.activation).uses_k:
            SAEConfig(**{**to_dict(self.sae), "k": self.ks[0]})   # the activation's own error
        grid = Grid(hooks=hooks, activations=[self.sae.activation], ks=self.ks, widths=self.widths,
                    expansions=self.expansions)
        points = grid.points()
        out = []
        for p in points:
            sae, train = p.configs(self.sae, self.train)
            run = self.out if len(points) == 1 else str(Path(self.out) / p.name())
            out.append((p.hook, run, SAEConfig(**sae), TrainConfig(**train)))
        return out


@dataclass
class Trained:
    """What :func:`train_job` leaves for one SAE: the SAE (saved in ``out``), its trainer and, with
    held-out tokens, their metrics (saved as ``out/metrics.json``)."""

    sae: SAE
    trainer: Trainer
    out: Path
    metrics: Metrics | None
    hook: str = ""


def train_job(job: TrainJob, *, progress: bool = True) -> list[Trained]:
    """Train every SAE the job names, side by side from one pass (``together`` at a time), each
    saved with its checkpoint, log and curves in its run directory; measure the held-out tail."""
    import torch

    from dictlens.data.store import split_heldout
    from dictlens.distributed import World, restarted
    from dictlens.eval.metrics import evaluate
    from dictlens.io import atomic_write_json
    from dictlens.train.group import fit_together
    from dictlens.train.trainer import Trainer

    world = World.from_env(job.dist_timeout, torch.device(job.train.device) if job.train.device else None)
    if restarted() and world.writes:
        import os
        import sys

        print(f"torchrun restarted the workers (restart {os.environ['TORCHELASTIC_RESTART_COUNT']}): each run "
              "continues from its checkpoint", file=sys.stderr)
    source = job.source()
    heldout = None
    if job.heldout_tokens > 0:
        source, heldout = split_heldout(source, job.heldout_tokens)
    members = job.points(source.hooks)
    size = job.together or len(members)
    done: list[Trained] = []
    for start in range(0, len(members), size):
        group = [(hook, Trainer(sae, train, source.view(hook), run, progress=False, world=world,
                                latents=world if job.shard_latents else None))
                 for hook, run, sae, train in members[start:start + size]]
        # torchrun restarting the workers after a failure (--max-restarts): continue the checkpoints
        saes = fit_together(group, source, resume=job.resume or restarted(), progress=progress)
        for (hook, trainer), sae in zip(group, saes, strict=True):   # (latent shards: the whole on rank 0)
            metrics = None
            if heldout is not None and world.writes:
                metrics = evaluate(sae, heldout.view(hook).batches(4096, shuffle=False))
                atomic_write_json(Path(trainer.out or job.out) / METRICS, metrics.to_dict())
            done.append(Trained(sae, trainer, Path(trainer.out or job.out), metrics, hook))
    world.close()
    return done
