"""The offline pattern explainer on planted features: it recovers the pattern, simulates the
activations, and a feature scored with another's explanation sits near chance."""

from __future__ import annotations

import random

import pytest

from dictlens.interpret.patterns import Window, explain_tokens, simulation_score

WORDS = [" the", " cat", " sat", " on", " mat", " a", " dog", " ran", " to", " park", " and", " it"]


def _text(rng: random.Random, n: int = 24) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def _planted(fire, n: int = 40, seed: int = 0) -> list[Window]:
    """Windows of random text whose activation is ``fire(texts, i)`` (0 elsewhere)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = _text(rng)
        out.append(Window(t, [fire(t, i) * rng.uniform(2, 4) for i in range(len(t))]))
    return out


def on_cat(t, i):
    return float(t[i] == " cat")


def mat_after_the(t, i):
    return float(t[i] == " mat" and i > 0 and t[i - 1] == " the")


def test_one_token_feature_is_recovered_and_simulated():
    train, held = _planted(on_cat, seed=0), _planted(on_cat, seed=1)
    p = explain_tokens(train)
    assert [t for t, _, _ in p.tokens] == [" cat"] and p.before is None and p.coverage == pytest.approx(1)
    assert "' cat' (100%)" in p.sentence()
    assert simulation_score(p, held) > 0.9


def test_token_after_token_feature_keeps_its_context():
    train, held = _planted(mat_after_the, seed=2), _planted(mat_after_the, seed=3)
    p = explain_tokens(train)
    assert [t for t, _, _ in p.tokens] == [" mat"] and p.before is not None and p.before[0] == " the"
    assert "after ' the'" in p.sentence()
    plain = explain_tokens(train)
    plain.before = None                                   # the same tokens without the context
    assert simulation_score(p, held) > 0.9 > simulation_score(plain, held)


def test_another_features_explanation_scores_near_chance():
    cat = explain_tokens(_planted(on_cat, seed=4))
    held_dog = _planted(lambda t, i: float(t[i] == " dog"), seed=5)
    assert abs(simulation_score(cat, held_dog)) < 0.15
    assert explain_tokens([Window([" a", " b"], [0.0, 0.0])]).sentence() == "never fires in its examples"


def test_explains_the_features_of_a_real_analysis(analysed_run):
    from dictlens.analysis.db import FeatureDB
    from dictlens.interpret.patterns import windows

    run = analysed_run
    db = FeatureDB(run / "analysis")
    f = max(range(db.n_features), key=lambda i: db.feature(i)["count"])
    ws = windows(db, f)
    p = explain_tokens(ws)
    fired = {t for w in ws for t, a in zip(w.texts, w.acts, strict=True) if a > 0}
    assert p.tokens and {t for t, _, _ in p.tokens} <= fired and 0 < p.coverage <= 1 + 1e-9
    assert p.windows == len(ws) and simulation_score(p, ws) > 0   # its own examples: better than nothing
