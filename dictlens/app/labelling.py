"""The app's labelling view: raters label features, blind, one after another.

Every rater meets the features that fire in the same random order (so that raters overlap
early and agreement has units to work on), less those they have labelled. A feature is
shown by its top examples (activations coloured) and a few test contexts without
activations (:func:`~dictlens.interpret.labels.test_contexts`); the rater writes a label,
gives a 1–5 rating and ticks the test contexts that fit the label. Nothing automated — no
explanation, no score — is shown before the answer is saved; the page after it reveals the
feature's explanations beside the rater's label.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from dictlens.analysis.db import FeatureDB
from dictlens.app.render import example_view, interpretation, show_token
from dictlens.errors import InputError
from dictlens.interpret.labels import test_contexts
from dictlens.interpret.store import Interpretations, Label

MAX_RATER = 60
TOP_SHOWN = 10


@functools.lru_cache(maxsize=4)
def _queue(path: str, n: int, seed: int) -> tuple[int, ...]:
    db = FeatureDB(path)
    alive = np.array([r["id"] for r in db.features(limit=db.n_features, alive_only=True)], np.int64)
    db.close()
    return tuple(int(f) for f in np.random.default_rng(seed).permutation(alive))


def queue(db: FeatureDB, seed: int = 0) -> tuple[int, ...]:
    """The order in which every rater meets the features that fire."""
    return _queue(str(db.path), db.n_features, seed)


def rater_name(value: str | None) -> str:
    name = (value or "").strip()
    if not name:
        raise InputError("name yourself first: a rater's name")
    if len(name) > MAX_RATER:
        raise InputError(f"a rater's name has at most {MAX_RATER} characters")
    return name


def label_page(db: FeatureDB, rater: str | None, done: int | None = None) -> dict[str, Any]:
    """What the labelling page shows ``rater`` next (no rater: the name form)."""
    if not rater:
        return {"rater": None}
    rater = rater_name(rater)
    order = queue(db)
    with Interpretations(db.path, readonly=True) as st:
        mine = {lab.feature: lab for lab in st.labels(rater)}
    out: dict[str, Any] = {"rater": rater, "labelled": len(mine), "total": len(order)}
    if done is not None and done in mine:
        out["revealed"] = {"id": done, "label": mine[done].label, "rating": mine[done].rating,
                           "explanations": interpretation(db, [done]).get(done, [])}
    nxt = next((f for f in order if f not in mine), None)
    if nxt is None:
        return out
    f = db.feature(nxt)
    scale = float(f["max"]) or 1.0
    top = [example_view(e, scale) for e in db.examples(nxt, kind="top")[:TOP_SHOWN]]
    tests = [{"id": c.id, "tokens": [show_token(t) for t in c.texts]} for c in test_contexts(db, nxt)]
    out["feature"] = {"id": nxt, "density": f["density"], "top": top, "tests": tests}
    return out


def save_label(db: FeatureDB, form: Mapping[str, Any]) -> tuple[str, int]:
    """Store a submitted label (form fields rater, feature, label, rating, shown, fits)."""
    rater = rater_name(form.get("rater"))
    try:
        feature = db.check_feature(int(form.get("feature", "")))
    except ValueError:
        raise InputError("the form names no feature") from None
    rating_text = str(form.get("rating") or "").strip()
    try:
        rating = int(rating_text) if rating_text else None
    except ValueError:
        raise InputError(f"rating {rating_text!r}: ratings go from 1 to 5") from None
    getlist = getattr(form, "getlist", lambda k: [form[k]] if k in form else [])
    shown, fits = list(getlist("shown")), set(getlist("fits"))
    with Interpretations(db.path) as st:
        st.put_labels([Label(feature, rater, str(form.get("label") or "").strip(), rating,
                             {c: c in fits for c in shown})])
    return rater, feature
