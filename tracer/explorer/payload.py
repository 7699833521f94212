"""A graph as the JSON the explorer's page draws: column arrays of nodes and edges.

Node ids are Neuronpedia node ids (:func:`tracer.reports.neuronpedia.np_node_id`), the ids saved
subgraphs use. Each node carries its display influence and the cumulative influence share the
node-threshold slider compares against (as the Neuronpedia export); each edge carries the
cumulative share of |weight| (edges sorted by |weight|, largest first) the edge slider compares
against, so the page re-prunes without asking the server. Automatic supernodes
(tracer.analyses.supernodes) found for the graph are listed by :func:`supernode_suggestions` for the
page to offer as groups.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tracer.graph import ERROR, FEATURE, LOGIT, NODE_KINDS, TOKEN, Graph
from tracer.reports.annotate import (
    display_influence,
    node_heading,
    node_text,
    visible_token,
    vocab_text,
)
from tracer.reports.feature_book import FeatureBook
from tracer.reports.neuronpedia import cumulative_influence, np_node_id


def edge_cumulative(weight: np.ndarray) -> np.ndarray:
    """[n_edges] running share of total |weight| with edges sorted by |weight|, largest first
    (the strongest edge has the smallest value); zeros when every weight is zero."""
    a = np.abs(np.asarray(weight, dtype=np.float64))
    total = float(a.sum())
    out = np.zeros(len(a))
    if total <= 0:
        return out
    order = np.argsort(-a, kind="stable")
    out[order] = np.cumsum(a[order]) / total
    return out


def feature_shares(kind: np.ndarray, influence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the node slider and the feature cap compare against, by influence among FEATURES
    only (error, token and logit nodes do not use up the share): ``fcum`` [n_nodes] the share of
    the total feature influence held by the features strictly more influential than the node,
    ``frank`` [n_nodes] int how many features those are. A feature (or error node) is shown at
    threshold t with at most m features when ``fcum < t`` and ``frank < m``, so the most
    influential feature is shown at every t > 0 (the running sum before it is 0). Token and
    logit nodes get 0 (always shown)."""
    infl = np.asarray(influence, dtype=np.float64)
    feats = np.flatnonzero(kind == FEATURE)
    fcum, frank = np.zeros(len(kind)), np.zeros(len(kind), dtype=np.int64)
    if not len(feats):
        return fcum, frank
    f_sorted = np.sort(infl[feats])[::-1]  # descending
    prefix = np.concatenate([[0.0], np.cumsum(f_sorted)])
    total = float(prefix[-1])
    which = np.flatnonzero((kind == FEATURE) | (kind == ERROR))
    # features strictly above each node: ties with the node itself do not count
    above = np.searchsorted(-f_sorted, -infl[which], side="left")
    frank[which] = above
    fcum[which] = prefix[above] / total if total > 0 else 0.0
    return fcum, frank


def _text(graph: Graph, i: int, features, decode) -> str:
    if int(graph.kind[i]) in (TOKEN, LOGIT):
        return visible_token(node_text(graph, i, None, decode))
    return node_text(graph, i, features, decode)


def _round(values, digits: int = 6) -> list:
    return [float(x) for x in np.round(np.asarray(values, dtype=np.float64), digits)]


def graph_payload(
    graph: Graph,
    graph_id: str,
    source: str,
    features: FeatureBook | None = None,
    decode: Callable[[int], str] | None = None,
) -> dict:
    """The JSON document of one graph for the page (see the module doc)."""
    n = graph.n_nodes
    infl = display_influence(graph)
    cum = np.nan_to_num(cumulative_influence(graph), nan=0.0)
    fcum, frank = feature_shares(graph.kind, infl)
    logits = np.flatnonzero(graph.kind == LOGIT)
    logit_table = [
        {
            "node": np_node_id(graph, int(i)),
            "token": int(graph.feature[i]),
            "text": visible_token(vocab_text(graph, int(graph.feature[i]), decode)),
            "probability": float(graph.probability[i]),
            "logit": float(graph.activation[i]),
        }
        for i in logits[np.argsort(-graph.probability[logits], kind="stable")]
    ]
    validation = graph.extra.get("validation")
    return {
        "id": graph_id,
        "source": source,
        "prompt": graph.prompt,
        "model": graph.model_name,
        "transcoder": graph.transcoder_name,
        "n_layers": int(graph.n_layers),
        "tokens": [visible_token(t) for t in graph.token_strings],
        "token_ids": [int(t) for t in graph.tokens],
        "params": graph.params,
        "scores": scores_with_convention(graph.scores, graph.params),
        "validation": validation if isinstance(validation, dict) else None,
        "logits": logit_table,
        "nodes": {
            "id": [np_node_id(graph, i) for i in range(n)],
            "kind": [NODE_KINDS[k] for k in graph.kind.tolist()],
            "layer": graph.layer.tolist(),
            "position": graph.position.tolist(),
            "feature": graph.feature.tolist(),
            "activation": _round(graph.activation),
            "influence": _round(infl),
            "cum": _round(cum),
            "fcum": _round(fcum),
            "frank": frank.tolist(),
            "text": [_text(graph, i, features, decode) for i in range(n)],
            "heading": [node_heading(graph, i) for i in range(n)],
        },
        "edges": {
            "source": graph.source.tolist(),
            "target": graph.target.tolist(),
            "weight": _round(graph.weight),
            "cum": _round(edge_cumulative(graph.weight)),
        },
    }


def scores_with_convention(scores: dict, params: dict) -> dict:
    """The graph's scores with the name of the rules they follow (``convention``), which the
    page shows beside them; graphs scored before conventions were recorded say so."""
    if not scores:
        return {}
    return {**scores, "convention": params.get("convention") or "not recorded"}


def supernode_suggestions(graph: Graph, supernodes: list[dict]) -> list[dict]:
    """Automatic supernodes (dicts of ``tracer.analyses.supernodes.Supernode``) as the page offers
    them:
    id, name, the perturbation check's agreement and effect rank, and ``members``: the node ids
    of this graph's nodes of the group's (layer, position, feature) members (the graph shown
    may be the full graph, whose node order differs from the circuit's). Groups with fewer than
    two members here are left out."""
    ids = {
        (int(graph.layer[i]), int(graph.position[i]), int(graph.feature[i])): np_node_id(graph, i)
        for i in np.flatnonzero(graph.kind == FEATURE)
    }
    out = []
    for s in supernodes:
        members = [ids[k] for k in (tuple(int(x) for x in m) for m in s.get("members", []))
                   if k in ids]  # fmt: skip
        if len(members) < 2:
            continue
        v = s.get("validation") or {}
        out.append({
            "id": s.get("id"), "name": s.get("name") or s.get("id"), "members": members,
            "agreement": v.get("agreement"), "effect_rank": v.get("effect_rank"),
        })  # fmt: skip
    return out
