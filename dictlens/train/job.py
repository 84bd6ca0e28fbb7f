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
    from dictlens.data.hooks import Wiring
    from dictlens.data.store import HookSource
    from dictlens.eval.metrics import Metrics
    from dictlens.sae.clt import Dictionary
    from dictlens.train.trainer import Trainer

METRICS = "metrics.json"
ARCHS = ("auto", "clt", "crosscoder")


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
    reads: list[str] = field(default_factory=list, flag="--reads",
                             help="transcoders: the hook a transcoder reads (e.g. mlp_in.15), or a pattern; the i-th "
                                  "hook of --reads pairs with the i-th of --writes, every pair from one pass")
    writes: list[str] = field(default_factory=list, flag="--writes",
                              help="transcoders: the hook it writes (e.g. mlp_out.15), or a pattern")
    skip: bool = field(False, help="transcoders: add a learned affine skip connection (a skip transcoder)")
    arch: str = field("auto", help="the kind of dictionary: auto (an SAE for --hook, a transcoder for each pair "
                                   "of --reads/--writes), clt (one cross-layer transcoder over every pair: each "
                                   "layer's features write that layer and every later one), "
                                   "crosscoder (one dictionary over every --hook, each reconstructed); an activation's "
                                   "name (--arch topk) is taken as --activation")
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
    sae: SAEConfig = field(default_factory=SAEConfig, skip=("k", "expansion", "n_features", "skip"),
                           help="the dictionary")
    train: TrainConfig = field(default_factory=TrainConfig, help="the optimisation")

    def __post_init__(self) -> None:
        if self.heldout_tokens < 0:
            raise ConfigError(f"heldout_tokens: expected a token count >= 0, found {self.heldout_tokens}")
        if self.together < 0:
            raise ConfigError(f"together: expected a count >= 0 (0: all), found {self.together}")
        if self.widths and self.expansions:
            raise ConfigError("train: give --n-features or --expansion, not both")
        from dictlens.sae import activations

        if self.arch in activations.NAMES:   # `--arch topk`: the one-encoder dictionary, with that activation
            sae = {**to_dict(self.sae), "activation": self.arch}
            if not activations.get(self.arch).uses_k:
                sae["k"] = None
            self.sae, self.arch = SAEConfig(**sae), "auto"
        if self.arch not in ARCHS:
            raise ConfigError(f"arch: expected {', '.join(ARCHS)} or an activation ({', '.join(activations.NAMES)}), "
                              f"found {self.arch!r}")
        if self.arch == "clt" and self.skip:
            raise ConfigError("skip: a cross-layer transcoder has no skip connection (--arch clt without --skip)")

    def plan(self) -> tuple[HookSource, list[Wiring]]:
        """The data the job names (the cache's hooks read together, or one stream of every hook; each
        view describes itself for its dictionary's provenance) and the dictionaries' wirings on it."""
        from dictlens.data.hooks import Wiring, wirings
        from dictlens.data.store import CacheHooks, StreamingSource

        if self.acts:
            from dictlens.data.cache import read_manifest

            if not Path(self.acts).is_dir():
                raise CacheError(f"activation cache {self.acts} does not exist")
            available = list(read_manifest(Path(self.acts))["hooks"])
            if not (self.hooks or self.reads) and len(available) > 1:
                raise CacheError(f"{self.acts} holds hooks {available}: name the one to read (--hook), or "
                                 "several")
            wires = (wirings(self.hooks, self.reads, self.writes, available, where=self.acts, arch=self.arch)
                     if self.hooks or self.reads or self.arch != "auto" else [Wiring.sae(h) for h in available])
            needed = list(dict.fromkeys(h for w in wires for h in w.hooks))
            missing = [h for h in needed if h not in available]
            if missing:
                raise CacheError(f"{self.acts} holds no hook {missing[0]!r} (it holds {', '.join(available)})")
            return CacheHooks(self.acts, needed, model=self.model), wires
        if not (self.model and (self.hooks or self.reads) and self.text):
            raise ConfigError("train: give --acts DIR (a harvested cache), or --model, --hook (or --reads and "
                              "--writes) and --text to stream")
        from dictlens.data.hooks import named_hooks
        from dictlens.data.models import load_model

        lm = load_model(self.model)
        wires = wirings(self.hooks, self.reads, self.writes, list(named_hooks(lm.model)), where=lm.name,
                        arch=self.arch)
        needed = list(dict.fromkeys(h for w in wires for h in w.hooks))
        return StreamingSource(lm, needed, self.text, tokens=max(t.tokens for _, _, _, t in self.points(wires)),
                               context=self.context, text_field=self.text_field), wires

    def points(self, wires: list[Wiring]) -> list[tuple[Wiring, str, SAEConfig, TrainConfig]]:
        """(wiring, run directory, dictionary, optimisation) of every dictionary to train: one per
        wiring (a hook, or a transcoder's pair) and ``--k`` and width; a single one trains into ``out``
        itself."""
        from dictlens.sae import activations
        from dictlens.train.grid import Grid

        if self.ks and not activations.get(self.sae.activation).uses_k:
            SAEConfig(**{**to_dict(self.sae), "k": self.ks[0]})   # the activation's own error
        by_name = {w.name: w for w in wires}
        grid = Grid(hooks=list(by_name), activations=[self.sae.activation], ks=self.ks, widths=self.widths,
                    expansions=self.expansions)
        points = grid.points()
        out = []
        for p in points:
            sae, train = p.configs(self.sae, self.train)
            wiring = by_name[p.hook]
            if wiring.cross_layer:   # (widths, k and --expansion per layer)
                sae.update(transcoder=True, clt_layers=len(wiring.reads))
            elif wiring.joint:
                sae.update(crosscoder=len(wiring.reads))
            elif not wiring.autoencoder:
                sae.update(transcoder=True, skip=self.skip or sae["skip"])
            elif self.skip:
                raise ConfigError(f"skip: applies to transcoders (--reads and --writes), not to the SAE on {p.hook}")
            run = self.out if len(points) == 1 else str(Path(self.out) / p.name())
            out.append((wiring, run, SAEConfig(**sae), TrainConfig(**train)))
        return out


@dataclass
class Trained:
    """What :func:`train_job` leaves for one SAE: the SAE (saved in ``out``), its trainer and, with
    held-out tokens, their metrics (saved as ``out/metrics.json``)."""

    sae: Dictionary
    trainer: Trainer
    out: Path
    metrics: Metrics | None
    hook: str = ""   # what it reads, or a transcoder's wiring (mlp_in.3>mlp_out.3)


def train_job(job: TrainJob, *, progress: bool = True) -> list[Trained]:
    """Train every SAE the job names, side by side from one pass (``together`` at a time), each
    saved with its checkpoint, log and curves in its run directory; measure the held-out tail."""
    import torch

    from dictlens.data.store import split_heldout, wiring_batches, wiring_sources
    from dictlens.distributed import World, restarted
    from dictlens.eval.metrics import evaluate
    from dictlens.io import atomic_write_json
    from dictlens.train.group import fit_together, wiring_of
    from dictlens.train.trainer import Trainer

    world = World.from_env(job.dist_timeout, torch.device(job.train.device) if job.train.device else None)
    if restarted() and world.writes:
        import os
        import sys

        print(f"torchrun restarted the workers (restart {os.environ['TORCHELASTIC_RESTART_COUNT']}): each run "
              "continues from its checkpoint", file=sys.stderr)
    ok = False
    try:
        source, wires = job.plan()
        heldout = None
        if job.heldout_tokens > 0:
            source, heldout = split_heldout(source, job.heldout_tokens)
        members = job.points(wires)
        size = job.together or len(members)
        done: list[Trained] = []
        for start in range(0, len(members), size):
            group: list[tuple[str | Wiring, Trainer]] = []
            for wiring, run, sae_cfg, train in members[start:start + size]:
                reads, writes = wiring_sources(source, wiring)
                group.append((wiring, Trainer(sae_cfg, train, reads, run, progress=False, world=world, target=writes,
                                              latents=world if job.shard_latents else None)))
            # torchrun restarting the workers after a failure (--max-restarts): continue the checkpoints
            saes = fit_together(group, source, resume=job.resume or restarted(), progress=progress)
            for (key, trainer), sae in zip(group, saes, strict=True):   # (latent shards: the whole on rank 0)
                wiring = wiring_of(key)
                metrics = None
                if heldout is not None and world.writes:
                    metrics = evaluate(sae, wiring_batches(heldout, wiring),
                                       outputs=list(wiring.writes) if len(wiring.writes) > 1 else None)
                    atomic_write_json(Path(trainer.out or job.out) / METRICS, metrics.to_dict())
                done.append(Trained(sae, trainer, Path(trainer.out or job.out), metrics, wiring.name))
        ok = True
    finally:
        world.close(together=ok)   # (after a failure the others are not at a barrier)
    return done
