"""(:Head) nodes: a graph's head loadings become CARRIES relationships from shared Head nodes to
the edges' target nodes; the canned queries sum them across prompts; storing twice leaves one
copy; deleting the graph removes them."""

from __future__ import annotations

import numpy as np
from conftest import small_graph, wipe

from graphstore.heads import head_key, head_rows
from graphstore.schema import feature_key


def with_loadings(graph, seed: int):
    """A head-loadings record on some of the graph's edges (the layout tracer.attention
    writes): per edge up to three heads [layer, head, part]."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(graph.n_edges, size=min(12, graph.n_edges), replace=False)
    rec = {"target": [], "source": [], "weight": [], "residual": [], "heads": [],
           "remainder": []}  # fmt: skip
    for e in picks:
        t, s, w = int(graph.target[e]), int(graph.source[e]), float(graph.weight[e])
        heads = [[int(rng.integers(6)), int(rng.integers(4)), w * float(f)]
                 for f in rng.dirichlet(np.ones(3)) * 0.9][: int(rng.integers(1, 4))]  # fmt: skip
        rec["target"].append(graph.node_id(t))
        rec["source"].append(graph.node_id(s))
        rec["weight"].append(w)
        rec["residual"].append(0.0)
        rec["heads"].append(heads)
        rec["remainder"].append(w - sum(p for _, _, p in heads))
    graph.extra["head_loadings"] = rec
    return graph


def test_heads_round_trip_and_queries(store):
    wipe(store)
    graphs = [with_loadings(small_graph(s), s) for s in (1, 2)]
    rows = [r for g in graphs for r in head_rows(g)]
    count = "MATCH (:Head)-[c:CARRIES]->(:Node) RETURN count(c) AS c"
    store.add_many(graphs, show_progress=False)  # the batch path writes heads too
    assert store.cypher(count).rows[0][0] == len(rows) > 0
    for g in graphs:
        store.add(g)  # idempotent: still one copy of each relationship
    n = store.cypher(count).rows[0][0]
    assert n == len(rows)
    keys = {r[2] for r in rows}
    got = store.cypher("MATCH (h:Head) RETURN h.key AS k, h.layer AS l, h.head AS h").rows
    assert {k for k, _, _ in got} >= keys
    # head-prompts: summed |part| per graph, exactly
    model = graphs[0].model_name
    l, h = rows[0][3], rows[0][4]
    res = store.query("head-prompts", model=model, layer=l, head=h)
    want = {}
    for g in graphs:
        s = sum(abs(r[5]) for r in head_rows(g) if r[2] == head_key(model, l, h))
        if s:
            want[g.prompt] = s
    assert {r[0]: r[2] for r in res.rows} == pytest_approx(want)
    # feature-heads: the heads of a feature's edges (into or out of its nodes)
    g = graphs[0]
    t = next(i for i in (r[0] for r in head_rows(g)) if g.kind[i] == 0)
    lay, idx = int(g.layer[t]), int(g.feature[t])
    res = store.query("feature-heads", layer=lay, index=idx, transcoder=g.transcoder_name)
    want = {}
    key = feature_key(g.transcoder_name, lay, idx)
    for gg in graphs:
        ids = {i for i in range(gg.n_nodes) if gg.kind[i] == 0
               and feature_key(gg.transcoder_name, gg.layer[i], gg.feature[i]) == key}  # fmt: skip
        for r in head_rows(gg):
            if r[0] in ids or r[1] in ids:
                want[(r[3], r[4])] = want.get((r[3], r[4]), 0.0) + abs(r[5])
    assert {(r[0], r[1]): r[2] for r in res.rows} == pytest_approx(want)
    # deleting a graph takes its relationships along; the heads stay
    store.delete(store.graph_ids()[0])
    left = store.cypher("MATCH (:Head)-[c:CARRIES]->() RETURN count(c) AS c").rows[0][0]
    assert 0 < left < n
    wipe(store)


def pytest_approx(d):
    import pytest

    return pytest.approx(d, rel=1e-9)
