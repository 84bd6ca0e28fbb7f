"""Activation batches for the trainer, from a disk cache or streamed from a model.

Both sources give the same thing: ``source.batches(batch_size, shuffle=..., seed=...)``
yields float32 tensors of shape [batch_size, D], ``source.stats`` gives the
normalisation statistics, and ``source.provenance()`` describes the data (model, hook,
tokenizer, context, outlier limit) for the record of a dictionary trained on it. The
trainer needs nothing else, so it also accepts a plain tensor or numpy array wrapped in
:class:`ArraySource`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from dictlens.data.activations import FilterState, Moments, NormStats, TokenFilter, iter_chunks, outlier_limit
from dictlens.data.cache import from_storage, read_manifest, verify_file
from dictlens.data.hooks import Wiring
from dictlens.data.models import LoadedModel
from dictlens.data.packing import pack_contexts, resolve_prepend_bos, special_token_ids, tokenizer_fingerprint
from dictlens.data.tap import Tap
from dictlens.data.text import iter_documents
from dictlens.errors import CacheError, ConfigError, InputError
from dictlens.provenance import Provenance


@runtime_checkable
class Source(Protocol):
    """What the trainer reads: batches of float32 rows [B, D], their width and statistics."""

    @property
    def d_in(self) -> int: ...

    @property
    def stats(self) -> NormStats: ...

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False, part: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]: ...


Rows = dict[str, torch.Tensor]   # aligned row blocks: row i of every entry is the same token


def part_rows(n: int, part: tuple[int, int]) -> slice:
    """Rank r of N's share of n rows: the r-th of N contiguous, near-equal slices."""
    rank, world = part
    return slice(rank * n // world, (rank + 1) * n // world)


def _shuffled_batches(blocks: Iterable[Rows], batch_size: int, *, shuffle: bool, generator: torch.Generator,
                      buffer_rows: int, drop_last: bool) -> Iterator[Rows]:
    """Re-batch a stream of aligned row blocks, shuffling within a buffer of ``buffer_rows`` rows
    (one permutation for every entry, so the rows of several hooks stay aligned)."""
    pending: list[Rows] = []
    n_pending = 0

    def drain(final: bool) -> Iterator[Rows]:
        nonlocal pending, n_pending
        rows = {key: torch.cat([p[key] for p in pending]) if len(pending) > 1 else pending[0][key]
                for key in pending[0]}
        n = n_pending
        if shuffle:
            perm = torch.randperm(n, generator=generator)
            rows = {key: v[perm] for key, v in rows.items()}
        n_full = n // batch_size * batch_size
        for i in range(0, n_full, batch_size):
            yield {key: v[i:i + batch_size] for key, v in rows.items()}
        rest = {key: v[n_full:] for key, v in rows.items()}
        pending, n_pending = ([rest], n - n_full) if n > n_full else ([], 0)
        if final and n > n_full and not drop_last:
            pending, n_pending = [], 0
            yield rest

    for block in blocks:
        size = len(next(iter(block.values())))
        if not size:
            continue
        pending.append(block)
        n_pending += size
        if n_pending >= buffer_rows:
            yield from drain(final=False)
    if n_pending:
        yield from drain(final=True)


def _cache_batches(stores: dict[str, ActivationStore], batch_size: int, *, shuffle: bool, seed: int,
                   drop_last: bool, buffer_rows: int, part: tuple[int, int]) -> Iterator[Rows]:
    """One epoch of batches of several hooks of one cache (``stores``: views on the same shards).

    The shuffle runs on row numbers: the shards are visited in a random order and the row
    numbers permuted within a buffer of ``buffer_rows`` rows, and each batch's rows are then
    read from the memory-mapped shards, so memory holds one batch per hook whatever the buffer.
    With ``part`` = (rank, world) each batch is that rank's slice of it: the world's ranks
    together read every row once, each its own."""
    first = next(iter(stores.values()))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(first.n_shards, generator=g).tolist() if shuffle else range(first.n_shards)
    starts = first.shard_starts
    blocks = ({"row": torch.arange(int(starts[i]), int(starts[i + 1]))} for i in order)
    for batch in _shuffled_batches(blocks, batch_size, shuffle=shuffle, generator=g,
                                   buffer_rows=buffer_rows if shuffle else batch_size, drop_last=drop_last):
        rows = batch["row"]
        if part != (0, 1):
            rows = rows[part_rows(len(rows), part)]
        yield {hook: store.gather(rows) for hook, store in stores.items()}


class ActivationStore:
    """Reads one hook of an activation cache written by :func:`dictlens.harvest`.

    ``model`` and ``hook``, when given, must match the cache. Every shard is checked
    against the manifest's size on open and its sha256 when first read.
    """

    def __init__(self, path: str | Path, hook: str | None = None, *, model: str | None = None,
                 verify: bool = True, shards: list[int] | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CacheError(f"activation cache {self.path} does not exist")
        self.manifest = read_manifest(self.path)
        hooks = self.manifest["hooks"]
        if hook is None:
            if len(hooks) != 1:
                raise CacheError(f"{self.path} holds hooks {hooks}: name the one to read")
            hook = hooks[0]
        if hook not in hooks:
            raise CacheError(f"{self.path} holds hooks {hooks}, not {hook!r}")
        if model is not None and model != self.manifest["model"]:
            raise CacheError(f"{self.path} was harvested from model {self.manifest['model']!r}, not {model!r}")
        if not self.manifest["shards"]:
            raise CacheError(f"{self.path} holds no shards yet")
        if shards is not None:  # a view on some shards (a train / held-out split)
            self.manifest = {**self.manifest, "shards": [self.manifest["shards"][i] for i in shards]}
            self.manifest["tokens"] = sum(s["rows"] for s in self.manifest["shards"])
        self.hook = hook
        self.verify = verify
        self._verified: set[tuple[int, str]] = set()
        self._maps: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self.shard_starts = np.concatenate([[0], np.cumsum([s["rows"] for s in self.manifest["shards"]])])
        for shard in self.manifest["shards"]:
            for key in ("tokens", hook):
                verify_file(self.path, shard["files"][key], full=False)

    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    @property
    def d_in(self) -> int:
        return int(self.manifest["widths"][self.hook])

    def provenance(self) -> Provenance:
        """What a dictionary trained on this cache reads: the cache's own description."""
        return Provenance(model=self.model, tokenizer=self.manifest.get("tokenizer"), hook_in=self.hook,
                          hook_out=self.hook, context=int(self.manifest["context"]),
                          outlier_limit=outlier_limit(self.manifest, self.hook), acts=str(self.path))

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def __len__(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def stats(self) -> NormStats:
        """Normalisation statistics of this hook over the whole cache."""
        if self.hook in self.manifest.get("stats", {}):
            s = self.manifest["stats"][self.hook]
            return NormStats(s["count"], np.asarray(s["mean"]), s["mean_norm"], np.asarray(s["var"]))
        return NormStats.from_moments(Moments.from_json(self.manifest["filter"]["kept"][self.hook]))

    MAPS_OPEN = 256   # memory-mapped shard files kept open (least recently used closed first)

    def _load(self, index: int, key: str) -> np.ndarray:
        """Shard ``index``'s file ``key`` memory-mapped (checked against its sha256 when first read)."""
        if (index, key) in self._maps:
            self._maps.move_to_end((index, key))
            return self._maps[(index, key)]
        entry = self.manifest["shards"][index]["files"][key]
        if self.verify and (index, key) not in self._verified:
            verify_file(self.path, entry)
            self._verified.add((index, key))
        try:
            arr: np.ndarray = np.load(self.path / entry["path"], mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise CacheError(f"shard {self.path / entry['path']} cannot be read: {e}") from None
        if len(arr) != self.manifest["shards"][index]["rows"]:
            raise CacheError(f"shard {self.path / entry['path']} holds {len(arr)} rows, the manifest says "
                             f"{self.manifest['shards'][index]['rows']}")
        self._maps[(index, key)] = arr
        if len(self._maps) > self.MAPS_OPEN:
            self._maps.popitem(last=False)
        return arr

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The activations of the cache's rows ``rows`` (numbers over all of this view's shards,
        in order), as float32 [len(rows), D]; each shard's rows are read in file order."""
        ids = rows.numpy()
        out = torch.empty(len(ids), self.d_in)
        shard = np.searchsorted(self.shard_starts, ids, side="right") - 1
        for s in np.unique(shard):
            where = np.flatnonzero(shard == s)
            local = ids[where] - self.shard_starts[s]
            arr = self._load(int(s), self.hook)
            if len(local) and local[-1] - local[0] + 1 == len(local) and bool((np.diff(local) == 1).all()):
                out[where] = from_storage(arr[local[0]:local[-1] + 1], self.manifest["dtype"])
                continue
            order = np.argsort(local, kind="stable")
            out[where[order]] = from_storage(arr[local[order]], self.manifest["dtype"])
        return out

    def shard(self, index: int) -> torch.Tensor:
        """All rows of shard ``index`` as float32 [rows, D]."""
        return from_storage(self._load(index, self.hook), self.manifest["dtype"])

    def token_table(self, index: int) -> np.ndarray:
        """int64 [rows, 3] of shard ``index``: token id, position, context index."""
        return np.asarray(self._load(index, "tokens"))

    def read_all(self) -> torch.Tensor:
        """Every row, in order, as float32 [N, D] (for caches that fit in memory)."""
        return torch.cat([self.shard(i) for i in range(self.n_shards)])

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                part: tuple[int, int] = (0, 1), buffer_rows: int = 1 << 18) -> Iterator[torch.Tensor]:
        """One epoch of float32 [batch_size, D] batches; every row appears exactly once.

        Shuffling visits the shards in a random order and permutes rows within a buffer
        of ``buffer_rows`` rows (several shards); memory holds one batch. ``part`` (rank,
        world): that rank's slice of each batch.
        """
        return (b[self.hook] for b in _cache_batches({self.hook: self}, batch_size, shuffle=shuffle, seed=seed,
                                                      drop_last=drop_last, buffer_rows=buffer_rows, part=part))


class ArraySource:
    """Wraps an in-memory [N, D] array or tensor in the source interface."""

    def __init__(self, data: Any):
        self.data = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data).float()
        if self.data.ndim != 2:
            raise InputError(f"activations: expected a 2-D array [N, D], found shape {tuple(self.data.shape)}")

    @property
    def d_in(self) -> int:
        return int(self.data.shape[1])

    def __len__(self) -> int:
        return len(self.data)

    @property
    def stats(self) -> NormStats:
        """Statistics of the finite rows (the trainer reports or skips the others)."""
        m = Moments()
        for part in self.data.split(1 << 15):
            m.add(part[torch.isfinite(part).all(dim=1)])
        return NormStats.from_moments(m)

    def provenance(self) -> Provenance:
        """Arrays carry no description: nothing is known of a model or hook."""
        return Provenance()

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False, part: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return (b["x"][part_rows(len(b["x"]), part)]
                for b in _shuffled_batches([{"x": self.data}], batch_size, shuffle=shuffle, generator=g,
                                           buffer_rows=len(self.data), drop_last=drop_last))


class ArrayHooks:
    """In-memory arrays of several hooks, row i of each the same token: a :class:`HookSource` for the
    Python API (a crosscoder's or CLT's hooks side by side from tensors in hand)."""

    def __init__(self, arrays: dict[str, Any]):
        self.views = {hook: ArraySource(a) for hook, a in arrays.items()}
        if not self.views:
            raise InputError("arrays: give at least one hook's activations")
        lengths = {hook: len(v) for hook, v in self.views.items()}
        if len(set(lengths.values())) > 1:
            raise InputError(f"arrays: every hook holds the same tokens, found rows {lengths}")

    @property
    def hooks(self) -> list[str]:
        return list(self.views)

    def view(self, hook: str) -> Source:
        if hook not in self.views:
            raise InputError(f"arrays hold no hook {hook!r} (they hold {', '.join(self.views)})")
        return self.views[hook]

    def __len__(self) -> int:
        return len(next(iter(self.views.values())))

    def batches_by_hook(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                        drop_last: bool = False, part: tuple[int, int] = (0, 1)) -> Iterator[Rows]:
        g = torch.Generator().manual_seed(seed)
        rows = {hook: v.data for hook, v in self.views.items()}
        for b in _shuffled_batches([rows], batch_size, shuffle=shuffle, generator=g, buffer_rows=len(self),
                                   drop_last=drop_last):
            yield {hook: x[part_rows(len(x), part)] for hook, x in b.items()}


class StreamingSource:
    """Activations of one hook or several streamed from the model over a text, without touching disk.

    Rows are filtered exactly as :func:`dictlens.harvest` filters them (a token dropped at one
    hook is dropped at all) and shuffled within a buffer of ``buffer_rows`` rows (by default
    65,536, or fewer when several hooks would make the buffer exceed 256 MiB). ``tokens``
    bounds one epoch. With one hook it is a :class:`Source`; with several, ``batches_by_hook``
    gives the hooks' aligned batches and ``view(hook)`` one hook as a source.
    """

    BUFFER_BYTES = 1 << 28

    def __init__(self, lm: LoadedModel, hook: str | Sequence[str], text: str, *, tokens: int, context: int = 128,
                 text_field: str = "text", batch_contexts: int = 16, keep_special: bool = False,
                 prepend_bos: str = "auto", outlier_factor: float | None = None,
                 drop_nonfinite: bool = False, buffer_rows: int | None = None):
        self.hooks = [hook] if isinstance(hook, str) else list(hook)
        if not self.hooks or len(set(self.hooks)) != len(self.hooks):
            raise ConfigError(f"hook: expected one or more distinct hooks, found {self.hooks}")
        self.lm, self.text, self.text_field = lm, text, text_field
        self.tokens, self.context, self.batch_contexts = tokens, context, batch_contexts
        self.prepend_bos = resolve_prepend_bos(lm.tokenizer, prepend_bos)
        self.filter = TokenFilter(set() if keep_special else special_token_ids(lm.tokenizer),
                                  keep_special, drop_nonfinite)
        self.outlier_factor = outlier_factor
        self._buffer_rows = buffer_rows
        self.tap = Tap(lm, self.hooks)
        self._stats: dict[str, NormStats] | None = None
        self._widths: dict[str, int] | None = None
        self._median_norm: dict[str, float] = {}  # fixed by the stream's first batch (outlier rule)

    @property
    def hook(self) -> str:
        """The hook, for a stream of one."""
        if len(self.hooks) != 1:
            raise ConfigError(f"this stream reads {len(self.hooks)} hooks; take one with view(hook)")
        return self.hooks[0]

    @property
    def model(self) -> str:
        return self.lm.name

    @property
    def widths(self) -> dict[str, int]:
        """Width of each hook's activations (read from a two-token probe)."""
        if self._widths is None:
            acts = self.tap(torch.zeros(1, 2, dtype=torch.long))
            self._widths = {h: int(acts[h].shape[-1]) for h in self.hooks}
        return self._widths

    @property
    def d_in(self) -> int:
        return self.widths[self.hook]

    @property
    def buffer_rows(self) -> int:
        if self._buffer_rows is None:
            self._buffer_rows = min(1 << 16, max(4096, self.BUFFER_BYTES // (4 * sum(self.widths.values()))))
        return self._buffer_rows

    def __len__(self) -> int:
        return self.tokens

    def view(self, hook: str) -> Source:
        """One hook of this stream as a source (its statistics and provenance are the stream's)."""
        if hook not in self.hooks:
            raise ConfigError(f"this stream reads hooks {self.hooks}, not {hook!r}")
        return HookView(self, hook)

    def _rows(self, part: tuple[int, int] = (0, 1)) -> Iterator[Rows]:
        """The filtered rows in stream order; with ``part`` (rank, world), of every world-th context
        from the rank-th on, up to that rank's share of ``tokens``."""
        contexts = pack_contexts(iter_documents(self.text, self.text_field), self.lm.tokenizer,
                                 self.context, prepend_bos=self.prepend_bos)
        rank, world = part
        if world > 1:
            contexts = islice(contexts, rank, None, world)
        state = FilterState(self.hooks, self.outlier_factor)
        share = part_rows(self.tokens, part)
        left = share.stop - share.start
        for chunk in iter_chunks(self.tap, contexts, batch_size=self.batch_contexts,
                                 token_filter=self.filter, state=state):
            self._median_norm.update(state.median_norm)
            rows = {h: chunk.acts[h][:left] for h in self.hooks}
            left -= len(rows[self.hooks[0]])
            yield rows
            if left <= 0:
                return

    def provenance(self, hook: str | None = None) -> Provenance:
        """The model, hook and text streamed; the outlier limit once the stream has begun."""
        hook = hook or self.hook
        median = self._median_norm.get(hook)
        limit = self.outlier_factor * median if self.outlier_factor and median is not None else None
        return Provenance(model=self.model, tokenizer=tokenizer_fingerprint(self.lm.tokenizer), hook_in=hook,
                          hook_out=hook, context=self.context, outlier_limit=limit, text=self.text)

    @property
    def stats_by_hook(self) -> dict[str, NormStats]:
        """Statistics of each hook, estimated from the first ``buffer_rows`` rows of the stream."""
        if self._stats is None:
            moments = {h: Moments() for h in self.hooks}
            for rows in self._rows():
                for h in self.hooks:
                    moments[h].add(rows[h])
                if moments[self.hooks[0]].count >= self.buffer_rows:
                    break
            self._stats = {h: NormStats.from_moments(m) for h, m in moments.items()}
        return self._stats

    @property
    def stats(self) -> NormStats:
        return self.stats_by_hook[self.hook]

    def batches_by_hook(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                        drop_last: bool = False, part: tuple[int, int] = (0, 1)) -> Iterator[Rows]:
        """One epoch of every hook's batches, aligned (row i of each is the same token). With
        ``part`` (rank, world), that rank's share of each batch of ``batch_size``: its own
        batch_size / world rows from its own contexts (every world-th), shuffled in its own
        buffer (the seed differs by rank), so that no rank runs the model on another's text."""
        rank, world = part
        if batch_size % world:
            raise ConfigError(f"batch_size: {batch_size} does not divide among {world} ranks")
        g = torch.Generator().manual_seed(seed + 7919 * rank)
        return _shuffled_batches(self._rows(part), batch_size // world, shuffle=shuffle, generator=g,
                                 buffer_rows=self.buffer_rows if shuffle else batch_size, drop_last=drop_last)

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False, part: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
        hook = self.hook
        return (b[hook] for b in self.batches_by_hook(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                                      part=part))


class CacheHooks:
    """Several hooks of one activation cache read together: one shuffle, row i of every hook
    the same token, each hook read from its own files."""

    def __init__(self, path: str | Path, hooks: Sequence[str], *, model: str | None = None, verify: bool = True,
                 shards: list[int] | None = None):
        if not hooks or len(set(hooks)) != len(hooks):
            raise ConfigError(f"hook: expected one or more distinct hooks, found {list(hooks)}")
        self.views = {h: ActivationStore(path, h, model=model, verify=verify, shards=shards) for h in hooks}

    @property
    def hooks(self) -> list[str]:
        return list(self.views)

    def view(self, hook: str) -> ActivationStore:
        return self.views[hook]

    def subset(self, hooks: Sequence[str]) -> CacheHooks:
        """These hooks of the cache alone (the same stores)."""
        missing = [h for h in hooks if h not in self.views]
        if missing:
            raise CacheError(f"the cache holds no hook {missing[0]!r} here (it holds {', '.join(self.views)})")
        out = CacheHooks.__new__(CacheHooks)
        out.views = {h: self.views[h] for h in hooks}
        return out

    def __len__(self) -> int:
        return len(next(iter(self.views.values())))

    def batches_by_hook(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                        part: tuple[int, int] = (0, 1), buffer_rows: int = 1 << 18) -> Iterator[Rows]:
        """One epoch of every hook's batches; each hook's are those of its own store with the same
        seed (a dictionary trained beside others sees what it would see alone)."""
        return _cache_batches(self.views, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                              buffer_rows=buffer_rows, part=part)


class HookView:
    """One hook of a source that reads several, as a :class:`Source`: what a dictionary trained on
    that hook sees (its width, statistics and provenance; its batches read the whole source)."""

    def __init__(self, parent: StreamingSource, hook: str):
        self.parent, self.hook = parent, hook

    @property
    def d_in(self) -> int:
        return self.parent.widths[self.hook]

    @property
    def stats(self) -> NormStats:
        return self.parent.stats_by_hook[self.hook]

    def __len__(self) -> int:
        return len(self.parent)

    def provenance(self) -> Provenance:
        return self.parent.provenance(self.hook)

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False, part: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
        return (b[self.hook] for b in self.parent.batches_by_hook(batch_size, shuffle=shuffle, seed=seed,
                                                                  drop_last=drop_last, part=part))


class OneSource:
    """A single :class:`Source` seen as a source of several hooks holding one, under ``key``."""

    def __init__(self, source: Source, key: str):
        self.source, self.key = source, key

    @property
    def hooks(self) -> list[str]:
        return [self.key]

    def view(self, hook: str) -> Source:
        return self.source

    def __len__(self) -> int:
        return len(self.source)

    def batches_by_hook(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                        drop_last: bool = False, part: tuple[int, int] = (0, 1)) -> Iterator[Rows]:
        return ({self.key: x} for x in self.source.batches(batch_size, shuffle=shuffle, seed=seed,
                                                           drop_last=drop_last, part=part))


class Paired:
    """A transcoder's input and target sources as one source of two hooks, ``x`` and ``y``.

    Row i of both must be the same token: two hooks of one cache, of one stream, or two arrays of
    the same length. Two views of one stream are read from one forward pass per batch; any other
    pair is read side by side, each source shuffled with the same seed (which gives the same
    permutation of the same rows)."""

    def __init__(self, source: Source, target: Source):
        if len(source) != len(target):
            raise InputError(f"target: {len(target)} rows against the source's {len(source)}; a transcoder reads "
                             "and writes the same tokens")
        self.source, self.target = source, target

    @property
    def hooks(self) -> list[str]:
        return ["x", "y"]

    def view(self, hook: str) -> Source:
        return self.source if hook == "x" else self.target

    def __len__(self) -> int:
        return len(self.source)

    def batches_by_hook(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                        drop_last: bool = False, part: tuple[int, int] = (0, 1)) -> Iterator[Rows]:
        kw: dict[str, Any] = {"shuffle": shuffle, "seed": seed, "drop_last": drop_last, "part": part}
        a, b = self.source, self.target
        if isinstance(a, HookView) and isinstance(b, HookView) and a.parent is b.parent:
            return ({"x": r[a.hook], "y": r[b.hook]} for r in a.parent.batches_by_hook(batch_size, **kw))
        return ({"x": x, "y": y} for x, y in zip(a.batches(batch_size, **kw), b.batches(batch_size, **kw),
                                                strict=True))


class Joined:
    """Several hooks of one source side by side, as one :class:`Source` (rows [N, Σ D]): what a
    dictionary reading several hooks at once (a cross-layer transcoder's layers) reads. ``parts``: each
    hook's own source (its statistics and provenance)."""

    def __init__(self, source: HookSource, hooks: Sequence[str]):
        self.source, self.hooks = only(source, hooks), list(hooks)
        self.parts = [source.view(h) for h in self.hooks]

    @property
    def d_in(self) -> int:
        return sum(int(p.d_in) for p in self.parts)

    @property
    def stats(self) -> NormStats:
        """The statistics of the rows side by side (the mean norm of the joined rows: √Σ mean‖x_h‖² is
        not known from the parts; their root sum of squared mean norms stands in)."""
        parts = [p.stats for p in self.parts]
        return NormStats(parts[0].count, np.concatenate([s.mean for s in parts]),
                         float(np.sqrt(sum(s.mean_norm ** 2 for s in parts))), np.concatenate([s.var for s in parts]))

    def __len__(self) -> int:
        return len(self.parts[0])

    def provenance(self) -> Provenance:
        first = self.parts[0]
        describe = getattr(first, "provenance", None)
        record = describe() if describe is not None else Provenance()
        return record.replace(hook_in=",".join(self.hooks), hook_out=",".join(self.hooks))

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False, part: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
        wiring = Wiring(tuple(self.hooks), tuple(self.hooks))
        return (wiring.inputs(b) for b in self.source.batches_by_hook(batch_size, shuffle=shuffle, seed=seed,
                                                                      drop_last=drop_last, part=part))


def only(source: HookSource, hooks: Sequence[str]) -> HookSource:
    """``source`` reading just ``hooks`` where it can (a cache reads each hook's own files; a stream runs
    the model once for all of its hooks whatever is read)."""
    if isinstance(source, CacheHooks):
        return source.subset(hooks)
    return source


def _side(source: HookSource, hooks: tuple[str, ...]) -> Source:
    return source.view(hooks[0]) if len(hooks) == 1 else Joined(source, hooks)


def wiring_sources(source: HookSource, wiring: Wiring) -> tuple[Source, Source | None]:
    """The sources a dictionary of ``wiring`` trains on: what it reads and, for a transcoder, what it
    writes (None for an SAE); several hooks side by side (:class:`Joined`)."""
    return _side(source, wiring.reads), None if wiring.autoencoder else _side(source, wiring.writes)


def wiring_batches(source: HookSource, wiring: Wiring, batch_size: int = 4096
                   ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]]:
    """A dictionary's evaluation batches in order, unshuffled: its inputs (an SAE), or (inputs, targets)
    pairs (a transcoder), reading only its own hooks."""
    batches = only(source, wiring.hooks).batches_by_hook(batch_size, shuffle=False)
    if wiring.autoencoder:
        return (wiring.inputs(b) for b in batches)
    return ((wiring.inputs(b), wiring.targets(b)) for b in batches)


@runtime_checkable
class HookSource(Protocol):
    """What several dictionaries train from together: aligned batches of several hooks."""

    @property
    def hooks(self) -> list[str]: ...

    def view(self, hook: str) -> Source: ...

    def __len__(self) -> int: ...

    def batches_by_hook(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                        drop_last: bool = False, part: tuple[int, int] = (0, 1)) -> Iterator[Rows]: ...


def _heldout_shards(store: ActivationStore, n_tokens: int) -> tuple[list[int], list[int]]:
    """(training shards, held-out shards): the last shards holding at least ``n_tokens`` rows."""
    rows = [s["rows"] for s in store.manifest["shards"]]
    k, held = 0, 0
    while held < n_tokens and k < len(rows):
        k += 1
        held += rows[-k]
    if k >= len(rows):
        raise ConfigError(f"heldout_tokens: {store.path} has {len(rows)} shards; holding out {n_tokens} tokens "
                          "would leave none for training (harvest more, or with a smaller --shard-tokens)")
    n = len(rows)
    return list(range(n - k)), list(range(n - k, n))


def split_heldout(source: Source | HookSource, n_tokens: int) -> tuple[Any, Any]:
    """(train, held-out) views of ``source`` with at least ``n_tokens`` held out.

    A cache is split by whole shards (its last ones; for several hooks the same shards), an
    array by rows; a stream cannot be split: harvest a held-out cache instead.
    """
    if isinstance(source, ArraySource):
        if n_tokens >= len(source):
            raise ConfigError(f"heldout_tokens: expected fewer than the {len(source)} rows, found {n_tokens}")
        return ArraySource(source.data[:-n_tokens]), ArraySource(source.data[-n_tokens:])
    if isinstance(source, ActivationStore):
        train, held = _heldout_shards(source, n_tokens)
        path, hook = source.path, source.hook
        return (ActivationStore(path, hook, verify=source.verify, shards=train),
                ActivationStore(path, hook, verify=source.verify, shards=held))
    if isinstance(source, CacheHooks):
        first = next(iter(source.views.values()))
        train, held = _heldout_shards(first, n_tokens)
        return (CacheHooks(first.path, source.hooks, verify=first.verify, shards=train),
                CacheHooks(first.path, source.hooks, verify=first.verify, shards=held))
    raise ConfigError("heldout_tokens: a stream cannot be split; evaluate on a separately harvested cache")
