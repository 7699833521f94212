"""Influence, pruning and scores against answers worked out by hand on small graphs."""

from __future__ import annotations

import numpy as np
import pytest

from tracer.graph import Graph
from tracer.prune import cumulative_keep, graph_scores, node_influence, prune


def hand_graph() -> Graph:
    """0 feature A (L0), 1 feature B (L1), 2 error (L0), 3 token, 4 logit.
    Edges: logit<-B 2, logit<-A -1, logit<-err 1, B<-A 3, B<-tok 1, A<-tok 2."""
    t = np.array([4, 4, 4, 1, 1, 0], np.int32)
    s = np.array([1, 0, 2, 0, 3, 3], np.int32)
    w = np.array([2.0, -1.0, 1.0, 3.0, 1.0, 2.0], np.float32)
    return Graph(
        prompt="x", tokens=[1, 7], token_strings=["<s>", "x"], model_name="m",
        transcoder_name="t", n_layers=2,
        kind=np.array([0, 0, 1, 2, 3], np.int8), layer=np.array([0, 1, 0, -1, 2], np.int32),
        position=np.array([1, 1, 1, 1, 1], np.int32), feature=np.array([3, 4, -1, 7, 9]),
        activation=np.ones(5, np.float32), probability=np.array([0, 0, 0, 0, 1], np.float32),
        target=t, source=s, weight=w, logit_weights=np.array([0, 0, 0, 0, 1], np.float32),
    )  # fmt: skip


def test_influence_by_hand():
    # Normalised rows: logit: B .5, A .25, err .25; B: A .75, tok .25; A: tok 1.
    # Paths: B .5; A .25 + .5*.75; err .25; tok .5*.25 + .25 + .375.
    np.testing.assert_allclose(node_influence(hand_graph()), [0.625, 0.5, 0.25, 0.75, 0.0])


def test_scores_by_hand():
    sc = graph_scores(hand_graph())
    assert sc["replacement"] == pytest.approx(0.75 / (0.75 + 0.25))
    # completeness: logit (1 - .25) * 1, B 1 * .5, A 1 * .625 over weights 1 + .5 + .625
    assert sc["completeness"] == pytest.approx((0.75 + 0.5 + 0.625) / 2.125)


def test_cumulative_keep():
    np.testing.assert_array_equal(
        cumulative_keep(np.array([1.0, 5.0, 3.0, 1.0]), 0.8), [False, True, True, False]
    )
    assert cumulative_keep(np.array([1.0, 1.0]), 1.0).all()
    with pytest.raises(ValueError):
        cumulative_keep(np.array([1.0]), 0.0)


def test_prune_by_hand():
    g = hand_graph()
    p = prune(g, node_threshold=0.5, edge_threshold=0.98)
    # A holds .625 / 1.125 > .5 of feature influence: B goes; all three remaining edges kept.
    assert [p.node_id(i) for i in range(p.n_nodes)] == ["f_0_1_3", "e_0_1", "t_1", "l_9"]
    edges = {
        (p.node_id(t), p.node_id(s)): w
        for t, s, w in zip(p.target, p.source, p.weight, strict=True)
    }
    assert edges == {("l_9", "f_0_1_3"): -1.0, ("l_9", "e_0_1"): 1.0, ("f_0_1_3", "t_1"): 2.0}
    np.testing.assert_allclose(p.extra["influence"], [0.5, 0.5, 0.5, 0.0])
    assert p.params["node_threshold"] == 0.5 and p.scores["replacement"] == pytest.approx(0.75)


def test_prune_drops_dangling_nodes():
    g = hand_graph()
    # Edge scores after node pruning at 1.0: logit<-B .5, logit<-A .25, logit<-err .25,
    # B<-A .375, B<-tok .125, A<-tok .625 (scores = normalised |w| x (influence + logit w)).
    # At 0.5 only A<-tok (.625) and logit<-B (.5) survive; A then feeds nothing kept but B<-A
    # was cut, so A and err are dangling and dropped; B stays (it feeds the logit).
    p = prune(g, node_threshold=1.0, edge_threshold=0.45)
    ids = [p.node_id(i) for i in range(p.n_nodes)]
    assert ids == ["f_1_1_4", "t_1", "l_9"]
    assert p.n_edges == 1 and p.node_id(p.target[0]) == "l_9"
