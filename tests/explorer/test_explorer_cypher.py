"""The Cypher console's table of properties (tracer.explorer.cypher): node and relationship
columns spread into one column per property, key properties first, everything else summarised
in one short cell; and, on the stored demo graphs, ``ORDER BY n.influence DESC`` sorts by the
influence pruning recorded for each node."""

from __future__ import annotations

import numpy as np
import pytest
from explorer_client import call

from tracer.explorer.cypher import MAX_SUMMARY, MAX_TEXT, property_table, summary
from tracer.graph import FEATURE
from tracer.reports.neuronpedia import np_node_id


def node(**props):
    return {"labels": ["Node"], **props}


def test_node_and_relationship_columns_spread_into_properties():
    a = node(graph="g1", i=4, kind="feature", layer=3, position=5, feature=12, influence=0.25,
             activation=1.5, token=None)  # fmt: skip
    b = node(graph="g1", i=9, kind="logit", layer=4, position=5, feature=7042, influence=0.5,
             probability=0.9)  # fmt: skip
    r = {"type": "EDGE", "weight": -0.125, "k": 3}
    t = property_table(["n", "r", "c"], [[a, r, 2], [b, None, 1]])
    cols = t["columns"]
    # labels, then the key properties in order, then the rest by name
    assert cols == ["n:labels", "n.kind", "n.layer", "n.feature", "n.position", "n.influence",
                    "n.activation", "n.probability", "n.graph", "n.i",
                    "r:type", "r.weight", "r.k", "c"]  # fmt: skip
    assert t["kinds"][0] == "labels" and t["kinds"][10] == "type" and t["kinds"][-1] == "value"
    assert set(t["kinds"][1:10]) == {"property"}
    row = dict(zip(cols, t["rows"][0], strict=True))
    assert row["n:labels"] == "Node" and row["n.influence"] == 0.25 and row["n.layer"] == 3
    assert row["n.probability"] is None  # a property this node lacks: an empty cell
    assert row["r:type"] == "EDGE" and row["r.weight"] == -0.125 and row["c"] == 2
    row = dict(zip(cols, t["rows"][1], strict=True))
    assert row["n.influence"] == 0.5 and row["n.feature"] == 7042
    assert row["r:type"] is None and row["r.weight"] is None  # a null relationship


def test_no_cell_is_a_json_blob():
    long = "x" * 500
    mixed = [node(kind="feature", layer=1, feature=2, position=0, influence=0.1), 3]
    t = property_table(["m", "s", "p"], [[mixed[0], long, mixed], [4, "short", {"a": [1, 2]}]])
    # a column mixing a node and a number is one value column of summaries
    assert t["columns"] == ["m", "s", "p"]
    cells = [c for r in t["rows"] for c in r]
    assert all(not isinstance(c, dict | list) for c in cells)
    assert t["rows"][0][0] == "(:Node kind=feature layer=1 feature=2 position=0 influence=0.1)"
    assert t["rows"][0][1] == "x" * (MAX_TEXT - 1) + "…"
    assert t["rows"][0][2].startswith("[(:Node kind=feature") and t["rows"][0][2].endswith(", 3]")
    assert t["rows"][1][2] == "{a: [1, 2]}"
    assert summary({"type": "EDGE", "weight": 0.5}) == "[:EDGE weight=0.5]"
    assert len(summary([node(key="k" * 100)] * 5)) == MAX_SUMMARY


def test_order_by_influence_returns_the_recorded_numbers(world):
    g, gid = world.graphs[0][0], world.ids[0]
    infl = np.asarray(g.extra["influence"], dtype=np.float64)
    feats = np.flatnonzero(g.kind == FEATURE)
    status, res = call(
        f"{world.url}/api/cypher",
        {"query": f"MATCH (n:Node {{graph: '{gid}'}}) WHERE n.kind = 'feature' "
                  "RETURN n ORDER BY n.influence DESC LIMIT 5"},
    )  # fmt: skip
    assert status == 200, res
    t = res["table"]
    col = t["columns"].index("n.influence")
    shown = [r[col] for r in t["rows"]]
    assert all(isinstance(v, float) for v in shown) and shown == sorted(shown, reverse=True)
    # the five most influential features of the graph, by the influence pruning recorded
    expect = np.sort(infl[feats])[::-1][:5]
    np.testing.assert_allclose(shown, expect, rtol=1e-12)
    layer, pos, feat = (t["columns"].index(f"n.{k}") for k in ("layer", "position", "feature"))
    top = feats[np.argsort(-infl[feats], kind="stable")][:5]
    if len(set(expect.tolist())) == 5:  # ties aside, the same nodes
        assert [(r[layer], r[pos], r[feat]) for r in t["rows"]] == [
            (int(g.layer[i]), int(g.position[i]), int(g.feature[i])) for i in top
        ]
    assert res["highlight"]["nodes"] == sorted({np_node_id(g, int(i)) for i in top})
    # a relationship query: type and weight columns, the weights the graph's
    status, res = call(
        f"{world.url}/api/cypher",
        {"query": f"MATCH (a:Node {{graph: '{gid}'}})-[e:EDGE]->(b) "
                  "RETURN e ORDER BY abs(e.weight) DESC LIMIT 3"},
    )  # fmt: skip
    t = res["table"]
    assert t["columns"][:2] == ["e:type", "e.weight"]
    assert [r[0] for r in t["rows"]] == ["EDGE"] * 3
    w = np.sort(np.abs(g.weight))[::-1][:3]
    assert [abs(r[1]) for r in t["rows"]] == pytest.approx(w.tolist(), rel=1e-6)
