"""Reading a stored graph back into a :class:`tracer.graph.Graph` (equal to the pruned graph that
was written: same node order, edge order, values to float32 precision)."""

from __future__ import annotations

import json

import numpy as np

from graphstore.errors import GraphNotFoundError
from tracer.graph import NODE_KINDS, Graph

GRAPH = "MATCH (g:Graph {id: $id}) WHERE g.complete = true RETURN g"

NODES = """
MATCH (n:Node {graph: $id})
RETURN [n.i, n.kind, n.layer, n.position, n.feature, n.activation, n.probability,
        n.logit_weight] AS r
"""

EDGES = """
MATCH (a:Node {graph: $id})-[e:EDGE]->(b:Node)
RETURN [e.k, b.i, a.i, e.weight] AS r
"""


def read_graph(session, gid: str) -> Graph:
    """The complete graph ``gid`` as a Graph; GraphNotFoundError if there is none."""

    def work(tx):
        rec = tx.run(GRAPH, id=gid).single()
        if rec is None:
            return None, None, None
        nodes = [r["r"] for r in tx.run(NODES, id=gid)]
        edges = [r["r"] for r in tx.run(EDGES, id=gid)]
        return dict(rec["g"]), nodes, edges

    g, nodes, edges = session.execute_read(work)
    if g is None:
        raise GraphNotFoundError(
            f"no complete graph with id {gid!r} in the store: list ids with "
            'circuit-atlas cypher "MATCH (g:Graph {complete: true}) RETURN g.id, g.prompt"'
        )
    n = int(g["n_nodes"])
    if len(nodes) != n or len(edges) != int(g["n_edges"]):
        raise RuntimeError(
            f"graph {gid} is marked complete but holds {len(nodes)}/{n} nodes and "
            f"{len(edges)}/{g['n_edges']} edges: re-store it to repair"
        )
    nodes.sort(key=lambda r: r[0])
    edges.sort(key=lambda r: r[0])
    kind_index = {k: i for i, k in enumerate(NODE_KINDS)}
    cols = list(zip(*nodes, strict=True)) if nodes else [()] * 8
    ecols = list(zip(*edges, strict=True)) if edges else [()] * 4
    return Graph(
        prompt=g["prompt"],
        tokens=list(g["tokens"]),
        token_strings=list(g["token_strings"]),
        model_name=g["model"],
        transcoder_name=g["transcoder"],
        n_layers=int(g["n_layers"]),
        kind=np.array([kind_index[k] for k in cols[1]], dtype=np.int8),
        layer=np.array(cols[2], dtype=np.int32),
        position=np.array(cols[3], dtype=np.int32),
        feature=np.array(cols[4], dtype=np.int64),
        activation=np.array(cols[5], dtype=np.float32),
        probability=np.array(cols[6], dtype=np.float32),
        logit_weights=np.array(cols[7], dtype=np.float32),
        target=np.array(ecols[1], dtype=np.int32),
        source=np.array(ecols[2], dtype=np.int32),
        weight=np.array(ecols[3], dtype=np.float32),
        params=json.loads(g["params_json"]),
        scores=json.loads(g["scores_json"]),
        extra=json.loads(g["extra_json"]),
    )
