"""Influence, pruning and scores against answers worked out by hand on small graphs, in both
conventions, and against a literal dense numpy transcription of circuit-tracer 0.5.0's published
definitions (``prune_graph`` / ``compute_graph_scores``) on random layered graphs."""

from __future__ import annotations

import numpy as np
import pytest
from prune_fixtures import hand_graph, make_graph, start_graph

from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from tracer.prune import (
    cumulative_cut,
    cumulative_keep,
    cumulative_share,
    error_influence_shares,
    graph_scores,
    node_influence,
    prune,
    resolve_convention,
)


def ids(g: Graph) -> list[str]:
    return [g.node_id(i) for i in range(g.n_nodes)]


def edge_set(g: Graph) -> set[tuple[str, str]]:
    return {(g.node_id(t), g.node_id(s)) for t, s in zip(g.target, g.source, strict=True)}


# --- influence and scores by hand --------------------------------------------------------------


def test_influence_by_hand():
    # Normalised rows: logit: B .5, A .25, err .25; B: A .75, tok .25; A: tok 1.
    # Paths: B .5; A .25 + .5*.75; err .25; tok .5*.25 + .25 + .375.
    for conv in ("circuit-tracer", "atlas"):  # no start-position error: the same
        infl = node_influence(hand_graph(), convention=conv)
        np.testing.assert_allclose(infl, [0.625, 0.5, 0.25, 0.75, 0.0])


def test_scores_by_hand_both_conventions():
    g = hand_graph()
    ct, at = graph_scores(g, "circuit-tracer"), graph_scores(g, "atlas")
    assert ct["replacement"] == at["replacement"] == pytest.approx(0.75 / (0.75 + 0.25))
    # Non-error share x (influence + logit weight): logit .75 x 1, B 1 x .5, A 1 x .625; the
    # input-less err (.25) and tok (.75) count as 1 x weight in circuit-tracer only.
    assert ct["completeness"] == pytest.approx((0.75 + 0.5 + 0.625 + 0.25 + 0.75) / 3.125)
    assert at["completeness"] == pytest.approx((0.75 + 0.5 + 0.625) / 2.125)


def test_input_less_feature_counts_in_circuit_tracer_completeness_only():
    # Feature C (L0) with no inputs feeds the logit: logit <- C 1, logit <- err 1.
    g = make_graph([0, 1, 2, 3], [0, 0, -1, 2], [1, 1, 1, 1], [(3, 0, 1.0), (3, 1, 1.0)])
    # Influence: C .5, err .5. circuit-tracer: (logit .5 x 1 + C 1 x .5 + err 1 x .5) / 2;
    # atlas: only the logit has inputs: .5 x 1 / 1.
    assert graph_scores(g, "circuit-tracer")["completeness"] == pytest.approx(0.75)
    assert graph_scores(g, "atlas")["completeness"] == pytest.approx(0.5)
    assert graph_scores(g, "circuit-tracer")["replacement"] == 0.0  # no token influence


def test_start_position_error_is_a_constant_in_circuit_tracer_only():
    g = start_graph()
    # circuit-tracer: e0's column is zero. logit row: F .5, e1 .25, t1 .25; F row: t1 .5, t0 .5.
    np.testing.assert_allclose(
        node_influence(g, convention="circuit-tracer"), [0.5, 0.0, 0.25, 0.25, 0.5, 0.0]
    )
    # atlas: logit row F .4, e0 .2, e1 .2, t1 .2; F row e0 .5, t1 .25, t0 .25.
    np.testing.assert_allclose(
        node_influence(g, convention="atlas"), [0.4, 0.4, 0.2, 0.1, 0.3, 0.0]
    )
    ct, at = graph_scores(g, "circuit-tracer"), graph_scores(g, "atlas")
    assert ct["replacement"] == pytest.approx(0.75 / (0.75 + 0.25))
    # logit .75 x 1, F 1 x .5, e1 1 x .25, t1 1 x .5, t0 1 x .25, e0 x 0 over 2.5.
    assert ct["completeness"] == pytest.approx(2.25 / 2.5)
    assert at["replacement"] == pytest.approx(0.4 / (0.4 + 0.6))
    # logit (1 - .4) x 1 and F (1 - .5) x .4 over 1.4.
    assert at["completeness"] == pytest.approx((0.6 + 0.2) / 1.4)
    # With the start token's features kept as nodes, its error node is an ordinary one.
    g.params["exclude_bos"] = False
    assert graph_scores(g, "circuit-tracer")["replacement"] == pytest.approx(0.4)


def test_error_influence_shares_by_hand():
    """Where the unexplained part sits (start_graph's influences above): shares of token +
    error influence, so they sum to 1 - replacement."""
    g = start_graph()
    at = error_influence_shares(g, "atlas")  # e0 (L0 @0) .4, e1 (L0 @1) .2 of 1.0
    assert len(at["by_position"]) == len(g.tokens) and len(at["by_layer"]) == g.n_layers
    np.testing.assert_allclose(at["by_position"][:2], [0.4, 0.2])
    np.testing.assert_allclose(at["by_layer"][0], 0.6)
    assert [(t["layer"], t["position"]) for t in at["top"]] == [(0, 0), (0, 1)]
    assert at["top"][0]["share"] == pytest.approx(0.4)
    ct = error_influence_shares(g, "circuit-tracer", top=1)  # e0 is a constant: e1 .25 of 1.0
    np.testing.assert_allclose(ct["by_position"][:2], [0.0, 0.25])
    assert ct["top"] == [{"layer": 0, "position": 1, "share": pytest.approx(0.25)}]
    for conv, shares in (("atlas", at), ("circuit-tracer", ct)):
        total = sum(shares["by_position"])
        assert total == pytest.approx(1 - graph_scores(g, conv)["replacement"])


def tiny_row_graph() -> Graph:
    """0 feature B (L1), 1 error e (L0), 2 token t, 3 logit, all at position 1. Edges:
    logit<-B 2, logit<-e 2, B<-t 2e-11, B<-e 2e-11 (B's inputs sum to 4e-11 < 1e-10)."""
    edges = [(3, 0, 2.0), (3, 1, 2.0), (0, 2, 2e-11), (0, 1, 2e-11)]
    return make_graph([0, 1, 2, 3], [1, 0, -1, 1], [1, 1, 1, 1], edges)


def test_circuit_tracer_floors_the_row_sum_at_1e_10():
    g = tiny_row_graph()
    # circuit-tracer divides B's row by max(4e-11, 1e-10): t .2, e .2 (the logit row: B .5,
    # e .5). Influence: B .5, e .5 + .5 x .2, t .5 x .2. (circuit-tracer 0.5.0's own
    # compute_node_influence / compute_graph_scores / prune_graph on this adjacency: the same.)
    np.testing.assert_allclose(
        node_influence(g, convention="circuit-tracer"), [0.5, 0.6, 0.1, 0.0], rtol=1e-6
    )
    ct = graph_scores(g, "circuit-tracer")
    assert ct["replacement"] == pytest.approx(0.1 / (0.1 + 0.6), rel=1e-6)
    # logit (1 - .5) x 1, B (1 - .2) x .5, e 1 x .6, t 1 x .1 over 1 + .5 + .6 + .1.
    assert ct["completeness"] == pytest.approx(1.6 / 2.2, rel=1e-6)
    # atlas normalises every row with inputs to one: B's row t .5, e .5.
    np.testing.assert_allclose(node_influence(g, convention="atlas"), [0.5, 0.75, 0.25, 0.0])
    assert graph_scores(g, "atlas")["replacement"] == pytest.approx(0.25)
    # Nodes by influence e .6, B .5, t .1 (shares .5 .917): B is the cut at .8, all stay.
    # Edge scores logit<-B .5, logit<-e .5, B<-t .1, B<-e .1 (shares .417 .833 .917 1): at .8
    # B's inputs go, so B (no incoming kept edge) goes, and logit<-B with it.
    p = prune(g, 0.8, 0.8, convention="circuit-tracer")
    assert ids(p) == ["e_0_1", "t_1", "l_3"] and edge_set(p) == {("l_3", "e_0_1")}
    # At .9 the cut is .1 (both B inputs, a tie): everything stays.
    assert prune(g, 0.8, 0.9, convention="circuit-tracer").n_edges == 4


# --- the cumulative rules ----------------------------------------------------------------------


def test_cumulative_keep_atlas_rule():
    np.testing.assert_array_equal(
        cumulative_keep(np.array([1.0, 5.0, 3.0, 1.0]), 0.8), [False, True, True, False]
    )
    assert cumulative_keep(np.array([1.0, 1.0]), 1.0).all()
    with pytest.raises(ValueError):
        cumulative_keep(np.array([1.0]), 0.0)


def test_cumulative_cut_circuit_tracer_rule_keeps_ties():
    s = np.array([3.0, 2.0, 2.0, 1.0])  # running shares .375 .625 .875 1
    assert cumulative_cut(s, 0.5) == 2.0  # both 2s kept (>= cut) ...
    assert cumulative_keep(s, 0.5).sum() == 2  # ... where the atlas rule stops at one
    assert cumulative_cut(s, 0.375) == 3.0  # reached exactly: that entry is the cut
    assert cumulative_cut(s, 0.0) == 3.0
    assert cumulative_cut(s, 1.0) == 1.0
    # Unstored zeros: a cut past the stored entries is zero (every entry kept).
    assert cumulative_cut(np.array([1.0, 1.0]), 1.0, n_total=10) == 1.0
    assert cumulative_cut(np.array([0.5, 0.25, 0.25]), 1.0, n_total=9) == 0.25
    assert cumulative_cut(np.zeros(3), 0.5) == float("inf")
    np.testing.assert_allclose(cumulative_share(s), [0.375, 0.625, 0.875, 1.0])
    with pytest.raises(ValueError):
        cumulative_cut(s, 1.5)


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="circuit-tracer, atlas"):
        prune(hand_graph(), convention="neuronpedia")
    assert resolve_convention(hand_graph()) == "circuit-tracer"  # the default
    g = hand_graph()
    g.params["convention"] = "atlas"
    assert resolve_convention(g) == "atlas"  # a graph's recorded convention


# --- pruning by hand -----------------------------------------------------------------------------


def test_prune_circuit_tracer_drops_a_low_influence_error_node():
    p = prune(hand_graph(), node_threshold=0.5, edge_threshold=0.98, convention="circuit-tracer")
    # All nodes ranked: tok .75, A .625, B .5, err .25, logit 0 (shares .353 .647 ...): the cut
    # is A; B and err go. On {A, tok, logit}: logit<-A and A<-tok both score 1: both kept.
    assert ids(p) == ["f_0_1_0", "t_1", "l_4"]
    assert edge_set(p) == {("l_4", "f_0_1_0"), ("f_0_1_0", "t_1")}
    assert p.params["convention"] == "circuit-tracer" and p.params["node_threshold"] == 0.5
    np.testing.assert_allclose(p.extra["influence"], [0.625, 0.75, 0.0])  # full-graph values
    shares = np.array([1.375, 0.75, 2.125]) / 2.125  # tok .75, A .625, ... of 2.125
    np.testing.assert_allclose(p.extra["cumulative_influence"], shares)
    assert p.scores["completeness"] == pytest.approx(0.92)


def test_prune_atlas_keeps_every_error_node():
    p = prune(hand_graph(), node_threshold=0.5, edge_threshold=0.98, convention="atlas")
    # A holds .625 / 1.125 > .5 of feature influence: B goes; errors are not ranked.
    assert ids(p) == ["f_0_1_0", "e_0_1", "t_1", "l_4"]
    edges = {
        (p.node_id(t), p.node_id(s)): w
        for t, s, w in zip(p.target, p.source, p.weight, strict=True)
    }
    assert edges == {("l_4", "f_0_1_0"): -1.0, ("l_4", "e_0_1"): 1.0, ("f_0_1_0", "t_1"): 2.0}
    np.testing.assert_allclose(p.extra["influence"], [0.5, 0.5, 0.5, 0.0])
    assert p.params["convention"] == "atlas"
    assert p.scores["replacement"] == pytest.approx(0.75)
    assert p.scores["completeness"] == pytest.approx((0.75 + 0.5 + 0.625) / 2.125)


def test_feature_without_kept_inputs():
    g = hand_graph()
    # Node threshold 1.0 keeps all. Edge scores (normalised |w| x (influence + logit weight)):
    # logit<-B .5, logit<-A .25, logit<-err .25, B<-A .375, B<-tok .125, A<-tok .625; shares
    # of 2.125 from the top: .294 .529 ...; at .45 the cut is .5: A<-tok and logit<-B stay.
    at = prune(g, node_threshold=1.0, edge_threshold=0.45, convention="atlas")
    # atlas: A feeds nothing kept (B<-A was cut): A and err dangle and go; B stays.
    assert ids(at) == ["f_1_1_1", "t_1", "l_4"] and edge_set(at) == {("l_4", "f_1_1_1")}
    ct = prune(g, node_threshold=1.0, edge_threshold=0.45, convention="circuit-tracer")
    # circuit-tracer: B has no kept input: it goes too, and with it logit<-B.
    assert ids(ct) == ["t_1", "l_4"] and ct.n_edges == 0


def test_prune_start_position_error():
    g = start_graph()
    ct = prune(g, 0.8, 0.98, convention="circuit-tracer")
    # Influence F .5, t1 .5, e1 .25, t0 .25, e0 0, logit 0 (total 1.5; shares .333 .667 .833):
    # the cut is .25, e0 goes. Edge scores .5 .25 .25 .25 .25 (shares ... .833 1): all kept.
    assert ids(ct) == ["f_1_1_0", "e_0_1", "t_0", "t_1", "l_5"]
    assert edge_set(ct) == {("l_5", "f_1_1_0"), ("l_5", "e_0_1"), ("l_5", "t_1"),
                            ("f_1_1_0", "t_1"), ("f_1_1_0", "t_0")}  # fmt: skip
    at = prune(g, 0.8, 0.98, convention="atlas")
    # atlas: e0 is an ordinary error node (not ranked) and feeds F and the logit: kept, with
    # all 7 edges (scores .4 .2 .2 .2 .2 .1 .1 of 1.4: .98 is reached at the last).
    assert ids(at) == ["f_1_1_0", "e_0_0", "e_0_1", "t_0", "t_1", "l_5"] and at.n_edges == 7


def test_prune_follows_the_graphs_recorded_convention():
    g = hand_graph()
    g.params["convention"] = "atlas"
    assert prune(g, 0.5).params["convention"] == "atlas"
    assert prune(g, 0.5, convention="circuit-tracer").params["convention"] == "circuit-tracer"


# --- against a literal transcription of circuit-tracer's definitions -----------------------------


def ct_reference(A, kind, position, w, node_t, edge_t):
    """circuit-tracer 0.5.0's prune_graph and compute_graph_scores on a dense [N, N] A (rows
    targets), written out from their published definitions; start-position error columns zero
    (circuit-tracer zeroes those error vectors)."""
    A = A.astype(np.float64).copy()
    A[:, (kind == ERROR) & (position == 0)] = 0.0

    def normalize(m):
        m = np.abs(m)
        return m / np.clip(m.sum(1, keepdims=True), 1e-10, None)

    def influence(norm):
        cur = w @ norm
        total = cur.copy()
        while cur.any():
            cur = cur @ norm
            total += cur
        return total

    def find_threshold(scores, t):
        s = np.sort(scores)[::-1]
        i = min(int(np.searchsorted(np.cumsum(s) / s.sum(), t)), len(s) - 1)
        return s[i]

    infl = influence(normalize(A))
    nm = infl >= find_threshold(infl, node_t)
    nm[(kind == TOKEN) | (kind == LOGIT)] = True
    pruned = A.copy()
    pruned[~nm] = 0
    pruned[:, ~nm] = 0
    npr = normalize(pruned)
    es = npr * (influence(npr) + w)[:, None]
    em = es >= find_threshold(es.ravel(), edge_t)
    fe, f = (kind == FEATURE) | (kind == ERROR), kind == FEATURE
    old = nm.copy()
    nm[fe] &= em[:, fe].any(0)
    nm[f] &= em[f].any(1)
    while (nm != old).any():
        old = nm.copy()
        em[~nm] = False
        em[:, ~nm] = False
        nm[fe] &= em[:, fe].any(0)
        nm[f] &= em[f].any(1)
    norm = normalize(A)
    err = (kind == ERROR).astype(float)
    tok_i, err_i = infl[kind == TOKEN].sum(), infl[kind == ERROR].sum()
    out = infl + w
    completeness = ((1 - norm @ err) * out).sum() / out.sum()
    return nm, em, {"replacement": tok_i / (tok_i + err_i), "completeness": completeness}


def random_layered_graph(seed: int, n_layers=3, n_pos=4, per_site=2, density=0.6) -> Graph:
    """Features at (layer, position), L x P error nodes (layer-major), P tokens, 2 logits at the
    last position, like attribution's layout; an edge runs from every earlier-layer,
    not-later-position source with probability ``density``, signed normal weights."""
    rng = np.random.default_rng(seed)
    kind, layer, pos = [], [], []
    for l in range(n_layers):
        for p in range(1, n_pos):  # no features at the start position
            for _ in range(rng.integers(0, per_site + 1)):
                kind.append(FEATURE), layer.append(l), pos.append(p)
    for l in range(n_layers):
        for p in range(n_pos):
            kind.append(ERROR), layer.append(l), pos.append(p)
    for p in range(n_pos):
        kind.append(TOKEN), layer.append(-1), pos.append(p)
    for _ in range(2):
        kind.append(LOGIT), layer.append(n_layers), pos.append(n_pos - 1)
    kind, layer, pos = np.array(kind), np.array(layer), np.array(pos)
    edges = []
    for t in np.where((kind == FEATURE) | (kind == LOGIT))[0]:
        # A feature at layer l reads what layers < l wrote (tokens: layer -1).
        src = np.where((kind != LOGIT) & (layer < layer[t]) & (pos <= pos[t]))[0]
        for s in src[rng.random(len(src)) < density]:
            edges.append((t, s, float(rng.normal())))
    g = make_graph(kind, layer, pos, edges, n_layers=n_layers, params={"exclude_bos": True})
    g.logit_weights[kind == LOGIT] = [0.7, 0.3]
    return g


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9), (0.95, 0.6)])
def test_circuit_tracer_convention_matches_the_published_definitions(seed, thresholds):
    g = random_layered_graph(seed)
    node_t, edge_t = thresholds
    A = g.adjacency().toarray()
    nm, em, sc = ct_reference(A, g.kind, g.position, g.logit_weights.astype(float), *thresholds)
    p = prune(g, node_t, edge_t, convention="circuit-tracer")
    assert ids(p) == [g.node_id(i) for i in np.where(nm)[0]]
    t, s = np.nonzero(em & (A != 0))
    assert not (em & (A == 0)).any()  # a positive edge cut: no unstored entry is kept
    assert edge_set(p) == {(g.node_id(a), g.node_id(b)) for a, b in zip(t, s, strict=True)}
    for k in ("replacement", "completeness"):
        assert p.scores[k] == pytest.approx(sc[k], abs=1e-12)
        assert graph_scores(g, "circuit-tracer")[k] == pytest.approx(sc[k], abs=1e-12)
    # The start-position error nodes never survive in this convention (their edges count as 0).
    assert not ((p.kind == ERROR) & (p.position == 0)).any()


def test_cumulative_cut_in_bounded_chunks_is_the_sorted_cut(monkeypatch):
    """Scores longer than CUT_CHUNK are cut by histogram passes over chunks, never one sort of
    every score: the same cut as the whole sort, with ties, zeros, unstored zeros and heavy
    repeats, at many thresholds."""
    import importlib

    prune_mod = importlib.import_module("tracer.prune")  # the module (``prune`` is shadowed)
    rng = np.random.default_rng(0)
    cases = [
        rng.exponential(size=5000),
        np.round(rng.exponential(size=5000), 1),  # many ties
        np.r_[np.zeros(2000), rng.random(3000)],
        np.r_[np.full(4000, 0.5), rng.random(1000)],  # one value dominates: bins cannot split
        rng.lognormal(0, 4, size=5000),  # a wide range: the crossing bin is narrowed twice
    ]
    want = {
        (i, t, extra): cumulative_cut(s, t, n_total=len(s) + extra)
        for i, s in enumerate(cases) for t in (0.0, 0.3, 0.8, 0.98, 0.999) for extra in (0, 7)
    }  # fmt: skip
    monkeypatch.setattr(prune_mod, "CUT_CHUNK", 300)
    monkeypatch.setattr(prune_mod, "CUT_BINS", 16)
    sorts = []
    real_sort = np.sort
    monkeypatch.setattr(
        np, "sort", lambda a, *k, **kw: sorts.append(len(a)) or real_sort(a, *k, **kw)
    )
    for (i, t, extra), cut in want.items():
        assert cumulative_cut(cases[i], t, n_total=len(cases[i]) + extra) == cut, (i, t, extra)
    assert max(sorts) < 5000  # no sort of every score
    # At a threshold of exactly 1 which of the smallest scores the running share reaches 1 at
    # is a matter of rounding; either way every positive score is kept.
    for s in cases:
        assert cumulative_cut(s, 1.0) <= s[s > 0].min()
