"""Comparing dictionaries: universality across seeds, feature splitting across widths,
features that persist across layers.

- :func:`match_features`: decoder-cosine matching of two SAEs — for each feature its best
  partner in the other SAE (MMCS both ways), and the one-to-one Hungarian matching.
- :func:`splitting`: for a narrow and a wide SAE on the same hook, each wide feature's
  parent in the narrow one by decoder cosine and by co-activation (the narrow feature that
  fires most often when it fires), how often the two agree, and how many children each
  narrow feature has.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dictlens.config import field
from dictlens.errors import ConfigError, InputError


@dataclass
class Matching:
    """Decoder-cosine matching of SAE A [Fa features] to SAE B [Fb]."""

    best_ab: np.ndarray  # [Fa] B's most similar feature to each A feature
    cos_ab: np.ndarray  # [Fa] its cosine
    best_ba: np.ndarray  # [Fb]
    cos_ba: np.ndarray  # [Fb]
    pairs: np.ndarray  # [min(Fa, Fb), 2] the Hungarian one-to-one matching (A id, B id)
    pair_cos: np.ndarray  # [min(Fa, Fb)]

    @property
    def mmcs_ab(self) -> float:
        """Mean over A's features of the best cosine in B."""
        return float(self.cos_ab.mean())

    @property
    def mmcs_ba(self) -> float:
        return float(self.cos_ba.mean())

    def partners(self) -> dict[int, tuple[int, float]]:
        """A feature id → (its Hungarian partner in B, their cosine), for the matched ones."""
        return dict(zip(self.pairs[:, 0].tolist(), zip(self.pairs[:, 1].tolist(), self.pair_cos.tolist(),
                                                       strict=True), strict=True))

    def summary(self, thresholds: Iterable[float] = (0.5, 0.7, 0.9)) -> dict[str, Any]:
        out: dict[str, Any] = {"features_a": len(self.best_ab), "features_b": len(self.best_ba),
                               "mmcs_a_to_b": self.mmcs_ab, "mmcs_b_to_a": self.mmcs_ba,
                               "hungarian_mean_cos": float(self.pair_cos.mean()) if len(self.pair_cos) else 0.0}
        for t in thresholds:
            out[f"matched_above_{t:g}"] = float((self.pair_cos > t).mean()) if len(self.pair_cos) else 0.0
        return out


def _unit(d: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(d.detach().float(), dim=1)


@torch.no_grad()
def cosine_matrix(dec_a: torch.Tensor, dec_b: torch.Tensor) -> torch.Tensor:
    """[Fa, Fb] cosines between the rows of two decoders (same width D)."""
    if dec_a.shape[1] != dec_b.shape[1]:
        raise InputError(f"the two SAEs read different widths ({dec_a.shape[1]} and {dec_b.shape[1]}): their "
                         f"decoder directions live in different spaces")
    return _unit(dec_a) @ _unit(dec_b).T


def match_features(dec_a: torch.Tensor, dec_b: torch.Tensor) -> Matching:
    """Best partners both ways and the Hungarian matching (maximum total cosine)."""
    from scipy.optimize import linear_sum_assignment

    cos = cosine_matrix(dec_a, dec_b)
    ab, ba = cos.max(dim=1), cos.max(dim=0)
    c = cos.numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    return Matching(ab.indices.numpy(), ab.values.numpy(), ba.indices.numpy(), ba.values.numpy(),
                    np.stack([rows, cols], axis=1), c[rows, cols])


@dataclass
class Splitting:
    """Parents of a wide SAE's features in a narrow one (same hook)."""

    parent_cos: np.ndarray  # [F_wide] narrow feature with the largest decoder cosine
    cos: np.ndarray  # [F_wide] that cosine
    parent_coact: np.ndarray  # [F_wide] narrow feature that fires most often with it (-1: it never fired)
    coact: np.ndarray  # [F_wide] P(parent fires | wide feature fires)
    children: np.ndarray  # [F_narrow] wide features whose cosine parent it is

    def summary(self) -> dict[str, Any]:
        fired = self.parent_coact >= 0
        agree = (self.parent_cos == self.parent_coact)[fired]
        return {"wide_features": len(self.parent_cos), "narrow_features": len(self.children),
                "wide_fired": int(fired.sum()),
                "parents_agree": float(agree.mean()) if len(agree) else 0.0,
                "mean_parent_cos": float(self.cos.mean()),
                "mean_coactivation": float(self.coact[fired].mean()) if fired.any() else 0.0,
                "children_mean": float(self.children.mean()), "children_max": int(self.children.max()),
                "narrow_without_children": float((self.children == 0).mean())}


@torch.no_grad()
def splitting(narrow: Any, wide: Any, batches: Iterable[torch.Tensor]) -> Splitting:
    """Each wide feature's parent in ``narrow`` by decoder cosine and by co-activation over
    the activation ``batches`` ([N, D] raw activations of the hook both SAEs read)."""
    from scipy import sparse

    if narrow.d_in != wide.d_in:
        raise InputError(f"splitting needs two SAEs on one hook: widths {narrow.d_in} and {wide.d_in} differ")
    cos = cosine_matrix(wide.W_dec, narrow.W_dec)
    best = cos.max(dim=1)
    Fw, Fn = wide.n_features, narrow.n_features
    joint = sparse.csr_matrix((Fw, Fn), dtype=np.float64)
    fired = np.zeros(Fw)
    for x in batches:
        mats = []
        for sae in (wide, narrow):
            with sae.ranking("float32"):
                p, _ = sae.encode_sparse(x.to(sae.device).float())
            r, c = p.rows.cpu().numpy(), p.cols.cpu().numpy()
            mats.append(sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(x), sae.n_features)))
        joint = joint + mats[0].T @ mats[1]
        fired += np.asarray(mats[0].sum(axis=0)).ravel()
    joint = joint.tocsr()
    parent_coact = np.full(Fw, -1, np.int64)
    coact = np.zeros(Fw)
    for w in np.flatnonzero(fired):
        lo, hi = joint.indptr[w], joint.indptr[w + 1]
        if hi > lo:
            j = lo + int(np.argmax(joint.data[lo:hi]))
            parent_coact[w] = joint.indices[j]
            coact[w] = joint.data[j] / fired[w]
    parent = best.indices.numpy()
    return Splitting(parent, best.values.numpy(), parent_coact, coact, np.bincount(parent, minlength=Fn))


@dataclass(kw_only=True)
class CompareJob:
    """``dictlens compare``: SAEs matched in order (A↔B, B↔C, ...)."""

    runs: list[str] = field(positional=True, help="SAE run directories, compared in order (A↔B, B↔C, ...)")
    out: str = field(help="directory for compare.json, compare.png, matches_*.csv")
    acts: str | None = field(None, help="activation cache of their hook: also find each wide feature's parent "
                                            "by co-activation (SAEs of different widths)")
    tokens: int = field(65536, help="tokens of --acts to read for co-activation")

    def __post_init__(self) -> None:
        if len(self.runs) < 2:
            raise ConfigError("compare: give at least two SAE run directories")


@dataclass
class Compared:
    """One summary per consecutive pair (compare.json's ``pairs``) and the files written."""

    pairs: list[dict[str, Any]]
    written: list[Path]


def compare_job(job: CompareJob) -> Compared:
    """Match each consecutive pair; with ``acts``, splitting between different widths; write
    compare.json, one matches_A__B.csv per pair and compare.png."""
    from dictlens.io import atomic_write_json
    from dictlens.load import check_cache, load_sae, open_cache

    saes = [load_sae(r) for r in job.runs]
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs: list[dict[str, Any]] = []
    written = [out / "compare.json", out / "compare.png"]
    for (ra, a), (rb, b) in itertools.pairwise(zip(job.runs, saes, strict=True)):
        m = match_features(a.W_dec, b.W_dec)
        row: dict[str, Any] = {"a": ra, "b": rb, "hook_a": a.provenance.hook_in, "hook_b": b.provenance.hook_in,
                               **m.summary()}
        written.append(write_matches(out / f"matches_{Path(ra).name}__{Path(rb).name}.csv", m))
        if job.acts and a.n_features != b.n_features and row["hook_a"] == row["hook_b"]:
            narrow, wide = (a, b) if a.n_features < b.n_features else (b, a)
            store = open_cache(a, ra, job.acts)
            check_cache(b, rb, store)
            batches = itertools.islice(store.batches(4096, shuffle=False), max(1, job.tokens // 4096))
            row["splitting"] = splitting(narrow, wide, batches).summary()
        pairs.append(row)
    atomic_write_json(out / "compare.json", {"runs": job.runs, "pairs": pairs})
    plot_matches(out / "compare.png", job.runs, saes)
    return Compared(pairs, written)


def write_matches(path: Path, m: Matching) -> Path:
    """One row per feature of A: its best partner in B, and its Hungarian partner (-1: none)."""
    import csv
    import io

    from dictlens.io import atomic_write_bytes

    partner = m.partners()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["feature_a", "best_b", "cos", "hungarian_b", "hungarian_cos"])
    for f in range(len(m.best_ab)):
        hb, hc = partner.get(f, (-1, float("nan")))
        w.writerow([f, int(m.best_ab[f]), f"{m.cos_ab[f]:.4f}", hb, f"{hc:.4f}"])
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def plot_matches(path: Path, runs: list[str], saes: list[Any]) -> Path:
    """Histogram of each feature's best cosine in the next SAE, one curve per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dictlens.eval.plots import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (ra, a), (rb, b) in itertools.pairwise(zip(runs, saes, strict=True)):
        best = cosine_matrix(a.W_dec, b.W_dec).max(dim=1).values.numpy()
        ax.hist(best, bins=50, range=(0, 1), histtype="step", linewidth=1.5,
                label=f"{Path(ra).name} → {Path(rb).name} (MMCS {best.mean():.3f})")
    ax.set_xlabel("cosine of each feature's best match in the other SAE")
    ax.set_ylabel("features")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
