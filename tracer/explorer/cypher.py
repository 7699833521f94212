"""The explorer's Cypher console: results of :meth:`GraphStore.cypher` as a JSON table, and
the graph nodes among them (``(:Node)`` values of one graph) as Neuronpedia node ids for the
graph view to highlight."""

from __future__ import annotations

from tracer.explorer.security import json_safe


def store_node_id(node: dict) -> str | None:
    """The Neuronpedia node id of a ``(:Node)`` result value (a dict with ``labels``, ``kind``,
    ``layer``, ``position``, ``feature``), or None for anything else."""
    if not isinstance(node, dict) or "Node" not in (node.get("labels") or []):
        return None
    kind, layer, pos, feat = (node.get(k) for k in ("kind", "layer", "position", "feature"))
    if kind == "feature":
        return f"{layer}_{feat}_{pos}"
    if kind == "error":
        return f"{layer}_-1_{pos}"
    if kind == "token":
        return f"E_{feat}_{pos}"
    if kind == "logit":  # a logit node's layer is n_layers; its id uses n_layers + 1
        return f"{int(layer) + 1}_{feat}_{pos}"
    return None


def cypher_result(res, max_rows: int) -> dict:
    """``{"columns", "rows", "truncated", "highlight"}``; highlight is ``{"graph", "nodes"}``
    when the result holds nodes of exactly one graph, else None."""
    graphs, nodes = set(), []

    def visit(v):
        if isinstance(v, list):
            for x in v:
                visit(x)
            return
        nid = store_node_id(v)
        if nid is not None:
            graphs.add(v.get("graph"))
            nodes.append(nid)

    for row in res.rows:
        for v in row:
            visit(v)
    highlight = None
    if nodes and len(graphs) == 1:
        highlight = {"graph": next(iter(graphs)), "nodes": sorted(set(nodes))}
    return {
        "columns": list(res.columns),
        "rows": [[json_safe(v) for v in r] for r in res.rows],
        "truncated": len(res.rows) >= max_rows,
        "highlight": highlight,
    }
