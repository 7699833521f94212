"""The strongest paths through an attribution graph: from the input tokens to a chosen logit, or
from one node up to the logits.

A path's score is the product of its edges' row-normalised |weights|: edge ``s -> t`` counts
``|A[t, s]| / sum_u |A[t, u]|``, the share of t's total absolute input that comes from s (the
normalisation pruning uses, over every input of t, error nodes included). Tracing up from a node
also multiplies by the reached logit's weight (``graph.logit_weights``), so the scores of all the
paths from a node sum to its influence. Scores are at most 1 and comparable within one call.

The k best paths are exact: max-product is shortest path on ``-log`` weights, and on a DAG the k
shortest paths from every node to the sinks follow by dynamic programming in reverse topological
order (a node's k best are the k best of "one out-edge, then one of the k best of its head").
numpy only; the graph's edges must form a DAG (attribution graphs do: edges run from earlier
layers to later ones).

Text of a path: ``␣France@4 → L12/F33@4 → L20/F7@5 → logit ␣Paris``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from tracer.reports.annotate import visible_token, vocab_text

DEFAULT_K = 5


@dataclass(frozen=True)
class CircuitPath:
    """One path: ``nodes`` the node indices from its start to its end, ``score`` the product of
    the row-normalised |edge weights| (times the end logit's weight when traced up from a
    node), ``weights`` the raw edge weights ``A[next, this]`` along it ([len(nodes) - 1])."""

    nodes: tuple[int, ...]
    score: float
    weights: tuple[float, ...]

    def text(self, graph: Graph, decode: Callable[[int], str] | None = None) -> str:
        """``␣France@4 → L12/F33@4 → logit ␣Paris`` (see :func:`node_step`)."""
        return " → ".join(node_step(graph, i, decode) for i in self.nodes)

    def to_dict(self, graph: Graph, decode: Callable[[int], str] | None = None) -> dict:
        """JSON: node ids (Neuronpedia's), score, edge weights and text."""
        from tracer.reports.neuronpedia import np_node_id

        return {
            "nodes": [np_node_id(graph, i) for i in self.nodes],
            "score": float(self.score),
            "weights": [float(w) for w in self.weights],
            "text": self.text(graph, decode),
        }


def node_step(graph: Graph, i: int, decode: Callable[[int], str] | None = None) -> str:
    """One node of a path's text: ``␣France@4`` (token), ``L12/F33@4`` (feature), ``err L3@4``
    (error), ``logit ␣Paris`` (logit); spaces shown as ``␣``."""
    k, layer, pos = int(graph.kind[i]), int(graph.layer[i]), int(graph.position[i])
    if k == TOKEN:
        return f"{visible_token(graph.token_strings[pos])}@{pos}"
    if k == FEATURE:
        return f"L{layer}/F{int(graph.feature[i])}@{pos}"
    if k == ERROR:
        return f"err L{layer}@{pos}"
    return f"logit {visible_token(vocab_text(graph, int(graph.feature[i]), decode))}"


def normalized_weights(graph: Graph) -> np.ndarray:
    """[n_edges] float64 ``|w_e| / sum |w|`` over the edges into ``target_e`` (0 for rows with
    no absolute input)."""
    a = np.abs(np.asarray(graph.weight, dtype=np.float64))
    sums = np.bincount(graph.target, weights=a, minlength=graph.n_nodes)
    denom = sums[graph.target]
    return np.divide(a, denom, out=np.zeros_like(a), where=denom > 0)


def resolve_target(
    graph: Graph, target: int | str | None, decode: Callable[[int], str] | None = None
) -> int:
    """The node index ``target`` names: None (the most probable logit), a node index, a
    Neuronpedia node id (``3_17_5``, ``E_504_2``), or the text of a logit token (``Paris``,
    `` Paris`` or ``␣Paris``; an exact match wins over one that ignores the leading space)."""
    logits = np.flatnonzero(graph.kind == LOGIT)
    if target is None:
        if not len(logits):
            raise ValueError("the graph has no logit nodes: give a node to trace up from")
        return int(logits[np.argmax(graph.probability[logits])])
    if isinstance(target, int | np.integer):
        if not 0 <= int(target) < graph.n_nodes:
            raise ValueError(f"node {target} is not in the graph (0..{graph.n_nodes - 1})")
        return int(target)
    from tracer.reports.neuronpedia import np_node_id

    spec = str(target)
    for i in range(graph.n_nodes):
        if np_node_id(graph, i) == spec:
            return i
    texts = {int(i): vocab_text(graph, int(graph.feature[i]), decode) for i in logits}
    wanted = spec.replace("␣", " ")
    exact = [i for i, t in texts.items() if t == wanted]
    loose = [i for i, t in texts.items() if t.strip() == wanted.strip()]
    found = exact or loose
    if len(found) >= 1 and (exact or len(loose) == 1):
        return max(found, key=lambda i: float(graph.probability[i]))
    shown = ", ".join(repr(visible_token(texts[int(i)])) for i in logits[:12])
    example = np_node_id(graph, int(logits[0])) if len(logits) else "3_17_5"
    raise ValueError(
        f"{spec!r} names no logit or node of this graph: give one of the logit tokens "
        f"({shown}) or a node id such as {example}"
        if len(found) == 0
        else f"{spec!r} matches several logits ({', '.join(repr(texts[i]) for i in loose)}): "
        "write the token exactly, with its leading space as ␣"
    )


def paths(
    graph: Graph,
    target: int | str | None = None,
    k: int = DEFAULT_K,
    decode: Callable[[int], str] | None = None,
) -> list[CircuitPath]:
    """The ``k`` strongest paths, strongest first: from any token node to ``target`` when it is
    a logit (None: the most probable logit), otherwise from ``target`` up to any logit (see the
    module doc for the scores). ``target`` as in :func:`resolve_target`."""
    if k < 1:
        raise ValueError(f"k={k}: ask for at least one path")
    t = resolve_target(graph, target, decode)
    n = graph.n_nodes
    if int(graph.kind[t]) == LOGIT:
        starts = {int(i): 0.0 for i in np.flatnonzero(graph.kind == TOKEN)}
        sinks = {t: 0.0}
    else:
        starts = {t: 0.0}
        logits = np.flatnonzero(graph.kind == LOGIT)
        lw = np.abs(np.asarray(graph.logit_weights, dtype=np.float64))
        if float(lw[logits].sum()) <= 0:
            lw = np.ones(n)
        sinks = {int(i): -np.log(lw[i]) for i in logits if lw[i] > 0}
    nw = normalized_weights(graph)
    found = k_best_paths(n, graph.source, graph.target, nw, starts, sinks, k)
    out = []
    for cost, nodes, edges in found:
        w = tuple(float(graph.weight[e]) for e in edges)
        out.append(CircuitPath(tuple(nodes), float(np.exp(-cost)), w))
    return out


def k_best_paths(
    n_nodes: int,
    source: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray,
    starts: dict[int, float],
    sinks: dict[int, float],
    k: int,
) -> list[tuple[float, list[int], list[int]]]:
    """The ``k`` most probable paths of a DAG of ``n_nodes`` nodes with edges
    ``source[e] -> target[e]`` of multiplicative weight ``weight[e]`` in (0, 1] (edges of weight
    <= 0 are absent), starting at a node of ``starts`` and ending at a node of ``sinks`` (each
    with an extra cost, in -log units). Returns ``(cost, nodes, edges)`` triples, lowest cost
    (= -log of the product) first; ties broken by node sequence. Raises ValueError on a cycle.
    """
    src = np.asarray(source, dtype=np.int64)
    dst = np.asarray(target, dtype=np.int64)
    w = np.asarray(weight, dtype=np.float64)
    live = w > 0
    src, dst, eid = src[live], dst[live], np.flatnonzero(live)
    cost = -np.log(w[live])
    # the nodes that reach a sink, found backwards level by level
    reach = np.zeros(n_nodes, dtype=bool)
    reach[list(sinks)] = True
    frontier = reach.copy()
    while frontier.any():
        new = np.zeros(n_nodes, dtype=bool)
        new[src[frontier[dst]]] = True
        new &= ~reach
        reach |= new
        frontier = new
    keep = reach[src] & reach[dst]
    src, dst, eid, cost = src[keep], dst[keep], eid[keep], cost[keep]
    order = np.argsort(src, kind="stable")  # out-edges of each node, grouped
    src, dst, eid, cost = src[order], dst[order], eid[order], cost[order]
    bounds = np.searchsorted(src, np.arange(n_nodes + 1))
    # best[v]: the k best (cost, edge to take or -1 to stop here, rank in the head's list)
    best_cost = np.full((n_nodes, k), np.inf)
    best_edge = np.full((n_nodes, k), -1, dtype=np.int64)
    best_rank = np.full((n_nodes, k), -1, dtype=np.int64)
    remaining = np.bincount(src, minlength=n_nodes)  # out-edges whose heads are not done
    done = ~reach
    frontier = np.flatnonzero(reach & (remaining == 0))
    n_done = 0
    while len(frontier):
        for v in frontier.tolist():
            lo, hi = bounds[v], bounds[v + 1]
            cand_c = (cost[lo:hi, None] + best_cost[dst[lo:hi]]).ravel()
            cand_e = np.repeat(np.arange(lo, hi), k)
            cand_r = np.tile(np.arange(k), hi - lo)
            if v in sinks:
                cand_c = np.append(cand_c, sinks[v])
                cand_e = np.append(cand_e, -1)
                cand_r = np.append(cand_r, -1)
            finite = np.isfinite(cand_c)
            cand_c, cand_e, cand_r = cand_c[finite], cand_e[finite], cand_r[finite]
            pick = np.lexsort((cand_r, cand_e, cand_c))[:k]
            m = len(pick)
            best_cost[v, :m], best_edge[v, :m], best_rank[v, :m] = (
                cand_c[pick], cand_e[pick], cand_r[pick])  # fmt: skip
        done[frontier] = True
        n_done += len(frontier)
        # an edge into a finished node no longer holds its source back
        into = np.isin(dst, frontier)
        remaining -= np.bincount(src[into], minlength=n_nodes)
        frontier = np.flatnonzero(~done & (remaining == 0))
    if n_done < int(reach.sum()):
        raise ValueError("the graph's edges form a cycle: paths need an acyclic graph")

    def walk(v: int, r: int) -> tuple[list[int], list[int]]:
        nodes, edges = [v], []
        while best_edge[v, r] >= 0:
            e = int(best_edge[v, r])
            edges.append(int(eid[e]))
            v, r = int(dst[e]), int(best_rank[v, r])
            nodes.append(v)
        return nodes, edges

    cands = []
    for s, extra in starts.items():
        if not reach[s]:
            continue
        for r in range(k):
            if np.isfinite(best_cost[s, r]):
                cands.append((float(best_cost[s, r]) + extra, s, r))
    out = []
    for c, s, r in cands:
        nodes, edges = walk(s, r)
        out.append((c, nodes, edges))
    out.sort(key=lambda x: (x[0], x[1]))
    return out[:k]
