"""Saved subgraphs (pinned nodes, supernodes, labels: :class:`tracer.subgraph.Subgraph`),
stored with their graph.

Schema: ``(:Subgraph {key, graph, name, doc_json, updated_ms})``, ``key = "<graph id>/<name>"``
(unique), ``graph`` the id of a complete ``(:Graph)``. Saving the same name again replaces the
subgraph. Each save is one write transaction that first checks the graph exists and the
subgraph's node ids are the graph's nodes, so a refused or failed save leaves the store as it
was.
"""

from __future__ import annotations

import json
import time

from graphstore.errors import GraphNotFoundError, StoreWriteError, SubgraphNotFoundError
from tracer.subgraph import Subgraph, SubgraphError

GRAPH_NODES = """
MATCH (g:Graph {id: $graph}) WHERE g.complete = true
OPTIONAL MATCH (n:Node {graph: $graph})
RETURN g.n_layers AS n_layers, collect([n.kind, n.layer, n.position, n.feature]) AS nodes
"""

SAVE = """
MERGE (s:Subgraph {key: $key})
SET s.graph = $graph, s.name = $name, s.doc_json = $doc, s.updated_ms = $now
RETURN s.key AS key
"""

LIST = """
MATCH (s:Subgraph {graph: $graph})
RETURN s.name AS name, s.doc_json AS doc, s.updated_ms AS updated_ms
ORDER BY name
"""

LOAD = "MATCH (s:Subgraph {key: $key}) RETURN s.doc_json AS doc"


def subgraph_key(graph_id: str, name: str) -> str:
    return f"{graph_id}/{name}"


def _np_ids(n_layers: int, rows: list) -> set[str]:
    """Neuronpedia node ids of a stored graph's nodes (the convention of
    tracer.reports.neuronpedia.np_node_id, computed from the stored node properties)."""
    ids = set()
    for kind, layer, pos, feat in rows:
        if kind is None:
            continue
        if kind == "feature":
            ids.add(f"{layer}_{feat}_{pos}")
        elif kind == "error":
            ids.add(f"{layer}_-1_{pos}")
        elif kind == "token":
            ids.add(f"E_{feat}_{pos}")
        else:
            ids.add(f"{n_layers + 1}_{feat}_{pos}")
    return ids


def save_subgraph(session, graph_id: str, subgraph: Subgraph) -> None:
    """Store ``subgraph`` with graph ``graph_id`` (replacing one of the same name).

    Raises GraphNotFoundError (no such complete graph), SubgraphError (malformed, or a node id
    the graph lacks) or StoreWriteError; in every case nothing is written."""
    import neo4j

    subgraph.check()
    doc = json.dumps(subgraph.to_dict(), ensure_ascii=False)

    def work(tx):
        rec = tx.run(GRAPH_NODES, graph=graph_id).single()
        if rec is None:
            raise GraphNotFoundError(
                f"no complete graph with id {graph_id!r} in the store: a subgraph is saved with "
                "a stored graph (add the graph with `circuit-atlas store add FILE`)"
            )
        subgraph.check(_np_ids(int(rec["n_layers"]), rec["nodes"]))
        tx.run(
            SAVE,
            key=subgraph_key(graph_id, subgraph.name),
            graph=graph_id,
            name=subgraph.name,
            doc=doc,
            now=int(time.time() * 1000),
        ).consume()

    try:
        session.execute_write(work)
    except (GraphNotFoundError, SubgraphError):
        raise
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError, OSError) as err:
        raise StoreWriteError(
            f"saving subgraph {subgraph.name!r} of graph {graph_id} failed ({err}); nothing "
            "was written: save it again once the server is back"
        ) from err


def list_subgraphs(session, graph_id: str) -> list[dict]:
    """``[{"name", "updated_ms", "pinned", "supernodes"}]`` of a graph's saved subgraphs."""
    rows = session.execute_read(lambda tx: tx.run(LIST, graph=graph_id).data())
    out = []
    for r in rows:
        d = json.loads(r["doc"])
        out.append({
            "name": r["name"], "updated_ms": r["updated_ms"],
            "pinned": len(d.get("pinnedIds", [])), "supernodes": len(d.get("supernodes", [])),
        })  # fmt: skip
    return out


def load_subgraph(session, graph_id: str, name: str) -> Subgraph:
    """The saved subgraph ``name`` of graph ``graph_id``; SubgraphNotFoundError if there is none."""
    rec = session.execute_read(lambda tx: tx.run(LOAD, key=subgraph_key(graph_id, name)).single())
    if rec is None:
        raise SubgraphNotFoundError(
            f"graph {graph_id} has no saved subgraph {name!r}: list them with "
            f"circuit-atlas cypher \"MATCH (s:Subgraph {{graph: '{graph_id}'}}) RETURN s.name\""
        )
    return Subgraph.from_dict(json.loads(rec["doc"]))
