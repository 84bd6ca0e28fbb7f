"""Explanations, scores and human labels: tables of the feature database.

They live in the analysis's own ``features.db`` (one file to copy, one place the report and
the app read), beside the tables that ``dictlens analyze`` writes:

- ``explanations(feature, explainer, text, pattern, model, prompt, settings, created)``:
  one per feature and explainer (``tokens``, or ``llm:MODEL``); ``pattern`` is the
  ``tokens`` explainer's structure (JSON), ``settings`` the prompt's hash, temperature and
  seed (JSON);
- ``scores(feature, explainer, judge, scorer, control, value, low, high, n, details, created)``:
  one per feature, explanation, judge, scorer and control (``''``: the feature's own
  explanation; ``shuffled``: another feature's), with its 95% bootstrap interval;
- ``labels(feature, rater, label, rating, contexts, created)``: a rater's free-text label,
  1–5 rating, and which of the shown contexts fit (JSON).

The database is switched to WAL mode when these tables are first written, so that several
raters (the app's threads, or several processes) write while others read. ``dictlens
analyze`` carries these tables over when it rewrites the database of the same SAE.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dictlens.analysis.db import DB_FILE
from dictlens.errors import AnalysisError, InputError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS interpret_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS explanations(feature INTEGER NOT NULL, explainer TEXT NOT NULL, text TEXT NOT NULL,
    pattern TEXT, model TEXT NOT NULL, prompt TEXT NOT NULL, settings TEXT NOT NULL, created TEXT NOT NULL,
    PRIMARY KEY(feature, explainer));
CREATE TABLE IF NOT EXISTS scores(feature INTEGER NOT NULL, explainer TEXT NOT NULL, judge TEXT NOT NULL,
    scorer TEXT NOT NULL, control TEXT NOT NULL, value REAL, low REAL, high REAL, n INTEGER NOT NULL,
    details TEXT NOT NULL, created TEXT NOT NULL, PRIMARY KEY(feature, explainer, judge, scorer, control));
CREATE TABLE IF NOT EXISTS labels(feature INTEGER NOT NULL, rater TEXT NOT NULL, label TEXT NOT NULL,
    rating INTEGER, contexts TEXT NOT NULL, created TEXT NOT NULL, PRIMARY KEY(feature, rater));
"""
TABLES = ("interpret_meta", "explanations", "scores", "labels")


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class Explanation:
    feature: int
    explainer: str
    text: str
    pattern: dict[str, Any] | None
    model: str
    prompt: str
    settings: dict[str, Any]
    created: str = ""


@dataclass(frozen=True)
class Score:
    feature: int
    explainer: str
    judge: str
    scorer: str
    control: str
    value: float | None
    low: float | None
    high: float | None
    n: int
    details: dict[str, Any]
    created: str = ""


@dataclass(frozen=True)
class Label:
    feature: int
    rater: str
    label: str
    rating: int | None
    contexts: dict[str, bool]
    created: str = ""


class Interpretations:
    """Read and write the interpretation tables of an analysis directory's ``features.db``.

    ``readonly=True`` never creates or writes anything (the report, `dictlens search`): a
    database without the tables reads as empty."""

    def __init__(self, directory: str | Path, *, readonly: bool = False):
        self.path = Path(directory) / DB_FILE
        if not self.path.is_file():
            raise AnalysisError(f"{directory}: no {DB_FILE}; run `dictlens analyze` first")
        self.readonly = readonly
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self.con = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
        self.con.execute("PRAGMA busy_timeout = 30000")
        tables = {t for (t,) in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.present = set(TABLES) <= tables
        if not readonly and not self.present:
            self.con.execute("PRAGMA journal_mode = WAL")
            with self.con:
                self.con.executescript(SCHEMA)
                self.con.execute("INSERT OR REPLACE INTO interpret_meta VALUES ('schema', ?)",
                                 (json.dumps(SCHEMA_VERSION),))
            self.present = True
        if self.present:
            row = self.con.execute("SELECT value FROM interpret_meta WHERE key = 'schema'").fetchone()
            version = json.loads(row[0]) if row else None
            if version != SCHEMA_VERSION:
                raise AnalysisError(f"{self.path}: interpretation tables of schema {version}, this dictlens reads "
                                    f"{SCHEMA_VERSION}; export the labels with an older dictlens, or re-analyse")
        n = self.con.execute("SELECT value FROM meta WHERE key = 'n_features'").fetchone()
        self.n_features = int(json.loads(n[0])) if n else 0

    def close(self) -> None:
        """Close; a writer first folds the write-ahead log into ``features.db``, so that the
        file alone holds everything (to copy or send)."""
        if not self.readonly and self.present:
            with contextlib.suppress(sqlite3.OperationalError):   # busy: folded in by a later writer
                self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.con.close()

    def __enter__(self) -> Interpretations:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _rows(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.con.execute(query, tuple(args)).fetchall() if self.present else []

    def _check(self, feature: int) -> int:
        if not 0 <= int(feature) < self.n_features:
            raise InputError(f"feature {feature} is out of range: this SAE has {self.n_features:,} features")
        return int(feature)

    # explanations
    def put_explanations(self, items: Iterable[Explanation]) -> int:
        rows = [(self._check(e.feature), e.explainer, e.text, None if e.pattern is None else json.dumps(e.pattern),
                 e.model, e.prompt, json.dumps(e.settings, sort_keys=True), e.created or _now()) for e in items]
        with self.con:
            self.con.executemany("INSERT OR REPLACE INTO explanations VALUES (?,?,?,?,?,?,?,?)", rows)
        return len(rows)

    def explanations(self, explainer: str | None = None, features: Sequence[int] | None = None
                     ) -> list[Explanation]:
        q, args = "SELECT * FROM explanations", []
        if explainer is not None:
            q, args = q + " WHERE explainer = ?", [explainer]
        out = [Explanation(f, ex, t, None if p is None else json.loads(p), m, pr, json.loads(s), c)
               for f, ex, t, p, m, pr, s, c in self._rows(q + " ORDER BY feature, explainer", args)]
        if features is not None:
            keep = set(features)
            out = [e for e in out if e.feature in keep]
        return out

    def explainers(self) -> list[str]:
        return [e for (e,) in self._rows("SELECT DISTINCT explainer FROM explanations ORDER BY explainer")]

    def search(self, text: str, limit: int = 20) -> list[Explanation]:
        """Explanations whose text contains ``text`` (case-insensitive), by feature."""
        like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._rows("SELECT * FROM explanations WHERE text LIKE ? ESCAPE '\\' ORDER BY feature, explainer "
                          "LIMIT ?", [like, int(limit)])
        return [Explanation(f, ex, t, None if p is None else json.loads(p), m, pr, json.loads(s), c)
                for f, ex, t, p, m, pr, s, c in rows]

    # scores
    def put_scores(self, items: Iterable[Score]) -> int:
        rows = [(self._check(s.feature), s.explainer, s.judge, s.scorer, s.control, s.value, s.low, s.high, s.n,
                 json.dumps(s.details, sort_keys=True), s.created or _now()) for s in items]
        with self.con:
            self.con.executemany("INSERT OR REPLACE INTO scores VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        return len(rows)

    def scores(self, explainer: str | None = None, judge: str | None = None) -> list[Score]:
        q, where, args = "SELECT * FROM scores", [], []
        for col, v in (("explainer", explainer), ("judge", judge)):
            if v is not None:
                where.append(f"{col} = ?")
                args.append(v)
        if where:
            q += " WHERE " + " AND ".join(where)
        return [Score(f, ex, j, sc, ctl, v, lo, hi, n, json.loads(d), c)
                for f, ex, j, sc, ctl, v, lo, hi, n, d, c in self._rows(q + " ORDER BY feature, scorer", args)]

    # labels
    def put_labels(self, items: Iterable[Label]) -> int:
        rows = []
        for lab in items:
            if not lab.rater.strip():
                raise InputError("a label needs a rater's name")
            if lab.rating is not None and not 1 <= int(lab.rating) <= 5:
                raise InputError(f"rating {lab.rating} of feature {lab.feature}: ratings go from 1 to 5")
            rows.append((self._check(lab.feature), lab.rater.strip(), lab.label, lab.rating,
                         json.dumps(lab.contexts, sort_keys=True), lab.created or _now()))
        with self.con:
            self.con.executemany("INSERT OR REPLACE INTO labels VALUES (?,?,?,?,?,?)", rows)
        return len(rows)

    def labels(self, rater: str | None = None) -> list[Label]:
        q, args = "SELECT * FROM labels", []
        if rater is not None:
            q, args = q + " WHERE rater = ?", [rater]
        return [Label(f, r, t, rt, json.loads(cx), c)
                for f, r, t, rt, cx, c in self._rows(q + " ORDER BY feature, rater", args)]
