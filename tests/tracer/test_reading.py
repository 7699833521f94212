"""What the explorer reads with: automatic feature labels, visible spaces, the feature-share
thresholds of the readable default, and the subgraph diagram's summed edges."""

from __future__ import annotations

import numpy as np
import pytest
from prune_fixtures import hand_graph

from tracer.explorer.payload import feature_shares
from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN
from tracer.reports.annotate import auto_label, visible_token
from tracer.reports.feature_book import Context, FeatureInfo
from tracer.subgraph import Subgraph, SubgraphError, Supernode, diagram


def test_visible_token():
    assert visible_token(" Paris") == "␣Paris"
    assert visible_token("Paris") == "Paris"
    assert visible_token("\n\t x") == "⏎⇥␣x"


def test_auto_label_recurring_words_and_promoted():
    ctx = [
        Context(["The capital city of", " Texas", " is Austin"], [0.0, 3.0, 0.0]),
        Context(["Paris is the capital city of", " France", "."], [0.0, 2.0, 0.0]),
        Context(["Berlin, the capital of", " Germany", " today"], [0.0, 1.0, 0.0]),
    ]
    info = FeatureInfo(1, 2, ctx, promoted_tokens=[(" Austin", 1.0), (" Paris", 0.5)])
    # "capital" in 3 contexts, "city" in 2; the peaks differ (no quoted token)
    assert auto_label(info) == "capital, city · → ␣Austin ␣Paris"
    same_peak = [Context(["a big", " dog", " ran"], [0, 2, 0]), Context(["the", " dog"], [0, 1])]
    assert auto_label(FeatureInfo(0, 0, same_peak)) == "“dog”"
    lone = FeatureInfo(0, 1, [Context(["xyz", " qq"], [0, 1])])
    assert auto_label(lone) == "on ␣qq"  # nothing recurs, nothing promoted
    assert auto_label(FeatureInfo(0, 3, label="human label")) == "human label"
    long = FeatureInfo(0, 4, promoted_tokens=[("x" * 60, 1.0)])
    assert len(auto_label(long)) == 40 and auto_label(long).endswith("…")


def test_feature_shares():
    kind = np.array([FEATURE, FEATURE, FEATURE, ERROR, TOKEN, LOGIT])
    infl = np.array([0.1, 0.6, 0.3, 0.35, 0.9, 1.0])
    fcum, frank = feature_shares(kind, infl)
    # features by influence: 0.6, 0.3, 0.1 (total 1.0); before each: 0, 0.6, 0.9
    assert fcum[:3] == pytest.approx([0.9, 0.0, 0.6]) and frank[:3].tolist() == [2, 0, 1]
    assert fcum[3] == pytest.approx(0.6) and frank[3] == 1  # only the 0.6 feature is above it
    assert fcum[4] == fcum[5] == 0 and frank[4] == frank[5] == 0
    # the top feature is shown at every threshold above zero
    for t in (1e-6, 0.3, 0.8):
        assert (fcum[:3] < t).sum() >= 1


def test_diagram_sums_member_edges():
    # hand_graph: 0 A (L0), 1 B (L1), 2 err, 3 token, 4 logit; edges logit<-B 2, logit<-A -1,
    # logit<-err 1, B<-A 3, B<-tok 1, A<-tok 2
    g = hand_graph()
    ids = ["0_0_1", "1_1_1", "0_-1_1", "E_3_1", "3_4_1"]
    sub = Subgraph("d", pinned=[ids[3], ids[0], ids[1], ids[4]], labels={ids[4]: "out"})
    d = diagram(g, sub)
    assert [u["id"] for u in d["units"]] == [ids[3], ids[0], ids[1], ids[4]]
    assert d["units"][3]["label"] == "out" and d["units"][0]["kind"] == "token"
    assert d["units"][0]["layer"] == -1 and d["units"][3]["layer"] == 2
    got = {(e["source"], e["target"]): e["weight"] for e in d["edges"]}
    assert got == {(ids[3], ids[0]): 2.0, (ids[3], ids[1]): 1.0, (ids[0], ids[1]): 3.0,
                   (ids[0], ids[4]): -1.0, (ids[1], ids[4]): 2.0}  # fmt: skip
    # A and B as one supernode: its edges are the sums of its members'; A->B is inside it
    grouped = Subgraph("d", pinned=sub.pinned, supernodes=[Supernode("AB", [ids[0], ids[1]])])
    d = diagram(g, grouped)
    assert [u["id"] for u in d["units"]] == ["s0", ids[3], ids[4]]
    assert d["units"][0]["layer"] == 0.5
    got = {(e["source"], e["target"]): (e["weight"], e["n"]) for e in d["edges"]}
    assert got == {(ids[3], "s0"): (3.0, 2), ("s0", ids[4]): (1.0, 2)}
    with pytest.raises(SubgraphError, match="not a node"):
        diagram(g, Subgraph("d", pinned=["9_9_9"]))


def test_subgraph_scores_count_unpinned_features_as_error():
    from tracer.prune import graph_scores
    from tracer.subgraph import subgraph_scores

    g = hand_graph()
    ids = ["0_0_1", "1_1_1", "0_-1_1", "E_3_1", "3_4_1"]
    every = subgraph_scores(g, Subgraph("s", pinned=ids[:2]), "circuit-tracer")
    assert every["replacement"] == pytest.approx(graph_scores(g, "circuit-tracer")["replacement"])
    assert every["features"] == 2
    # pin A only: B counts as an error node with its inputs (A 3, tok 1) dropped. Normalised
    # rows: logit <- B 0.5, A 0.25, err 0.25; A <- tok 1. Influence: B 0.5, A 0.25, err 0.25,
    # tok 0.25: replacement = 0.25 / (0.25 + 0.75). Completeness (circuit-tracer): the logit
    # row's non-error share 0.25 at weight 1, the other rows whole at weights 0.25 (A), 0.5 (B),
    # 0.25 (err), 0.25 (tok): (0.25 + 1.25) / 2.25.
    one = subgraph_scores(g, Subgraph("s", pinned=[ids[0]]), "circuit-tracer")
    assert one["replacement"] == pytest.approx(0.25)
    assert one["completeness"] == pytest.approx(1.5 / 2.25)
    none = subgraph_scores(g, Subgraph("s", pinned=[ids[3], ids[4]]), "circuit-tracer")
    assert none["replacement"] == 0.0 and none["features"] == 0
