"""`dictlens serve`: the local web app (Flask).

Pages: the feature list (sortable, paged), a page per feature (the report's template),
live text ("which features fire on which tokens"), search by token, and the comparison
of two SAEs, and steering (a prompt continued with and without feature edits, side by
side). JSON under ``/api/`` for scripts.

The app serves only its own static files (Flask's static route, which refuses paths
outside the package's ``static/``); nothing reads a path from a request.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flask import Flask, abort, jsonify, redirect, render_template, request, url_for

from dictlens.analysis.db import FeatureDB
from dictlens.app.labelling import label_page, save_label
from dictlens.app.live import LiveEncoder
from dictlens.app.render import (
    environment,
    explained_rows,
    feature_page,
    index_page,
    interpretation,
    show_token,
    svg_bars,
)
from dictlens.errors import DictlensError, InputError

if TYPE_CHECKING:
    from flask.typing import ResponseReturnValue

    from dictlens.analysis.compare import Matching
    from dictlens.data.models import LoadedModel
    from dictlens.sae.model import SAE
    from dictlens.use.steer import GenerateConfig

PAGE = 500  # features per index page


class Comparison:
    """This analysis's SAE matched to another SAE (``--compare RUN``), computed on first use."""

    def __init__(self, live: LiveEncoder, other: str | Path | SAE | None):
        self.live, self.other = live, other
        self._m: Matching | None = None
        self.name = str(other) if isinstance(other, (str, Path)) else "the other SAE"
        self.lock = threading.Lock()

    def matching(self) -> Matching:
        from dictlens.analysis.compare import match_features
        from dictlens.load import load_sae

        with self.lock:
            if self._m is None:
                other = load_sae(self.other) if isinstance(self.other, (str, Path)) else self.other
                if other is None:
                    raise InputError("no SAE to compare with: start the app with --compare RUN")
                self._m = match_features(self.live.load_sae().W_dec, other.W_dec)
            return self._m

    def for_feature(self, f: int) -> dict[str, Any]:
        m = self.matching()
        hit = np.flatnonzero(m.pairs[:, 0] == f)
        partner = (int(m.pairs[hit[0], 1]), float(m.pair_cos[hit[0]])) if len(hit) else None
        return {"name": self.name, "best": int(m.best_ab[f]), "cos": float(m.cos_ab[f]), "partner": partner}


def create_app(analysis: str | Path, *, sae: SAE | None = None, lm: LoadedModel | None = None,
               model: str | None = None,
               device: str | None = None, compare: str | Path | Any | None = None) -> Flask:
    """The app over an analysis directory. ``sae``/``lm`` (optional) are used for live
    text instead of loading the run and model recorded in the analysis; ``compare`` (a run
    directory or an SAE) is matched against this SAE on the compare page."""
    db = FeatureDB(analysis)
    live = LiveEncoder(db.meta, sae=sae, lm=lm, model=model, device=device)
    comparison = Comparison(live, compare) if compare is not None else None
    here = Path(__file__).parent
    app = Flask("dictlens", template_folder=str(here / "templates"), static_folder=str(here / "static"))
    app.jinja_options = {**app.jinja_options, "trim_blocks": True, "lstrip_blocks": True}  # as the report
    app.jinja_env.filters.update(environment().filters)
    app.config.update(dictlens_db=db, dictlens_live=live)

    def common() -> dict[str, Any]:
        return {"app": True, "meta": db.meta, "index_url": url_for("index"),
                "feature_url": lambda f: url_for("feature", f=int(f)),
                "static": lambda name: url_for("static", filename=name)}

    @app.errorhandler(DictlensError)
    def bad_input(e: DictlensError) -> ResponseReturnValue:
        if request.path.startswith("/api/"):
            return jsonify(error=str(e)), 400
        return render_template("error.html", message=str(e), **common()), 400

    @app.get("/")
    def index() -> ResponseReturnValue:
        order = request.args.get("order", "id")
        offset = max(0, request.args.get("offset", 0, type=int))
        explained = interpretation(db)
        data = index_page(db, explained)
        data["rows"] = explained_rows([{**r, "logit_top": [show_token(t) for t in r["logit_top"]]}
                                       for r in db.features(order=order, limit=PAGE, offset=offset)], explained)
        more = offset + PAGE < db.n_features
        data["more_url"] = url_for("index", order=order, offset=offset + PAGE) if more else None
        return render_template("index.html", **common(), **data, order=order)

    @app.get("/feature")
    def goto() -> ResponseReturnValue:
        f = request.args.get("id", type=int)
        if f is None:
            raise InputError("give a feature number")
        return redirect(url_for("feature", f=db.check_feature(f)))

    @app.get("/feature/<int:f>")
    def feature(f: int) -> ResponseReturnValue:
        other = comparison.for_feature(db.check_feature(f)) if comparison else None
        return render_template("feature.html", **common(), **feature_page(db, db.check_feature(f)), other=other)

    @app.get("/compare")
    def compare_page() -> ResponseReturnValue:
        if comparison is None:
            return render_template("compare.html", **common(), result=None)
        m = comparison.matching()
        order = request.args.get("order", "cos")
        offset = max(0, request.args.get("offset", 0, type=int))
        partner = m.partners()
        ids = np.argsort(-m.cos_ab, kind="stable") if order == "cos" else np.argsort(m.cos_ab, kind="stable")
        rows = [{"id": int(f), "best": int(m.best_ab[f]), "cos": float(m.cos_ab[f]),
                 "partner": partner.get(int(f))} for f in ids[offset:offset + PAGE]]
        more = url_for("compare_page", order=order, offset=offset + PAGE) if offset + PAGE < len(ids) else None
        return render_template("compare.html", **common(), result=m.summary(), name=comparison.name, rows=rows,
                               more_url=more, hist=svg_bars(np.histogram(m.cos_ab, bins=40, range=(0, 1))[0].tolist(),
                                                            labels=("0", "1"), title="best cosine"))

    @app.route("/text", methods=["GET", "POST"])
    def text() -> ResponseReturnValue:
        q = request.values.get("q", "")
        tokens, summary = live.encode(q) if q else ([], [])
        rows = db.features(order="id", limit=db.n_features) if summary else []
        lens = {r["id"]: [show_token(t) for t in r["logit_top"]] for r in rows}
        for s in summary:
            s["logit_top"] = lens.get(s["id"], [])
        shown = [{"text": show_token(t.text), "features": t.features} for t in tokens]
        return render_template("text.html", **common(), q=q, tokens=shown, summary=summary[:100])

    @app.route("/steer", methods=["GET", "POST"])
    def steer() -> ResponseReturnValue:
        form = steer_form(request.values, db)
        result = None
        if request.method == "POST":   # never on GET: a link or an <img> elsewhere must not start generating
            result = live.steer(form["prompt"], parse_steer_edits(form, db), steer_config(form))
        return render_template("steer.html", **common(), form=form, result=result)

    @app.post("/api/steer")
    def api_steer() -> ResponseReturnValue:
        from dictlens.use.splice import Edit

        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str) \
                or not isinstance(body.get("edits"), list) or not all(isinstance(e, dict) for e in body["edits"]):
            raise InputError('POST a JSON object {"prompt": "...", "edits": [{"feature": F, "kind": "add", '
                             '"value": C}], "max_new_tokens": N, "temperature": T, "seed": S}')
        try:
            edits = [Edit(int(e["feature"]), e.get("kind", "add"), float(e.get("value", 0.0)), int(e.get("start", 0)))
                     for e in body["edits"]]
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise InputError(f"edits: each needs a feature and a numeric value ({err})") from None
        check_steer_size(body["prompt"], edits)
        for e in edits:
            db.check_feature(e.feature)
        g = live.steer(body["prompt"], edits, steer_config(body))
        return jsonify(prompt=g.prompt, unsteered=g.unsteered, steered=g.steered, edits=g.edits)

    @app.get("/label")
    def label() -> ResponseReturnValue:
        done = request.args.get("done", type=int)
        return render_template("label.html", **common(), **label_page(db, request.args.get("rater"), done))

    @app.post("/label")
    def label_save() -> ResponseReturnValue:
        rater, f = save_label(db, request.form)
        return redirect(url_for("label", rater=rater, done=f), code=303)

    @app.get("/token")
    def token() -> ResponseReturnValue:
        q = request.args.get("q", "")
        hits = db.features_for_token(q) if q else []
        return render_template("token.html", **common(), q=q, hits=hits)

    @app.get("/api/feature/<int:f>")
    def api_feature(f: int) -> ResponseReturnValue:
        data = db.feature(db.check_feature(f))
        data["examples"] = [e.__dict__ for e in db.examples(f)]
        return jsonify(data)

    @app.post("/api/text")
    def api_text() -> ResponseReturnValue:
        body = request.get_json(silent=True) or {}
        if not isinstance(body.get("text"), str):
            raise InputError('POST a JSON object {"text": "..."}')
        tokens, summary = live.encode(body["text"])
        return jsonify(tokens=[t.__dict__ for t in tokens], features=summary)

    @app.get("/favicon.ico")
    def favicon() -> ResponseReturnValue:
        abort(404)

    return app


def steer_form(values: Any, db: FeatureDB) -> dict[str, Any]:
    """The steering form's fields (from a request), defaulted: one feature at twice its
    largest analysed activation."""
    feature = values.get("feature", type=int)
    default = ""
    if feature is not None:
        f = db.feature(db.check_feature(feature))
        default = f"{feature}:{2 * (f['max'] or 1.0):.3g}"
    return {"prompt": values.get("prompt", "I went to the market and"), "edits": values.get("edits", default),
            "kind": values.get("kind", "add"), "start": values.get("start", "0"),
            "max_new_tokens": values.get("max_new_tokens", "30"), "temperature": values.get("temperature", "0.7"),
            "seed": values.get("seed", "0")}


def parse_steer_edits(form: dict[str, Any], db: FeatureDB) -> list[Any]:
    """``F:VALUE, F:VALUE`` in the form's kind (add or clamp; ``zero`` takes ``F`` alone)."""
    from dictlens.use.splice import parse_edit

    kind = form["kind"]
    if kind not in ("add", "clamp", "scale", "zero"):
        raise InputError(f"kind {kind!r}: expected add, clamp, scale or zero")
    try:
        start = int(form["start"])
    except ValueError:
        raise InputError(f"from position {form['start']!r} is not an integer") from None
    specs = [s.strip() for s in str(form["edits"]).replace(";", ",").split(",") if s.strip()]
    if not specs:
        raise InputError("give at least one edit, e.g. 123:40")
    edits = [parse_edit(s, kind, start) for s in specs]
    check_steer_size(form["prompt"], edits)
    for e in edits:
        db.check_feature(e.feature)
    return edits


MAX_PROMPT_CHARS, MAX_EDITS = 4000, 16   # the app steers one local prompt at a time


def check_steer_size(prompt: str, edits: list[Any]) -> None:
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"the prompt is {len(prompt):,} characters; the app takes at most {MAX_PROMPT_CHARS:,} "
                         "(`dictlens generate` takes any that fits the model's context)")
    if len(edits) > MAX_EDITS:
        raise InputError(f"{len(edits)} edits; the app takes at most {MAX_EDITS}")


def steer_config(values: Mapping[str, Any]) -> GenerateConfig:
    from dictlens.use.steer import GenerateConfig

    def number(key: str, kind: type, default: Any) -> Any:
        raw = values.get(key, default)
        try:
            return kind(raw)
        except (TypeError, ValueError):
            raise InputError(f"{key}: {raw!r} is not a number") from None
    cfg = GenerateConfig(max_new_tokens=number("max_new_tokens", int, 30),
                         temperature=number("temperature", float, 0.7), seed=number("seed", int, 0))
    if cfg.max_new_tokens > 200:
        raise InputError("max_new_tokens: at most 200 in the app")
    return cfg


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(analysis: str | Path, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Run the app until interrupted (Werkzeug's threaded server: a local tool, not a public one)."""
    app = create_app(analysis, **kwargs)
    if not is_loopback(host):
        print(f"warning: serving on {host}: anyone who can reach this machine can read the analysed text")
    print(f"dictlens app on http://{host}:{port}/ (Ctrl-C stops it)")
    app.run(host=host, port=port, threaded=True, use_reloader=False)
