"""The report and the web app: they render what the database holds, stay inert on hostile
corpus text, serve only their own files, and work in a real browser (Chromium)."""

from __future__ import annotations

import re
import shutil
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dictlens.analysis import AnalysisConfig, FeatureDB, analyze
from dictlens.app.report import write_report
from dictlens.app.server import create_app, is_loopback
from dictlens.provenance import Provenance
from dictlens.sae.config import SAEConfig
from dictlens.sae.model import SAE

HOSTILE = ['<script>window.__pwned = 1</script>', '" onmouseover="window.__pwned = 2" x="',
           "'><img src=x onerror=\"window.__pwned = 3\">", "</textarea><b id=injected>"]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output"


class _Audit(HTMLParser):
    """Collects the script elements and event-handler attributes of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict] = []
        self.handlers: list[tuple[str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "script":
            self.scripts.append(dict(attrs))
        self.handlers += [(tag, k) for k, _ in attrs if k.startswith("on")]


def _audit(html: str) -> _Audit:
    a = _Audit()
    a.feed(html)
    return a


@pytest.fixture(scope="module")
def analysis(tiny_models, tmp_path_factory):
    """An analysis of a tiny model whose vocabulary texts (as shown) include hostile HTML, over a
    corpus that contains it too."""
    import dictlens.analysis.collect as collect
    from dictlens.data.text import default_documents

    lm = tiny_models["llama"]
    tmp = tmp_path_factory.mktemp("app")
    text = tmp / "hostile.txt"
    docs = default_documents()[:30]
    text.write_text("\n\n".join(d + " " + HOSTILE[i % len(HOSTILE)] for i, d in enumerate(docs)))
    real = collect.decode_vocab

    def hostile_vocab(tokenizer):
        vocab = real(tokenizer)
        for i in range(3, len(vocab), 7):  # every 7th token displays as an attack
            vocab[i] = HOSTILE[i % len(HOSTILE)]
        return vocab

    sae = SAE(SAEConfig(d_in=32, n_features=24, activation="topk", k=3), seed=0,
              provenance=Provenance.of_sae(lm.name, "resid_post.1")).eval()
    collect.decode_vocab = hostile_vocab
    try:
        analyze(sae, lm, "resid_post.1", AnalysisConfig(text=str(text), tokens=800, context=32, top_k=4,
                                                        random_examples=2, coactivation=True),
                tmp / "an", progress=False)
    finally:
        collect.decode_vocab = real
    return {"dir": tmp / "an", "sae": sae, "lm": lm}


def test_report_pages_render_the_database_and_stay_inert(analysis, tmp_path):
    index = write_report(analysis["dir"], tmp_path / "report", progress=False)
    db = FeatureDB(analysis["dir"])
    pages = sorted((tmp_path / "report").glob("f*.html"))
    assert len(pages) == db.n_features and index.name == "index.html"
    html = index.read_text()
    for f in range(db.n_features):
        assert f'href="f{f}.html"' in html
    busy = db.features(order="-count", limit=1)[0]["id"]
    page = (tmp_path / "report" / f"f{busy}.html").read_text()
    f = db.feature(busy)
    assert f"Feature {busy}" in page and "Top activations" in page and "Across activation quantiles" in page
    top = db.examples(busy, kind="top")[0]
    assert f'title="{top.value:.3g}"' in page or f'title="{top.value:.2e}"' in page  # hover shows the value
    assert len(re.findall(r'class="ex" data-kind="top"', page)) == len(db.examples(busy, kind="top"))
    assert f["logit_top"][0]["token"].replace("\n", "↵") in page or "&" in f["logit_top"][0]["token"]
    hostile_shown = 0
    for p in [index, *pages]:
        text = p.read_text()
        a = _audit(text)
        assert a.scripts == [{"src": "dictlens.js"}], p  # only our own script
        assert not a.handlers, (p, a.handlers)
        assert "img" not in a.tags and "textarea" not in a.tags, p
        hostile_shown += text.count("&lt;script&gt;window.__pwned")
    assert hostile_shown > 0  # the hostile tokens were on the pages, escaped
    # a subset report links only the pages it has
    write_report(analysis["dir"], tmp_path / "part", features=[0, 1], progress=False)
    assert sorted(p.name for p in (tmp_path / "part").glob("f*.html")) == ["f0.html", "f1.html"]
    assert 'href="f2.html"' not in (tmp_path / "part" / "index.html").read_text()
    assert not (tmp_path / "part.partial").exists()


@pytest.fixture(scope="module")
def client(analysis):
    app = create_app(analysis["dir"], sae=analysis["sae"], lm=analysis["lm"])
    app.testing = True
    return app.test_client()


def test_app_pages_search_and_api(client, analysis):
    db = FeatureDB(analysis["dir"])
    r = client.get("/")
    assert r.status_code == 200 and b"features of an SAE on resid_post.1" in r.data
    r = client.get("/?order=-density")
    ids = [int(x) for x in re.findall(rb'href="/feature/(\d+)"', r.data)]
    dens = db.densities
    assert ids and all(dens[a] >= dens[b] for a, b in zip(ids, ids[1:], strict=False))
    busy = ids[0]
    r = client.get(f"/feature/{busy}")
    assert r.status_code == 200 and f"Feature {busy}".encode() in r.data
    assert client.get(f"/feature?id={busy}").headers["Location"].endswith(f"/feature/{busy}")
    r = client.get("/feature/999")
    assert r.status_code == 400 and b"out of range" in r.data
    assert client.get("/api/feature/999").get_json()["error"].startswith("feature 999 is out of range")
    api = client.get(f"/api/feature/{busy}").get_json()
    assert api["count"] == db.feature(busy)["count"] and api["examples"]
    # live text: the features the app reports are the SAE's codes of the model's activations
    r = client.post("/api/text", json={"text": "The cat sat on the mat."})
    body = r.get_json()
    assert r.status_code == 200 and body["features"] and body["tokens"]
    assert all(len(t["features"]) <= 3 for t in body["tokens"])  # TopK k = 3
    maxima = [f["max"] for f in body["features"]]
    assert maxima == sorted(maxima, reverse=True)
    r = client.post("/text", data={"q": HOSTILE[0] + " and " + HOSTILE[2]})
    a = _audit(r.data.decode())
    assert r.status_code == 200 and not a.handlers and "img" not in a.tags
    assert a.scripts == [{"src": "/static/dictlens.js"}]
    assert client.post("/api/text", json={"text": "  "}).get_json()["error"] == "the text is empty"
    assert "at most" in client.post("/api/text", json={"text": "word " * 5000}).get_json()["error"]
    assert client.post("/api/text", data="nope").status_code == 400
    # search by token
    word = db.token_text(int(analysis["lm"].tokenizer(" the").input_ids[-1]))
    r = client.get("/token", query_string={"q": word})
    hits = db.features_for_token(word, n=20)
    assert hits, "' the' occurs in the analysed text"
    assert r.status_code == 200 and b"mean activation" in r.data and b"does not occur" not in r.data
    assert f'href="/feature/{hits[0]["id"]}"'.encode() in r.data
    assert client.get("/token", query_string={"q": "\u2603\u2603"}).status_code == 400


def test_app_serves_only_its_own_files(client):
    assert client.get("/static/style.css").status_code == 200
    for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py",
                 "/static//etc/passwd", "/../../etc/passwd", "/static/%2e%2e/%2e%2e/analysis/db.py"):
        r = client.get(path, follow_redirects=True)
        assert r.status_code in (400, 404), path
        assert b"def " not in r.data and b"root:" not in r.data
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


# ---- in a real browser ------------------------------------------------------------------

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    if path is None:  # the browser tests are part of the suite: without a browser they fail
        pytest.fail("Chromium is missing: `make setup` installs Debian's chromium as root with apt "
                    "(elsewhere: `apt-get install chromium`, or put chromium on PATH)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True,
                              args=["--no-sandbox", "--disable-background-networking"])
        yield b
        b.close()


def _page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    return page, dialogs


def test_report_in_a_browser(browser, analysis, tmp_path):
    index = write_report(analysis["dir"], tmp_path / "report", progress=False)
    page, dialogs = _page(browser)
    page.goto(index.as_uri())
    rows = page.locator("#features tbody tr")
    assert rows.count() == 24
    page.fill("#filter", "7")
    assert page.locator("#features tbody tr:visible").count() == 1
    page.fill("#filter", "")
    db = FeatureDB(analysis["dir"])
    page.click("#features th:nth-child(2)")  # sort by density, densest first
    first = int(page.locator("#features tbody tr").first.locator("td").first.inner_text())
    assert db.densities[first] == db.densities.max()
    busy = db.features(order="-count", limit=1)[0]["id"]
    page.click(f'a[href="f{busy}.html"]')
    assert page.locator("#feature-title").inner_text() == f"Feature {busy}"
    assert page.locator("#top .ex").count() == len(db.examples(busy, kind="top"))
    hot = page.locator("#top .tok.c").first
    assert float(hot.get_attribute("title")) > 0
    for el in page.locator(".tok").all()[:50]:
        el.hover()  # would fire an injected onmouseover
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "report_feature.png"), full_page=True)
    assert page.evaluate("window.__pwned") is None and not dialogs
    assert page.locator("#injected").count() == 0 and page.locator("img").count() == 0
    page.close()


@pytest.fixture
def server(analysis):
    from werkzeug.serving import make_server

    app = create_app(analysis["dir"], sae=analysis["sae"], lm=analysis["lm"])
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def test_app_in_a_browser(browser, server, analysis):
    page, dialogs = _page(browser)
    page.goto(server + "/")
    assert page.locator("#features tbody tr").count() == 24
    page.fill("header form.goto input", "5")
    page.press("header form.goto input", "Enter")
    page.wait_for_url("**/feature/5")
    assert page.locator("#feature-title").inner_text() == "Feature 5"
    page.goto(server + "/text")
    page.fill("#q", "The cat sat on the mat. " + HOSTILE[0])
    page.click("#run")
    page.wait_for_selector("#text-features")
    assert page.locator("#text-tokens tbody tr").count() > 5
    first = page.locator("#text-features tbody tr a").first
    target = first.inner_text()
    first.click()
    assert page.locator("#feature-title").inner_text() == f"Feature {target}"
    page.goto(server + "/token")
    page.fill("#q", "the")
    page.press("#q", "Enter")
    page.wait_for_selector("#token-features")
    assert page.locator("#token-features tbody tr").count() > 0
    SCREENSHOTS.mkdir(exist_ok=True)
    page.goto(server + "/text")
    page.fill("#q", "Water boils at one hundred degrees.")
    page.click("#run")
    page.wait_for_selector("#text-features")
    page.screenshot(path=str(SCREENSHOTS / "app_text.png"), full_page=True)
    assert page.evaluate("window.__pwned") is None and not dialogs
    page.close()


def test_app_compare_page(analysis):
    sae = analysis["sae"]
    other = SAE(SAEConfig(d_in=32, n_features=30, activation="topk", k=3), seed=5).eval()
    with __import__("torch").no_grad():
        other.W_dec[:24] = sae.W_dec.flip(0)  # feature f of this SAE is feature 23 - f there
    app = create_app(analysis["dir"], sae=sae, lm=analysis["lm"], compare=other)
    c = app.test_client()
    r = c.get("/compare")
    assert r.status_code == 200 and b"MMCS 1" in r.data and b"100.0% above 0.9" in r.data
    r = c.get("/feature/3")
    assert b"closest feature 20 (cosine 1)" in r.data and b"one-to-one partner 20" in r.data
    plain = create_app(analysis["dir"], sae=sae, lm=analysis["lm"]).test_client()
    assert b"dictlens serve RUN --compare OTHER_RUN" in plain.get("/compare").data


def test_app_steering_panel_and_api(client, analysis):
    r = client.get("/feature/3")
    assert b'id="steer-this"' in r.data
    r = client.get("/steer", query_string={"feature": 3})
    assert r.status_code == 200 and b'value="3:' in r.data and b'id="steer-result"' not in r.data
    r = client.get("/steer", query_string={"prompt": "The cat", "edits": "3:30"})   # a GET never generates
    assert r.status_code == 200 and b'id="steer-result"' not in r.data
    hostile = "The cat " + HOSTILE[0]
    r = client.post("/steer", data={"prompt": hostile, "edits": "3:30, 5:10", "kind": "add",
                                    "max_new_tokens": "6", "temperature": "0"})
    assert r.status_code == 200 and b'id="steer-result"' in r.data and b"<script>window" not in r.data
    audit = _audit(r.data.decode())
    assert not audit.handlers and all(s.get("src") for s in audit.scripts)
    steered = re.search(r'id="steered"><span class="frac">.*?</span>(.*?)</p>', r.data.decode(), re.S).group(1)
    unsteered = re.search(r'id="unsteered"><span class="frac">.*?</span>(.*?)</p>', r.data.decode(), re.S).group(1)
    assert steered != unsteered
    r = client.post("/api/steer", json={"prompt": "The cat", "edits": [{"feature": 3, "kind": "add", "value": 30}],
                                        "max_new_tokens": 6, "temperature": 0})
    body = r.get_json()
    assert r.status_code == 200 and body["steered"] != body["unsteered"] and body["edits"][0]["feature"] == 3
    for data, message in [({"prompt": "x", "edits": "3:abc"}, b"is not a number"),
                          ({"prompt": "x", "edits": "99:1"}, b"out of range"),
                          ({"prompt": "x", "edits": ""}, b"at least one edit"),
                          ({"prompt": "x", "edits": "3:1", "max_new_tokens": "many"}, b"is not a number")]:
        r = client.post("/steer", data=data)
        assert r.status_code == 400 and message in r.data, data
    for body in ({"prompt": "x", "edits": [{"kind": "add"}]}, [1, 2], {"prompt": "x", "edits": [5]},
                 {"prompt": "x", "edits": [{"feature": 1e400, "value": 1}]},
                 {"prompt": "x" * 5000, "edits": [{"feature": 1, "value": 1}]}):
        r = client.post("/api/steer", json=body)
        assert r.status_code == 400 and r.get_json()["error"], body


def test_app_steering_in_a_browser(browser, server):
    page, dialogs = _page(browser)
    page.goto(server + "/feature/3")
    page.click("#steer-this")
    page.wait_for_url("**/steer?feature=3")
    page.fill("#prompt", "Once upon a time " + HOSTILE[1])
    page.fill("#edits", "3:30")
    page.click("#steer-run")
    page.wait_for_selector("#steer-result")
    assert page.locator("#steered").inner_text() != page.locator("#unsteered").inner_text()
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "app_steer.png"), full_page=True)
    assert page.evaluate("window.__pwned") is None and not dialogs
    page.close()


def test_two_raters_label_in_a_browser_blind_and_agreement_reads_them(browser, server, analysis, capsys):
    from dictlens.cli import main
    from dictlens.interpret.store import Explanation, Interpretations

    with Interpretations(analysis["dir"]) as st:       # an explanation that must stay hidden until answered
        st.put_explanations([Explanation(f, "tokens", f"SECRET-{f}", None, "", "", {}) for f in range(24)])
    page, dialogs = _page(browser)
    seen = {}
    for r, rater in enumerate(("ada", "bob <i>")):
        page.goto(server + "/label")
        page.fill("#rater", rater)
        page.click("#start")
        for n in range(3):
            assert "SECRET" not in page.locator("#label-form").inner_text()           # blind
            assert page.locator("#revealed").count() == (1 if n else 0)
            fid = int(page.locator("input[name=feature]").get_attribute("value"))
            seen.setdefault(rater, []).append(fid)
            page.fill("#label", f"<img src=x onerror=window.__pwned=1> {rater} {n}")
            page.check(f'input[name=rating][value="{1 + (n + r) % 5}"]')
            boxes = page.locator("input[name=fits]")
            for i in range(boxes.count()):
                if (i + r) % 2 == 0:
                    boxes.nth(i).check()
            page.click("#save")
            assert f"SECRET-{fid}" in page.locator("#revealed").inner_text()           # revealed after
        assert page.locator("#progress").inner_text().startswith(f"{rater}: 3 of ")
    assert seen["ada"] == seen["bob <i>"]                  # the same features, in the same order
    assert page.evaluate("window.__pwned") is None and not dialogs and page.locator("img").count() == 0
    SCREENSHOTS.mkdir(exist_ok=True)
    page.goto(server + "/label?rater=carol")
    page.screenshot(path=str(SCREENSHOTS / "app_label.png"), full_page=True)
    page.close()
    with Interpretations(analysis["dir"], readonly=True) as st:
        labels = st.labels()
    assert len(labels) == 6 and all(lab.contexts for lab in labels if lab.feature == seen["ada"][0])
    capsys.readouterr()
    assert main(["agreement", str(analysis["dir"]), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "2 raters (ada: 3, bob <i>: 3 labels) on 3 features" in out and "Cohen's kappa, ada & bob <i>" in out
