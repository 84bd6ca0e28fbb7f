"""Monitor features: one event per firing above a threshold, while text streams through.

Two ways in:

* ``Monitor.scan(docs)`` runs documents through the model (stopped after the hooked
  layer, as in harvesting) and yields an :class:`Event` per (token, watched feature)
  whose code exceeds the feature's threshold;
* ``with monitor.attached(callback):`` watches the model's own forward passes — a
  serving stack's ``generate`` — and calls ``callback(event)`` as tokens go by, the
  prompt first, then each generated token.

Positions count tokens of the document from 0 (BOS, when the model adds one, is not a
position and is never reported; nor are other special tokens or activations above the
SAE's training outlier limit). A document longer than ``context`` tokens is read in
consecutive windows of ``context`` tokens, each started afresh with BOS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from dictlens.data.hooks import replaced, resolve_hook
from dictlens.data.tokens import keep_mask
from dictlens.errors import ConfigError, InputError
from dictlens.use.splice import CallContext, Edit, check_edits, parse_feature_spec, parse_number

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE


@dataclass(frozen=True)
class Watch:
    """Report ``feature`` wherever its code exceeds ``threshold`` (raw activation units)."""

    feature: int
    threshold: float = 0.0


def parse_watch(spec: str) -> Watch:
    """``FEATURE`` or ``FEATURE:THRESHOLD``."""
    f, value = parse_feature_spec(spec, "feature")
    return Watch(f, 0.0 if value is None else parse_number(spec, "feature threshold", value))


@dataclass
class Event:
    """One firing: which document and token, which feature, how strongly, and the text
    around it (``left`` + ``token`` + ``right``)."""

    doc: Any
    position: int
    feature: int
    activation: float
    token: str
    left: str
    right: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Monitor:
    """Watches ``watches`` (features of ``sae`` at ``hook`` of ``lm``)."""

    def __init__(self, lm: LoadedModel, sae: SAE, hook: str, watches: Sequence[Watch], *, window: int = 8,
                 max_norm: float | None = None):
        if not watches:
            raise ConfigError("monitor: give at least one feature to watch")
        check_edits(sae, [Edit(w.feature, "zero") for w in watches])
        self.lm, self.sae, self.hook, self.window, self.max_norm = lm, sae, hook, window, max_norm
        self.point = resolve_hook(lm.model, hook)
        self.features = torch.tensor([w.feature for w in watches], device=sae.device)
        self.thresholds = torch.tensor([w.threshold for w in watches], device=sae.device)
        self._call = CallContext(lm)

    # ---- the firings in a batch of activations ---------------------------------------
    def firings(self, x_ND: torch.Tensor, keep_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, watch index, activation) of every firing among rows ``keep_N`` of ``x_ND``."""
        x = x_ND.float().to(self.sae.device)
        keep = keep_N.to(self.sae.device)
        if self.max_norm is not None:
            keep = keep & (x.norm(dim=1) <= self.max_norm)
        rows = keep.nonzero()[:, 0]
        if len(rows) == 0:
            return rows, rows, x.new_zeros(0)
        with self.sae.ranking("float32"):
            p, vals = self.sae.encode_sparse(x[rows])
        at, which, v = p.select(vals, self.features)
        above = v > self.thresholds[which]
        return rows[at[above]], which[above], v[above]

    def _event(self, doc: Any, ids: Sequence[int], pos: int, watch: int, value: float, base: int = 0) -> Event:
        """``ids``: the document's tokens (no BOS); ``pos`` indexes them; ``base``: the
        document position of ``ids[0]``."""
        def dec(part: Sequence[int]) -> str:
            return str(self.lm.tokenizer.decode(list(part), skip_special_tokens=True))
        i = pos - base
        lo, hi = max(0, i - self.window), i + 1 + self.window
        return Event(doc, pos, int(self.features[watch]), float(value), dec(ids[i:i + 1]),
                     dec(ids[lo:i]), dec(ids[i + 1:hi]))

    # ---- text in, events out ---------------------------------------------------------
    def _windows(self, docs: Iterable[Any], context: int) -> Iterator[tuple[Any, list[int], int]]:
        from dictlens.data.packing import resolve_prepend_bos

        bos = self.lm.tokenizer.bos_token_id if resolve_prepend_bos(self.lm.tokenizer, "auto") else None
        room = context - (bos is not None)
        if room < 1:
            raise ConfigError(f"monitor: context {context} leaves no room for text")
        for n, item in enumerate(docs):
            doc, text = item if isinstance(item, tuple) else (n, item)
            ids = self.lm.tokenizer(str(text), add_special_tokens=False).input_ids
            for start in range(0, len(ids), room):
                yield doc, ids[start:start + room], start

    @torch.inference_mode()
    def scan(self, docs: Iterable[str | tuple[Any, str]], *, context: int = 256, batch_size: int = 8,
             sort_windows: int = 64, callback: Callable[[Event], None] | None = None) -> Iterator[Event]:
        """Events of ``docs`` (texts, or (id, text) pairs), in document order.

        ``sort_windows`` windows are read ahead and batched by length, so that a batch of
        short documents is not padded to the longest window (1: no read-ahead, for
        interactive input)."""
        from dictlens.data.tap import Tap

        limit = self.lm.max_context
        if limit is not None and context > limit:
            raise ConfigError(f"monitor: context {context} exceeds {self.lm.name}'s {limit}")
        if batch_size < 1 or sort_windows < 1:
            raise ConfigError(f"monitor: batch_size and sort_windows must be at least 1 (found {batch_size}, "
                              f"{sort_windows})")
        tap = Tap(self.lm, [self.hook])
        pending: list[tuple[Any, list[int], int]] = []
        for item in self._windows(docs, context):
            pending.append(item)
            if len(pending) >= max(sort_windows, batch_size):
                yield from self._run_sorted(tap, pending, batch_size, callback)
                pending = []
        if pending:
            yield from self._run_sorted(tap, pending, batch_size, callback)

    def _run_sorted(self, tap: Any, windows: list[tuple[Any, list[int], int]], batch_size: int,
                    callback: Callable[[Event], None] | None) -> Iterator[Event]:
        """The windows' events in window order, from batches of windows of similar length."""
        by_length = sorted(range(len(windows)), key=lambda i: len(windows[i][1]))
        found: dict[int, list[Event]] = {}
        for s in range(0, len(by_length), batch_size):
            part = by_length[s:s + batch_size]
            for i, events in zip(part, self._run(tap, [windows[i] for i in part]), strict=True):
                found[i] = events
        for i in range(len(windows)):
            for event in found[i]:
                if callback is not None:
                    callback(event)
                yield event

    def _run(self, tap: Any, batch: list[tuple[Any, list[int], int]]) -> list[list[Event]]:
        """Each window's events (by position, then watch order)."""
        from dictlens.data.packing import resolve_prepend_bos

        bos = self.lm.tokenizer.bos_token_id
        pad = self.lm.tokenizer.pad_token_id if self.lm.tokenizer.pad_token_id is not None else 0
        lead = 1 if bos is not None and resolve_prepend_bos(self.lm.tokenizer, "auto") else 0
        T = lead + max(len(ids) for _, ids, _ in batch)
        ids_BT = torch.full((len(batch), T), pad, dtype=torch.long)
        keep = torch.zeros(len(batch), T, dtype=torch.bool)
        for b, (_, ids, _) in enumerate(batch):
            if lead and bos is not None:
                ids_BT[b, 0] = bos
            ids_BT[b, lead:lead + len(ids)] = torch.tensor(ids, dtype=torch.long)
            keep[b, lead:lead + len(ids)] = True      # right padding: causal, so it changes nothing before it
        keep &= keep_mask(ids_BT, self._call.special)
        x = tap(ids_BT)[self.hook]
        rows, which, vals = self.firings(x.reshape(-1, x.shape[-1]), keep.reshape(-1))
        order = torch.argsort(rows * len(self.features) + which, stable=True)
        out: list[list[Event]] = [[] for _ in batch]
        for r, w, v in zip(rows[order].tolist(), which[order].tolist(), vals[order].tolist(), strict=True):
            b, t = divmod(r, T)
            doc, ids, base = batch[b]
            out[b].append(self._event(doc, ids, base + t - lead, w, v, base))
        return out

    # ---- inside a serving stack -------------------------------------------------------
    @contextmanager
    def attached(self, callback: Callable[[Event], None]) -> Iterator[Monitor]:
        """Within the block, every forward pass of the model reports its firings to
        ``callback`` (``doc`` is the batch row; ``position`` the token's position in the
        model's sequence, BOS or chat-template tokens included). Prompt tokens are reported
        when the prompt is read, each generated token when it is fed back (so not the very
        last one ``generate`` samples). A call that continues a cache filled before the
        block shows text from where the block began. Beam search, which reorders the cache
        rows, is not followed. Nothing about the model's outputs changes."""
        history: dict[int, tuple[int, list[int]]] = {}   # row -> (position of its first token seen, tokens)

        def watch(x: torch.Tensor) -> torch.Tensor:
            B, T, D = x.shape
            ids = self._call.ids
            if ids is None or ids.shape != (B, T):
                raise InputError("monitor: the model was called without input_ids to report tokens by")
            offset = self._call.offset
            if offset == 0:
                history.clear()
            for b in range(B):
                history.setdefault(b, (offset, []))[1].extend(ids[b].tolist())
            with torch.no_grad():
                rows, which, vals = self.firings(x.detach().reshape(-1, D), self._call.keep_rows(B, T, x.device))
            for r, w, v in zip(rows.tolist(), which.tolist(), vals.tolist(), strict=True):
                b, t = divmod(r, T)
                base, seen = history[b]
                callback(self._event(b, seen, offset + t, w, v, base))
            return x

        with ExitStack() as stack:
            self._call.attach(stack)
            stack.enter_context(replaced(self.lm.model, self.point, watch))
            yield self
