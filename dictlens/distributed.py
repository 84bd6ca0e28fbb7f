"""Training on several processes with ``torch.distributed``, launched by ``torchrun``.

    torchrun --nproc-per-node 2 -m dictlens train --acts runs/acts --hook resid_post.15 ...

:class:`World` is the one place the trainer talks to the other ranks. Data parallel: every
rank holds the whole dictionary and reads its own slice of each global batch (a cache's rows
are split by rank; a stream gives each rank every N-th context); the gradients are averaged,
and so are the statistics the trainer keeps (which features fired, the batch norms the
dead-feature boost uses, the logged metrics), so the ranks stay identical step after step and
train to the weights one process would reach on the same global batches. Only rank 0 writes
logs, checkpoints and the SAE; a checkpoint holds the global state, so it resumes with any
world size that divides the batch.

A rank that dies or stalls must not hang the others: every collective has the timeout given
at start-up (``--dist-timeout``), each rank records its step in the rendezvous store, and a
collective that fails is raised as a one-line :class:`DistributedError` that names the ranks
that stopped answering. The one-process world (``World()``) makes every call a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from dictlens.errors import ConfigError, DictlensError

T = TypeVar("T")


class DistributedError(DictlensError):
    """Another rank died, stalled or disagrees: this rank stops instead of hanging."""


@dataclass
class World:
    """This process's place among the ranks: ``rank`` of ``size`` (1: alone, no communication)."""

    rank: int = 0
    size: int = 1
    timeout_s: float = 0.0
    backend: str = ""
    local_rank: int = 0   # this rank's index on its machine: its GPU
    step: int = 0         # the training step, for messages
    beats: Any = None     # this rank's heartbeat (a thread ticking a counter in the store)
    writer: bool = True   # False: a rank other than the first that reads the data alone (solo())
    _cpu_group: Any = None  # a gloo group over the same ranks, for gathers to host memory

    @property
    def alone(self) -> bool:
        return self.size == 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes files (rank 0 only)."""
        return self.writer and self.rank == 0

    def solo(self) -> World:
        """This rank reading the data alone (every rank the same batches), as when the ranks
        split a dictionary's features instead of the batch: no collectives, and only the first
        rank writes."""
        return World(timeout_s=self.timeout_s, backend=self.backend, local_rank=self.local_rank,
                     writer=self.writes)

    @property
    def part(self) -> tuple[int, int]:
        """(rank, size): which slice of each global batch this rank reads."""
        return (self.rank, self.size)

    # ---- set-up -----------------------------------------------------------------------
    @classmethod
    def from_env(cls, timeout_s: float = 300.0, device: torch.device | None = None) -> World:
        """The world torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), joined;
        alone when there is none. gloo on CPU, NCCL on CUDA (``device`` cuda, or none given and a
        GPU present: the trainer's own default)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        backend = "nccl" if on_cuda else "gloo"
        if not dist.is_initialized():
            if on_cuda:
                torch.cuda.set_device(local)
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                        **_attempt_store(rank, size, timeout_s))
            except (RuntimeError, ValueError) as e:
                raise DistributedError(f"rank {rank}: cannot join the other {size - 1} rank(s): "
                                       f"{_first_line(e)}") from None
        world = cls(rank=dist.get_rank(), size=dist.get_world_size(), timeout_s=timeout_s, backend=backend,
                    local_rank=local)
        world.beats = _Heartbeat.start(world.rank)
        return world

    def close(self, together: bool = True) -> None:
        """Leave the world: first (``together``, the run having ended well on every rank) wait for
        the others at a barrier, so that no rank tears gloo down while another still writes its
        files; then stop the heartbeat and destroy the process group, so that no thread of
        either is left running into the interpreter's exit (which aborts the process:
        "terminate called without an active exception")."""
        if not self.alone:
            import torch.distributed as dist

            if together and dist.is_initialized():
                self._run("waiting for every rank to finish", dist.barrier)
        if self.beats is not None:
            self.beats.stop()
            self.beats = None
        if not self.alone:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # ---- collectives ------------------------------------------------------------------
    def _run(self, what: str, fn: Callable[[], T]) -> T:
        """Run a collective; a failure (a rank died, or stalled past the timeout) becomes a one-line
        error naming the ranks that stopped answering (those whose heartbeat no longer ticks)."""
        try:
            return fn()
        except (RuntimeError, ValueError) as e:   # gloo/NCCL raise RuntimeError (DistBackendError) on timeouts
            raise DistributedError(f"rank {self.rank}: {what} failed{self._who_stopped()}: {_first_line(e)}") \
                from None

    def heartbeat(self, step: int) -> None:
        """The training step this rank is at (named in the messages)."""
        self.step = step

    def _who_stopped(self) -> str:
        """' at step S: rank R stopped answering' from the ranks' heartbeats: a rank that died or is
        frozen no longer ticks its counter in the store (read twice, a few beats apart)."""
        if self.beats is None:
            return f" at step {self.step}"
        first = self.beats.read(self.size)
        if first is None:
            return f" at step {self.step} (the rendezvous store is unreachable too)"
        import time

        time.sleep(3 * _Heartbeat.EVERY_S)
        second = self.beats.read(self.size) or {}
        stopped = [r for r in range(self.size) if r != self.rank and (first.get(r) is None
                                                                      or second.get(r) == first.get(r))]
        if not stopped:
            return f" at step {self.step} (every rank still beats: they disagree on the collectives?)"
        named = ", ".join(f"rank {r}" + (" (never started)" if first.get(r) is None else "") for r in stopped)
        return f" at step {self.step}: {named} stopped answering (died or stalled)"

    def sum_(self, tensor: torch.Tensor, what: str = "summing across ranks") -> torch.Tensor:
        """All-reduce ``tensor`` in place (sum); returns it."""
        if self.alone:
            return tensor
        import torch.distributed as dist

        self._run(what, lambda: dist.all_reduce(tensor))
        return tensor

    def max_(self, tensor: torch.Tensor, what: str = "taking the maximum across ranks") -> torch.Tensor:
        if self.alone:
            return tensor
        import torch.distributed as dist

        self._run(what, lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MAX))
        return tensor

    def broadcast_(self, tensor: torch.Tensor, what: str = "sharing rank 0's values") -> torch.Tensor:
        """Overwrite ``tensor`` in place with rank 0's; returns it."""
        if self.alone:
            return tensor
        import torch.distributed as dist

        self._run(what, lambda: dist.broadcast(tensor, src=0))
        return tensor

    def any(self, flag: bool, what: str = "agreeing across ranks") -> bool:
        """Whether ``flag`` holds on any rank."""
        if self.alone:
            return flag
        return bool(self.max_(torch.tensor([int(flag)], device=self._device()), what).item())

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks (one flat all-reduce)."""
        self.sum_grads(params, "averaging gradients", mean=True)

    def sum_grads(self, params: list[torch.nn.Parameter], what: str = "summing gradients", mean: bool = False) -> None:
        """Replace each gradient by its sum (or ``mean``) over the ranks, in one flat all-reduce; a
        missing gradient counts as zeros so that every rank reduces the same buffer."""
        if self.alone or not params:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads]), what)
        if mean:
            flat.div_(self.size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum_shared(self, partial: torch.Tensor, what: str = "summing the partial reconstructions") -> torch.Tensor:
        """Σ over the ranks of ``partial``, differentiably: every rank goes on to compute the same
        loss from the sum, so the gradient of each rank's part is the sum's gradient (an identity
        backward, no communication)."""
        if self.alone:
            return partial
        out: torch.Tensor = _SumShared.apply(partial, self, what)  # type: ignore[no-untyped-call]
        return out

    def gather_to_first(self, x: torch.Tensor, what: str = "gathering a checkpoint") -> torch.Tensor | None:
        """Every rank's ``x`` (the same shape on each) concatenated along dim 0 in host memory on
        rank 0 (None on the others), through a gloo group: a GPU never holds the whole."""
        if self.alone:
            return x.detach().cpu()
        import torch.distributed as dist

        if self._cpu_group is None:
            self._cpu_group = self._run("creating a host-memory group",
                                        lambda: dist.new_group(backend="gloo") if self.backend != "gloo"
                                        else dist.group.WORLD)
        mine = x.detach().contiguous().cpu()
        parts = [torch.empty_like(mine) for _ in range(self.size)] if self.rank == 0 else None
        self._run(what, lambda: dist.gather(mine, parts, dst=0, group=self._cpu_group))
        return torch.cat(parts) if parts is not None else None

    def gather_rows(self, x: torch.Tensor, what: str = "gathering rows") -> torch.Tensor:
        """Every rank's rows concatenated in rank order (the global batch from its slices)."""
        if self.alone:
            return x
        import torch.distributed as dist

        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(self.size)]
        self._run(what, lambda: dist.all_gather(sizes, torch.tensor([len(x)], device=x.device)))
        most = int(max(int(s) for s in sizes))
        padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[:len(x)] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self._run(what, lambda: dist.all_gather(parts, padded))
        return torch.cat([p[:int(n)] for p, n in zip(parts, sizes, strict=True)])

    def check_same(self, value: Any, what: str) -> None:
        """Refuse to start unless every rank was given the same ``value`` (a config): a one-line
        error on every rank naming the first that differs."""
        if self.alone:
            return
        import torch.distributed as dist

        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()[:8]
        mine = torch.tensor(list(digest), dtype=torch.long, device=self._device())
        everyone = [torch.empty_like(mine) for _ in range(self.size)]
        self._run(f"comparing {what}", lambda: dist.all_gather(everyone, mine))
        differ = [r for r, d in enumerate(everyone) if not torch.equal(d, everyone[0])]
        if differ:
            raise ConfigError(f"rank {self.rank}: rank {differ[0]} was given another {what} than rank 0: every rank "
                              "must run the same command")

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


class _SumShared(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, partial: torch.Tensor, world: World, what: str) -> torch.Tensor:
        return world.sum_(partial.clone(), what)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        return g, None, None


class _Heartbeat:
    """A daemon thread that ticks ``dictlens/beat/RANK`` in the rendezvous store every second, on
    its own connection (torchrun's store outlives the workers, so a dead rank's count stops)."""

    EVERY_S = 1.0

    def __init__(self, store: Any, rank: int):
        import threading

        self.store, self.rank = store, rank
        self.stopping = threading.Event()
        self.thread: Any = None

    @classmethod
    def start(cls, rank: int) -> _Heartbeat | None:
        import threading

        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            return None
        try:
            from torch.distributed import TCPStore  # type: ignore[attr-defined]  # (re-exported untyped)

            store = TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10))
        except (RuntimeError, ValueError):
            return None
        import atexit

        beat = cls(store, rank)
        beat.thread = threading.Thread(target=beat._run, name="dictlens-heartbeat", daemon=True)
        beat.thread.start()
        atexit.register(beat.stop)   # a thread left inside the store's C++ at exit aborts the process
        return beat

    def _run(self) -> None:
        with contextlib.suppress(RuntimeError, ValueError):
            while not self.stopping.is_set():
                self.store.add(f"dictlens/beat/{self.rank}", 1)
                self.stopping.wait(self.EVERY_S)

    def stop(self) -> None:
        """End the thread (within one beat) before the process or its store goes, then let the
        store's connection go while the interpreter still runs."""
        self.stopping.set()
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout=15 * self.EVERY_S)   # (a store call times out after 10 s)
        if self.thread is None or not self.thread.is_alive():
            self.store = None

    def read(self, size: int) -> dict[int, int] | None:
        if self.store is None:
            return None
        try:
            return {r: int(self.store.get(f"dictlens/beat/{r}")) for r in range(size)
                    if self.store.check([f"dictlens/beat/{r}"])}
        except (RuntimeError, ValueError):
            return None


def _attempt_store(rank: int, size: int, timeout_s: float) -> dict[str, Any]:
    """Under torchrun's agent store, a store of this attempt's own (keys prefixed by the restart
    count): after a restart, torch's default can hand the new workers the old workers' addresses
    (pytorch/pytorch#167288), and the new mesh then fails to connect. Elsewhere: the default."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not host or not port:
        return {}
    from torch.distributed import PrefixStore, TCPStore  # type: ignore[attr-defined]  # (re-exported untyped)

    base = TCPStore(host, int(port), world_size=size, is_master=False,
                    timeout=datetime.timedelta(seconds=timeout_s))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": PrefixStore(f"dictlens/attempt_{attempt}", base), "rank": rank, "world_size": size}


def _store() -> Any:
    try:
        import torch.distributed.distributed_c10d as c10d

        return c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError, ImportError):
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def restarted() -> bool:
    """Whether torchrun restarted this worker after a failure (``--max-restarts``): the run then
    resumes from its checkpoint without being told."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
