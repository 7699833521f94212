"""The explorer's Cypher console: results of :meth:`GraphStore.cypher` as a table of
properties, and the graph nodes among them (``(:Node)`` values of one graph) as Neuronpedia
node ids for the graph view to highlight.

A result column whose values are all nodes (dicts with ``labels``) or all relationships (dicts
with ``type``) is spread into one column per property (``n:labels``, ``n.layer``,
``n.influence``, ..., ``r:type``, ``r.weight``), the key properties first; every other
structured value (a list, a map, a path, a mixed column) becomes one short text summary
(``(:Node feature L3/F12@5 influence=0.0312)``), so no cell is a raw JSON blob."""

from __future__ import annotations

from tracer.explorer.security import json_safe

# Key properties, in column order; the rest of a value's scalar properties follow by name.
NODE_KEYS = ("kind", "layer", "index", "feature", "position", "influence", "activation",
             "probability", "token", "name", "key", "prompt", "graph")  # fmt: skip
REL_KEYS = ("weight", "k", "nodes", "activation")
MAX_TEXT = 80  # characters of a string property shown; longer ones are cut with "…"
MAX_PROPERTY_COLUMNS = 12  # property columns per spread result column
MAX_SUMMARY = 160  # characters of a one-cell summary


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


def _is_node(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("labels"), list)


def _is_rel(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("type"), str) and "labels" not in v


def _scalar(v):
    """A property value as a table cell: numbers, booleans and short strings as they are, a
    long string cut, a list or map as a short text."""
    if v is None or isinstance(v, bool | int | float):
        return json_safe(v)
    if isinstance(v, str):
        return v if len(v) <= MAX_TEXT else v[: MAX_TEXT - 1] + "…"
    return summary(v)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary(v) -> str:
    """One line for any result value: a node as ``(:Label key=value ...)`` with its key
    properties (a graph node also as ``L3/F12@5``), a relationship as ``[:TYPE weight=...]``,
    a list as ``[a, b, …]``; at most MAX_SUMMARY characters."""
    if _is_node(v):
        props = " ".join(f"{k}={_fmt(v[k])}" for k in NODE_KEYS if v.get(k) is not None)
        text = f"(:{':'.join(v['labels'])} {props})"
    elif _is_rel(v):
        props = " ".join(f"{k}={_fmt(v[k])}" for k in REL_KEYS if v.get(k) is not None)
        text = f"[:{v['type']} {props}]".replace(" ]", "]")
    elif isinstance(v, list):
        text = "[" + ", ".join(summary(x) for x in v[:8]) + (", …" if len(v) > 8 else "") + "]"
    elif isinstance(v, dict):
        text = "{" + ", ".join(f"{k}: {summary(x)}" for k, x in list(v.items())[:8]) + "}"
    elif isinstance(v, float):
        text = _fmt(v)
    else:
        text = "" if v is None else str(v)
    return text if len(text) <= MAX_SUMMARY else text[: MAX_SUMMARY - 1] + "…"


def _property_keys(values: list[dict], first: tuple[str, ...], skip: set[str]) -> list[str]:
    present = {k for v in values for k, x in v.items() if k not in skip and x is not None}
    keys = [k for k in first if k in present]
    keys += sorted(present - set(keys))
    return keys[:MAX_PROPERTY_COLUMNS]


def property_table(columns: list[str], rows: list[list]) -> dict:
    """``{"columns": [...], "rows": [[cell, ...]], "kinds": [...]}``: the result as a table of
    properties. ``kinds[j]`` says what table column j holds: ``"labels"``/``"type"`` (a node's
    labels or a relationship's type), ``"property"`` (one property of the node or relationship
    values of a result column) or ``"value"`` (a scalar, or a summary of anything else)."""
    out_cols: list[str] = []
    kinds: list[str] = []
    getters = []  # per output column: function(row) -> cell
    for j, name in enumerate(columns):
        values = [r[j] for r in rows if r[j] is not None]
        if values and all(_is_node(v) for v in values):
            out_cols.append(f"{name}:labels")
            kinds.append("labels")
            getters.append(lambda r, j=j: ":".join(r[j]["labels"]) if r[j] else None)
            first, skip = NODE_KEYS, {"labels"}
        elif values and all(_is_rel(v) for v in values):
            out_cols.append(f"{name}:type")
            kinds.append("type")
            getters.append(lambda r, j=j: r[j]["type"] if r[j] else None)
            first, skip = REL_KEYS, {"type"}
        else:
            out_cols.append(name)
            kinds.append("value")
            getters.append(lambda r, j=j: _scalar(r[j]))
            continue
        for k in _property_keys(values, first, skip):
            out_cols.append(f"{name}.{k}")
            kinds.append("property")
            getters.append(lambda r, j=j, k=k: _scalar(r[j].get(k)) if r[j] else None)
    return {"columns": out_cols, "kinds": kinds, "rows": [[f(r) for f in getters] for r in rows]}


def cypher_result(res, max_rows: int) -> dict:
    """``{"columns", "rows", "table", "truncated", "highlight"}``: ``rows`` the plain values,
    ``table`` the same rows as a table of properties (:func:`property_table`); highlight is
    ``{"graph", "nodes"}`` when the result holds nodes of exactly one graph, else None."""
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
    rows = [[json_safe(v) for v in r] for r in res.rows]
    return {
        "columns": list(res.columns),
        "rows": rows,
        "table": property_table(list(res.columns), rows),
        "truncated": len(res.rows) >= max_rows,
        "highlight": highlight,
    }
