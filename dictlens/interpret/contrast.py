"""``dictlens contrast RUN --pos FILE --neg FILE``: the features that separate two sets of texts.

Every text runs through the model and the SAE once (special tokens and the SAE's outlier
positions left out); a feature's value on a text is its largest code there (``--pool max``)
or its mean (``mean``). The texts are split, stratified and seeded, into a train and a test
part (``--test-fraction``):

- **ranking** (train part): per feature, the Mann–Whitney U test of positive against
  negative texts (scipy, two-sided), its p-value corrected for the false-discovery rate
  (Benjamini–Hochberg, scipy's ``false_discovery_control``), the AUC (U / n₊n₋) and the
  rank-biserial effect size (2·AUC − 1); ranked by corrected p-value, then by effect;
- **checking** (test part, never seen by the ranking): each listed feature's AUC alone,
  and three logistic-regression probes (scikit-learn) trained on the train part and
  scored on the test part — on the **raw activations** of the same hook (mean over the
  text's tokens: the dense baseline), on **all the SAE's features**, and on the **top 10
  ranked features** — so that one sees whether the dictionary holds the concept as well as
  a probe on the activations it came from does.

Input files: the fortune format (entries between lines of ``%``), ``.jsonl``/``.parquet``
records (``--text-field``), or one text per line.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dictlens.config import check, field
from dictlens.errors import ConfigError, InputError
from dictlens.formats.preflight import FORCE_HELP
from dictlens.io import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE

TOP_PROBE = 10


def text_set(path: str, text_field: str = "text", limit: int | None = None) -> list[str]:
    """The texts of one set (see the module's doc), at most ``limit``."""
    from dictlens.data.text import iter_documents, split_fortunes

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file of texts")
    if p.suffix in (".jsonl", ".parquet"):
        texts = [t.strip() for t in iter_documents(str(p), text_field) if t.strip()]
    else:
        raw = p.read_text(encoding="utf-8", errors="replace")
        fortune = any(line.strip() == "%" for line in raw.splitlines())
        texts = split_fortunes(raw) if fortune else [t.strip() for t in raw.splitlines() if t.strip()]
    if not texts:
        raise InputError(f"{path}: no text in it")
    return texts[:limit] if limit else texts


@torch.no_grad()
def encode_texts(sae: SAE, lm: LoadedModel, hook: str, texts: Sequence[str], *, pool: str = "max",
                 max_tokens: int = 256, max_norm: float | None = None,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per text: the SAE's features pooled over its tokens [N, F] and the raw activations'
    mean [N, D] (first ``max_tokens`` tokens; special tokens and outliers left out)."""
    from tqdm.auto import tqdm

    from dictlens.data.tap import Tap
    from dictlens.data.tokens import not_special, text_ids

    tap = Tap(lm, [hook])
    feats = np.zeros((len(texts), sae.n_features), np.float32)
    dense = np.zeros((len(texts), sae.d_in), np.float32)
    for i, text in enumerate(tqdm(texts, desc="contrast", unit="text", disable=not progress)):
        ids = text_ids(lm, text, max_tokens=max_tokens, truncate=True)
        acts = tap(ids)[hook][0].float()
        keep = not_special(lm.tokenizer, ids)[0].to(acts.device)
        if max_norm is not None:
            keep &= acts.norm(dim=-1) <= max_norm
        if not bool(keep.any()):
            continue
        x = acts[keep]
        with sae.ranking("float32"):
            codes = sae.encode(x.to(sae.device)).float()
        feats[i] = (codes.amax(0) if pool == "max" else codes.mean(0)).cpu().numpy()
        dense[i] = x.mean(0).cpu().numpy()
    return feats, dense


def rank_features(X: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per feature (columns of ``X``): Mann–Whitney p, BH-corrected q, AUC, rank-biserial effect."""
    from scipy.stats import false_discovery_control, mannwhitneyu

    pos, neg = X[y == 1], X[y == 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        u, p = mannwhitneyu(pos, neg, axis=0, alternative="two-sided")
    p = np.where(np.isfinite(p), p, 1.0)
    auc = u / (len(pos) * len(neg))
    return {"p": p, "q": false_discovery_control(p), "auc": auc, "effect": 2 * auc - 1,
            "mean_pos": pos.mean(0), "mean_neg": neg.mean(0),
            "fires_pos": (pos > 0).mean(0), "fires_neg": (neg > 0).mean(0)}


def probe(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray,
          seed: int = 0) -> dict[str, float]:
    """A standardised, L2-regularised logistic regression: test accuracy and AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    model.fit(X_train, y_train)
    score = model.decision_function(X_test)
    return {"accuracy": float(model.score(X_test, y_test)), "auc": float(roc_auc_score(y_test, score)),
            "inputs": int(X_train.shape[1])}


@dataclass(kw_only=True)
class ContrastJob:
    """``dictlens contrast``: features that separate two text sets, beside a dense probe."""

    run: str = field(positional=True, help="SAE run directory")
    pos: str = field(help="texts of the concept (fortune file, .jsonl or one text per line)")
    neg: str = field(help="texts without it, in the same forms")
    text_field: str = field("text", help="field of .jsonl / .parquet records")
    max_texts: int = field(2000, help="at most this many texts from each file")
    max_tokens: int = field(256, help="tokens of each text read")
    pool: str = field("max", choices=("max", "mean"), help="a feature's value on a text: its max or mean code")
    test_fraction: float = field(0.3, help="share of the texts held out to check the ranking and the probes")
    fdr: float = field(0.05, help="false-discovery rate of the listed features")
    n: int = field(20, short="-n", help="features listed")
    seed: int = field(0, help="seed of the split")
    model: str | None = field(None, help="model (default: the SAE's)")
    device: str | None = field(None, help="cpu or cuda")
    out: str | None = field(None, help="output directory (default: RUN/contrast)")
    force: bool = field(False, help=FORCE_HELP)

    def __post_init__(self) -> None:
        check(0 < self.test_fraction < 1, "test_fraction", "a share between 0 and 1", self.test_fraction)
        check(0 < self.fdr < 1, "fdr", "a rate between 0 and 1", self.fdr)
        check(self.n >= 1 and self.max_texts >= 2 and self.max_tokens >= 1, "n, max_texts, max_tokens",
              "positive (max_texts at least 2)", (self.n, self.max_texts, self.max_tokens))


@dataclass
class Contrast:
    result: dict[str, Any]
    written: list[Path]


def _examples(X: np.ndarray, texts: Sequence[str], y: np.ndarray, f: int, n: int = 3) -> list[dict[str, Any]]:
    top = np.argsort(-X[:, f], kind="stable")[:n]
    return [{"set": "pos" if y[i] else "neg", "value": float(X[i, f]), "text": texts[i][:160]}
            for i in top if X[i, f] > 0]


def contrast_job(job: ContrastJob, *, say: Callable[[str], None] = print) -> Contrast:
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    from dictlens.load import load_run, own_directory

    pos, neg = text_set(job.pos, job.text_field, job.max_texts), text_set(job.neg, job.text_field, job.max_texts)
    if set(pos) == set(neg):
        raise InputError(f"{job.pos} and {job.neg} hold the same texts: nothing to contrast")
    if min(len(pos), len(neg)) < 4:
        raise InputError(f"contrast needs at least 4 texts in each set; {job.pos}: {len(pos)}, {job.neg}: {len(neg)}")
    shared = len(set(pos) & set(neg))
    loaded = load_run(job.run, model=job.model, device=job.device, force=job.force)
    t0 = time.perf_counter()
    say(f"contrast {len(pos):,} texts of {job.pos} against {len(neg):,} of {job.neg} at {loaded.hook}")
    texts = pos + neg
    y = np.array([1] * len(pos) + [0] * len(neg))
    X, D = encode_texts(loaded.sae, loaded.lm, loaded.hook, texts, pool=job.pool, max_tokens=job.max_tokens,
                        max_norm=loaded.max_norm)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=job.test_fraction, stratify=y,
                                           random_state=job.seed)
    if len(np.unique(y[idx_test])) < 2 or len(np.unique(y[idx_train])) < 2:
        raise ConfigError("the split leaves one set out of a part: give more texts or another --test-fraction")
    r = rank_features(X[idx_train], y[idx_train])
    alive = (X[idx_train] > 0).any(0)
    order = np.lexsort((-np.abs(r["effect"]), r["q"]))
    order = order[alive[order]]
    listed = [int(f) for f in order[:job.n]]
    Xt, yt = X[idx_test], y[idx_test]
    features: list[dict[str, Any]] = []
    for f in listed:
        test_auc = float(roc_auc_score(yt, Xt[:, f])) if np.ptp(Xt[:, f]) > 0 else 0.5
        features.append({"id": f, "q": float(r["q"][f]), "p": float(r["p"][f]), "auc_train": float(r["auc"][f]),
                         "effect": float(r["effect"][f]), "auc_test": test_auc,
                         "direction": "pos" if r["effect"][f] > 0 else "neg",
                         "mean_pos": float(r["mean_pos"][f]), "mean_neg": float(r["mean_neg"][f]),
                         "fires_pos": float(r["fires_pos"][f]), "fires_neg": float(r["fires_neg"][f]),
                         "examples": _examples(X, texts, y, f)})
    top = order[:TOP_PROBE].tolist()
    probes = {"dense activations (mean over tokens)": probe(D[idx_train], y[idx_train], D[idx_test], yt, job.seed),
              "all SAE features": probe(X[idx_train], y[idx_train], Xt, yt, job.seed),
              f"top {len(top)} ranked features": probe(X[idx_train][:, top], y[idx_train], Xt[:, top], yt, job.seed)}
    result = {"run": job.run, "hook": loaded.hook, "model": loaded.lm.name, "pos": job.pos, "neg": job.neg,
              "texts": {"pos": len(pos), "neg": len(neg), "shared": shared, "train": len(idx_train),
                        "test": len(idx_test)},
              "pool": job.pool, "fdr": job.fdr, "significant": int((r["q"][alive] <= job.fdr).sum()),
              "significant_pos": int(((r["q"] <= job.fdr) & (r["effect"] > 0) & alive).sum()),
              "features": features, "probes": probes, "seconds": time.perf_counter() - t0}
    out = Path(job.out) if job.out else own_directory(job.run, "contrast") / "contrast"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "contrast.json", result)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["feature", "q", "p", "auc_train", "auc_test", "effect", "mean_pos", "mean_neg", "fires_pos",
                "fires_neg"])
    for row in features:
        w.writerow([row[k] for k in ("id", "q", "p", "auc_train", "auc_test", "effect", "mean_pos", "mean_neg",
                                     "fires_pos", "fires_neg")])
    atomic_write_bytes(out / "contrast.csv", buf.getvalue().encode())
    return Contrast(result, [out / "contrast.json", out / "contrast.csv"])
