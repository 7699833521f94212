"""Influence, pruning and graph scores (after Ameisen et al., 2025).

All of it works on |A| with each row normalised to sum to one, ``N``: a target's inputs as
fractions. Influence of a node on the logits sums over paths of every length,

    influence = w (N + N^2 + N^3 + ...)

with ``w`` the logit weights (a row vector over nodes, nonzero on logit nodes). The graph is a
DAG, so the series ends after at most 2 x n_layers + 2 terms.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from tracer.graph import ERROR, FEATURE, TOKEN, Graph


def normalized_abs_adjacency(graph: Graph) -> sp.csr_matrix:
    """|A| with rows scaled to sum to one (rows without inputs stay zero). [N, N] CSR."""
    a = abs(graph.adjacency())
    sums = np.asarray(a.sum(axis=1)).ravel()
    inv = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
    return (sp.diags(inv) @ a).tocsr()


def node_influence(graph: Graph, norm: sp.csr_matrix | None = None) -> np.ndarray:
    """Influence of every node on the logit targets [n_nodes] (logit nodes get 0)."""
    norm = normalized_abs_adjacency(graph) if norm is None else norm
    x = graph.logit_weights.astype(np.float64)
    total = np.zeros(graph.n_nodes)
    for _ in range(graph.n_nodes + 1):
        x = norm.T @ x
        total += x
        if x.sum() < 1e-14:
            break
    return total


def cumulative_keep(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Bool mask of the highest scores whose sum first reaches ``threshold`` of the total."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold {threshold} must be in (0, 1]")
    keep = np.zeros(len(scores), dtype=bool)
    total = scores.sum()
    if len(scores) == 0 or total <= 0:
        return keep
    order = np.argsort(-scores, kind="stable")
    csum = np.cumsum(scores[order]) / total
    n = int(np.searchsorted(csum, threshold - 1e-12)) + 1
    keep[order[: min(n, len(scores))]] = True
    return keep


def graph_scores(graph: Graph) -> dict[str, float]:
    """Replacement score (token influence / (token + error influence)) and completeness
    (influence-weighted share of each node's normalised input that comes from non-error nodes).
    Both in [0, 1]; 1 means the transcoder explains everything."""
    norm = normalized_abs_adjacency(graph)
    infl = node_influence(graph, norm)
    tok = infl[graph.kind == TOKEN].sum()
    err = infl[graph.kind == ERROR].sum()
    from_error = np.asarray(norm[:, graph.kind == ERROR].sum(axis=1)).ravel()
    has_input = np.asarray(norm.sum(axis=1)).ravel() > 0
    weight = (infl + graph.logit_weights) * has_input
    total = weight.sum()
    completeness = float(((1.0 - from_error) * weight).sum() / total) if total else 0.0
    return {
        "replacement": float(tok / (tok + err)) if tok + err > 0 else 0.0,
        "completeness": completeness,
    }


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
    """The circuit: feature nodes holding ``node_threshold`` of the feature influence, the edges
    holding ``edge_threshold`` of the edge scores among them, without dangling nodes.

    Error, token and logit nodes are not pruned by influence; error (and feature) nodes left
    with no path to a logit are dropped at the end, token nodes are always kept (they label the
    prompt). Edge score = normalised |edge| x (influence of its target + target's logit weight).
    The result carries ``extra['influence']`` (per kept node) and the full graph's scores.
    """
    norm = normalized_abs_adjacency(graph)
    infl = node_influence(graph, norm)
    is_feat = graph.kind == FEATURE
    keep = ~is_feat
    keep[np.where(is_feat)[0][cumulative_keep(infl[is_feat], node_threshold)]] = True

    # Edge scores on the node-pruned graph.
    sub = graph.subgraph(keep)
    sub_norm = normalized_abs_adjacency(sub)
    sub_infl = node_influence(sub, sub_norm)
    coo = sub_norm.tocoo()
    score = coo.data * (sub_infl + sub.logit_weights)[coo.row]
    keep_edge_coo = cumulative_keep(score, edge_threshold)
    n = np.int64(sub.n_nodes)
    kept_keys = coo.row[keep_edge_coo].astype(np.int64) * n + coo.col[keep_edge_coo]
    edge_mask = np.isin(sub.target.astype(np.int64) * n + sub.source, kept_keys)

    # Drop dangling nodes: no outgoing kept edge (cannot reach a logit), tokens and logits aside.
    node_keep = np.ones(sub.n_nodes, dtype=bool)
    prunable = (sub.kind == FEATURE) | (sub.kind == ERROR)
    while True:
        alive = edge_mask & node_keep[sub.target] & node_keep[sub.source]
        has_out = np.zeros(sub.n_nodes, dtype=bool)
        has_out[sub.source[alive]] = True
        drop = prunable & node_keep & ~has_out
        if not drop.any():
            break
        node_keep &= ~drop
    pruned = sub.subgraph(node_keep, edge_mask)
    pruned.extra["influence"] = sub_infl[node_keep].tolist()
    pruned.params = {
        **graph.params,
        "pruned": True,
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
    }
    pruned.scores = {**graph_scores(graph), **graph.scores}
    pruned.extra["full_graph"] = {"n_nodes": graph.n_nodes, "n_edges": graph.n_edges}
    return pruned
