"""What the report and the web app show, as plain data for the Jinja2 templates.

The report (static files) and the app (Flask) render the same templates from the same
page data, so a feature page looks the same in both. Corpus text is untrusted: templates
are rendered with autoescaping on, and nothing here marks a string safe except the SVG
plots, which are built from numbers only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from dictlens.analysis.db import Example, FeatureDB

LEVELS = 10  # colour steps of a token's activation relative to the feature's max


def environment() -> Environment:
    env = Environment(loader=PackageLoader("dictlens.app", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default_for_string=True, default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["pct"] = pct
    return env


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    v = float(v)
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def pct(v: Any) -> str:
    v = float(v)
    if v == 0:
        return "0%"
    return f"{v:.3%}" if v < 0.001 else f"{v:.2%}" if v < 0.1 else f"{v:.1%}"


def show_token(text: str) -> str:
    """Make whitespace visible: newlines as ↵, tabs as →; the text stays plain (escaped later)."""
    return text.replace("\r", "").replace("\n", "↵").replace("\t", "→") or "∅"


def token_spans(texts: Sequence[str], acts: Sequence[float], scale: float, center: int | None = None
                ) -> list[dict[str, Any]]:
    """One dict per token: its shown text, activation, colour level (0 = silent, 1..LEVELS)
    and whether it is the example's own position."""
    out = []
    for i, (t, a) in enumerate(zip(texts, acts, strict=True)):
        level = 0 if a <= 0 or scale <= 0 else max(1, min(LEVELS, math.ceil(LEVELS * a / scale)))
        out.append({"text": show_token(t), "act": float(a), "level": level, "center": i == center})
    return out


def example_view(e: Example, scale: float) -> dict[str, Any]:
    center = None if e.kind == "random" else e.center  # a random context has no position of interest
    return {"kind": e.kind, "group": e.group, "value": e.value, "position": e.position,
            "tokens": token_spans(e.texts, e.acts, scale, center)}


def svg_bars(values: Sequence[float], *, width: int = 360, height: int = 90, labels: tuple[str, str] = ("", ""),
             mark: int | None = None, title: str = "") -> Markup:
    """A bar chart as inline SVG (numbers only go in, so it is safe to mark)."""
    vals = [float(v) for v in values]
    n = max(1, len(vals))
    top = max(vals) if vals and max(vals) > 0 else 1.0
    bw = width / n
    bars = []
    for i, v in enumerate(vals):
        h = (height - 16) * v / top
        cls = "bar mark" if mark == i else "bar"
        bars.append(f'<rect class="{cls}" x="{i * bw:.2f}" y="{height - 14 - h:.2f}" '
                    f'width="{max(bw - 0.5, 0.5):.2f}" height="{h:.2f}"><title>{v:g}</title></rect>')
    left, right = (str(x).replace("&", "&amp;").replace("<", "&lt;") for x in labels)
    t = str(title).replace("&", "&amp;").replace("<", "&lt;")
    return Markup(f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
                  f'role="img" aria-label="{t}">{"".join(bars)}'
                  f'<text x="0" y="{height - 2}" class="axis">{left}</text>'
                  f'<text x="{width}" y="{height - 2}" class="axis" text-anchor="end">{right}</text></svg>')


def density_histogram(db: FeatureDB, mark_feature: int | None = None, bins: int = 40) -> tuple[Markup, str]:
    """log10 feature density over all features (dead ones counted apart), with one
    feature's bin highlighted; and a caption."""
    dens = db.densities
    alive = dens > 0
    lo = math.floor(math.log10(1.0 / max(1, int(db.meta["tokens"]))))
    logs = np.log10(dens[alive]) if alive.any() else np.zeros(0)
    counts, edges = np.histogram(logs, bins=bins, range=(lo, 0.0))
    mark = None
    if mark_feature is not None and dens[mark_feature] > 0:
        where = int(np.searchsorted(edges, math.log10(dens[mark_feature]), side="right")) - 1
        mark = min(bins - 1, max(0, where))
    svg = svg_bars(counts.tolist(), labels=(f"10^{lo}", "1"), mark=mark, title="log10 feature density")
    return svg, f"{int((~alive).sum()):,} of {len(dens):,} features never fired in {int(db.meta['tokens']):,} tokens"


def activation_histogram(db: FeatureDB, hist: Sequence[int]) -> Markup:
    """The feature's activations on the log bins of the analysis, trimmed to the used range."""
    h = np.asarray(hist)
    edges = db.meta["hist_edges"]
    used = np.flatnonzero(h)
    if len(used) == 0:
        return svg_bars([0], title="activation histogram")
    a, b = int(used[0]), int(used[-1]) + 1
    return svg_bars(h[a:b].tolist(), labels=(fmt(edges[a]), fmt(edges[b])), title="activation histogram (log bins)")


def interpretation(db: FeatureDB, features: Sequence[int] | None = None) -> dict[int, list[dict[str, Any]]]:
    """Per feature, its explanations (:mod:`dictlens.interpret.store`), each with its scores:
    per judge and scorer, the value with its interval beside the shuffled control's value."""
    from dictlens.interpret.store import Interpretations

    with Interpretations(db.path, readonly=True) as st:
        explanations = st.explanations(features=features)
        scores = st.scores() if explanations else []
    keep = None if features is None else set(features)
    paired: dict[tuple[int, str], dict[tuple[str, str], dict[str, Any]]] = {}
    for sc in scores:
        if keep is not None and sc.feature not in keep:
            continue
        row = paired.setdefault((sc.feature, sc.explainer), {}).setdefault(
            (sc.judge, sc.scorer), {"judge": sc.judge, "scorer": sc.scorer.replace("_", " "), "value": None,
                                    "low": None, "high": None, "n": 0, "shuffled": None})
        if sc.control:
            row["shuffled"] = sc.value
        else:
            row.update(value=sc.value, low=sc.low, high=sc.high, n=sc.n)
    out: dict[int, list[dict[str, Any]]] = {}
    for e in explanations:
        rows = paired.get((e.feature, e.explainer), {})
        out.setdefault(e.feature, []).append({"explainer": e.explainer, "text": e.text, "model": e.model,
                                              "prompt": e.prompt, "created": e.created,
                                              "scores": [rows[k] for k in sorted(rows)]})
    return out


def feature_page(db: FeatureDB, feature: int, explained: dict[int, list[dict[str, Any]]] | None = None
                 ) -> dict[str, Any]:
    """Everything a feature page shows (``explained``: :func:`interpretation` of every
    feature, when the caller has it)."""
    f = db.feature(feature)
    for side in ("logit_top", "logit_bottom"):
        f[side] = [{**r, "token": show_token(r["token"])} for r in f[side]]
    scale = float(f["max"]) or 1.0
    examples = [example_view(e, scale) for e in db.examples(feature)]
    groups: dict[int, list[dict[str, Any]]] = {}
    for e in examples:
        if e["kind"] == "quantile":
            groups.setdefault(e["group"], []).append(e)
    quantiles = [{**q, "examples": groups.get(i, [])} for i, q in enumerate(f["quantiles"])]
    density_svg, density_caption = density_histogram(db, feature)
    return {
        "f": f, "id": feature, "n_features": db.n_features,
        "top": [e for e in examples if e["kind"] == "top"],
        "quantiles": list(reversed(quantiles)),  # highest activations first
        "random": [e for e in examples if e["kind"] == "random"],
        "activation_svg": activation_histogram(db, f["hist"]),
        "density_svg": density_svg, "density_caption": density_caption,
        "neighbours": [{"id": i, "cos": c} for i, c in f["neighbours"]],
        "coact": [{"id": i, "jaccard": j} for i, j in f["coact"]],
        "explanations": (interpretation(db, [feature]) if explained is None else explained).get(feature, []),
    }


def explained_rows(rows: list[dict[str, Any]], explained: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Index rows with their first explanation and its detection AUC (when scored)."""
    for r in rows:
        first = explained.get(r["id"], [None])[0]
        r["explanation"] = first["text"] if first else ""
        auc = [s["value"] for s in first["scores"] if s["scorer"] == "detection auc"] if first else []
        r["auc"] = auc[0] if auc else None
    return rows


def index_page(db: FeatureDB, explained: dict[int, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    svg, caption = density_histogram(db)
    explained = interpretation(db) if explained is None else explained
    rows = explained_rows(db.features(order="id", limit=db.n_features), explained)
    for r in rows:
        r["logit_top"] = [show_token(t) for t in r["logit_top"]]
    return {"rows": rows, "density_svg": svg, "density_caption": caption, "explained": bool(explained),
            "alive": sum(1 for r in rows if r["count"] > 0), "n_features": db.n_features}


def static_dir() -> Path:
    return Path(__file__).parent / "static"
