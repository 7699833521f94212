"""What reports say about a graph's nodes: influence, display text, strongest neighbours.

Shared by the renderer, the HTML report and the Neuronpedia export so the three agree.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tracer.features import FeatureBook
from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph


def display_influence(graph: Graph) -> np.ndarray:
    """Per-node influence on the logits for display [n_nodes] float64, >= 0.

    Feature, error and token nodes: the influence recorded by pruning (``graph.extra
    ['influence']``, a list aligned with the nodes, or a node array ``graph.influence``), else
    computed now (:func:`tracer.prune.node_influence`), else — for a graph without logit weights
    — |activation|. Logit nodes: their logit weight (the share of the target they stand for).
    """
    values = getattr(graph, "influence", None)
    if values is None:
        values = graph.extra.get("influence")
    if values is not None:
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (graph.n_nodes,):
            raise ValueError(
                f"graph influence has shape {arr.shape} but the graph has {graph.n_nodes} nodes; "
                "it must be a list aligned with the nodes"
            )
    elif float(np.abs(graph.logit_weights).sum()) > 0:
        from tracer.prune import node_influence

        arr = node_influence(graph)
    else:
        arr = graph.activation.astype(np.float64)
    arr = np.abs(np.nan_to_num(arr))
    is_logit = graph.kind == LOGIT
    arr[is_logit] = np.abs(graph.logit_weights[is_logit])
    return arr


def influence_source(graph: Graph) -> str:
    """Where :func:`display_influence` takes its values from: "recorded", "computed" or
    "activation"."""
    if getattr(graph, "influence", None) is not None or "influence" in graph.extra:
        return "recorded"
    return "computed" if float(np.abs(graph.logit_weights).sum()) > 0 else "activation"


def visible(text: str) -> str:
    """Token text with line breaks and tabs made visible (a bare newline token would vanish)."""
    return text.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "")


def visible_token(text: str) -> str:
    """One token's text with its spaces shown as ``␣`` as well (``" Paris"`` -> ``"␣Paris"``),
    so tokens that differ only by a leading space look different."""
    return visible(text).replace(" ", "␣")


def vocab_text(graph: Graph, vocab_id: int, decode: Callable[[int], str] | None = None) -> str:
    """The text of vocabulary item ``vocab_id``: from the graph's own token-text table
    (``graph.extra['token_text']``, {id: text}), else a prompt token with that id, else
    ``decode``; ``#id`` when none knows it."""
    table = graph.extra.get("token_text") or {}
    text = table.get(str(vocab_id), table.get(vocab_id)) if isinstance(table, dict) else None
    if text is not None:
        return str(text)
    for tok, s in zip(graph.tokens, graph.token_strings, strict=False):
        if int(tok) == int(vocab_id):
            return s
    if decode is not None:
        return decode(int(vocab_id))
    return f"#{vocab_id}"


def node_text(
    graph: Graph,
    i: int,
    features: FeatureBook | None = None,
    decode: Callable[[int], str] | None = None,
) -> str:
    """Short display text for node ``i``: the token for token and logit nodes, the feature's
    short label (promoted tokens / contexts) for features, ``err`` for error nodes."""
    k = int(graph.kind[i])
    if k == TOKEN:
        return visible(graph.token_strings[int(graph.position[i])])
    if k == LOGIT:
        return visible(vocab_text(graph, int(graph.feature[i]), decode))
    if k == ERROR:
        return "error"
    info = features.get(int(graph.layer[i]), int(graph.feature[i])) if features else None
    return info.short_label() if info else ""


def node_heading(graph: Graph, i: int) -> str:
    """Kind and coordinates: ``L3 F17 @4``, ``error L3 @4``, ``token @4``, ``logit``."""
    k, layer, pos = int(graph.kind[i]), int(graph.layer[i]), int(graph.position[i])
    if k == FEATURE:
        return f"L{layer} F{int(graph.feature[i])} @{pos}"
    if k == ERROR:
        return f"error L{layer} @{pos}"
    if k == TOKEN:
        return f"token @{pos}"
    return f"logit @{pos}"


def neighbours(graph: Graph, top: int | None = None) -> tuple[list[list], list[list]]:
    """Per node, its incoming and outgoing edges as (other node, weight) pairs sorted by
    |weight| descending (at most ``top`` each when given). Returns (inputs, outputs), each a
    list [n_nodes] of lists."""
    inputs: list[list] = [[] for _ in range(graph.n_nodes)]
    outputs: list[list] = [[] for _ in range(graph.n_nodes)]
    order = np.argsort(-np.abs(graph.weight), kind="stable")
    for t, s, w in zip(
        graph.target[order].tolist(),
        graph.source[order].tolist(),
        graph.weight[order].tolist(),
        strict=True,
    ):
        if top is None or len(inputs[t]) < top:
            inputs[t].append((s, w))
        if top is None or len(outputs[s]) < top:
            outputs[s].append((t, w))
    return inputs, outputs


def logit_order(graph: Graph) -> np.ndarray:
    """Indices of the logit nodes, most probable first."""
    idx = np.flatnonzero(graph.kind == LOGIT)
    return idx[np.argsort(-graph.probability[idx], kind="stable")]
