"""Several dictionaries trained side by side from one read of the data.

Each :class:`~dictlens.train.trainer.Trainer` keeps its own dictionary, optimiser, state,
checkpoint and run directory; the group owns the one loop over the data: every batch of a
source of several hooks (:class:`~dictlens.data.store.HookSource`: a cache's hooks read
together, or one forward pass of the model per batch) goes to each dictionary reading that
hook (a transcoder: the hooks it reads and writes, a :class:`~dictlens.data.hooks.Wiring`).
A dictionary for every layer, or several configurations of one hook, then costs one pass over
the data instead of one each. A single trainer's :meth:`Trainer.fit` is this loop
with a group of one.

The data order is the first member's (its ``seed`` and ``batch_size``), and so are the rows
that initialise the decoder bias and calibrate thresholds (read once for all); every member
must use that batch size. A member's own ``seed`` sets its initial weights and its other draws.
Members stop at their own ``tokens``. Resuming is exact: each member continues from its own
checkpoint, and one that is ahead of the others (it saved later before an interruption)
waits until the stream reaches where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch

from dictlens.data.hooks import Wiring
from dictlens.errors import CheckpointError, ConfigError, InputError

if TYPE_CHECKING:
    from dictlens.data.store import HookSource
    from dictlens.distributed import World
    from dictlens.sae.model import SAE
    from dictlens.train.trainer import Trainer


Member = tuple["str | Wiring", "Trainer"]   # a hook (an SAE's) or what the dictionary reads and writes


def wiring_of(key: str | Wiring) -> Wiring:
    return Wiring.sae(key) if isinstance(key, str) else key


def check_members(members: Sequence[Member], source: HookSource) -> None:
    """Refuse a group the loop cannot feed: no members, unknown hooks, several batch sizes."""
    if not members:
        raise ConfigError("train: nothing to train")
    missing = [h for key, _ in members for h in wiring_of(key).hooks if h not in source.hooks]
    if missing:
        raise ConfigError(f"hook: the data holds {source.hooks}, not {missing[0]!r}")
    sizes = {t.cfg.batch_size for _, t in members}
    if len(sizes) > 1:
        raise ConfigError(f"batch_size: dictionaries trained together read the same batches; found batch sizes "
                          f"{sorted(sizes)}")


def fit_together(members: Sequence[Member], source: HookSource, *, resume: bool = False,
                 progress: bool = True) -> list[SAE]:
    """Train every ``(hook, trainer)`` of ``members`` on ``source`` to its ``tokens`` (``hook``: a
    :class:`Wiring` for a transcoder); returns their finished SAEs in order (each saved into its
    trainer's ``out``).

    Without ``resume``, a member whose ``out`` already holds a checkpoint is an error, so a
    run is never overwritten by accident. Ctrl-C checkpoints every member before it stops.
    The time each member spends in its own steps is left in ``trainer.step_seconds``, and that
    plus its share of reading the data in ``trainer.seconds``."""
    from tqdm.auto import tqdm

    from dictlens.train.trainer import (
        CALIBRATION_BATCHES,
        CALIBRATION_ROWS,
        CALIBRATION_SEED,
        CHECKPOINT,
        INIT_ROWS,
        INIT_SEED,
        draw_size,
    )

    check_members(members, source)
    wired = [(wiring_of(key), t) for key, t in members]
    if not resume:
        for _, t in members:
            if t.out is not None and (t.out / CHECKPOINT).is_file():
                raise CheckpointError(f"{t.out} already holds a training checkpoint; resume it (--resume) "
                                      "or choose another --out")
    lead = members[0][1]
    batch_size, seed, world = lead.cfg.batch_size, lead.cfg.seed, lead.world
    if any(t.world != world for _, t in members):
        raise ConfigError("train: dictionaries trained together share one world of ranks")
    part = world.part
    # one read of the data for every member's initialisation and calibration rows (a stream
    # would otherwise run the model again for each): the lead's draws, taken only when needed
    n_init = draw_size(min(INIT_ROWS, max(len(source), 1)), world)
    init = _Once(lambda: next(iter(source.batches_by_hook(n_init, shuffle=True, seed=seed + INIT_SEED, part=part))))
    calibration = _Once(lambda: list(islice(source.batches_by_hook(draw_size(CALIBRATION_ROWS, world), shuffle=True,
                                                                   seed=seed + CALIBRATION_SEED, part=part),
                                            CALIBRATION_BATCHES)))
    for w, t in wired:
        t.start(resume=resume, sample=lambda w=w: world.gather_rows(w.written(init())))  # type: ignore[misc]
    running = [(w, t) for w, t in wired if t.state.step < t.cfg.steps]
    position = min(((t.state.epoch, t.state.batch_in_epoch) for _, t in running), default=(0, 0))
    done_tokens = min((t.state.tokens for _, t in running), default=0)
    total = max(t.cfg.steps for _, t in members) * batch_size
    desc = "train" if len(members) == 1 else f"train {len(members)} dictionaries"
    bar = tqdm(total=total, initial=min(done_tokens, total), unit="tok", unit_scale=True,
               disable=not (progress and world.writes), desc=desc)
    read_seconds, finished = 0.0, False
    try:
        epoch, skip = position
        while running:
            produced = False
            it = iter(source.batches_by_hook(batch_size, shuffle=True, seed=seed + epoch, drop_last=True, part=part))
            i = -1
            while running:
                t0 = time.perf_counter()
                batch = next(it, None)
                read_seconds += time.perf_counter() - t0
                if batch is None:
                    break
                i += 1
                produced = True
                if i < skip:  # every member trained on it before the checkpoint
                    continue
                rec = None
                for w, t in running:
                    if (t.state.epoch, t.state.batch_in_epoch) != (epoch, i):
                        continue  # ahead of the stream: it saved after this batch
                    t0 = time.perf_counter()
                    rec = t.step(w.inputs(batch), y=w.targets(batch)) or rec
                    t.step_seconds += time.perf_counter() - t0
                running = [(w, t) for w, t in running if t.state.step < t.cfg.steps]
                bar.update(batch_size)
                if rec is not None:
                    bar.set_postfix(fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}",
                                    dead=f"{rec['dead_fraction']:.1%}")
            if not produced:
                raise InputError(f"the activations hold fewer rows ({len(source)}) than one batch "
                                 f"({batch_size}); lower --batch-size")
            if running and batch is None:  # the epoch ended: the next starts at its first batch
                epoch, skip = epoch + 1, 0
                for _, t in running:
                    if t.state.epoch < epoch:  # (one ahead may already be in the new epoch)
                        t.state.epoch, t.state.batch_in_epoch = epoch, 0
        finished = True
    except KeyboardInterrupt:
        for _, t in members:
            t.save_checkpoint()
        raise
    finally:
        bar.close()
        if not finished:
            for _, t in members:
                t.close_logs()
    for _, t in members:
        t.seconds = t.step_seconds + read_seconds / len(members)
    return [t.finish(_rows_of(calibration, w, world)) for w, t in wired]


class _Once:
    """A value computed on first call and kept."""

    def __init__(self, make: Callable[[], Any]):
        self.make, self.value, self.made = make, None, False

    def __call__(self) -> Any:
        if not self.made:
            self.value, self.made = self.make(), True
        return self.value


def _rows_of(batches: _Once, wiring: Wiring, world: World) -> Iterator[torch.Tensor]:
    """One dictionary's input rows of shared batches (every rank's slices gathered), drawn when first iterated."""
    for batch in batches():
        yield world.gather_rows(wiring.inputs(batch))
