"""Activation batches for the trainer, from a disk cache or streamed from a model.

Both sources give the same thing: ``source.batches(batch_size, shuffle=..., seed=...)``
yields float32 tensors of shape [batch_size, D], ``source.stats`` gives the
normalisation statistics, and ``source.provenance()`` describes the data (model, hook,
tokenizer, context, outlier limit) for the record of a dictionary trained on it. The
trainer needs nothing else, so it also accepts a plain tensor or numpy array wrapped in
:class:`ArraySource`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from dictlens.data.activations import FilterState, Moments, NormStats, TokenFilter, iter_chunks, outlier_limit
from dictlens.data.cache import from_storage, read_manifest, verify_file
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
                drop_last: bool = False) -> Iterator[torch.Tensor]: ...


def _shuffled_batches(blocks: Iterable[torch.Tensor], batch_size: int, *, shuffle: bool,
                      generator: torch.Generator, buffer_rows: int, drop_last: bool
                      ) -> Iterator[torch.Tensor]:
    """Re-batch a stream of row blocks, shuffling within a buffer of ``buffer_rows`` rows."""
    pending: list[torch.Tensor] = []
    n_pending = 0

    def drain(final: bool) -> Iterator[torch.Tensor]:
        nonlocal pending, n_pending
        rows = torch.cat(pending) if len(pending) > 1 else pending[0]
        if shuffle:
            rows = rows[torch.randperm(len(rows), generator=generator)]
        n_full = len(rows) // batch_size * batch_size
        for i in range(0, n_full, batch_size):
            yield rows[i:i + batch_size]
        rest = rows[n_full:]
        pending, n_pending = ([rest], len(rest)) if len(rest) else ([], 0)
        if final and len(rest) and not drop_last:
            pending, n_pending = [], 0
            yield rest

    for block in blocks:
        pending.append(block)
        n_pending += len(block)
        if n_pending >= buffer_rows:
            yield from drain(final=False)
    if n_pending:
        yield from drain(final=True)


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

    def _load(self, index: int, key: str) -> np.ndarray:
        entry = self.manifest["shards"][index]["files"][key]
        if self.verify and (index, key) not in self._verified:
            verify_file(self.path, entry)
            self._verified.add((index, key))
        try:
            arr: np.ndarray = np.load(self.path / entry["path"], mmap_mode="r", allow_pickle=False)
            return arr
        except ValueError as e:
            raise CacheError(f"shard {self.path / entry['path']} cannot be read: {e}") from None

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
                buffer_rows: int = 1 << 18) -> Iterator[torch.Tensor]:
        """One epoch of float32 [batch_size, D] batches; every row appears exactly once.

        Shuffling visits the shards in a random order and permutes rows within a buffer
        of ``buffer_rows`` rows (several shards), so memory stays bounded.
        """
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.n_shards, generator=g).tolist() if shuffle else range(self.n_shards)
        blocks = (self.shard(i) for i in order)
        return _shuffled_batches(blocks, batch_size, shuffle=shuffle, generator=g,
                                 buffer_rows=buffer_rows if shuffle else batch_size, drop_last=drop_last)


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
                drop_last: bool = False) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return _shuffled_batches([self.data], batch_size, shuffle=shuffle, generator=g,
                                 buffer_rows=len(self.data), drop_last=drop_last)


class StreamingSource:
    """Activations of one hook streamed from the model over a text, without touching disk.

    Rows are filtered exactly as :func:`dictlens.harvest` filters them and shuffled
    within a buffer of ``buffer_rows`` rows. ``tokens`` bounds one epoch.
    """

    def __init__(self, lm: LoadedModel, hook: str, text: str, *, tokens: int, context: int = 128,
                 text_field: str = "text", batch_contexts: int = 16, keep_special: bool = False,
                 prepend_bos: str = "auto", outlier_factor: float | None = None,
                 drop_nonfinite: bool = False, buffer_rows: int = 1 << 16):
        self.lm, self.hook, self.text, self.text_field = lm, hook, text, text_field
        self.tokens, self.context, self.batch_contexts = tokens, context, batch_contexts
        self.prepend_bos = resolve_prepend_bos(lm.tokenizer, prepend_bos)
        self.filter = TokenFilter(set() if keep_special else special_token_ids(lm.tokenizer),
                                  keep_special, drop_nonfinite)
        self.outlier_factor = outlier_factor
        self.buffer_rows = buffer_rows
        self.tap = Tap(lm, [hook])
        self._stats: NormStats | None = None
        self._width: int | None = None
        self._median_norm: float | None = None  # fixed by the stream's first batch (outlier rule)

    @property
    def model(self) -> str:
        return self.lm.name

    @property
    def d_in(self) -> int:
        """Width of the hook's activations (read from a two-token probe)."""
        if self._width is None:
            self._width = int(self.tap(torch.zeros(1, 2, dtype=torch.long))[self.hook].shape[-1])
        return self._width

    def __len__(self) -> int:
        return self.tokens

    def _rows(self) -> Iterator[torch.Tensor]:
        contexts = pack_contexts(iter_documents(self.text, self.text_field), self.lm.tokenizer,
                                 self.context, prepend_bos=self.prepend_bos)
        state = FilterState([self.hook], self.outlier_factor)
        left = self.tokens
        for chunk in iter_chunks(self.tap, contexts, batch_size=self.batch_contexts,
                                 token_filter=self.filter, state=state):
            self._median_norm = state.median_norm.get(self.hook, self._median_norm)
            rows = chunk.acts[self.hook][:left]
            left -= len(rows)
            yield rows
            if left <= 0:
                return

    def provenance(self) -> Provenance:
        """The model, hook and text streamed; the outlier limit once the stream has begun."""
        limit = (self.outlier_factor * self._median_norm
                 if self.outlier_factor and self._median_norm is not None else None)
        return Provenance(model=self.model, tokenizer=tokenizer_fingerprint(self.lm.tokenizer), hook_in=self.hook,
                          hook_out=self.hook, context=self.context, outlier_limit=limit, text=self.text)

    @property
    def stats(self) -> NormStats:
        """Statistics estimated from the first ``buffer_rows`` rows of the stream."""
        if self._stats is None:
            m = Moments()
            for rows in self._rows():
                m.add(rows)
                if m.count >= self.buffer_rows:
                    break
            self._stats = NormStats.from_moments(m)
        return self._stats

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return _shuffled_batches(self._rows(), batch_size, shuffle=shuffle, generator=g,
                                 buffer_rows=self.buffer_rows if shuffle else batch_size,
                                 drop_last=drop_last)


def split_heldout(source: Source, n_tokens: int) -> tuple[Source, Source]:
    """(train, held-out) views of ``source`` with at least ``n_tokens`` held out.

    A cache is split by whole shards (its last ones), an array by rows; a stream cannot be
    split: harvest a held-out cache instead.
    """
    if isinstance(source, ArraySource):
        if n_tokens >= len(source):
            raise ConfigError(f"heldout_tokens: expected fewer than the {len(source)} rows, found {n_tokens}")
        return ArraySource(source.data[:-n_tokens]), ArraySource(source.data[-n_tokens:])
    if isinstance(source, ActivationStore):
        rows = [s["rows"] for s in source.manifest["shards"]]
        k, held = 0, 0
        while held < n_tokens and k < len(rows):
            k += 1
            held += rows[-k]
        if k >= len(rows):
            raise ConfigError(f"heldout_tokens: {source.path} has {len(rows)} shards; holding out {n_tokens} tokens "
                              "would leave none for training (harvest more, or with a smaller --shard-tokens)")
        n, path, hook = len(rows), source.path, source.hook
        return (ActivationStore(path, hook, verify=source.verify, shards=list(range(n - k))),
                ActivationStore(path, hook, verify=source.verify, shards=list(range(n - k, n))))
    raise ConfigError("heldout_tokens: a stream cannot be split; evaluate on a separately harvested cache")
