"""The feature database: one SQLite file that the report and the web app read.

Tables:

- ``meta(key, value)``: JSON values — the SAE, model, hook, text, token counts, the
  histogram bin edges, the window sizes;
- ``features(id, count, density, max, mean, hist, quantiles, logit_top, logit_bottom,
  neighbours, coact)``: per-feature statistics; list-valued columns hold JSON;
- ``examples(feature, kind, grp, rank, position, value)``: example positions into the
  code store (``kind`` is ``top``, ``quantile`` (with its group) or ``random``, a
  context where the feature does not fire); the tokens and per-token activations of an
  example are read from the code store (:mod:`dictlens.analysis.codes`);
- ``vocab(id, text)``: each token id decoded on its own, for display.

The file is written under a temporary name and renamed into place. Tables that other
steps add to the database (explanations, scores and labels: :mod:`dictlens.interpret.store`)
are carried over into the new file when it is the same SAE's (same ``sae`` and
``n_features``), so that re-analysing loses no labels.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dictlens.analysis.codes import CodeStore
from dictlens.config import field
from dictlens.errors import AnalysisError, ConfigError, InputError

DB_FILE = "features.db"
CODES_DIR = "codes"

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features(id INTEGER PRIMARY KEY, count INTEGER NOT NULL, density REAL NOT NULL, max REAL NOT NULL,
    mean REAL NOT NULL, hist TEXT NOT NULL, quantiles TEXT NOT NULL, logit_top TEXT NOT NULL,
    logit_bottom TEXT NOT NULL, neighbours TEXT NOT NULL, coact TEXT NOT NULL);
CREATE TABLE examples(feature INTEGER NOT NULL, kind TEXT NOT NULL, grp INTEGER NOT NULL, rank INTEGER NOT NULL,
    position INTEGER NOT NULL, value REAL NOT NULL);
CREATE INDEX examples_feature ON examples(feature, kind, grp, rank);
CREATE TABLE vocab(id INTEGER PRIMARY KEY, text TEXT NOT NULL);
"""


@dataclass(kw_only=True)
class AnalysisDir:
    """Where an analysis is: RUN itself, RUN/analysis, or --analysis."""

    run: str = field(positional=True, help="run directory (its analysis/ is read) or analysis directory")
    analysis: str | None = field(None, help="analysis directory (default: RUN or RUN/analysis)")

    def path(self) -> Path:
        for cand in ([Path(self.analysis)] if self.analysis else [Path(self.run), Path(self.run) / "analysis"]):
            if (cand / DB_FILE).is_file():
                return cand
        raise AnalysisError(f"no feature database in {self.analysis or self.run}: run `dictlens analyze "
                            f"{self.run}` first")


def feature_ranges(spec: str | None) -> list[int] | None:
    """'0-99,120,7' → ids (None: no selection)."""
    if not spec:
        return None
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
        except ValueError:
            raise ConfigError(f"features: expected numbers and ranges like 0-99,120, found {part!r}") from None
    return out


def write_db(path: Path, meta: dict[str, Any], features: Iterable[tuple[Any, ...]], examples: Iterable[tuple[Any, ...]],
             vocab: Sequence[str]) -> Path:
    """Write the database to ``path`` atomically. ``features`` rows follow the column order
    of the features table (list columns already JSON); ``examples`` rows that of examples."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    con = sqlite3.connect(tmp)
    try:
        con.executescript(SCHEMA)
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        con.executemany("INSERT INTO features VALUES (?,?,?,?,?,?,?,?,?,?,?)", features)
        con.executemany("INSERT INTO examples VALUES (?,?,?,?,?,?)", examples)
        con.executemany("INSERT INTO vocab VALUES (?, ?)", enumerate(vocab))
        con.commit()
        if path.is_file():
            _carry_over(path, con, meta)
    finally:
        con.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    for suffix in ("-wal", "-shm"):   # a WAL-mode predecessor's files must not meet the new database
        Path(str(path) + suffix).unlink(missing_ok=True)
    os.replace(tmp, path)
    return path


def _carry_over(old: Path, con: sqlite3.Connection, meta: dict[str, Any]) -> None:
    """Copy into ``con`` the tables of ``old`` that :data:`SCHEMA` does not define, when
    ``old`` describes the same SAE; checkpoint ``old``'s write-ahead log first."""
    ours = {"meta", "features", "examples", "vocab"}
    try:
        prev = sqlite3.connect(old)
        prev.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        prev.execute("PRAGMA journal_mode = DELETE")
        same = {k: json.loads(v) for k, v in prev.execute("SELECT key, value FROM meta WHERE key IN "
                                                           "('sae', 'n_features')")}
        tables = [(n, sql) for n, sql in prev.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'")
                  if n not in ours and not n.startswith("sqlite_")]
        prev.close()
    except sqlite3.DatabaseError:
        return                              # not a database we can read: nothing to keep
    if not tables or same != {"sae": meta.get("sae"), "n_features": meta.get("n_features")}:
        return
    con.execute("ATTACH DATABASE ? AS old", (str(old),))
    try:
        for name, sql in tables:
            con.execute(sql)
            con.execute(f'INSERT INTO "{name}" SELECT * FROM old."{name}"')
        con.commit()
    finally:
        con.execute("DETACH DATABASE old")


@dataclass
class Example:
    """One example context of a feature: token ids and texts, the feature's activation at
    each, and where the example's own position is in the window."""

    kind: str
    group: int
    position: int
    value: float
    tokens: list[int]
    texts: list[str]
    acts: list[float]
    center: int


class FeatureDB:
    """Read access to an analysis directory (``features.db`` + ``codes/``)."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory)
        db = self.path / DB_FILE
        if not db.is_file():
            raise AnalysisError(f"{self.path}: no {DB_FILE}; run `dictlens analyze RUN --out {self.path}` first")
        self._uri = f"file:{db}?mode=ro"
        self._local = threading.local()  # one read-only connection per thread (the app's workers)
        self._all: list[sqlite3.Connection] = []
        try:
            self.meta = {k: json.loads(v) for k, v in self.con.execute("SELECT key, value FROM meta")}
        except sqlite3.DatabaseError as e:
            raise AnalysisError(f"{db}: not a readable feature database ({e}); re-run `dictlens analyze`") from None
        self.codes = CodeStore(self.path / CODES_DIR)
        self.vocab = [t for (t,) in self.con.execute("SELECT text FROM vocab ORDER BY id")]
        self.n_features = int(self.meta["n_features"])

    @functools.cached_property
    def densities(self) -> np.ndarray:
        """[F] firing density of every feature."""
        return np.array([d for (d,) in self.con.execute("SELECT density FROM features ORDER BY id")], np.float64)

    @property
    def con(self) -> sqlite3.Connection:
        """This thread's connection to the database (read-only)."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self._uri, uri=True, check_same_thread=False)
            self._local.con = con
            self._all.append(con)
        return con

    def close(self) -> None:
        for con in self._all:
            con.close()
        self._all.clear()
        self._local = threading.local()

    def token_text(self, token: int) -> str:
        return self.vocab[token] if 0 <= token < len(self.vocab) else f"<{token}>"

    def check_feature(self, feature: int) -> int:
        if not 0 <= int(feature) < self.n_features:
            raise InputError(f"feature {feature} is out of range: this SAE has {self.n_features:,} features "
                             f"(0 to {self.n_features - 1})")
        return int(feature)

    def feature(self, feature: int) -> dict[str, Any]:
        """Every statistic of one feature, JSON columns decoded, token ids given their text."""
        f = self.check_feature(feature)
        row = self.con.execute("SELECT * FROM features WHERE id = ?", (f,)).fetchone()
        cols = [d[0] for d in self.con.execute("SELECT * FROM features LIMIT 0").description]
        out = dict(zip(cols, row, strict=True))
        for c in ("hist", "quantiles", "logit_top", "logit_bottom", "neighbours", "coact"):
            out[c] = json.loads(out[c])
        for c in ("logit_top", "logit_bottom"):
            out[c] = [{"token": self.token_text(t), "logit": v} for t, v in out[c]]
        return out

    def features(self, order: str = "id", limit: int = 100, offset: int = 0,
                 alive_only: bool = False) -> list[dict[str, Any]]:
        """Summary rows (id, count, density, max, mean, top logit tokens) in ``order``
        (id, density, max, or -density, -max for descending)."""
        column = order.lstrip("-")
        if column not in ("id", "density", "max", "count", "mean"):
            raise InputError(f"order must be id, density, max, count or mean (optionally with -), not {order!r}")
        desc = " DESC" if order.startswith("-") else ""
        where = " WHERE count > 0" if alive_only else ""
        rows = self.con.execute(f"SELECT id, count, density, max, mean, logit_top FROM features{where} "
                                f"ORDER BY {column}{desc}, id LIMIT ? OFFSET ?", (int(limit), int(offset)))
        return [{"id": i, "count": c, "density": d, "max": m, "mean": mu,
                 "logit_top": [self.token_text(t) for t, _ in json.loads(lt)[:5]]}
                for i, c, d, m, mu, lt in rows]

    def examples(self, feature: int, kind: str | None = None, left: int | None = None,
                 right: int | None = None) -> list[Example]:
        """The stored examples of ``feature`` (of one ``kind``, or all), with their windows."""
        f = self.check_feature(feature)
        left = int(self.meta.get("window_left", 24)) if left is None else left
        right = int(self.meta.get("window_right", 8)) if right is None else right
        q = "SELECT kind, grp, rank, position, value FROM examples WHERE feature = ?"
        args: tuple[Any, ...] = (f,)
        if kind is not None:
            q += " AND kind = ?"
            args = (f, kind)
        out = []
        for k, grp, _, pos, val in self.con.execute(q + " ORDER BY kind, grp, rank", args):
            toks, acts, center = self.codes.window(f, pos, left, right)
            out.append(Example(k, grp, pos, val, toks.tolist(), [self.token_text(int(t)) for t in toks],
                               acts.tolist(), center))
        return out

    def example_positions(self, feature: int, kind: str) -> list[int]:
        """The positions of ``feature``'s stored examples of one ``kind``, in rank order (no windows read)."""
        f = self.check_feature(feature)
        return [p for (p,) in self.con.execute("SELECT position FROM examples WHERE feature = ? AND kind = ? "
                                               "ORDER BY grp, rank", (f, kind))]

    def count(self, alive_only: bool = False) -> int:
        where = " WHERE count > 0" if alive_only else ""
        return int(self.con.execute(f"SELECT COUNT(*) FROM features{where}").fetchone()[0])

    def token_ids(self, text: str) -> list[int]:
        """Vocabulary ids whose text is ``text`` (exactly, or with one leading space)."""
        return [i for (i,) in self.con.execute("SELECT id FROM vocab WHERE text = ? OR text = ?",
                                               (text, " " + text.lstrip()))]

    def features_for_token(self, text: str, n: int = 20) -> list[dict[str, Any]]:
        """The features most active on a token across the analysed text: for each feature
        that fires where the token occurs, its mean activation over those occurrences
        (zeros included) and how often it fires there; strongest first."""
        ids = self.token_ids(text)
        if not ids:
            raise InputError(f"no token of the vocabulary reads {text!r}")
        tokens = np.asarray(self.codes.tokens).reshape(-1)
        where = np.flatnonzero(np.isin(tokens, ids) & self.codes.kept.reshape(-1))
        if len(where) == 0:
            return []
        starts, stops = self.codes.indptr[where], self.codes.indptr[where + 1]
        feats = np.concatenate([self.codes.feature[a:b] for a, b in zip(starts, stops, strict=True)])
        vals = np.concatenate([self.codes.value[a:b] for a, b in zip(starts, stops, strict=True)])
        total = np.bincount(feats, weights=vals, minlength=self.n_features) / len(where)
        fires = np.bincount(feats, minlength=self.n_features) / len(where)
        best = np.argsort(-total, kind="stable")[:n]
        return [{"id": int(f), "mean": float(total[f]), "fires": float(fires[f]), "occurrences": len(where)}
                for f in best if total[f] > 0]
