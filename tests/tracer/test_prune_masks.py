"""Library API for comparing pruning implementations: ``prune_masks`` says what ``prune`` keeps
as masks over the full graph, and ``Graph.from_coo`` builds a graph from plain arrays."""

from __future__ import annotations

import numpy as np
import pytest
from prune_fixtures import hand_graph, start_graph

from tracer.graph import LOGIT, Graph
from tracer.prune import prune, prune_masks


@pytest.mark.parametrize("convention", ["circuit-tracer", "atlas"])
@pytest.mark.parametrize("make", [hand_graph, start_graph])
@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.7), (1.0, 1.0)])
def test_masks_are_what_prune_keeps(convention, make, thresholds):
    g = make()
    node_mask, edge_mask = prune_masks(g, *thresholds, convention=convention)
    p = prune(g, *thresholds, convention=convention)
    kept_ids = {p.node_id(i) for i in range(p.n_nodes)}
    assert {g.node_id(i) for i in np.flatnonzero(node_mask)} == kept_ids
    kept_edges = {
        (p.node_id(t), p.node_id(s), w)
        for t, s, w in zip(p.target, p.source, p.weight, strict=True)
    }
    mine = {
        (g.node_id(t), g.node_id(s), w)
        for t, s, w in zip(
            g.target[edge_mask], g.source[edge_mask], g.weight[edge_mask], strict=True
        )
    }
    assert mine == kept_edges


def test_from_coo_fills_the_stored_dtypes_and_normalised_logit_weights(tmp_path):
    kind = [0, 1, 2, 3, 3]
    g = Graph.from_coo(
        kind=kind, layer=[0, 0, -1, 2, 2], position=[1, 1, 1, 1, 1], feature=[5, -1, 7, 8, 9],
        target=[3, 4, 0], source=[0, 0, 2], weight=[0.5, -1.0, 2.0], tokens=[1, 7],
        n_layers=2, probability=[0, 0, 0, 0.6, 0.2],
    )  # fmt: skip
    assert g.kind.dtype == np.int8 and g.target.dtype == np.int32 and g.weight.dtype == np.float32
    np.testing.assert_allclose(g.logit_weights, [0, 0, 0, 0.75, 0.25], rtol=1e-6)
    back = Graph.load(g.save(tmp_path / "g.parquet"))
    np.testing.assert_array_equal(back.weight, g.weight)
    assert back.token_strings == ["1", "7"]
    # No probabilities: every logit weighs the same.
    u = Graph.from_coo(
        kind=kind, layer=[0, 0, -1, 2, 2], position=[1] * 5, feature=[5, -1, 7, 8, 9],
        target=[], source=[], weight=[], tokens=[1, 7], n_layers=2,
    )  # fmt: skip
    np.testing.assert_allclose(u.logit_weights[u.kind == LOGIT], [0.5, 0.5])
