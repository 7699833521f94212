"""Cross-prompt results in the store: supernodes, global virtual weights, swap experiments.

Schema (beside :mod:`graphstore.schema`'s)::

    (:Supernode {id, graph, local_id, name, size, influence, cohesion, members_json,
                 agreement, observed, predicted, effect_rank, random_mean_agreement,
                 detail_json})        detail_json: promoted, contexts, similarity, validation
    (:Graph)-[:HAS_SUPERNODE]->(:Supernode)-[:MEMBER]->(:Node)     members are nodes of the
                                                                   stored (pruned) graph
    (:Feature)-[:VIRTUAL {weight, rank_in, rank_out}]->(:Feature)  top-k global weights;
                                   the convention on (:Transcoder {virtual_norm, virtual_top_k})
    (:Swap {id, graph, other_graph, prompt, other_prompt, moved, top_before_json,
            top_after_json, continuation_before, continuation_after, result_json})
    (:Graph)-[:HAS_SWAP]->(:Swap)-[:SWAP_FROM]->(:Graph)

Every write is one transaction: a failed write leaves the store as it was. Inputs are plain
data (dicts and lists, or a pyarrow table for the weights), never torch.
"""

from __future__ import annotations

import hashlib
import json

import neo4j

from graphstore.errors import GraphNotFoundError, ModelMismatchError, StoreWriteError
from graphstore.ingest import NEW_FEATURES, NODE_BATCH
from graphstore.schema import feature_key

GRAPH_STATE = "MATCH (g:Graph {id: $graph}) RETURN g.complete AS complete, g.n_nodes AS n"

DELETE_SUPERNODES = "MATCH (s:Supernode {graph: $graph}) DETACH DELETE s"

# Row: [id, local id, name, size, influence, cohesion, members_json, agreement, observed,
# predicted, effect_rank, random_mean_agreement, members [[i, layer, position, feature]],
# detail_json].
WRITE_SUPERNODES = """
MATCH (g:Graph {id: $graph})
UNWIND $rows AS r
CREATE (s:Supernode {id: r[0], graph: $graph, local_id: r[1], name: r[2], size: r[3],
                     influence: r[4], cohesion: r[5], members_json: r[6], agreement: r[7],
                     observed: r[8], predicted: r[9], effect_rank: r[10],
                     random_mean_agreement: r[11], detail_json: r[13]})
CREATE (g)-[:HAS_SUPERNODE]->(s)
WITH s, r
UNWIND r[12] AS m
MATCH (n:Node {graph: $graph, i: m[0]})
WHERE n.kind = 'feature' AND n.layer = m[1] AND n.position = m[2] AND n.feature = m[3]
CREATE (s)-[:MEMBER]->(n)
RETURN count(*) AS members
"""

MISSING_FEATURES = """
UNWIND $keys AS k
OPTIONAL MATCH (f:Feature {key: k})
WITH k, f WHERE f IS NULL
RETURN collect(k) AS missing
"""

TRANSCODER = """
MERGE (t:Transcoder {name: $transcoder})
  ON CREATE SET t.model = $model
MERGE (m:Model {name: $model})
MERGE (t)-[:FOR_MODEL]->(m)
SET t.virtual_norm = $norm, t.virtual_top_k = $top_k, t.virtual_input_site = $input_site
"""

TRANSCODER_MODEL = "MATCH (t:Transcoder {name: $transcoder}) RETURN t.model AS model"

DELETE_VIRTUAL = """
MATCH (a:Feature {transcoder: $transcoder})-[v:VIRTUAL]->()
WITH v LIMIT $batch
DELETE v
RETURN count(*) AS deleted
"""

WRITE_VIRTUAL = """
UNWIND $rows AS r
MATCH (a:Feature {key: r[0]})
MATCH (b:Feature {key: r[1]})
CREATE (a)-[:VIRTUAL {weight: r[2], rank_in: r[3], rank_out: r[4]}]->(b)
RETURN count(*) AS written
"""

WRITE_SWAP = """
MATCH (g:Graph {id: $graph})
OPTIONAL MATCH (h:Graph {id: $other})
OPTIONAL MATCH (old:Swap {id: $id})
DETACH DELETE old
CREATE (s:Swap)
SET s = $props
CREATE (g)-[:HAS_SWAP]->(s)
FOREACH (x IN CASE WHEN h IS NULL THEN [] ELSE [h] END | CREATE (s)-[:SWAP_FROM]->(x))
RETURN s.id AS id
"""


def _graph_exists(tx, graph_id: str) -> dict:
    rec = tx.run(GRAPH_STATE, graph=graph_id).single()
    if rec is None or rec["complete"] is not True:
        raise GraphNotFoundError(
            f"no complete graph with id {graph_id!r} in the store: store the graph first "
            "(circuit-atlas trace ... --store, or GraphStore.add)"
        )
    return rec.data()


def _failed(what: str, err: Exception) -> StoreWriteError:
    return StoreWriteError(f"writing {what} failed ({err}); nothing was written: retry")


# --- supernodes -----------------------------------------------------------------------------------


# Supernode fields kept whole in detail_json (the others have their own properties).
DETAIL = ("promoted", "contexts", "similarity", "validation")


def supernode_rows(graph_id: str, supernodes: list[dict]) -> list[list]:
    """WRITE_SUPERNODES rows from supernode dicts
    (``tracer.analyses.supernodes.Supernode.to_dict()``:
    id, name, nodes, members, influence, cohesion, validation)."""
    rows = []
    for s in supernodes:
        v = s.get("validation") or {}
        members = [[int(i), *map(int, m)] for i, m in zip(s["nodes"], s["members"], strict=True)]
        rows.append([
            f"{graph_id}/{s['id']}", s["id"], s.get("name", ""), len(members),
            float(s.get("influence", 0.0)), float(s.get("cohesion", 0.0)),
            json.dumps(s["members"]), v.get("agreement"), v.get("observed"), v.get("predicted"),
            v.get("effect_rank"), v.get("random_mean_agreement"), members,
            json.dumps({k: s.get(k) for k in DETAIL}),
        ])  # fmt: skip
    return rows


def write_supernodes(session, graph_id: str, supernodes: list[dict]) -> int:
    """Replace the supernodes of stored graph ``graph_id``; returns the members linked.

    Members must be feature nodes of the stored graph (same index, layer, position and
    feature): supernodes found on the pruned graph that was stored."""
    rows = supernode_rows(graph_id, supernodes)

    def work(tx):
        _graph_exists(tx, graph_id)
        tx.run(DELETE_SUPERNODES, graph=graph_id).consume()
        if not rows:
            return 0
        linked = tx.run(WRITE_SUPERNODES, graph=graph_id, rows=rows).single()["members"]
        want = sum(len(r[12]) for r in rows)
        if linked != want:
            raise ValueError(
                f"only {linked} of the {want} supernode members are feature nodes of stored "
                f"graph {graph_id}: find supernodes on the graph that was stored (the pruned "
                "circuit), not on another version of it"
            )
        return linked

    try:
        return session.execute_write(work)
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError, OSError) as err:
        raise _failed(f"the supernodes of graph {graph_id}", err) from err


READ_SUPERNODES = """
MATCH (g:Graph {id: $graph})-[:HAS_SUPERNODE]->(s:Supernode)
WHERE g.complete = true
OPTIONAL MATCH (s)-[:MEMBER]->(n:Node)
RETURN s.local_id AS id, s.name AS name, s.influence AS influence, s.cohesion AS cohesion,
       s.detail_json AS detail, collect([n.i, n.layer, n.position, n.feature]) AS members
"""


def read_supernodes(session, graph_id: str) -> list[dict]:
    """The stored supernodes of graph ``graph_id`` as dicts in the shape of
    ``tracer.analyses.supernodes.Supernode.to_dict()`` (nodes in ascending order, members beside
    them;
    supernodes by influence, largest first); [] when it has none."""

    def work(tx):
        return [r.data() for r in tx.run(READ_SUPERNODES, graph=graph_id)]

    out = []
    for r in session.execute_read(work):
        members = sorted(m for m in r["members"] if m[0] is not None)
        detail = json.loads(r["detail"]) if r["detail"] else {}
        out.append({
            "id": r["id"], "name": r["name"], "nodes": [m[0] for m in members],
            "members": [m[1:] for m in members], "influence": r["influence"],
            "cohesion": r["cohesion"], **{k: detail.get(k) for k in DETAIL},
        })  # fmt: skip
    out.sort(key=lambda d: (-(d["influence"] or 0.0), _local_order(d["id"])))
    return out


def _local_order(local_id: str):
    """s2 before s10."""
    digits = local_id[1:]
    return (0, int(digits), "") if digits.isdigit() else (1, 0, local_id)


# --- global weights -------------------------------------------------------------------------------


def virtual_rows(transcoder: str, table) -> tuple[list[list], list[list]]:
    """(WRITE_VIRTUAL rows, feature rows [key, layer, index]) from a global-weights table
    (columns source_layer, source_index, target_layer, target_index, weight, rank_in,
    rank_out; ``tracer.analyses.global_weights.GlobalWeights.to_table()``)."""
    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    rows, feats = [], {}
    for sl, si, tl, ti, w, ri, ro in zip(
        cols["source_layer"], cols["source_index"], cols["target_layer"], cols["target_index"],
        cols["weight"], cols["rank_in"], cols["rank_out"], strict=True,
    ):  # fmt: skip
        a, b = feature_key(transcoder, sl, si), feature_key(transcoder, tl, ti)
        feats[a], feats[b] = [a, sl, si], [b, tl, ti]
        rows.append([a, b, float(w), int(ri), int(ro)])
    return rows, list(feats.values())


def write_global_weights(
    session, transcoder: str, model: str, table, *, norm: str, top_k: int, input_site: str,
    progress=None,
) -> int:  # fmt: skip
    """Replace the stored global weights of ``transcoder`` (of ``model``) with ``table``'s, in
    one transaction; creates the features they name. Returns the relationships written.
    ``progress(done, total)`` after each batch."""
    rows, feats = virtual_rows(transcoder, table)

    def work(tx):
        rec = tx.run(TRANSCODER_MODEL, transcoder=transcoder).single()
        if rec is not None and rec["model"] not in (None, model):
            raise ModelMismatchError(
                f"transcoder {transcoder!r} belongs to model {rec['model']!r} in this store, "
                f"not {model!r}: store the weights of the transcoder traced with that model"
            )
        tx.run(TRANSCODER, transcoder=transcoder, model=model, norm=norm, top_k=int(top_k),
               input_site=input_site).consume()  # fmt: skip
        while tx.run(DELETE_VIRTUAL, transcoder=transcoder, batch=NODE_BATCH).single()["deleted"]:
            pass
        missing = set(tx.run(MISSING_FEATURES, keys=[f[0] for f in feats]).single()["missing"])
        new = [f for f in feats if f[0] in missing]
        for start in range(0, len(new), NODE_BATCH):
            tx.run(NEW_FEATURES, rows=new[start : start + NODE_BATCH],
                   transcoder=transcoder).consume()  # fmt: skip
        done = 0
        for start in range(0, len(rows), NODE_BATCH):
            batch = rows[start : start + NODE_BATCH]
            done += tx.run(WRITE_VIRTUAL, rows=batch).single()["written"]
            if progress is not None:
                progress(done, len(rows))
        if done != len(rows):  # pragma: no cover - a bug
            raise RuntimeError(f"{done} of {len(rows)} global weights written")
        return done

    try:
        return session.execute_write(work)
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError, OSError) as err:
        raise _failed(f"the global weights of {transcoder}", err) from err


# --- swaps ----------------------------------------------------------------------------------------


def swap_id(graph_id: str, result: dict) -> str:
    """Stable id of a swap result: graph, features removed and inserted, mode."""
    ident = json.dumps([graph_id, result.get("removed"), result.get("inserted"),
                        result.get("mode")], sort_keys=True, default=str)  # fmt: skip
    return "w" + hashlib.sha256(ident.encode()).hexdigest()[:24]


def write_swap(session, graph_id: str, other_graph_id: str | None, result: dict) -> str:
    """Store one swap result (``tracer.analyses.swap.SwapResult.to_dict()``) with graph ``graph_id``
    (linked to ``other_graph_id`` when that graph is stored). Same swap again: replaced."""
    sid = swap_id(graph_id, result)
    props = {
        "id": sid, "graph": graph_id, "other_graph": other_graph_id,
        "prompt": result.get("prompt"), "other_prompt": result.get("other_prompt"),
        "mode": result.get("mode"), "moved": bool(result.get("moved")),
        "top_before_json": json.dumps(result.get("top_before")),
        "top_after_json": json.dumps(result.get("top_after")),
        "continuation_before": result.get("continuation_before", ""),
        "continuation_after": result.get("continuation_after", ""),
        "result_json": json.dumps(result, default=str),
    }  # fmt: skip
    props = {k: v for k, v in props.items() if v is not None}

    def work(tx):
        _graph_exists(tx, graph_id)
        return tx.run(WRITE_SWAP, graph=graph_id, other=other_graph_id, id=sid,
                      props=props).single()["id"]  # fmt: skip

    try:
        return session.execute_write(work)
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError, OSError) as err:
        raise _failed(f"a swap result of graph {graph_id}", err) from err
