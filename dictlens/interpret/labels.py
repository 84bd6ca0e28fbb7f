"""Human labels: what a rater is shown, and labels in and out as CSV.

A rater labels a feature from its top examples (activations shown) and then marks which of
a few **test contexts** fit the label: held-out contexts of the feature's scoring sample
(:func:`~dictlens.interpret.scores.scoring_sample`), some where it fires and some where it
does not, in an order fixed by the feature (every rater sees the same), shown without
activations. The marks are kept by context id (``kind:position``), so they can be checked
against where the feature really fires: a human detection score.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dictlens.errors import InputError
from dictlens.interpret.scores import Context, scoring_sample
from dictlens.interpret.store import Label
from dictlens.io import atomic_write_bytes

ACTIVE, SILENT = 4, 2          # test contexts shown per feature
CSV_FIELDS = ("feature", "rater", "label", "rating", "contexts", "created")


def test_contexts(db: Any, feature: int, active: int = ACTIVE, silent: int = SILENT) -> list[Context]:
    """The contexts a rater marks for ``feature``: up to ``active`` where it fires (spread over
    the quantile groups) and ``silent`` where it does not, shuffled by a seed of the feature."""
    s = scoring_sample(db, feature)
    rng = random.Random(feature)
    by_group = sorted(s.activating, key=lambda c: (-c.group, c.position))
    step = max(1, len(by_group) // max(active, 1))
    shown = by_group[::step][:active] + rng.sample(s.negatives, min(silent, len(s.negatives)))
    rng.shuffle(shown)
    return shown


def human_detection(labels: Iterable[Label], truth: dict[int, dict[str, bool]]) -> dict[str, float | int | None]:
    """A rater's marks against where the features fire: balanced accuracy over every marked
    context (``truth``: feature → context id → fires)."""
    hits = {True: [0, 0], False: [0, 0]}            # fires → [marked fitting, shown]
    for lab in labels:
        for cid, fits in lab.contexts.items():
            fires = truth.get(lab.feature, {}).get(cid)
            if fires is None:
                continue
            hits[fires][1] += 1
            hits[fires][0] += int(fits == fires)
    if not hits[True][1] or not hits[False][1]:
        return {"balanced_accuracy": None, "contexts": hits[True][1] + hits[False][1]}
    ba = (hits[True][0] / hits[True][1] + hits[False][0] / hits[False][1]) / 2
    return {"balanced_accuracy": ba, "contexts": hits[True][1] + hits[False][1]}


def to_csv(labels: Sequence[Label], path: Path) -> Path:
    """Write ``labels`` as CSV (``contexts`` as JSON), atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for lab in labels:
        w.writerow([lab.feature, lab.rater, lab.label, "" if lab.rating is None else lab.rating,
                    json.dumps(lab.contexts, sort_keys=True), lab.created])
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def from_csv(path: Path, n_features: int) -> list[Label]:
    """Labels from a CSV with the columns of :func:`to_csv` (``created`` optional); every
    row checked, and the first bad one refused by its line number."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise InputError(f"{path}: cannot read the label file ({e.strerror})") from None
    rows = csv.DictReader(io.StringIO(text))
    missing = [c for c in CSV_FIELDS[:5] if c not in (rows.fieldnames or [])]
    if missing:
        raise InputError(f"{path}: a label file has the columns {', '.join(CSV_FIELDS)}; missing {', '.join(missing)}")
    out = []
    for line, r in enumerate(rows, start=2):
        where = f"{path}, line {line}"
        try:
            feature = int(r["feature"])
        except ValueError:
            raise InputError(f"{where}: feature {r['feature']!r} is not a number") from None
        if not 0 <= feature < n_features:
            raise InputError(f"{where}: feature {feature} is unknown: this SAE has {n_features:,} features")
        rater = (r["rater"] or "").strip()
        if not rater:
            raise InputError(f"{where}: no rater named")
        rating = None
        if (r["rating"] or "").strip():
            try:
                rating = int(r["rating"])
            except ValueError:
                raise InputError(f"{where}: rating {r['rating']!r} is not a whole number from 1 to 5") from None
            if not 1 <= rating <= 5:
                raise InputError(f"{where}: rating {rating}: ratings go from 1 to 5")
        try:
            contexts = json.loads(r["contexts"] or "{}")
        except ValueError:
            raise InputError(f"{where}: contexts must be JSON like {{\"activating:123\": true}}") from None
        if not isinstance(contexts, dict) or not all(isinstance(v, bool) for v in contexts.values()):
            raise InputError(f"{where}: contexts must map context ids to true or false")
        out.append(Label(feature, rater, r["label"] or "", rating, contexts, (r.get("created") or "").strip()))
    return out
