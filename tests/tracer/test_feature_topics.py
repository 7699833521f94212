"""The place-topic rule of tracer.analyses.feature_topics on hand-made contexts: the activating
token or
a word within 3 of it must be a place word (case-sensitive names, any-case nouns), a feature
counts at half of its top-8 contexts; and the WordNet word list holds the expected places."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracer.analyses.feature_topics import (
    PlaceWords,
    context_topic,
    feature_topic,
    marked_text,
    place_words,
)
from tracer.reports.feature_book import Context, FeatureBook, FeatureInfo

WORDS = PlaceWords.of(["France", "Paris", "New York", "Turkey"])


def ctx(left: str, token: str, right: str) -> Context:
    """A context as the contexts table gives it: three pieces, the activation on the middle."""
    return Context([left, token, right], [0.0, 2.0, 0.0])


@pytest.mark.parametrize(
    ("left", "token", "right", "counts", "matched"),
    [
        ("The capital of", " France", " is Paris.", True, ["capital", "France", "Paris"]),
        ("He flew to Paris on a", " sunny", " day", True, ["Paris"]),  # 3 words before
        # "Paris" is 4 words before the token (Paris on a sunny | warm): out of the window.
        ("He flew to Paris on a sunny", " warm", " day", False, []),
        ("a b c", " d", " e f g Paris", False, []),  # 4 words after
        ("a b c", " d", " e f Paris", True, ["Paris"]),  # 3 words after
        ("the big", " city", " lights", True, ["city"]),  # a place noun
        ("CAPITAL", " letters", " here", True, ["CAPITAL"]),  # nouns in any case
        ("roast", " turkey", " dinner", False, []),  # names are case-sensitive
        ("France's", " wine", "", True, ["France"]),  # possessive
        ("x x x x New", " York", " x x x x", True, ["New York"]),  # a name split by the window
        ("x x x New York", ",", " x x x", True, ["New York"]),  # punctuation: between two words
        ("Paris x x x", ",", " x x x", False, []),  # ... "Paris" is 4 words before the gap
        ("Fr", "ance", " x", True, ["France"]),  # a sub-word token inside a name
    ],
)
def test_context_rule(left, token, right, counts, matched):
    t = context_topic(ctx(left, token, right), WORDS)
    assert t.counts is counts
    assert t.matched == matched
    assert t.text == f"{left}«{token}»{right}"


def test_peak_of_real_token_lists_and_window_size():
    c = Context(["Paris", " is", " big", " and", " old", " now"], [0, 0, 0, 0, 1.5, 0.2])
    assert marked_text(c) == "Paris is big and« old» now"
    assert not context_topic(c, WORDS).counts  # Paris is 4 words before " old"
    assert context_topic(c, WORDS, window=4).counts


def test_feature_counts_at_half_of_its_top_8():
    good, bad = ctx("in", " Paris", ""), ctx("in", " bed", "")
    # 4 of the first 8 count; the 9th and 10th (good) are beyond the top 8.
    info = FeatureInfo(1, 7, top_contexts=[good] * 4 + [bad] * 4 + [good] * 2)
    t = feature_topic(info, WORDS)
    assert (t.n_contexts, t.n_counting, t.counts) == (8, 4, True)
    info.top_contexts = [good] * 3 + [bad] * 5 + [good] * 2
    t = feature_topic(info, WORDS)
    assert (t.n_contexts, t.n_counting, t.counts) == (8, 3, False)
    assert feature_topic(FeatureInfo(0, 0), WORDS).counts is False  # no contexts
    d = t.to_dict()
    assert (d["layer"], d["index"], d["n_counting"]) == (1, 7, 3)
    assert d["contexts"][0] == {"text": "in« Paris»", "counts": True, "matched": ["Paris"]}


def test_contexts_table_rows_are_checked(tmp_path: Path):
    import pyarrow as pa

    table = pa.table({
        "layer": [2], "feature": [5],
        "top_contexts": [["the capital of «France» is", "a «cat» sat"]],
        "top_activations": [[3.0, 1.0]],
    })  # fmt: skip
    info = FeatureBook.from_table(table).get(2, 5)
    t = feature_topic(info, WORDS)
    assert [c.counts for c in t.contexts] == [True, False] and t.counts  # 1 of 2: half


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").exists(), reason="no WordNet")
def test_wordnet_place_words():
    w = place_words()
    for name in ("France", "Germany", "Italy", "Paris", "Berlin", "Rome", "London", "Tokyo"):
        assert (name,) in w.names, name
    assert ("New", "York") in w.names
    assert ("turkey",) not in w.names and ("Texas",) not in w.names  # a bird; a US state
    assert context_topic(ctx("the capital of", " Germany", ""), w).counts
    assert not context_topic(ctx("we went", " home", " early"), w).counts


def _by_hand(graph, infl, n):
    """Influence summed per (layer, feature) with np.add.at over node keys, largest first."""
    import numpy as np

    from tracer.graph import FEATURE

    f = np.where(graph.kind == FEATURE)[0]
    keys = graph.layer[f].astype(np.int64) * 10_000 + graph.feature[f]
    uniq, inv = np.unique(keys, return_inverse=True)
    sums = np.zeros(len(uniq))
    np.add.at(sums, inv, np.asarray(infl)[f])
    order = np.lexsort((uniq, -sums))[:n]
    return uniq[order].tolist(), sums[order]


def test_cards_of_the_most_influential_features():
    import numpy as np
    from model_fixtures import make_random_clt, make_tiny_model

    from tracer.analyses.feature_topics import feature_cards, influential_features
    from tracer.attribution import attribute
    from tracer.graph import FEATURE
    from tracer.prune import node_influence, prune
    from tracer.replacement import ReplacementModel

    rm = ReplacementModel(make_tiny_model("llama"), make_random_clt(3, 32, 16, seed=4))
    full = attribute(rm, "ab cd ef", progress=False)
    g = prune(full, 0.9, 0.98)
    for graph, infl in ((g, g.extra["influence"]), (full, node_influence(full))):
        keys, sums = _by_hand(graph, infl, 4)
        top = influential_features(graph, 4)
        assert [(l * 10_000 + i) for l, i, _, _ in top] == keys
        np.testing.assert_allclose([x for _, _, x, _ in top], sums, rtol=1e-9)
    top = influential_features(g, 4)
    f = np.where(g.kind == FEATURE)[0]
    l0, i0, _, pos0 = top[0]
    at = (g.layer[f] == l0) & (g.feature[f] == i0)
    assert pos0 == sorted({int(p) for p in g.position[f][at]})
    book = FeatureBook.from_dict({"features": [{
        "layer": l0, "index": i0, "frequency": 0.01,
        "top_contexts": [{"tokens": ["in", " Paris"], "activations": [0, 1]}],
        "promoted_tokens": [[" France", 0.5]]}]})  # fmt: skip
    cards = feature_cards(g, book, WORDS, n=4)
    assert [(c.layer, c.index) for c in cards] == [(l, i) for l, i, _, _ in top]
    d = cards[0].to_dict()
    assert d["contexts"] == ["in« Paris»"] and d["promoted"] == [(" France", 0.5)]
    assert d["about_places"] is True and d["frequency"] == 0.01
    assert cards[1].topic is None and cards[1].to_dict()["about_places"] is None
