"""Store -> load equals the original; exports; idempotent re-ingest; validation properties."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from graphstore import GraphNotFoundError, graph_id
from graphstore.synthetic import synthetic_graph
from tests.graphstore.conftest import assert_graphs_equal, small_graph
from tracer.graph import FEATURE, Graph


def _counts(store, gid):
    nodes = store.cypher("MATCH (n:Node {graph: $g}) RETURN count(n)", {"g": gid}).rows[0][0]
    edges = store.cypher(
        "MATCH (a:Node {graph: $g})-[e:EDGE]->(b:Node) RETURN count(e)", {"g": gid}
    ).rows[0][0]
    graphs = store.cypher("MATCH (x:Graph {id: $g}) RETURN count(x)", {"g": gid}).rows[0][0]
    return graphs, nodes, edges


def test_round_trip_realistic_graph(store):
    g = synthetic_graph(7)  # SmolLM2-sized: hundreds of nodes, thousands of edges
    assert 150 < g.n_nodes < 600 and g.n_edges > 1500
    res = store.add(g)
    assert res.written and not res.repaired
    assert res.graph_id == graph_id(g)
    back = store.load(res.graph_id)
    assert_graphs_equal(back, g)
    assert _counts(store, res.graph_id) == (1, g.n_nodes, g.n_edges)


def test_exports_networkx_and_parquet(store, tmp_path):
    g = small_graph(11)
    gid = store.add(g).graph_id
    expected = g.to_networkx()
    got = store.to_networkx(gid)
    assert nx.utils.graphs_equal(expected, got)
    assert dict(expected.nodes(data=True)) == dict(got.nodes(data=True))
    out = store.export_parquet(gid, tmp_path / "exported.parquet")
    assert_graphs_equal(Graph.load(out), g)


def test_full_graph_archived_and_referenced(store):
    full = synthetic_graph(12)
    keep = np.zeros(full.n_nodes, dtype=bool)
    keep[np.argsort(-full.activation)[: full.n_nodes // 2]] = True
    keep[full.kind >= 2] = True  # tokens and logits stay
    pruned = full.subgraph(keep)
    gid = store.add(pruned, full=full).graph_id
    path = store.cypher("MATCH (g:Graph {id: $g}) RETURN g.parquet_path", {"g": gid}).rows[0][0]
    assert path.endswith(f"{gid}.parquet")
    assert_graphs_equal(Graph.load(path), full)
    assert_graphs_equal(store.load_full(gid), full)
    assert_graphs_equal(store.load(gid), pruned)


def test_reingest_is_idempotent(store):
    g = small_graph(21)
    first = store.add(g)
    before = _counts(store, first.graph_id)
    features = store.cypher("MATCH (f:Feature) RETURN count(f)").rows[0][0]
    again = store.add(g)
    assert again.graph_id == first.graph_id and not again.written
    assert _counts(store, first.graph_id) == before == (1, g.n_nodes, g.n_edges)
    assert store.cypher("MATCH (f:Feature) RETURN count(f)").rows[0][0] == features
    # Same identity (model, transcoder, tokens, params), changed content: replaced, one copy.
    changed = small_graph(21)
    changed.weight = (changed.weight * 2).astype(np.float32)
    changed.scores = {**changed.scores, "replacement": 0.123}
    third = store.add(changed)
    assert third.graph_id == first.graph_id and third.written and third.repaired
    assert _counts(store, first.graph_id) == (1, g.n_nodes, g.n_edges)
    assert_graphs_equal(store.load(first.graph_id), changed)


def test_graph_identity_follows_model_tokens_params():
    g = small_graph(3)
    assert graph_id(g) == graph_id(small_graph(3))
    assert graph_id(g) != graph_id(small_graph(3, params={**g.params, "node_threshold": 0.7}))
    assert graph_id(g) != graph_id(small_graph(3, tokens=[*g.tokens[:-1], 9999]))
    assert graph_id(g) != graph_id(small_graph(3, transcoder_name="other@0000000000000001"))


def test_validation_and_scores_are_filterable(store):
    g = small_graph(31)
    g.extra = {"validation": {"rank_correlation": 0.875, "sign_agreement": 0.5, "n_ablated": 17}}
    g.scores = {"replacement": 0.625, "completeness": 0.75}
    gid = store.add(g).graph_id
    res = store.cypher(
        "MATCH (g:Graph) WHERE g.complete = true AND g.validation_rank_correlation > 0.87 "
        "AND g.validation_n_ablated = 17 AND g.score_replacement = 0.625 RETURN g.id"
    )
    assert [gid] in res.rows
    rec = store.cypher(
        "MATCH (g:Graph {id: $g}) RETURN g.validation_sign_agreement, g.param_node_threshold",
        {"g": gid},
    ).rows[0]
    assert rec == [0.5, g.params["node_threshold"]]


def test_unknown_graph(store):
    with pytest.raises(GraphNotFoundError, match="no complete graph"):
        store.load("g-does-not-exist")


def test_delete(store):
    g = small_graph(41)
    gid = store.add(g).graph_id
    assert store.delete(gid)
    assert _counts(store, gid) == (0, 0, 0)
    assert gid not in store.graph_ids()


@pytest.mark.parametrize("shape", ["no_edges", "no_features", "large"])
def test_round_trip_edge_cases(store, shape, monkeypatch):
    """The write statement is assembled from parts: a graph without edges, one without feature
    nodes, and one written in several transactions (more edges than EDGE_BATCH) all load back
    equal, and are counted once."""
    from graphstore import ingest

    g = small_graph(61, params={"shape": shape})  # its own graph id
    if shape == "no_edges":
        g = g.subgraph(np.ones(g.n_nodes, dtype=bool), np.zeros(g.n_edges, dtype=bool))
        assert g.n_edges == 0
    elif shape == "no_features":
        g = g.subgraph(g.kind != FEATURE)
        assert g.n_edges > 0 and not (g.kind == FEATURE).any()
    else:
        monkeypatch.setattr(ingest, "EDGE_BATCH", 7)
    before = store.cypher("MATCH (f:Feature) RETURN sum(f.graphs)").rows[0][0] or 0
    res = store.add(g)
    assert res.written
    assert_graphs_equal(store.load(res.graph_id), g)
    assert _counts(store, res.graph_id) == (1, g.n_nodes, g.n_edges)
    after = store.cypher("MATCH (f:Feature) RETURN sum(f.graphs)").rows[0][0] or 0
    n_features = len(
        {
            (int(a), int(b))
            for a, b, k in zip(g.layer, g.feature, g.kind, strict=True)
            if k == FEATURE
        }
    )
    assert after - before == n_features
    assert not store.add(g).written
