"""Cross-prompt results in a real ArcadeDB store: supernodes (round trip, replace, a failed
write leaves the old ones, deleted with their graph), global weights beside per-prompt edges,
separating features of two prompt groups against a Python computation, graph contrast, swaps."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import wipe
from model_fixtures import hand_graph

from graphstore import GraphNotFoundError
from tracer.analyses.global_weights import GlobalWeights
from tracer.graph import FEATURE, LOGIT, TOKEN

F, T, LG = FEATURE, TOKEN, LOGIT


def graph_with(prompt: str, feats: list[tuple[int, int, int, float, float]], tc="tc-x@00ff"):
    """A graph whose feature nodes (layer, position, index, activation, edge to the logit)
    feed one logit (id 50), fed by a token; feature 0 also feeds feature 1 (weight 0.5)."""
    kinds = [F] * len(feats) + [T, LG]
    layers = [f[0] for f in feats] + [-1, 4]
    pos = [f[1] for f in feats] + [1, 3]
    index = [f[2] for f in feats] + [7, 50]
    acts = [f[3] for f in feats] + [1.0, 2.0]
    n = len(feats)
    edges = [(n + 1, i, f[4]) for i, f in enumerate(feats)] + [(i, n, 0.3) for i in range(n)]
    if n > 1:
        edges.append((1, 0, 0.5))
    g = hand_graph(kinds, layers, pos, index, acts, edges)
    g.prompt, g.transcoder_name = prompt, tc
    g.tokens = [1, 5, 6, sum(map(ord, prompt))]  # one graph id per prompt
    return g


def test_supernodes_round_trip_replace_and_failed_write(store):
    wipe(store)
    g = graph_with("p one", [(0, 1, 3, 1.0, 0.5), (1, 1, 4, 2.0, 0.2), (2, 2, 5, 1.5, -0.3)])
    gid = store.add(g).graph_id
    sn = [{"id": "s0", "name": "→ Austin", "nodes": [0, 1], "members": [[0, 1, 3], [1, 1, 4]],
           "influence": 0.7, "cohesion": 0.8,
           "validation": {"agreement": 0.9, "observed": -1.0, "predicted": -1.2,
                          "effect_rank": 1.0, "random_mean_agreement": 0.4}}]  # fmt: skip
    assert store.add_supernodes(gid, sn) == 2
    rows = store.query("supernodes", graph=gid).rows
    assert len(rows) == 1
    _, _, local, name, size, infl, agree, rank, members = rows[0]
    assert (local, name, size, agree, rank) == ("s0", "→ Austin", 2, 0.9, 1.0)
    assert sorted(map(list, members)) == [[0, 1, 3], [1, 1, 4]]
    back = store.supernodes(gid)  # read back whole, in the shape it was given
    assert back == [{**sn[0], "promoted": None, "contexts": None, "similarity": None}]
    # Replaced, not added to.
    sn2 = [{"id": "s0", "name": "x", "nodes": [2], "members": [[2, 2, 5]]},
           {"id": "s1", "name": "y", "nodes": [0], "members": [[0, 1, 3]]}]  # fmt: skip
    assert store.add_supernodes(gid, sn2) == 2
    assert sorted(r[2] for r in store.query("supernodes", graph=gid).rows) == ["s0", "s1"]
    # Members that are not the stored graph's nodes: refused, the old supernodes stay.
    bad = [{"id": "s0", "name": "z", "nodes": [0], "members": [[9, 9, 9]]}]
    with pytest.raises(ValueError, match="0 of the 1 supernode members"):
        store.add_supernodes(gid, bad)
    assert sorted(r[2] for r in store.query("supernodes", graph=gid).rows) == ["s0", "s1"]
    with pytest.raises(GraphNotFoundError, match="no complete graph with id 'nope'"):
        store.add_supernodes("nope", sn)
    store.delete(gid)
    assert store.cypher("MATCH (s:Supernode) RETURN count(s) AS c").rows[0][0] == 0


def test_global_weights_beside_edges(store):
    wipe(store)
    # Feature 0 (L0/F3 @1, act 2) -> feature 1 (L1/F4 @1): same position, weight 0.5.
    # Feature 2 (L2/F5 @2) is fed by nobody but the token.
    g = graph_with("p two", [(0, 1, 3, 2.0, 0.5), (1, 1, 4, 1.0, 0.2), (2, 2, 5, 1.0, 0.1)])
    g.source = np.r_[g.source, [0]].astype(np.int32)  # a cross-position edge L0/F3 -> L2/F5
    g.target = np.r_[g.target, [2]].astype(np.int32)
    g.weight = np.r_[g.weight, [0.05]].astype(np.float32)
    gid = store.add(g).graph_id
    gw = GlobalWeights(
        "tc-x@00ff", "mlp_in", "corpus-mean", 2,
        source_layer=np.array([0, 0, 1]), source_index=np.array([3, 3, 4]),
        target_layer=np.array([1, 2, 2]), target_index=np.array([4, 5, 5]),
        weight=np.array([0.2, -0.1, 0.3], np.float32), rank_in=np.array([0, 1, 0]),
        rank_out=np.array([0, 1, -1]),
    )  # fmt: skip
    assert store.add_global_weights(gw.to_table(), model="m") == 3
    assert store.add_global_weights(gw.to_table(), model="m") == 3  # replaced
    # (Other tests on the same server store weights of other transcoders.)
    mine = "MATCH (:Feature {transcoder: 'tc-x@00ff'})-[v:VIRTUAL]->() RETURN count(v) AS c"
    assert store.cypher(mine).rows[0][0] == 3
    norm = store.cypher("MATCH (t:Transcoder {name: 'tc-x@00ff'}) RETURN t.virtual_norm").rows
    assert norm == [["corpus-mean"]]
    res = store.query("edge-vs-weight", graph=gid)
    by = {(r[0], r[2], r[3], r[5]): r for r in res.rows}
    same = by[(0, 3, 1, 4)]  # edge 0.5, global 0.2, direct 2.0 * 0.2
    assert same[6] == pytest.approx(0.5) and same[7] == pytest.approx(0.2)
    assert same[8] == pytest.approx(0.4) and same[9] == pytest.approx(0.1)
    cross = by[(0, 3, 2, 5)]  # across positions: no direct path
    assert cross[7] == pytest.approx(-0.1) and cross[8] == 0.0
    with pytest.raises(Exception, match="belongs to model 'm'"):
        store.add_global_weights(gw.to_table(), model="other")


def test_separating_features_and_contrast(store):
    wipe(store)
    # Group a (France): L3/F1 drives the logit; group b (Germany): L3/F2 does; L2/F9 in all.
    specs = {
        "capital of France": [(3, 2, 1, 1.0, 1.0), (2, 1, 9, 1.0, 0.3)],
        "France is in Europe": [(3, 2, 1, 1.0, 0.8), (2, 1, 9, 1.0, 0.1)],
        "capital of Germany": [(3, 2, 2, 1.0, 0.9), (2, 1, 9, 1.0, 0.2)],
        "Germany is in Europe": [(3, 2, 2, 1.0, 1.1), (2, 1, 9, 1.0, 0.2), (3, 2, 1, 1.0, 0.1)],
    }
    ids = {p: store.add(graph_with(p, f)).graph_id for p, f in specs.items()}
    res = store.query("separating-features", a="France", b="Germany")
    got = {(r[0], r[1]): r for r in res.rows}

    def expected(layer, index):
        def attr(p):
            # logit weight 1 (one logit): attribution = the edge into the logit
            return sum(f[4] for f in specs[p] if (f[0], f[2]) == (layer, index))

        xa = np.array([attr(p) for p in specs if "France" in p])
        xb = np.array([attr(p) for p in specs if "Germany" in p])
        return (xa.mean() - xb.mean()) / np.sqrt((xa.var() + xb.var()) / 2 + 1e-12)

    for key in ((3, 1), (3, 2), (2, 9)):
        assert got[key][8] == pytest.approx(expected(*key), rel=1e-5, abs=1e-5)
    assert [r[:2] for r in res.rows[:2]] in ([[3, 2], [3, 1]], [[3, 1], [3, 2]])
    assert got[(3, 1)][4:8] == [2, 1, 2, 2]
    with pytest.raises(ValueError, match="needs two groups"):
        store.query("separating-features", a="France", b="")
    c = store.query("graph-contrast", a=ids["capital of France"], b=ids["capital of Germany"])
    assert sorted((r[0], r[1], r[2]) for r in c.rows) == [("a", 3, 1), ("b", 3, 2)]


def test_swaps_stored_with_the_graph(store):
    wipe(store)
    ga = store.add(graph_with("The capital of France is", [(0, 1, 3, 1.0, 0.5)])).graph_id
    gb = store.add(graph_with("The capital of Germany is", [(0, 1, 4, 1.0, 0.5)])).graph_id
    result = {"prompt": "The capital of France is", "other_prompt": "The capital of Germany is",
              "mode": "live", "removed": [[0, 1, 3]], "inserted": [[0, 1, 4, 1.0]],
              "top_before": [[" Paris", 7, 0.7]], "top_after": [[" Berlin", 8, 0.5]],
              "continuation_after": " Berlin.", "moved": True}  # fmt: skip
    sid = store.add_swap(ga, result, gb)
    assert store.add_swap(ga, result, gb) == sid  # the same swap again: one copy
    rows = store.query("swaps", graph=ga).rows
    assert len(rows) == 1 and rows[0][4] is True and "Berlin" in rows[0][6]
    linked = store.cypher("MATCH (:Swap)-[:SWAP_FROM]->(g:Graph) RETURN g.id").rows
    assert linked == [[gb]]
    with pytest.raises(GraphNotFoundError):
        store.add_swap("nope", result)
