"""Attention heads in the store: ``(:Head {model, layer, head})`` nodes and, for each circuit
edge, the heads that carry it (``tracer.attention`` head loadings, kept in a graph's
``extra["head_loadings"]``).

A head is shared by every graph of its model (key ``"<model>/<layer>/<head>"``). Each kept head
of a circuit edge is one relationship to the edge's target node::

    (:Head)-[:CARRIES {graph, source, target, part, share, rank}]->(:Node)

``source`` / ``target`` are the edge's node indices in the stored graph, ``part`` the head's
part of the edge weight, ``share`` = |part| / |edge|, ``rank`` 0 for the head carrying most.
Deleting a graph deletes its nodes and so these relationships; the Head nodes stay.

Canned queries (``circuit-atlas query NAME``): ``feature-heads`` (the heads that carry a
feature's edges across prompts) and ``head-prompts`` (the prompts where a head carries the
most).
"""

from __future__ import annotations

import neo4j

from graphstore.errors import StoreWriteError
from graphstore.queries import CannedQuery, Param
from graphstore.schema import feature_key

HEAD_LOADINGS = "head_loadings"  # the graph.extra key (tracer.attention.HEAD_LOADINGS_KEY)


def head_key(model: str, layer: int, head: int) -> str:
    """The unique key of an attention head: ``"<model>/<layer>/<head>"``."""
    return f"{model}/{int(layer)}/{int(head)}"


def head_rows(graph) -> list[list]:
    """WRITE_HEADS rows of a graph with head loadings: [target index, source index, head key,
    layer, head, part, share, rank]; [] when the graph has none. Edges are matched to the
    graph's nodes by node id (the record may come from the full graph)."""
    rec = graph.extra.get(HEAD_LOADINGS)
    if not rec:
        return []
    index = {graph.node_id(i): i for i in range(graph.n_nodes)}
    rows = []
    for t, s, w, heads in zip(rec["target"], rec["source"], rec["weight"], rec["heads"],
                              strict=True):  # fmt: skip
        if t not in index or s not in index:
            continue
        for rank, (layer, head, part) in enumerate(heads):
            share = abs(part) / abs(w) if w else 0.0
            rows.append([index[t], index[s], head_key(graph.model_name, layer, head),
                         int(layer), int(head), float(part), float(share), rank])  # fmt: skip
    return rows


DELETE_HEADS = "MATCH (:Head)-[c:CARRIES {graph: $graph}]->() DELETE c"

WRITE_HEADS = """
UNWIND $rows AS r
MATCH (t:Node {graph: $graph, i: r[0]})
MERGE (h:Head {key: r[2]})
  ON CREATE SET h.model = $model, h.layer = r[3], h.head = r[4]
CREATE (h)-[:CARRIES {graph: $graph, target: r[0], source: r[1], part: r[5], share: r[6],
                      rank: r[7]}]->(t)
RETURN count(*) AS carried
"""


def write_heads(session, graph_id: str, graph) -> int:
    """Replace the head loadings of stored graph ``graph_id`` by those of ``graph`` (the stored
    circuit, or any graph with the same nodes); returns the relationships written."""
    rows = head_rows(graph)

    def work(tx):
        tx.run(DELETE_HEADS, graph=graph_id).consume()
        if not rows:
            return 0
        res = tx.run(WRITE_HEADS, graph=graph_id, model=graph.model_name, rows=rows).single()
        carried = res["carried"] if res is not None else 0
        if carried != len(rows):
            raise ValueError(
                f"only {carried} of {len(rows)} head loadings found their target node in "
                f"stored graph {graph_id}: store the circuit the loadings were computed for"
            )
        return carried

    try:
        return session.execute_write(work)
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError, OSError) as err:
        raise StoreWriteError(
            f"writing the head loadings of graph {graph_id} failed ({err}); nothing was "
            "written: retry"
        ) from err


FEATURE_HEADS = """
// The heads that carry the edges into or out of feature F's nodes, across prompts: summed
// |part| over those edges, the edges and prompts involved.
// $key: F's "<transcoder>/<layer>/<index>".
MATCH (f:Feature {key: $key})<-[:INSTANCE_OF]-(n:Node)
MATCH (g:Graph {id: n.graph})
WHERE g.complete = true
MATCH (h:Head)-[c:CARRIES {graph: n.graph}]->(t:Node)
WHERE t = n OR c.source = n.i
RETURN h.layer AS layer, h.head AS head, sum(abs(c.part)) AS carried, count(c) AS edges,
       count(DISTINCT g.prompt_id) AS prompts
ORDER BY carried DESC, layer ASC, head ASC
LIMIT $limit
"""

HEAD_PROMPTS = """
// The prompts where head (layer, head) of $model carries the most circuit-edge weight.
MATCH (h:Head {key: $key})-[c:CARRIES]->(t:Node)
MATCH (g:Graph {id: c.graph})
WHERE g.complete = true
RETURN g.prompt AS prompt, g.id AS graph, sum(abs(c.part)) AS carried, count(c) AS edges,
       max(c.share) AS largest_share
ORDER BY carried DESC, graph ASC
LIMIT $limit
"""


def _feature_heads(layer, index, transcoder, limit=20):
    return FEATURE_HEADS, {"key": feature_key(transcoder, layer, index), "limit": int(limit)}


def _head_prompts(model, layer, head, limit=20):
    return HEAD_PROMPTS, {"key": head_key(model, layer, head), "limit": int(limit)}


HEAD_QUERIES = (
    CannedQuery(
        "feature-heads",
        "the attention heads that carry a feature's circuit edges across prompts",
        FEATURE_HEADS,
        (
            Param("layer", int, "layer of the feature", required=True),
            Param("index", int, "index of the feature", required=True),
            Param("transcoder", str, "its transcoder (default: the store's)"),
            Param("limit", int, "rows to return", 20),
        ),
        _feature_heads,
    ),
    CannedQuery(
        "head-prompts",
        "the prompts where an attention head carries the most circuit-edge weight",
        HEAD_PROMPTS,
        (
            Param("model", str, "model name as graphs record it (e.g. smollm2)", required=True),
            Param("layer", int, "attention layer", required=True),
            Param("head", int, "head of that layer", required=True),
            Param("limit", int, "rows to return", 20),
        ),
        _head_prompts,
    ),
)
