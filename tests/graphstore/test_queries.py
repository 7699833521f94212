"""Each canned query against the same answer computed independently (plain Python / networkx)
from the Graph objects that were stored."""

from __future__ import annotations

from collections import defaultdict

import networkx as nx
import numpy as np
import pytest

from graphstore import graph_id, prompt_id
from graphstore.queries import CANNED, FEATURE_FEEDS, FEATURE_FEEDS_BACKWARD
from tests.graphstore.conftest import SMALL, recurring_expected, small_graph, wipe
from tracer.graph import FEATURE, LOGIT, TOKEN

N_GRAPHS = 12


@pytest.fixture(scope="module")
def stored(server_auth, tmp_path_factory):
    from graphstore import GraphStore

    store = GraphStore(**server_auth, archive_dir=tmp_path_factory.mktemp("qarchive"))
    wipe(store)
    graphs = [small_graph(100 + i) for i in range(N_GRAPHS)]
    # Two graphs of one prompt (other params): distinct prompts != distinct graphs.
    base = graphs[0]
    graphs.append(
        small_graph(
            500,
            prompt=base.prompt,
            tokens=list(base.tokens),
            token_strings=list(base.token_strings),
            params={**base.params, "node_threshold": 0.5},
        )
    )
    graphs[-1].position = np.minimum(graphs[-1].position, len(base.tokens) - 1).astype(np.int32)
    for g in graphs:
        store.add(g)
    # An incomplete graph (a writer that died before the flip) must not show up in any answer.
    from graphstore import ingest

    ghost = small_graph(999)
    with store._session() as s:
        s.execute_write(ingest._write_nodes, ingest.graph_rows(ghost, graph_id(ghost), None))
    yield store, graphs
    store.close()


def test_recurring_features(stored):
    store, graphs = stored
    agg = defaultdict(lambda: [set(), set(), 0, 0.0])  # prompts, graphs, nodes, activation
    for g in graphs:
        for i in np.flatnonzero(g.kind == FEATURE):
            a = agg[(int(g.layer[i]), int(g.feature[i]))]
            a[0].add(prompt_id(g))
            a[1].add(graph_id(g))
            a[2] += 1
            a[3] += abs(float(g.activation[i]))
    rows = [
        [layer, index, len(p), len(gs), n, act]
        for (layer, index), (p, gs, n, act) in agg.items()
        if len(p) >= 3
    ]
    rows.sort(key=lambda r: (-r[2], -r[3], r[0], r[1]))
    expected = rows[:15]
    assert len(expected) >= 5  # the query has something to find
    res = store.query("recurring-features", min_prompts=3, limit=15)
    assert res.columns == [
        "transcoder", "layer", "index", "prompts", "graphs", "nodes", "activation"
    ]  # fmt: skip
    assert all(r[0] == SMALL.transcoder_name for r in res.rows)
    assert [r[1:6] for r in res.rows] == [r[:5] for r in expected]
    np.testing.assert_allclose([r[6] for r in res.rows], [r[5] for r in expected], rtol=1e-9)
    text, params = CANNED["recurring-features"].prepare(min_prompts=3, limit=15)
    assert store.cypher(text, params).rows == res.rows  # the documented text, run as is
    # Distinct prompts, not graphs: the fixture repeats a prompt (graph 500), so some feature
    # is in more graphs than prompts, and the query counts its prompt once.
    assert any(r[3] < r[4] for r in res.rows)


def _feature_edges(graphs) -> list[dict]:
    rows = []
    for g in graphs:
        for t, s, w in zip(g.target.tolist(), g.source.tolist(), g.weight.tolist(), strict=True):
            if g.kind[s] == FEATURE and g.kind[t] == FEATURE:
                rows.append(
                    dict(
                        graph=graph_id(g),
                        prompt=g.prompt,
                        src=(int(g.layer[s]), int(g.feature[s])),
                        tgt=(int(g.layer[t]), int(g.feature[t])),
                        sp=int(g.position[s]),
                        tp=int(g.position[t]),
                        weight=float(w),
                    )
                )
    return rows


def test_feature_feeds(stored):
    store, graphs = stored
    edges = _feature_edges(graphs)
    pair_graphs = defaultdict(set)
    for e in edges:
        pair_graphs[(e["src"], e["tgt"])].add(e["graph"])
    (src, tgt) = max(pair_graphs, key=lambda k: (len(pair_graphs[k]), k))
    assert len(pair_graphs[(src, tgt)]) >= 2  # a pair that recurs across prompts
    exp = [e for e in edges if e["src"] == src and e["tgt"] == tgt]
    exp.sort(key=lambda e: (-abs(e["weight"]), e["graph"], e["sp"], e["tp"]))
    res = store.query(
        "feature-feeds",
        source_layer=src[0],
        source_index=src[1],
        target_layer=tgt[0],
        target_index=tgt[1],
    )
    assert [r[:4] for r in res.rows] == [[e["prompt"], e["graph"], e["sp"], e["tp"]] for e in exp]
    np.testing.assert_allclose([r[4] for r in res.rows], [e["weight"] for e in exp], rtol=1e-7)
    none = store.query(
        "feature-feeds", source_layer=tgt[0], source_index=tgt[1], target_layer=0, target_index=0
    )
    assert none.rows == []
    # Both Cypher texts (either walking direction) give the same rows as the function.
    _, params = CANNED["feature-feeds"].prepare(*src, *tgt, transcoder=SMALL.transcoder_name)
    assert params["source_key"] == f"{SMALL.transcoder_name}/{src[0]}/{src[1]}"
    assert params["target_key"] == f"{SMALL.transcoder_name}/{tgt[0]}/{tgt[1]}"
    for text in (FEATURE_FEEDS, FEATURE_FEEDS_BACKWARD):
        assert store.cypher(text, params).rows == res.rows


def _paths(graphs, logit, token=None, position=None, only=None, max_hops=4):
    out = []
    for g in graphs:
        gid = graph_id(g)
        if only is not None and gid != only:
            continue
        G = nx.DiGraph()
        G.add_nodes_from(range(g.n_nodes))
        for t, s, w in zip(g.target.tolist(), g.source.tolist(), g.weight.tolist(), strict=True):
            G.add_edge(s, t, weight=float(w))
        starts = [
            i
            for i in np.flatnonzero(g.kind == TOKEN)
            if (token is None or g.token_strings[g.position[i]] == token)
            and (position is None or g.position[i] == position)
        ]
        ends = [i for i in np.flatnonzero(g.kind == LOGIT) if g.feature[i] == logit]
        for s in starts:
            for e in ends:
                for p in nx.all_simple_paths(G, s, e, cutoff=max_hops):
                    hops = zip(p[:-1], p[1:], strict=True)
                    strength = float(np.prod([G.edges[a, b]["weight"] for a, b in hops]))
                    out.append((gid, [int(x) for x in p], strength))
    out.sort(key=lambda r: (-abs(r[2]), r[0]))
    return out


def test_token_to_logit_paths_one_graph(stored):
    store, graphs = stored
    g = graphs[3]
    logit = int(g.feature[g.kind == LOGIT][0])
    expected = _paths(graphs, logit, position=len(g.tokens) - 1, only=graph_id(g), max_hops=3)
    assert expected
    res = store.query(
        "token-to-logit-paths",
        logit=logit,
        graph=graph_id(g),
        position=len(g.tokens) - 1,
        max_hops=3,
        limit=8,
    )
    got = [(r[0], r[2], r[6]) for r in res.rows]
    assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in expected[:8]]
    np.testing.assert_allclose([c for *_, c in got], [c for *_, c in expected[:8]], rtol=1e-9)
    kinds = res.rows[0][3]
    assert kinds[0] == "token" and kinds[-1] == "logit"
    # The documented Cypher text gives the same rows as the function (which uses a DP).
    text, params = CANNED["token-to-logit-paths"].prepare(
        logit=logit, graph=graph_id(g), position=len(g.tokens) - 1, max_hops=3, limit=8
    )
    by_cypher = store.cypher(text, params).rows
    assert [r[:6] for r in by_cypher] == [r[:6] for r in res.rows]
    np.testing.assert_allclose([r[6] for r in by_cypher], [r[6] for r in res.rows], rtol=1e-12)


def test_token_to_logit_paths_across_graphs(stored):
    store, graphs = stored
    # The most common (token string, logit) pair across graphs.
    counts = defaultdict(int)
    for g in graphs:
        for lg in set(g.feature[g.kind == LOGIT].tolist()):
            for tok in set(g.token_strings):
                counts[(tok, lg)] += 1
    tok, logit = max(counts, key=lambda k: (counts[k], k))
    expected = _paths(graphs, logit, token=tok, max_hops=3)
    assert len({gid for gid, *_ in expected}) >= 2
    res = store.query("token-to-logit-paths", logit=logit, token=tok, max_hops=3, limit=10)
    assert [(r[0], r[2]) for r in res.rows] == [(a, b) for a, b, _ in expected[:10]]
    np.testing.assert_allclose([r[6] for r in res.rows], [c for *_, c in expected[:10]])


def test_paths_argument_errors(stored):
    store, _ = stored
    with pytest.raises(ValueError, match="max_hops"):
        store.query("token-to-logit-paths", logit=1, position=0, max_hops=20)
    with pytest.raises(ValueError, match="start token"):
        store.query("token-to-logit-paths", logit=1)
    with pytest.raises(ValueError, match="unknown query"):
        store.query("no-such-query")


def test_token_drivers(stored):
    store, graphs = stored
    counts = defaultdict(int)
    for g in graphs:
        for lg in g.feature[g.kind == LOGIT].tolist():
            counts[lg] += 1
    logit = max(counts, key=lambda k: (counts[k], -k))
    assert counts[logit] >= 2
    agg = defaultdict(lambda: [set(), 0, 0.0, -np.inf])  # prompts, edges, total, strongest
    for g in graphs:
        for t, s, w in zip(g.target.tolist(), g.source.tolist(), g.weight.tolist(), strict=True):
            if g.kind[t] == LOGIT and g.feature[t] == logit and g.kind[s] == FEATURE:
                a = agg[(int(g.layer[s]), int(g.feature[s]))]
                a[0].add(prompt_id(g))
                a[1] += 1
                a[2] += float(w)
                a[3] = max(a[3], float(w))
    exp = [[layer, index, len(p), n, tot, mx] for (layer, index), (p, n, tot, mx) in agg.items()]
    exp.sort(key=lambda r: (-r[4], r[0], r[1]))
    exp = exp[:10]
    res = store.query("token-drivers", logit=logit, limit=10)
    assert [r[1:5] for r in res.rows] == [r[:4] for r in exp]
    np.testing.assert_allclose([r[5] for r in res.rows], [r[4] for r in exp], rtol=1e-9)
    np.testing.assert_allclose([r[6] for r in res.rows], [r[5] for r in exp], rtol=1e-9)


def test_similar_graphs(stored):
    store, graphs = stored
    mass = {}
    for g in graphs:
        m = defaultdict(float)
        for i in np.flatnonzero(g.kind == FEATURE):
            m[(int(g.layer[i]), int(g.feature[i]))] += abs(float(g.activation[i]))
        mass[graph_id(g)] = m
    target = graph_id(graphs[5])
    a = mass[target]
    exp = []
    for gid, b in mass.items():
        shared = set(a) & set(b)
        if gid == target or not shared:
            continue
        overlap = sum(min(a[f], b[f]) for f in shared)
        sim = overlap / (sum(a.values()) + sum(b.values()) - overlap)
        exp.append((gid, len(shared), sim))
    exp.sort(key=lambda r: (-r[2], r[0]))
    res = store.query("similar-graphs", graph=target, limit=6)
    assert [(r[0], r[2]) for r in res.rows] == [(gid, n) for gid, n, _ in exp[:6]]
    np.testing.assert_allclose([r[3] for r in res.rows], [s for *_, s in exp[:6]], rtol=1e-6)


def test_similar_graphs_parts_equal_the_cypher_text(stored):
    """The function adds up per-part aggregates run at once; the documented Cypher text does it
    in one aggregation: same rows for every target graph."""
    from graphstore.queries import SIMILAR_GRAPHS

    store, graphs = stored
    for g in graphs:
        gid = graph_id(g)
        res = store.query("similar-graphs", graph=gid, limit=8)
        ref = store.cypher(SIMILAR_GRAPHS, {"graph": gid, "limit": 8})
        assert [r[:3] for r in res.rows] == [r[:3] for r in ref.rows]
        np.testing.assert_allclose([r[3] for r in res.rows], [r[3] for r in ref.rows], rtol=1e-12)
    assert store.query("similar-graphs", graph="g-not-stored").rows == []


def test_incomplete_graph_invisible_to_queries(stored):
    store, graphs = stored
    ids = {graph_id(g) for g in graphs}
    assert set(store.graph_ids()) == ids
    assert store.stats()["graphs"] == len(graphs)


def test_counters_follow_delete_and_replace(stored):
    """Recurrence counters are maintained when a graph is removed, re-added and replaced (this
    runs last in the module: it changes the stored set)."""
    store, graphs = stored
    removed = graphs[0]  # shares its prompt with graphs[-1]
    assert store.delete(graph_id(removed))
    rest = graphs[1:]
    res = store.query("recurring-features", min_prompts=2, limit=1000)
    assert [r[1:6] for r in res.rows] == recurring_expected(rest, 2)
    store.add(removed)
    changed = small_graph(101)  # = graphs[1] with other activations: replaced in place
    changed.activation = (changed.activation + 1).astype(np.float32)
    assert store.add(changed).repaired
    res = store.query("recurring-features", min_prompts=1, limit=1000)
    assert [r[1:6] for r in res.rows] == recurring_expected(graphs, 1)
