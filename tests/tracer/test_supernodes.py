"""Automatic supernodes: a planted structure is recovered (and nothing is grouped where nothing
was planted), names come from shared promoted tokens and contexts, the signals match direct
computations, group predictions hold ablated members fixed, and the perturbation check agrees
with validate's own per-node effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import hand_graph, make_random_clt, make_tiny_model

from tracer.analyses.supernode_check import agreement, group_effects, validate_supernodes
from tracer.analyses.supernodes import (
    SupernodeError,
    corpus_activations,
    decoder_directions,
    find_supernodes,
    get_supernode,
    supernodes_of,
)
from tracer.analyses.validate import linear_total_effect, validate
from tracer.attribution import attribute
from tracer.graph import FEATURE, LOGIT, TOKEN, Graph
from tracer.replacement import ReplacementModel
from tracer.reports.feature_book import FeatureBook


def planted(seed=0):
    """Features 0-2 (group A) and 3-5 (group B) share decoder directions, edge profiles and
    corpus firing; features 6 and 7 share nothing with anyone. Node 8 is a token, 9-10 logits.
    Returns (graph, decoder [8, 16], activations [60, 8])."""
    rng = np.random.default_rng(seed)
    n_f = 8
    kinds = [FEATURE] * n_f + [TOKEN, LOGIT, LOGIT]
    layers = [0, 1, 1, 0, 1, 2, 0, 2, -1, 4, 4]
    positions = [1, 1, 2, 2, 3, 3, 1, 3, 1, 3, 3]
    features = [10, 11, 12, 20, 21, 22, 30, 31, 5, 100, 101]
    acts = [1.0, 2.0, 1.5, 1.2, 0.8, 2.2, 1.0, 1.1, 3.0, 4.0, 2.0]
    edges = [(9, i, 1.0 + 0.1 * i) for i in (0, 1, 2)]  # A -> logit 9
    edges += [(10, i, -(1.0 + 0.1 * i)) for i in (3, 4, 5)]  # B -> logit 10 (negative)
    edges += [(i, 8, 0.5) for i in (0, 1, 2)]  # token -> A
    edges += [(6, 8, -0.7), (7, 6, 0.9), (10, 7, 0.3), (9, 6, -0.2)]  # loners: their own
    graph = hand_graph(kinds, layers, positions, features, acts, edges)
    u_a, u_b = rng.normal(size=16), rng.normal(size=16)
    dec = np.stack([u_a + 0.1 * rng.normal(size=16) for _ in range(3)]
                   + [u_b + 0.1 * rng.normal(size=16) for _ in range(3)]
                   + [rng.normal(size=16) for _ in range(2)])  # fmt: skip
    firing = np.zeros((60, n_f))
    firing[:20, :3] = rng.uniform(1, 2, size=(20, 3))
    firing[20:40, 3:6] = rng.uniform(1, 2, size=(20, 3))
    firing[40:50, 6] = 1.0
    firing[50:60, 7] = 1.0
    return graph, dec, firing


def book_for(graph: Graph) -> FeatureBook:
    feats = []
    for i in np.where(graph.kind == FEATURE)[0]:
        f = int(graph.feature[i])
        promoted = [[" Austin", 1.0], [" Texas", 0.5]] if f < 20 else [[f" tok{f}", 1.0]]
        ctx = [{"tokens": ["in", " Dallas"], "activations": [0.0, 3.0]}] if f < 20 else []
        feats.append({"layer": int(graph.layer[i]), "index": f, "promoted_tokens": promoted,
                      "top_contexts": ctx})  # fmt: skip
    return FeatureBook.from_dict({"features": feats})


def groups_of(found):
    return sorted(sorted(s.nodes) for s in found)


def test_planted_groups_are_recovered_and_named():
    graph, dec, acts = planted()
    found = find_supernodes(graph, decoder=dec, activations=acts, book=book_for(graph))
    assert groups_of(found) == [[0, 1, 2], [3, 4, 5]]
    by_nodes = {tuple(sorted(s.nodes)): s for s in found}
    a = by_nodes[(0, 1, 2)]
    assert a.promoted[:2] == [(" Austin", 3), (" Texas", 3)]
    assert a.contexts == [(" Dallas", 3)]
    assert "Austin" in a.name and "Dallas" in a.name
    assert a.members == [(0, 1, 10), (1, 1, 11), (1, 2, 12)]
    for s in found:
        assert set(s.similarity) == {"decoder", "edges", "coactivation"}
        assert s.cohesion >= 0.5
    # Ids follow influence: group A feeds the logits with weight 1.0-1.2 each, B with 1.3-1.5.
    assert [s.id for s in found] == ["s0", "s1"]
    assert found[0].influence >= found[1].influence
    # Round trip through graph.extra and a file.
    assert [s.nodes for s in supernodes_of(graph)] == [s.nodes for s in found]


def test_each_signal_alone_finds_what_it_carries():
    graph, dec, acts = planted()
    only_dec = find_supernodes(graph, decoder=dec, weight_edges=0.0, weight_coactivation=0.0)
    assert groups_of(only_dec) == [[0, 1, 2], [3, 4, 5]]
    only_act = find_supernodes(graph, activations=acts, weight_edges=0.0, weight_decoder=0.0)
    assert groups_of(only_act) == [[0, 1, 2], [3, 4, 5]]


def test_nothing_planted_nothing_grouped():
    graph, _, _ = planted()
    rng = np.random.default_rng(3)
    dec = rng.normal(size=(8, 64))  # random directions: cosines near 0
    acts = np.eye(8).repeat(5, axis=0)  # every feature fires alone
    found = find_supernodes(graph, decoder=dec, activations=acts, weight_edges=0.0)
    assert found == []
    # Disagreeing signals: the edge profiles alone say A, B, but with weight 1 of 3 they are
    # outvoted at the 0.5 cut.
    found = find_supernodes(graph, decoder=dec, activations=acts)
    assert found == []


def test_missing_supernode_and_bad_input_are_clear_errors():
    graph, dec, acts = planted()
    with pytest.raises(SupernodeError, match="has no supernodes"):
        get_supernode(graph, "s0")
    find_supernodes(graph, decoder=dec, activations=acts)
    assert get_supernode(graph, "s1").id == "s1"
    with pytest.raises(SupernodeError, match="no supernode 's7'.*s0, s1"):
        get_supernode(graph, "s7")
    with pytest.raises(SupernodeError, match="columns for 8 feature nodes"):
        find_supernodes(graph, activations=acts[:, :5])
    with pytest.raises(SupernodeError, match="feature nodes only"):
        find_supernodes(graph, nodes=np.array([0, 8]))


def test_signals_match_direct_computation():
    model = make_tiny_model("llama")
    clt = make_random_clt(3, 32, 16)
    rm = ReplacementModel(model, clt)
    members = [(0, 1, 3), (1, 2, 5), (2, 1, 7)]
    dirs = decoder_directions(clt, members)
    for row, (l, _, f) in zip(dirs, members, strict=True):
        np.testing.assert_allclose(row, clt.W_dec[l][f].sum(0).double().numpy(), rtol=1e-6)
    # Corpus activations: each sequence recorded on its own (position 0 excluded).
    torch.manual_seed(0)
    tokens = torch.randint(3, 100, (3, 9))
    feats = [(0, 3), (1, 5), (2, 7), (0, 11)]
    acts = corpus_activations(rm, tokens, feats, batch=2, progress=False)
    expected = np.zeros_like(acts)
    for s in range(3):
        st = rm.record(tokens[s])
        dense = torch.zeros(3, 9, 16)
        dense[st.feat_layer, st.feat_pos, st.feat_index] = st.feat_value
        for j, (l, f) in enumerate(feats):
            expected[s * 8 : (s + 1) * 8, j] = dense[l, 1:, f].numpy()
    assert (expected > 0).any()
    np.testing.assert_allclose(acts, expected, rtol=1e-5, atol=1e-6)


def test_group_prediction_holds_ablated_members():
    # s (act 2) -> t (act 1) weight 0.5; s -> logit 1.0; t -> logit 3.0.
    g = hand_graph([FEATURE, FEATURE, LOGIT], [0, 1, 4], [1, 1, 3], [1, 2, 9], [2.0, 1.0, 5.0],
                   [(1, 0, 0.5), (2, 0, 1.0), (2, 1, 3.0)])  # fmt: skip
    # Alone: x_s = -1, x_t = 0.5 * -1 / 1 -> metric -1 + 3 * -0.5 = -2.5.
    np.testing.assert_allclose(linear_total_effect(g, np.array([0, 1])), [-2.5, -3.0])
    both = linear_total_effect(g, np.zeros(0, np.int64), groups=[np.array([0, 1])])
    np.testing.assert_allclose(both, [-4.0])  # t held at -1, not -1.5
    np.testing.assert_allclose(agreement([1.0, 1.0, 0.0, 2.0], [1.0, 3.0, 0.0, -2.0]),
                               [1.0, 0.5, 1.0, 0.0])  # fmt: skip


def test_perturbation_check_on_a_tiny_model():
    model = make_tiny_model("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16, seed=2))
    graph = attribute(rm, torch.tensor([1, 5, 9, 22, 40]), progress=False)
    feats = np.where(graph.kind == FEATURE)[0]
    # A single-node group's observed effect is validate's observed effect of that node.
    rep = validate(rm, graph, nodes=[(int(graph.layer[i]), int(graph.position[i]),
                                      int(graph.feature[i])) for i in feats[:3]],
                   progress=False)  # fmt: skip
    obs, pred = group_effects(rm, graph, [np.array([i]) for i in feats[:3]])
    np.testing.assert_allclose(obs, [n["observed"] for n in rep.nodes], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pred, [n["linear"] for n in rep.nodes], rtol=1e-9)
    found = find_supernodes(graph, transcoder=rm.transcoder, min_similarity=0.3)
    assert found
    results = validate_supernodes(rm, graph, found[:2], n_random=3, progress=False)
    for s, r in zip(found[:2], results, strict=True):
        assert r["n_random"] == 3 and 0.0 <= r["agreement"] <= 1.0
        assert 0.0 <= r["effect_rank"] <= 1.0
        # The group's own observed effect, checked independently.
        o, _ = group_effects(rm, graph, [np.array(s.nodes)])
        assert r["observed"] == pytest.approx(float(o[0]), rel=1e-6)
        assert graph.extra["supernodes"][found.index(s)]["validation"] == r
