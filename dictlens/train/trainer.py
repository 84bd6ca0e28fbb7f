"""The training loop. It consumes batches of activations and knows nothing about models.

A source is anything with ``batches(batch_size, shuffle=, seed=, drop_last=)`` yielding
float32 [B, D] tensors and a ``stats`` attribute (``ActivationStore``,
``StreamingSource``, ``ArraySource``), and optionally ``provenance()``: the description of
the data that the saved SAE's record starts from. Everything the loop needs to continue exactly
where it stopped lives in :class:`TrainState` and the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dictlens.config import from_dict, to_dict
from dictlens.data.store import Source
from dictlens.distributed import World
from dictlens.errors import ActivationError, CheckpointMismatch, ConfigError, InputError
from dictlens.io import atomic_write_bytes
from dictlens.provenance import Provenance
from dictlens.sae.clt import CLT
from dictlens.sae.config import SAEConfig
from dictlens.sae.kernels import BACKWARD_DTYPES
from dictlens.sae.model import SAE
from dictlens.sae.shard import LatentShard
from dictlens.train.checkpoint import load_checkpoint, save_checkpoint
from dictlens.train.config import TrainConfig, check_compatible, check_shardable
from dictlens.train.dead import DeadTracker, boost, resample
from dictlens.train.losses import WHOLE_ON_EVERY_SHARD, auxk_is_sparse, loss_terms, squared_error
from dictlens.train.optim import Plateau, ScheduleFreeAdam, build_optimizer, lr_factor

CHECKPOINT = "checkpoint.safetensors"
# TrainConfig fields a resumed run may change (more tokens, other logging); any other
# change would silently continue a different experiment.
RESUMABLE_CHANGES = {"tokens", "log_every", "checkpoint_every", "plots", "device",
                     "skip_nonfinite", "tensorboard", "wandb_project"}


class ExternalLoggers:
    """TensorBoard and W&B, when asked for: each logged record goes to them too."""

    def __init__(self, cfg: TrainConfig, config: dict[str, Any]):
        self.tb: Any = None
        self.wandb: Any = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard: the tensorboard package is not installed "
                                  "(pip install tensorboard)") from None
            self.tb = SummaryWriter(cfg.tensorboard)
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError("wandb_project: the wandb package is not installed (pip install wandb)") from None
            self.wandb = wandb
            wandb.init(project=cfg.wandb_project, config=config)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
LOG = "log.jsonl"
# the rows a fresh run initialises from (one shuffled batch) and an activation calibrates on at
# the end (BatchTopK's threshold): sizes and seed offsets, for a lone trainer and a group alike
INIT_ROWS, INIT_SEED = 16384, 10_000
CALIBRATION_ROWS, CALIBRATION_BATCHES, CALIBRATION_SEED = 4096, 2, 20_000


def draw_size(rows: int, world: World) -> int:
    """A draw of ``rows`` rows, trimmed so that it divides among the ranks (each reads its slice)."""
    return rows - rows % world.size


@dataclass
class TrainState:
    """Where training stands: enough, with the checkpoint's tensors, to resume exactly."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_nonfinite: int = 0
    resampled: int = 0
    plateau: dict[str, Any] = field(default_factory=lambda: asdict(Plateau()))


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite, in one sum: a NaN or an infinity anywhere makes the
    sum NaN or infinite; only a sum of large finite values that overflows needs the full check
    (a pass of its own, which at B=4,096, D=576 cost 5 ms of a 110 ms step)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to the rows of x."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-8)
        new: torch.Tensor = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * m.norm().clamp_min(1e-8):
            return new
        m = new
    return m


_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """On glibc, let freed memory be reused instead of returned to the OS.

    A CPU training step allocates and frees tens of MB of temporaries (gradients, the
    ranking buffer, autograd intermediates). By default glibc serves blocks that large
    with fresh mmap()s and trims the heap after every free, so each step page-faults
    the same memory in again: about 7% of a step at 9,216 features (bench/train.py).
    Raising the mmap and trim thresholds keeps the pages. Process-wide and
    irreversible, so only training on CPU asks for it; a no-op elsewhere.
    Returns whether the thresholds were set.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok


def _same_widths(widths: list[int], kind: str) -> None:
    if len(set(widths)) > 1:
        raise InputError(f"a {kind}'s hooks must share one width; found widths {sorted(set(widths))}")


class Trainer:
    """Trains one SAE (or transcoder) on a source; ``out`` (optional) receives checkpoints, logs and the SAE."""

    def __init__(self, sae_cfg: SAEConfig, cfg: TrainConfig, source: Source, out: str | Path | None = None,
                 *, provenance: Provenance | None = None, progress: bool = True, world: World | None = None,
                 latents: World | None = None, target: Source | None = None):
        """``world``: the ranks splitting each batch (data parallel); ``latents``: the ranks splitting
        the dictionary's features instead (latent parallel, dictlens/sae/shard.py; every rank then
        reads the whole batch, and ``world`` is its :meth:`World.solo`). ``target``: what a transcoder
        writes (row i the same token as the source's row i); the dictionary is then a transcoder from
        ``source`` to ``target``, and :meth:`step` takes both."""
        layers = max(1, sae_cfg.clt_layers)   # a CLT's widths are per layer: its sources hold every layer
        for what, src in (("source", source), ("target", target)):
            if src is not None and layers > 1 and len(getattr(src, "parts", ())) != layers:
                raise InputError(f"{what}: a cross-layer transcoder over {layers} layers reads {layers} hooks side by "
                                 f"side (a Joined source), found {len(getattr(src, 'parts', ())) or 1}")
        if sae_cfg.crosscoder and len(getattr(source, "parts", ())) != sae_cfg.crosscoder:
            raise InputError(f"source: a crosscoder over {sae_cfg.crosscoder} hooks reads them side by side (a Joined "
                             f"source), found {len(getattr(source, 'parts', ())) or 1}")
        if sae_cfg.crosscoder and target is not None:
            raise ConfigError("target: a crosscoder reconstructs the hooks it reads; it has no other target")
        d = int(source.d_in) // layers
        if layers > 1 or sae_cfg.crosscoder:
            _same_widths([int(p.d_in) for p in getattr(source, "parts", [])]
                         + [int(p.d_in) for p in getattr(target, "parts", [])], "crosscoder" if sae_cfg.crosscoder
                         else "cross-layer transcoder")
        if sae_cfg.d_in and sae_cfg.d_in != d:
            raise InputError(f"d_in: the SAE expects width {sae_cfg.d_in}, the activations have width {d}")
        if sae_cfg.transcoder and target is None:
            raise ConfigError("transcoder: give the activations it writes (target; --writes)")
        fill: dict[str, Any] = {"d_in": d}
        if target is not None:
            d_out = int(target.d_in) // layers
            if sae_cfg.transcoder and sae_cfg.d_out and sae_cfg.d_out != d_out:
                raise InputError(f"d_out: the transcoder writes width {sae_cfg.d_out}, the target activations have "
                                 f"width {d_out}")
            if len(target) != len(source):
                raise InputError(f"target: {len(target)} rows against the source's {len(source)}; a transcoder "
                                 "reads and writes the same tokens (two hooks of one cache or stream)")
            fill.update(transcoder=True, d_out=d_out)
        self.sae_cfg = from_dict(SAEConfig, {**to_dict(sae_cfg), **fill})
        self.target = target
        self.cfg = cfg
        check_compatible(self.sae_cfg, cfg)
        self.source = source
        self.out = Path(out) if out is not None else None
        self.world = world or World()   # the other ranks, when data parallel (dictlens/distributed.py)
        shard = None
        if latents is not None and not latents.alone:
            shard = LatentShard.of(latents, self.sae_cfg)
            check_shardable(self.sae_cfg, cfg)
            self.world = latents.solo()
        self.progress = progress and self.world.writes
        self.device = torch.device(cfg.device) if cfg.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda" and self.device.index is None and (latents or self.world).size > 1:
            self.device = torch.device("cuda", self.world.local_rank)   # one GPU per rank
        if self.device.type == "cpu":
            keep_freed_memory()
        self.sae: Any = (CLT if self.sae_cfg.clt_layers else SAE)(self.sae_cfg, device=self.device, seed=cfg.seed,
                                                                    shard=shard)
        self.sae.world = self.world
        self.sae.backward_dtype = BACKWARD_DTYPES[cfg.backward_dtype]
        self._provenance = provenance  # None: the source's own description, taken at the end
        self.lr = cfg.learning_rate(self.sae_cfg)
        self.optimizer = build_optimizer(list(self.sae.parameters()), cfg, self.lr)
        # the decoder's unit rows kept by the optimizer's own pass where nothing needs the projected
        # gradient before the update (clipping does): two passes over the decoder fewer a step
        self._unit_rows_in_step = False
        if isinstance(self.optimizer, ScheduleFreeAdam) and cfg.clip_grad <= 0 and self.sae_cfg.decoder_norm == "unit":
            for W in self.sae.decoders():
                self.optimizer.keep_unit_rows(W)
            self._unit_rows_in_step = True
        self.dead = DeadTracker(self.sae.n_features, cfg.dead_after(), self.device)
        self.dead_method = cfg.dead_method(self.sae_cfg)  # decided once: boost, auxk, resample or none
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.state = TrainState()
        self.log_file: Any = None
        self.external: ExternalLoggers | None = None
        self.started = False
        self._clock = (0.0, 0)  # (perf_counter, tokens) when this process started stepping
        self.step_seconds = 0.0  # in fit: spent in this trainer's steps
        self.seconds = 0.0  # in fit: its steps and its share of reading the data

    # ---- set-up ---------------------------------------------------------------------
    def init_sample(self) -> torch.Tensor:
        """The rows a fresh run initialises its decoder bias from (the written activation's: a
        transcoder's target): the first batch of up to 16,384 rows of a shuffle seeded by ``seed + 10,000``."""
        written = self.target or self.source
        n = draw_size(min(INIT_ROWS, max(len(written), 1)), self.world)
        return self.world.gather_rows(next(iter(written.batches(n, shuffle=True, seed=self.cfg.seed + INIT_SEED,
                                                                part=self.world.part))))

    def start(self, resume: bool = False, sample: Callable[[], torch.Tensor] | None = None) -> None:
        """Ready the run: resume from ``out``'s checkpoint (with ``resume``, when one exists) or
        initialise from the data (``sample``: where the written activation's rows come from,
        :meth:`init_sample` by default; read only when needed); open the logs. :meth:`step` calls it when not called."""
        if self.started:
            return
        if self.cfg.batch_size % self.world.size:
            raise ConfigError(f"batch_size: the global batch of {self.cfg.batch_size} rows does not divide among "
                              f"{self.world.size} ranks")
        shard = self.sae.shard
        for world in (self.world, shard.world) if shard is not None else (self.world,):
            world.check_same({"sae": to_dict(self.sae_cfg), "train": to_dict(self.cfg)}, "configuration")
        self.sae.train()
        if not (resume and self.resume()):
            self._initialise(sample or self.init_sample)
        if shard is not None:
            shard.sync_replicated(self.sae)
        if self.out is not None and self.world.writes:
            self.out.mkdir(parents=True, exist_ok=True)
            self._truncate_log()
            self.log_file = open(self.out / LOG, "a")  # noqa: SIM115 - closed by close_logs()
        if self.world.writes:
            self.external = ExternalLoggers(self.cfg, {"sae": to_dict(self.sae_cfg), "train": to_dict(self.cfg)})
        self._clock = (time.perf_counter(), self.state.tokens)
        self.started = True

    def _scale(self, sources: list[Source]) -> float:
        """The factor that brings the mean norm of ``sources``' rows (the mean over them, for several) to the
        configured one (√D by default)."""
        mean_norm = sum(s.stats.mean_norm for s in sources) / len(sources)
        norm = {"sqrt_d": math.sqrt(int(sources[0].d_in)), "unit": 1.0, "none": None}[self.sae_cfg.normalize]
        return 1.0 if norm is None or mean_norm <= 0 else norm / mean_norm

    def _initialise(self, sample_rows: Callable[[], torch.Tensor]) -> None:
        """Input scales (one per layer read), the target's scale (one for every hook written) and the
        decoder bias from the data (fresh runs only)."""
        reads = list(getattr(self.source, "parts", [self.source]))
        writes = list(getattr(self.target, "parts", [self.target])) if self.target is not None else reads
        self.sae.set_scales([self._scale([p]) for p in reads], self._scale(writes))
        scale = self.sae.target_scale   # (a crosscoder's: per column)
        if self.cfg.b_dec_init == "zero":
            return
        sample = sample_rows()
        sample = sample[torch.isfinite(sample).all(dim=1)].to(self.device) * scale.to(self.device)
        init = sample.mean(0) if self.cfg.b_dec_init == "mean" else geometric_median(sample)
        self.sae.init_decoder_bias(init)

    def resume(self) -> bool:
        """Load ``out/checkpoint.safetensors`` if it exists; True when resumed."""
        if self.out is None or not (self.out / CHECKPOINT).is_file():
            return False
        ck = load_checkpoint(self.out / CHECKPOINT)
        # rebuilt so that a config saved before n_features was resolved from d_in compares equal
        saved_sae = to_dict(from_dict(SAEConfig, ck["sae_config"], source=str(self.out / CHECKPOINT)))
        if saved_sae != to_dict(self.sae_cfg):
            diff = {k: (saved_sae.get(k), v) for k, v in to_dict(self.sae_cfg).items() if saved_sae.get(k) != v}
            raise CheckpointMismatch(f"{self.out / CHECKPOINT} is from a different SAE (saved vs asked: {diff}); "
                             "use another --out")
        # a setting the checkpoint does not name (it predates the setting) was that setting's default
        saved_train = {**to_dict(TrainConfig()), **ck["train_config"]}
        changed = {k: (saved_train.get(k), v) for k, v in to_dict(self.cfg).items()
                   if k not in RESUMABLE_CHANGES and saved_train.get(k) != v}
        if changed:
            raise CheckpointMismatch(f"{self.out / CHECKPOINT} was trained with other settings (saved vs asked: "
                                     f"{changed}); resume with the same settings, or use another --out")
        where = str(self.out / CHECKPOINT)
        self.sae.load_state(ck["sae"], where)
        optimizer, since_fired = ck["optimizer"], ck["since_fired"]
        if (shard := self.sae.shard) is not None:   # this shard's rows of the whole dictionary's state
            optimizer = shard.slice_optimizer(optimizer, self._names(), self.sae.per_feature_keys, where)
            since_fired = shard.slice(since_fired, "since_fired", where)
        self.optimizer.load_state_dict(optimizer)
        self.dead.since_fired.copy_(since_fired)
        self.generator.set_state(ck["rng"])
        self.state = TrainState(**ck["state"])
        return True

    def _names(self) -> list[str]:
        """The SAE's parameter names in the optimiser's order."""
        return [name for name, _ in self.sae.named_parameters()]

    def save_checkpoint(self) -> None:
        """Everything to resume exactly (rank 0 writes it: every rank holds the same state; latent
        shards gather theirs into it first, so every rank calls this)."""
        if self.out is None:
            return
        sae = self.sae.full_state()
        optimizer: dict[str, Any] | None = self.optimizer.state_dict()
        since_fired: torch.Tensor | None = self.dead.since_fired
        if (shard := self.sae.shard) is not None:
            optimizer = shard.gather_optimizer(self.optimizer.state_dict(), self._names(), self.sae.per_feature_keys)
            since_fired = shard.gather(self.dead.since_fired, "gathering the dead-feature counters")
        if not self.world.writes:
            return
        assert sae is not None and optimizer is not None and since_fired is not None
        self.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.out / CHECKPOINT, {
            "sae": sae, "optimizer": optimizer,
            "since_fired": since_fired, "rng": self.generator.get_state(),
            "state": asdict(self.state), "sae_config": to_dict(self.sae_cfg), "train_config": to_dict(self.cfg),
        })

    # ---- the loop -------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, Any] | None:
        """One optimisation step on a raw batch [B, D] (in the activations' own units); a transcoder's
        also takes its target ``y`` [B, D_out] (row i the same token as x's row i).

        Counts the step, logs on logging steps (the record is returned) and checkpoints when
        one is due. A batch holding NaN or Inf is skipped (``skip_nonfinite``) or stops the
        run with the checkpoint saved. The first call starts the run (:meth:`start`)."""
        self.start()
        x = x.to(self.device, torch.float32)
        if x.ndim != 2 or x.shape[1] != self.sae.d_in:
            raise InputError(f"batch shape {list(x.shape)} does not match the SAE's d_in {self.sae.d_in}")
        if self.sae_cfg.transcoder:
            if y is None:
                raise InputError("a transcoder's step takes its target batch too: step(x, y)")
            y = y.to(self.device, torch.float32)
            if y.shape != (len(x), self.sae.d_out):
                raise InputError(f"target batch shape {list(y.shape)} does not match [{len(x)}, {self.sae.d_out}] "
                                 "(the inputs' rows, the transcoder's d_out)")
        elif y is not None:
            raise InputError("step: a target batch was given to an SAE, which reconstructs its input")
        finite = all_finite(x) and (y is None or all_finite(y))
        if self.world.any(not finite, "checking the batches are finite"):
            self._nonfinite(x if y is None else torch.cat([x, y], 1))
            return None
        self.world.heartbeat(self.state.step)
        if self.sae.shard is not None:
            self.sae.shard.world.heartbeat(self.state.step)
        log_now = (self.state.step + 1) % self.cfg.log_every == 0 or self.state.step + 1 == self.cfg.steps
        metrics = self._optimise(x * self.sae.input_scale, measure=log_now,
                                 y=None if y is None else y * self.sae.target_scale)
        n = len(x) * self.world.size   # the global batch
        self.state.step += 1
        self.state.tokens += n
        self.state.batch_in_epoch += 1
        record = self._log(metrics) if log_now else None
        every = self.cfg.checkpoint_every
        if every > 0 and self.state.tokens // every > (self.state.tokens - n) // every:
            self.save_checkpoint()
        return record

    def _optimise(self, x: torch.Tensor, measure: bool, y: torch.Tensor | None = None) -> dict[str, float]:
        """The optimisation step on a normalised batch (``y``: a transcoder's normalised target); with
        ``measure``, also the logged metrics (loss terms, FVU of the target, L0), which cost a few passes
        over the batch."""
        cfg, sae = self.cfg, self.sae
        t = x if y is None else y   # what it reconstructs
        plateau = Plateau(**self.state.plateau)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor(cfg, self.state.step, plateau)
        dead = self.dead.dead
        k_aux = cfg.aux_k(sae.cfg)
        # Many dead features: AuxK's pairs come out of the TopK selection (sparse);
        # few: the loss takes a dense product over the dead columns instead.
        shard = sae.shard
        sparse_aux = False
        if self.dead_method == "auxk" and cfg.auxk_coeff > 0:
            n_dead = shard.count(dead) if shard is not None else int(dead.sum())   # the whole dictionary's
            # latent shards merge AuxK's features from the selection, however few are dead; a CLT's layers
            # each have their own dead features: the dense product over each layer's
            sparse_aux = n_dead > 0 if shard is not None else auxk_is_sparse(n_dead, k_aux) and not sae.cfg.clt_layers
            k_aux = min(k_aux, n_dead)
        aux_rows = cfg.auxk_rows
        if aux_rows > 0 and not self.world.alone:  # the global batch's first rows: this slice's share
            aux_rows = max(0, min(len(x), aux_rows - self.world.rank * len(x)))
            sparse_aux = sparse_aux and aux_rows > 0
        world = self.world
        if sae.cfg.clt_layers:   # every layer's block, one reconstruction of every layer's target
            assert y is not None
            blocks, x_hat = sae.encode_blocks(x, dead if sparse_aux else None, k_aux, aux_rows)
            terms = {"mse": squared_error(x_hat, y) / len(x)}
            for (layer, block), codes in zip(sae.each(), blocks, strict=True):
                F = block.n_features
                part = loss_terms(block, codes, sae.inputs_of(x, layer), cfg, self.state.step,
                                  dead[layer * F:(layer + 1) * F], self.generator, self.dead_method, world,
                                  sae.written_by(y, layer), reconstruct=False)
                for k, v in part.items():
                    if k != "total":
                        terms[k] = terms[k] + v if k in terms else v
            terms["total"] = torch.stack(list(terms.values())).sum()
        else:
            codes = sae.encode_codes(x, dead if sparse_aux else None, k_aux, aux_rows)
            blocks, x_hat = [codes], codes.x_hat
            terms = loss_terms(sae, codes, x, cfg, self.state.step, dead, self.generator, self.dead_method, world, y)
        if (shard.world if shard else world).any(not bool(torch.isfinite(terms["total"])),
                                                 "checking the loss is finite"):
            self.save_checkpoint()
            values = {k: round(float(v.detach()), 4) for k, v in terms.items()}
            raise ActivationError(f"step {self.state.step}: the loss became {values['total']} ({values}); "
                                  "checkpoint saved; "
                                  "lower --lr or enable --clip-grad")
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        world.average_grads(list(sae.parameters()))
        if shard is not None:
            shard.reduce_grads(sae)
        if not self._unit_rows_in_step:
            sae.project_decoder_grad()
        if cfg.clip_grad > 0 and shard is not None:
            shard.clip_grad_norm_(sae, cfg.clip_grad)
        elif cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.clip_grad)
        self.optimizer.step()
        if not self._unit_rows_in_step:
            sae.normalize_decoder()
        fired = world.max_(self.dead.fired_blocks([(c.pattern, c.vals.detach()) for c in blocks]),
                           "counting the features that fired")
        self.dead.record(fired, len(x) * world.size)
        nnz = sum((c.vals > 0).sum() for c in blocks)
        boosted = None
        if self.dead_method == "boost":
            norms = world.sum_(torch.stack([x.norm(dim=1).sum(), x.new_tensor(float(len(x)))]))
            unit = float(norms[0] / norms[1]) / math.sqrt(x.shape[1] / max(1, sae.cfg.clt_layers))
            boosted = 0
            for layer, block in sae.each():
                F = block.n_features
                boosted += boost(block, self.optimizer, self.dead.dead[layer * F:(layer + 1) * F], cfg.boost * unit)
        out: dict[str, float] = {}
        if measure:
            with torch.no_grad():
                if shard is not None:   # the reconstruction is every shard's; the other terms sum over features
                    names = [k for k in terms if k not in (*WHOLE_ON_EVERY_SHARD, "total")]
                    parts = shard.world.sum_(torch.stack([terms[k].detach().float() for k in names] + [
                        nnz.float()]), "reducing the logged metrics")
                    out = {k: float(v) for k, v in terms.items() if k in WHOLE_ON_EVERY_SHARD}
                    out.update({k: float(parts[i]) for i, k in enumerate(names)})
                    out["total"] = sum(out.values())
                    err = (t - x_hat).pow(2).sum()
                    out["fvu"] = float(err / (t - t.mean(0)).pow(2).sum().clamp_min(1e-12))
                    out["l0"] = float(parts[-1]) / len(x)
                elif world.alone:
                    out = {k: float(v.detach()) for k, v in terms.items()}
                    err = (t - x_hat).pow(2).sum()
                    out["fvu"] = float(err / (t - t.mean(0)).pow(2).sum().clamp_min(1e-12))
                    out["l0"] = float(nnz) / len(x)
                else:   # the global batch's: terms averaged over ranks, FVU and L0 from summed moments
                    names = list(terms)
                    parts = torch.stack([terms[k].detach().float() for k in names] + [
                        (t - x_hat).pow(2).sum(), t.pow(2).sum(), nnz.float()])
                    parts = world.sum_(torch.cat([parts, t.sum(0)]), "reducing the logged metrics")
                    out = {k: float(parts[i]) / world.size for i, k in enumerate(names)}
                    e2, x2, on = (float(v) for v in parts[len(names):len(names) + 3])
                    total_rows = len(x) * world.size
                    centred = x2 - float(parts[len(names) + 3:].pow(2).sum()) / total_rows
                    out["fvu"] = e2 / max(centred, 1e-12)
                    out["l0"] = on / total_rows
            if boosted is not None:
                out["boosted"] = boosted
        if self.dead_method == "resample" and self._resample_due():
            # every rank resamples alike from the whole global batch
            for (layer, block), codes in zip(sae.each(), blocks, strict=True):
                F = block.n_features
                self.state.resampled += resample(
                    block, self.optimizer, self.dead.dead[layer * F:(layer + 1) * F],
                    world.gather_rows(sae.inputs_of(x, layer)), world.gather_rows(codes.x_hat.detach()),
                    self.generator, None if y is None else world.gather_rows(sae.written_by(y, layer)))
            self.dead.since_fired[self.dead.dead] = 0
        return out

    def _resample_due(self) -> bool:
        # Default: 4 times in the first half of training (at 1/8, 2/8, 3/8, 4/8), so the
        # resampled features have at least half the run to settle: resampling late left
        # a ReLU SAE with thousands of fresh features firing on half of all tokens
        # (held-out FVU 30 on bench/sweep_train.py).
        every = self.cfg.resample_every or max(1, self.cfg.steps // 8)
        limit = self.cfg.steps if self.cfg.resample_every else self.cfg.steps // 2 + 1
        step = self.state.step + 1
        return step % every == 0 and step < limit

    def _log(self, metrics: dict[str, float]) -> dict[str, Any]:
        t0, tokens0 = self._clock
        dead = torch.tensor([float(self.dead.dead.sum()), float(self.dead.turnover())])
        if self.sae.shard is not None:   # the whole dictionary's
            self.sae.shard.world.sum_(dead, "counting the dead features")
        record = {"step": self.state.step, "tokens": self.state.tokens, **metrics,
                  "dead_fraction": float(dead[0]) / (self.sae_cfg.n_features * max(1, self.sae_cfg.clt_layers)),
                  "turnover": int(dead[1]),
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "tokens_per_s": (self.state.tokens - tokens0) / max(1e-9, time.perf_counter() - t0)}
        if self.cfg.schedule == "plateau":
            plateau = Plateau(**self.state.plateau)
            plateau.update(metrics["total"])
            self.state.plateau = asdict(plateau)
        if self.log_file is not None:   # (rank 0's only)
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()
        if self.external is not None:
            self.external.log(record)
        return record

    def fit(self, resume: bool = False) -> SAE:
        """Train to ``cfg.tokens``; with ``resume``, continue from ``out``'s checkpoint.

        The loop over :meth:`step`, then :meth:`finish` (the loop of
        :func:`dictlens.train.group.fit_together`, with this trainer alone). Without ``resume``,
        an ``out`` that already holds a checkpoint is an error, so a finished or interrupted
        run is never overwritten by accident. Ctrl-C saves a checkpoint before it stops the run.
        """
        from dictlens.data.hooks import Wiring
        from dictlens.data.store import OneSource, Paired
        from dictlens.train.group import fit_together

        if self.target is not None:
            return fit_together([(Wiring(("x",), ("y",)), self)], Paired(self.source, self.target), resume=resume,
                                progress=self.progress)[0]
        return fit_together([("x", self)], OneSource(self.source, "x"), resume=resume, progress=self.progress)[0]

    def calibration_rows(self) -> Iterator[torch.Tensor]:
        """The rows an activation calibrates on at the end (BatchTopK's threshold): two batches
        of 4,096 of a shuffle seeded by ``seed + 20,000``; lazy."""
        from itertools import islice

        world = self.world
        batches = self.source.batches(draw_size(CALIBRATION_ROWS, world), shuffle=True,
                                      seed=self.cfg.seed + CALIBRATION_SEED, part=world.part)
        return (world.gather_rows(x) for x in islice(batches, CALIBRATION_BATCHES))

    def finish(self, calibration: Iterable[torch.Tensor] | None = None) -> SAE:
        """End the run: checkpoint, put schedule-free parameters at their average, let the
        activation finish (BatchTopK calibrates its threshold, on ``calibration``, by default
        :meth:`calibration_rows`), save the SAE and its curves into ``out``. Returns the SAE in
        inference mode (BatchTopK then codes each token by its threshold, so a token's codes no
        longer depend on its batch-mates)."""
        self.start()
        self.close_logs()
        self.save_checkpoint()
        if hasattr(self.optimizer, "eval"):
            self.optimizer.eval()
        # lazy: read (or, from a stream, computed) only by an activation that calibrates
        sample = self.calibration_rows() if calibration is None else calibration
        rows = (x.to(self.device, torch.float32) * self.sae.input_scale for x in sample)
        self.sae.finish_training(x[torch.isfinite(x).all(dim=1)] for x in rows)
        describe = getattr(self.source, "provenance", None)
        record = self._provenance or (describe() if describe is not None else Provenance())
        if self.target is not None:   # what it writes: the target's hook (unless the record was given)
            written = getattr(self.target, "provenance", None)
            if self._provenance is None:
                record = record.replace(hook_out=written().hook_out if written is not None else None)
            record = record.replace(output_scale=float(self.sae.target_scale))
        scales = self.sae.input_scale.reshape(-1)
        parts = self.sae_cfg.clt_layers or self.sae_cfg.crosscoder
        if parts:   # (one per layer or hook: in the notes; the record's field is their mean)
            per_layer = scales.view(parts, -1)[:, 0]
            record = record.replace(notes={**record.notes, "input_scales": [float(s) for s in per_layer]})
        self.sae.provenance = record.replace(normalization=self.sae_cfg.normalize,
                                             input_scale=float(scales.mean()))
        whole = self.sae.gathered()   # latent shards: the whole dictionary, on rank 0
        if self.out is not None and self.world.writes:
            assert whole is not None
            whole.save(self.out, extra={"train": {**to_dict(self.cfg), "lr_used": self.lr,
                                                  "state": asdict(self.state)}})
            if self.cfg.plots:
                from dictlens.train.plots import plot_log

                plot_log(self.out / LOG, self.out / "curves.png")
        done: SAE = (whole or self.sae).eval()   # (a CLT for a cross-layer transcoder)
        return done

    def close_logs(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        if self.external is not None:
            self.external.close()
            self.external = None

    def _nonfinite(self, x: torch.Tensor) -> None:
        bad = int((~torch.isfinite(x).all(dim=1)).sum())
        if self.cfg.skip_nonfinite:
            self.state.skipped_nonfinite += 1
            self.state.batch_in_epoch += 1
            return
        self.save_checkpoint()
        where = f"; checkpoint saved in {self.out}" if self.out else ""
        raise ActivationError(f"step {self.state.step}: the batch holds NaN or Inf in {bad} rows{where}; "
                              "pass --skip-nonfinite to skip such batches")

    def _truncate_log(self) -> None:
        """Drop log lines past the checkpoint (written after it, before an interruption)."""
        assert self.out is not None
        path = self.out / LOG
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines() if line.strip()
                and json.loads(line)["step"] <= self.state.step]
        atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def train(sae_cfg: SAEConfig, cfg: TrainConfig, source: Source | torch.Tensor | np.ndarray,
          out: str | Path | None = None, *, provenance: Provenance | None = None, progress: bool = True,
          resume: bool = False, target: Source | torch.Tensor | np.ndarray | None = None) -> SAE:
    """Train an SAE on ``source`` (a store, a stream, or an array) and return it; with ``target`` (the
    activation it writes, row for row), a transcoder from ``source`` to ``target``."""
    from dictlens.data.store import ArraySource

    src = source if isinstance(source, Source) else ArraySource(source)
    tgt = target if target is None or isinstance(target, Source) else ArraySource(target)
    return Trainer(sae_cfg, cfg, src, out, provenance=provenance, progress=progress, target=tgt).fit(resume=resume)
