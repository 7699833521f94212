"""Contrastive graphs: two hand-built graphs with known differences (features only in one,
a feature at two positions summed, a sign flip, a changed weight), the difference graph, and
the clear error for graphs of different transcoders."""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import hand_graph

from tracer.analyses.contrast import ContrastError, contrast
from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph

F, E, T, LG = FEATURE, ERROR, TOKEN, LOGIT


def graphs() -> tuple[Graph, Graph]:
    # a: feature L1/F5 @2, L2/F7 @2 and @3 (one feature, two nodes), error L0@2, token 9@1,
    #    logit 10.  b: L1/F5 @2, L0/F3 @1, error L0@2, token 8@1, logit 10.
    a = hand_graph(
        [F, F, F, E, T, LG], [1, 2, 2, 0, -1, 4], [2, 2, 3, 2, 1, 3], [5, 7, 7, -1, 9, 10],
        [1.0, 2.0, 0.5, 0.3, 1.0, 3.0],
        [(5, 0, 2.0), (5, 1, 1.0), (5, 2, 0.5), (0, 4, 0.7), (1, 0, 0.25), (5, 3, 0.1)],
    )  # fmt: skip
    b = hand_graph(
        [F, F, E, T, LG], [1, 0, 0, -1, 4], [2, 1, 2, 1, 3], [5, 3, -1, 8, 10],
        [1.5, 0.4, 0.3, 1.0, 2.0],
        [(4, 0, -1.0), (0, 1, 0.6), (4, 2, 0.4), (0, 3, 0.7)],
    )  # fmt: skip
    return a, b


def test_known_differences():
    a, b = graphs()
    c = contrast(a, b)
    assert [(r[0], r[1]) for r in c.only_in_a] == [(2, 7)]
    assert c.only_in_a[0][2] == pytest.approx(2.5)  # activations of both nodes summed
    assert [(r[0], r[1]) for r in c.only_in_b] == [(0, 3)]
    assert [(r[0], r[1], r[2], r[3]) for r in c.shared] == [(1, 5, 1.0, 1.5)]
    # L1/F5 -> logit 10: +2 in a, -1 in b: a sign flip, the largest change (3).
    assert len(c.sign_flips) == 1
    flip = c.sign_flips[0]
    assert flip.source == (F, 1, -1, 5) and flip.target == (LG, -1, -1, 10)
    assert (flip.weight_a, flip.weight_b, flip.change) == (2.0, -1.0, 3.0)
    assert c.largest_changes[0] == flip
    # error L0@2 -> logit: 0.1 vs 0.4, shared; L2/F7 -> logit summed over positions: 1.5.
    changes = {(e.source, e.target): e.change for e in c.largest_changes}
    assert changes[((E, 0, 2, -1), (LG, -1, -1, 10))] == pytest.approx(-0.3)
    only_a = {(e.source, e.target): e.weight_a for e in c.edges_only_in_a}
    assert only_a[((F, 2, -1, 7), (LG, -1, -1, 10))] == pytest.approx(1.5)
    assert ((T, -1, 1, 9), (F, 1, -1, 5)) in only_a  # tokens differ: 9 in a, 8 in b
    only_b = {(e.source, e.target) for e in c.edges_only_in_b}
    assert only_b == {((F, 0, -1, 3), (F, 1, -1, 5)), ((T, -1, 1, 8), (F, 1, -1, 5))}
    s = c.summary()
    assert s["n_features_only_in_a"] == 1 and s["n_sign_flips"] == 1
    assert s["only_in_a"][0]["feature"] == "L2/F7"


def test_difference_graph(tmp_path):
    a, b = graphs()
    d = contrast(a, b).difference_graph()
    ids = {d.node_id(i): i for i in range(d.n_nodes)}
    f5 = next(i for n, i in ids.items() if n.startswith("f_1_") and n.endswith("_5"))
    assert d.activation[f5] == pytest.approx(1.0 - 1.5)
    logit = np.where(d.kind == LOGIT)[0]
    assert len(logit) == 1 and d.logit_weights[logit[0]] == pytest.approx(1.0)
    w = {(int(t), int(s)): float(x) for t, s, x in zip(d.target, d.source, d.weight, strict=True)}
    assert w[(int(logit[0]), f5)] == pytest.approx(3.0)
    assert d.count("feature") == 3 and d.count("token") == 2
    back = Graph.load(d.save(tmp_path / "diff.parquet"))
    np.testing.assert_array_equal(back.weight, d.weight)
    assert back.extra["contrast"]["n_sign_flips"] == 1


def test_identical_graphs_have_no_difference():
    a, _ = graphs()
    c = contrast(a, a)
    assert not c.only_in_a and not c.only_in_b and not c.sign_flips
    assert all(e.change == 0 for e in c.largest_changes)
    assert contrast(a, a).difference_graph().n_edges == 0


def test_different_transcoders_are_a_clear_error():
    a, b = graphs()
    b.transcoder_name = "another-clt"
    with pytest.raises(ContrastError, match="different transcoders.*same transcoder"):
        contrast(a, b)
