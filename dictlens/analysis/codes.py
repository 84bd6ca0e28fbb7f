"""The code store: every analysed token and its SAE codes, on disk.

One analysis pass writes, for C contexts of T positions (position g = c·T + t):

- ``tokens.bin`` int32 [C, T] token ids, ``kept.bin`` uint8 [C, T] (1 where the token was
  analysed: not BOS, padding or another special token);
- ``indptr.bin`` int64 [C·T + 1], ``feature.bin`` int32 [nnz], ``value.bin`` float32 [nnz]:
  the active features of position g are ``feature[indptr[g]:indptr[g + 1]]`` (CSR).

The files are raw arrays, memory-mapped for reading; their lengths are recorded in
``codes.json``, so a truncated file is named instead of read. The writer appends to files
in a temporary directory that :meth:`CodeWriter.commit` renames into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dictlens.errors import AnalysisError
from dictlens.io import atomic_write_json, read_json

FILES = {"tokens": np.int32, "kept": np.uint8, "indptr": np.int64, "feature": np.int32, "value": np.float32}
META = "codes.json"


class CodeWriter:
    """Appends contexts and their codes; ``commit()`` publishes ``directory`` atomically."""

    def __init__(self, directory: str | Path, context: int, n_features: int):
        self.final = Path(directory)
        self.tmp = self.final.with_name(self.final.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.context, self.n_features = context, n_features
        self.files = {name: open(self.tmp / f"{name}.bin", "wb") for name in FILES}  # noqa: SIM115
        self.n_contexts = 0
        self.nnz = 0
        self.files["indptr"].write(np.zeros(1, np.int64).tobytes())

    def append(self, tokens: np.ndarray, kept: np.ndarray, counts: np.ndarray, features: np.ndarray,
               values: np.ndarray) -> None:
        """``tokens``/``kept`` [B, T]; ``counts`` [B·T] active features per position;
        ``features``/``values`` [nnz] in position order."""
        B, T = tokens.shape
        if self.context != T or counts.shape != (B * T,) or len(features) != int(counts.sum()):
            raise AnalysisError("CodeWriter.append: the ids, keep mask and codes of a batch have different shapes")
        self.files["tokens"].write(np.ascontiguousarray(tokens, np.int32).tobytes())
        self.files["kept"].write(np.ascontiguousarray(kept, np.uint8).tobytes())
        self.files["indptr"].write((self.nnz + np.cumsum(counts, dtype=np.int64)).tobytes())
        self.files["feature"].write(np.ascontiguousarray(features, np.int32).tobytes())
        self.files["value"].write(np.ascontiguousarray(values, np.float32).tobytes())
        self.n_contexts += B
        self.nnz += int(counts.sum())

    def commit(self, extra: dict[str, Any] | None = None) -> Path:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        atomic_write_json(self.tmp / META, {"contexts": self.n_contexts, "context": self.context,
                                            "nnz": self.nnz, "n_features": self.n_features, **(extra or {})})
        if self.final.exists():
            old = self.final.with_name(self.final.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old)
        else:
            os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class CodeStore:
    """Read side: memory-mapped arrays and the activations of one feature over a window."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise AnalysisError(f"{self.path}: no {META} (not a finished analysis code store)")
        self.meta = read_json(meta_path)
        C, T, nnz = int(self.meta["contexts"]), int(self.meta["context"]), int(self.meta["nnz"])
        self.n_contexts, self.context, self.n_features = C, T, int(self.meta["n_features"])
        want = {"tokens": C * T, "kept": C * T, "indptr": C * T + 1, "feature": nnz, "value": nnz}
        arrays = {}
        for name, dtype in FILES.items():
            f = self.path / f"{name}.bin"
            size = f.stat().st_size if f.is_file() else -1
            expected = want[name] * np.dtype(dtype).itemsize
            if size != expected:
                found = "missing" if size < 0 else f"{size:,} bytes"
                raise AnalysisError(f"{f}: expected {expected:,} bytes ({want[name]:,} × {np.dtype(dtype).name}), "
                                 f"found {found}: the analysis was interrupted or the file is damaged; re-run "
                                 f"`dictlens analyze`")
            arrays[name] = (np.memmap(f, dtype=dtype, mode="r", shape=(want[name],)) if want[name]
                            else np.zeros(0, dtype))
        self.tokens = arrays["tokens"].reshape(C, T)
        self.kept = np.array(arrays["kept"], dtype=bool).reshape(C, T)  # small: C·T bytes
        self.indptr, self.feature, self.value = arrays["indptr"], arrays["feature"], arrays["value"]

    def feature_values(self, feature: int, start: int, stop: int) -> np.ndarray:
        """Activation of ``feature`` at global positions [start, stop) (0 where inactive)."""
        lo, hi = int(self.indptr[start]), int(self.indptr[stop])
        feats = np.asarray(self.feature[lo:hi])
        counts = np.diff(np.asarray(self.indptr[start:stop + 1]))
        owner = np.repeat(np.arange(stop - start), counts)
        out = np.zeros(stop - start, np.float32)
        hit = feats == feature
        out[owner[hit]] = self.value[lo:hi][hit]
        return out

    def window(self, feature: int, position: int, left: int, right: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Token ids and ``feature``'s activations around global ``position`` (within its
        context, analysed tokens only), and the index of ``position`` in the window."""
        c, t = divmod(int(position), self.context)
        kept = np.flatnonzero(self.kept[c])
        lo_t = max(int(kept[0]) if len(kept) else t, t - left)
        hi_t = min(int(kept[-1]) + 1 if len(kept) else t + 1, t + right + 1)
        start = c * self.context
        acts = self.feature_values(feature, start + lo_t, start + hi_t)
        return np.asarray(self.tokens[c, lo_t:hi_t]), acts, t - lo_t

    def codes_at(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """Active features and values at one global position."""
        lo, hi = int(self.indptr[position]), int(self.indptr[position + 1])
        return np.asarray(self.feature[lo:hi]), np.asarray(self.value[lo:hi])

    def context_features(self) -> Any:
        """scipy CSR [contexts, F]: 1 where the feature fires anywhere in the context."""
        from scipy import sparse

        T = self.context
        owner = np.repeat(np.arange(self.n_contexts * T) // T, np.diff(np.asarray(self.indptr)))
        m = sparse.csr_matrix((np.ones(len(owner), np.float32), (owner, np.asarray(self.feature))),
                              shape=(self.n_contexts, self.n_features))
        m.data[:] = 1.0  # duplicates were summed
        return m

    def token_features(self) -> Any:
        """scipy CSR [positions, F] of the activations (the whole store as one matrix)."""
        from scipy import sparse

        return sparse.csr_matrix((np.asarray(self.value), np.asarray(self.feature), np.asarray(self.indptr)),
                                 shape=(self.n_contexts * self.context, self.n_features))
