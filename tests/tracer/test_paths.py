"""tracer.analyses.paths: the k strongest paths, checked against brute-force enumeration of every
path
on small random DAGs, on a hand-worked graph, and through the CLI."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from prune_fixtures import hand_graph, make_graph

from tracer.analyses.paths import k_best_paths, normalized_weights, paths, resolve_target
from tracer.graph import FEATURE, LOGIT, TOKEN, Graph


def random_dag(seed: int, n_tokens=3, n_layers=3, per_layer=3, n_logits=2, p_edge=0.6) -> Graph:
    """Tokens at the bottom, ``per_layer`` features per layer, logits at the top; each possible
    edge (from any lower row to any higher row) present with probability ``p_edge``, random
    signed weights; some features dead ends (their edges dropped at random)."""
    rng = np.random.default_rng(seed)
    kind, layer, pos = [], [], []
    for L in range(n_layers):
        for _ in range(per_layer):
            kind.append(FEATURE), layer.append(L), pos.append(int(rng.integers(n_tokens)))
    for p in range(n_tokens):
        kind.append(TOKEN), layer.append(-1), pos.append(p)
    for _ in range(n_logits):
        kind.append(LOGIT), layer.append(n_layers), pos.append(n_tokens - 1)
    n = len(kind)
    edges = []
    for t, s in itertools.product(range(n), range(n)):
        if layer[s] < layer[t] and kind[t] != TOKEN and kind[s] != LOGIT and rng.random() < p_edge:
            edges.append((t, s, float(rng.normal() * rng.exponential())))
    g = make_graph(kind, layer, pos, edges, n_layers=n_layers)
    g.tokens = list(range(100, 100 + n_tokens))
    g.token_strings = [f" t{p}" for p in range(n_tokens)]
    lw = np.where(g.kind == LOGIT, rng.random(n), 0.0)
    g.logit_weights = (lw / lw.sum()).astype(np.float32)
    g.probability = g.logit_weights.copy()
    return g


def all_paths(g: Graph, starts, ends) -> list[tuple[float, tuple[int, ...]]]:
    """Every path from a start to an end by depth-first enumeration, with its product of
    row-normalised |weights| computed here from the raw edges."""
    a = np.abs(g.weight.astype(np.float64))
    rows = {t: a[g.target == t].sum() for t in set(g.target.tolist())}
    out_edges: dict[int, list[tuple[int, float]]] = {}
    for t, s, w in zip(g.target.tolist(), g.source.tolist(), a.tolist(), strict=True):
        if w > 0:
            out_edges.setdefault(s, []).append((t, w / rows[t]))
    found = []

    def go(v, path, prod):
        if v in ends:
            found.append((prod * ends[v], tuple(path)))
        for u, w in out_edges.get(v, []):
            go(u, [*path, u], prod * w)

    for s in starts:
        go(s, [s], 1.0)
    return sorted(found, key=lambda x: -x[0])


@pytest.mark.parametrize("seed", range(12))
def test_token_to_logit_matches_brute_force(seed):
    g = random_dag(seed)
    logits = np.flatnonzero(g.kind == LOGIT)
    target = int(logits[np.argmax(g.probability[logits])])
    truth = all_paths(g, np.flatnonzero(g.kind == TOKEN).tolist(), {target: 1.0})
    assert len(truth) > 6  # the test graphs have many paths
    for k in (1, 3, 7):
        got = paths(g, None, k)
        assert len(got) == min(k, len(truth))
        assert [p.score for p in got] == pytest.approx([s for s, _ in truth[:k]], rel=1e-9)
        assert [p.nodes for p in got] == [nodes for _, nodes in truth[:k]]
        for p in got:
            assert g.kind[p.nodes[0]] == TOKEN and p.nodes[-1] == target
            # weights are the graph's edges along the path
            for (s, t), w in zip(itertools.pairwise(p.nodes), p.weights, strict=True):
                e = np.flatnonzero((g.source == s) & (g.target == t))
                assert len(e) == 1 and float(g.weight[e[0]]) == w


@pytest.mark.parametrize("seed", range(8))
def test_node_up_to_logits_matches_brute_force(seed):
    g = random_dag(seed + 100)
    logits = np.flatnonzero(g.kind == LOGIT)
    ends = {int(i): float(g.logit_weights[i]) for i in logits}
    start = int(np.flatnonzero(g.kind == FEATURE)[0])  # a layer-0 feature
    truth = all_paths(g, [start], ends)
    got = paths(g, start, 4)
    assert [p.score for p in got] == pytest.approx([s for s, _ in truth[:4]], rel=1e-6)
    assert [p.nodes for p in got] == [nodes for _, nodes in truth[:4]]
    # the scores of all the paths from a node sum to its influence (tracer.prune)
    from tracer.prune import node_influence

    every = paths(g, start, 10_000)
    assert len(every) == len(truth)
    infl = node_influence(g, convention="atlas")[start]
    assert sum(p.score for p in every) == pytest.approx(infl, rel=1e-6)


def test_hand_graph_text_and_scores():
    # hand_graph: tok -> A (2), tok -> B (1), A -> B (3), A -> logit (-1), B -> logit (2),
    # err -> logit (1). Row sums: A 2, B 4, logit 4.
    g = hand_graph()
    g.token_strings = ["<s>", " x", "y"]
    got = paths(g, None, 5)
    # tok->A->B->logit: 1 * 3/4 * 2/4; tok->A->logit: 1 * 1/4; tok->B->logit: 1/4 * 2/4
    assert [p.score for p in got] == pytest.approx([0.375, 0.25, 0.125])
    assert got[0].nodes == (3, 0, 1, 4)
    assert got[0].text(g) == "␣x@1 → L0/F0@1 → L1/F1@1 → logit #4"
    assert got[0].weights == (2.0, 3.0, 2.0)
    d = got[0].to_dict(g)
    assert d["nodes"] == ["E_3_1", "0_0_1", "1_1_1", "3_4_1"] and d["score"] == 0.375


def test_targets_by_name_and_errors():
    g = hand_graph()
    g.extra["token_text"] = {"4": " Paris"}
    assert resolve_target(g, None) == 4
    assert resolve_target(g, "␣Paris") == resolve_target(g, " Paris") == 4
    assert resolve_target(g, "Paris") == 4  # ignoring the space when unambiguous
    assert resolve_target(g, "1_1_1") == 1
    with pytest.raises(ValueError, match="names no logit"):
        resolve_target(g, "Berlin")
    with pytest.raises(ValueError, match="at least one path"):
        paths(g, None, 0)
    cyc = make_graph([0, 0, 3], [0, 0, 1], [0, 0, 0], [(0, 1, 1.0), (1, 0, 1.0), (2, 0, 1.0)])
    with pytest.raises(ValueError, match="cycle"):
        paths(cyc, 0, 2)


def test_normalized_weights_rows_sum_to_one():
    g = random_dag(3)
    nw = normalized_weights(g)
    sums = np.bincount(g.target, weights=nw, minlength=g.n_nodes)
    has_in = np.bincount(g.target, minlength=g.n_nodes) > 0
    assert np.allclose(sums[has_in], 1.0)


def test_k_best_paths_low_level_ties_and_dead_ends():
    # 0 -> 1 -> 3, 0 -> 2 -> 3 (equal), 0 -> 4 (dead end); start 0, sink 3
    src, dst = np.array([0, 1, 0, 2, 0]), np.array([1, 3, 2, 3, 4])
    w = np.array([0.5, 1.0, 0.5, 1.0, 1.0])
    got = k_best_paths(5, src, dst, w, {0: 0.0}, {3: 0.0}, 5)
    assert [n for _, n, _ in got] == [[0, 1, 3], [0, 2, 3]]
    assert [c for c, _, _ in got] == pytest.approx([np.log(2), np.log(2)])


def test_cli_paths(tmp_path):
    g = random_dag(5)
    g.extra["token_text"] = {
        str(int(g.feature[i])): f" w{i}" for i in np.flatnonzero(g.kind == LOGIT)
    }
    f = tmp_path / "g.parquet"
    g.save(f)
    top = paths(g, None, 3)
    run = [sys.executable, "-m", "tracer", "paths", str(f), "-k", "3"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for p in top:
        assert p.text(g) in out.stdout
    js = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=120)
    doc = json.loads(js.stdout)
    assert [p["text"] for p in doc["paths"]] == [p.text(g) for p in top]
    bad = subprocess.run([*run, "--target", "Nowhere"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "names no logit" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
