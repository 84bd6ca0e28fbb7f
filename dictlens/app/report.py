"""The static HTML report: ``index.html`` and one ``f<N>.html`` per feature, opened from
disk with no server (relative links, one CSS and one JS file beside the pages)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from dictlens.analysis.db import FeatureDB
from dictlens.app.render import environment, feature_page, index_page, interpretation, static_dir


def feature_file(feature: int) -> str:
    return f"f{int(feature)}.html"


def write_report(analysis: str | Path, out: str | Path | None = None, features: Iterable[int] | None = None,
                 progress: bool = True) -> Path:
    """Render the report of an analysis directory into ``out`` (default ``ANALYSIS/report``)
    and return the path of its index. The pages are written to a temporary directory that
    replaces ``out`` at the end, so a reader never sees half a report."""
    from tqdm.auto import tqdm

    db = FeatureDB(analysis)
    out = Path(out) if out else Path(analysis) / "report"
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    env = environment()
    ids = range(db.n_features) if features is None else sorted({db.check_feature(f) for f in features})
    paged = set(ids)
    common = {"app": False, "meta": db.meta, "index_url": "index.html", "static": lambda name: name,
              "feature_url": lambda f: feature_file(f) if f in paged else None}
    try:
        for name in ("style.css", "dictlens.js"):
            shutil.copyfile(static_dir() / name, tmp / name)
        page = env.get_template("feature.html")
        explained = interpretation(db)
        for f in tqdm(ids, desc="report", unit="page", disable=not progress):
            (tmp / feature_file(f)).write_text(page.render(**common, **feature_page(db, f, explained)),
                                               encoding="utf-8")
        (tmp / "index.html").write_text(env.get_template("index.html").render(**common,
                                                                              **index_page(db, explained)),
                                        encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        db.close()
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out / "index.html"
