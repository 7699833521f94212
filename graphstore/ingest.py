"""Writing pruned graphs to the database: batched ``UNWIND $rows`` in managed transactions.

A graph with more than EDGE_BATCH edges is written as (1) one transaction with its (:Graph)
node (``complete = false``), new features, nodes and per-graph feature summary, (2) its edges
in batches, (3) one last transaction that sets ``complete = true`` and adds the graph to the
per-feature counters. Every query reads complete graphs only, so a writer that dies part-way
leaves nothing visible; the next write of the same graph id deletes the remains first.
A smaller graph (the usual pruned circuit) goes in a single transaction doing all three.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from graphstore.schema import feature_key
from tracer.graph import FEATURE, NODE_KINDS, TOKEN, Graph

# Rows per transaction. Rows travel as lists, not maps: ArcadeDB decodes Bolt lists of
# scalars several times faster than maps (measured: 4,000 map rows 166 ms, lists 21 ms).
NODE_BATCH = 5000
EDGE_BATCH = 20000
DELETE_BATCH = 5000


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in graph metadata")


def graph_id(graph: Graph) -> str:
    """Stable identity of a traced graph: a hash of (model, transcoder, prompt tokens,
    attribution parameters). Tracing the same prompt with the same settings gives the same id."""
    ident = {
        "model": graph.model_name,
        "transcoder": graph.transcoder_name,
        "tokens": [int(t) for t in graph.tokens],
        "params": graph.params,
    }
    return "g" + hashlib.sha256(_json(ident).encode()).hexdigest()[:24]


def prompt_id(graph: Graph) -> str:
    """Identity of a prompt: a hash of (model, prompt tokens)."""
    ident = {"model": graph.model_name, "tokens": [int(t) for t in graph.tokens]}
    return "p" + hashlib.sha256(_json(ident).encode()).hexdigest()[:24]


def content_hash(graph: Graph) -> str:
    """Hash of everything a stored graph holds: equal hashes mean a re-write changes nothing."""
    h = hashlib.sha256()
    h.update(_json(graph.header()).encode())
    for name in ("kind", "layer", "position", "feature", "activation", "probability"):
        h.update(np.ascontiguousarray(getattr(graph, name)).tobytes())
    h.update(np.ascontiguousarray(graph.logit_weights, dtype=np.float32).tobytes())
    for name in ("target", "source", "weight"):
        h.update(np.ascontiguousarray(getattr(graph, name)).tobytes())
    return h.hexdigest()


def _prop_name(prefix: str, key: str) -> str:
    return prefix + re.sub(r"[^0-9A-Za-z_]", "_", str(key))


def _scalar(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool | int | float | str):
        return v
    return None


def flat_properties(graph: Graph) -> dict:
    """Scalar params, scores and validation results as (:Graph) properties, so Cypher can
    filter on them: ``param_<k>``, ``score_<k>``, ``validation_<k>`` (nested dicts joined
    with ``_``)."""
    out: dict = {}

    def put(prefix: str, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                put(_prop_name(prefix, k) + "_", v)
            elif (s := _scalar(v)) is not None:
                out[_prop_name(prefix, k)] = s

    put("param_", graph.params)
    put("score_", graph.scores)
    validation = graph.extra.get("validation")
    if isinstance(validation, dict):
        put("validation_", validation)
    return out


@dataclass
class GraphRows:
    """A graph flattened into parameter rows for the write queries."""

    header: dict
    feature_nodes: list[list]  # [key, i, layer, position, feature, activation, prob, logit_w]
    other_nodes: list[list]  # [i, kind, layer, position, feature, activation, prob, logit_w, tok]
    features: list[list]  # [key, n_nodes, activation sum, layer, index] per distinct feature
    edge_source: np.ndarray  # [n_edges] node index
    edge_target: np.ndarray
    edge_weight: np.ndarray


def graph_rows(graph: Graph, gid: str, parquet_path: str | None) -> GraphRows:
    n = graph.n_nodes
    kind = graph.kind.tolist()
    layer = graph.layer.tolist()
    position = graph.position.tolist()
    feature = graph.feature.tolist()
    activation = graph.activation.astype(np.float64).tolist()
    probability = graph.probability.astype(np.float64).tolist()
    logit_w = np.asarray(graph.logit_weights, dtype=np.float64).tolist()
    feature_nodes, other_nodes = [], []
    per_feature: dict[str, list] = {}
    tc = graph.transcoder_name
    for i in range(n):
        if kind[i] == FEATURE:
            key = feature_key(tc, layer[i], feature[i])
            feature_nodes.append(
                [
                    key,
                    i,
                    layer[i],
                    position[i],
                    feature[i],
                    activation[i],
                    probability[i],
                    logit_w[i],
                ]
            )
            agg = per_feature.setdefault(key, [key, 0, 0.0, layer[i], feature[i]])
            agg[1] += 1
            agg[2] += abs(activation[i])
        else:
            tok = graph.token_strings[position[i]] if kind[i] == TOKEN else None
            other_nodes.append(
                [i, NODE_KINDS[kind[i]], layer[i], position[i], feature[i], activation[i],
                 probability[i], logit_w[i], tok]
            )  # fmt: skip
    features = list(per_feature.values())
    header = {
        "id": gid,
        "model": graph.model_name,
        "transcoder": graph.transcoder_name,
        "prompt_id": prompt_id(graph),
        "prompt": graph.prompt,
        "tokens": [int(t) for t in graph.tokens],
        "token_strings": list(graph.token_strings),
        "n_nodes": n,
        "n_edges": graph.n_edges,
        "n_layers": int(graph.n_layers),
        "parquet_path": parquet_path,
        "content_hash": content_hash(graph),
        "params_json": _json(graph.params),
        "scores_json": _json(graph.scores),
        "extra_json": _json(graph.extra),
        "feature_mass": float(sum(f[2] for f in features)),
        "created_at": time.time(),
        **flat_properties(graph),
    }
    return GraphRows(
        header=header,
        feature_nodes=feature_nodes,
        other_nodes=other_nodes,
        features=features,
        edge_source=np.asarray(graph.source),
        edge_target=np.asarray(graph.target),
        edge_weight=np.asarray(graph.weight, dtype=np.float64),
    )


# --- Cypher ---------------------------------------------------------------------------------------

STATE = """
OPTIONAL MATCH (t:Transcoder {name: $transcoder})
OPTIONAL MATCH (g:Graph {id: $id})
RETURN t.model AS transcoder_model, g.complete AS complete, g.content_hash AS content_hash
"""

HIDE = """
MATCH (g:Graph {id: $id})
WITH g, g.complete AS was_complete
SET g.complete = false
RETURN was_complete, g.prompt_id AS prompt_id
"""

# Per-feature counters over complete graphs (Feature.graphs, .prompts, .nodes, .activation),
# updated in the transaction that flips a graph's visibility, so "which features recur" reads
# a few thousand Feature nodes instead of aggregating every graph's features at query time.
GRAPH_FEATURES = """
MATCH (g:Graph {id: $id})-[u:HAS_FEATURE]->(f:Feature)
RETURN elementId(f) AS eid, u.nodes AS nodes, u.activation AS activation
"""

SAME_PROMPT_FEATURES = """
MATCH (h:Graph {prompt_id: $prompt_id})-[:HAS_FEATURE]->(f:Feature)
WHERE h.complete = true AND h.id <> $id
RETURN DISTINCT elementId(f) AS eid
"""

COUNT_FEATURES = """
UNWIND $rows AS r
MATCH (f) WHERE elementId(f) = r[0]
SET f.graphs = coalesce(f.graphs, 0) + $sign,
    f.prompts = coalesce(f.prompts, 0) + $sign * r[3],
    f.nodes = coalesce(f.nodes, 0) + $sign * r[1],
    f.activation = coalesce(f.activation, 0.0) + $sign * r[2]
"""

DELETE_NODES = """
MATCH (n:Node {graph: $id})
WITH n LIMIT $batch
DETACH DELETE n
RETURN count(*) AS deleted
"""

DELETE_GRAPH = "MATCH (g:Graph {id: $id}) DETACH DELETE g"

HEADER = """
MERGE (m:Model {name: $h.model})
MERGE (t:Transcoder {name: $h.transcoder})
  ON CREATE SET t.model = $h.model
MERGE (t)-[:FOR_MODEL]->(m)
MERGE (p:Prompt {id: $h.prompt_id})
  ON CREATE SET p.text = $h.prompt, p.model = $h.model, p.tokens = $h.tokens,
                p.token_strings = $h.token_strings
CREATE (g:Graph {id: $h.id})
SET g += $h, g.complete = false
CREATE (g)-[:OF_PROMPT]->(p)
CREATE (g)-[:USES]->(t)
"""

# Features are looked up first and only the missing ones created: per-row MERGE is several
# times slower on ArcadeDB (measured ~1.3 ms a row).
FIND_FEATURES = """
UNWIND $keys AS key
MATCH (f:Feature {key: key})
RETURN f.key AS key, elementId(f) AS eid
"""

NEW_FEATURES = """
UNWIND $rows AS r
CREATE (f:Feature {key: r[0], transcoder: $transcoder, layer: r[1], index: r[2]})
RETURN f.key AS key, elementId(f) AS eid
"""

FEATURE_NODES = """
UNWIND $rows AS r
MATCH (f) WHERE elementId(f) = r[0]
CREATE (n:Node {graph: $id, i: r[1], kind: 'feature', layer: r[2], position: r[3],
                feature: r[4], activation: r[5], probability: r[6], logit_weight: r[7]})
CREATE (n)-[:INSTANCE_OF]->(f)
RETURN r[1] AS i, elementId(n) AS eid
"""

OTHER_NODES = """
UNWIND $rows AS r
CREATE (n:Node {graph: $id, i: r[0], kind: r[1], layer: r[2], position: r[3], feature: r[4],
                activation: r[5], probability: r[6], logit_weight: r[7], token: r[8]})
RETURN r[0] AS i, elementId(n) AS eid
"""

HAS_FEATURE = """
MATCH (g:Graph {id: $id})
UNWIND $rows AS r
MATCH (f) WHERE elementId(f) = r[0]
CREATE (g)-[:HAS_FEATURE {nodes: r[1], activation: r[2]}]->(f)
"""

# Edges grouped by source node: one lookup of the source per group (measured ~1.7x faster on
# ArcadeDB than one row per edge). Row: [source eid, [target eids], [weights], [edge indices]].
EDGES = """
UNWIND $rows AS r
MATCH (a) WHERE elementId(a) = r[0]
UNWIND range(0, size(r[1]) - 1) AS j
MATCH (b) WHERE elementId(b) = r[1][j]
CREATE (a)-[:EDGE {weight: r[2][j], k: r[3][j]}]->(b)
"""

COMPLETE = "MATCH (g:Graph {id: $id}) SET g.complete = true RETURN g.id AS id"


@dataclass
class WriteResult:
    graph_id: str
    written: bool  # False when an identical complete copy was already stored
    repaired: bool  # True when remains of an earlier (crashed or different) write were removed
    n_nodes: int
    n_edges: int
    seconds: float


def _count_features(tx, gid: str, prompt: str, features: list[list], sign: int) -> None:
    """Add (sign +1) or remove (-1) one complete graph's contribution to the feature counters.
    ``features`` rows: [feature eid, nodes, activation]. A prompt counts once per feature, so
    features another complete graph of the same prompt already has do not change ``prompts``."""
    seen = {r["eid"] for r in tx.run(SAME_PROMPT_FEATURES, prompt_id=prompt, id=gid)}
    rows = [[eid, n, act, 0 if eid in seen else 1] for eid, n, act in features]
    for start in range(0, len(rows), NODE_BATCH):
        tx.run(COUNT_FEATURES, rows=rows[start : start + NODE_BATCH], sign=sign).consume()


def _hide(tx, gid: str) -> bool:
    rec = tx.run(HIDE, id=gid).single()
    if rec is None:
        return False
    if rec["was_complete"]:
        feats = [[r["eid"], r["nodes"], r["activation"]] for r in tx.run(GRAPH_FEATURES, id=gid)]
        _count_features(tx, gid, rec["prompt_id"], feats, -1)
    return True


def _complete(tx, gid: str, prompt: str, features: list[list]) -> bool:
    rec = tx.run(COMPLETE, id=gid).single()
    if rec is None:  # pragma: no cover - would mean a concurrent delete
        return False
    _count_features(tx, gid, prompt, features, +1)
    return True


def delete_graph(session, gid: str) -> bool:
    """Remove a graph (complete or not) and everything that belongs to it; True if found."""
    found = session.execute_write(_hide, gid)
    while True:
        deleted = session.execute_write(
            lambda tx: tx.run(DELETE_NODES, id=gid, batch=DELETE_BATCH).single()["deleted"]
        )
        if not deleted:
            break
    session.execute_write(lambda tx: tx.run(DELETE_GRAPH, id=gid).consume())
    return found


def write_rows(session, rows: GraphRows, on_state=None, progress=None) -> WriteResult:
    """Write one graph's rows.

    ``on_state(state)`` sees the stored state first (the caller checks model consistency there
    and may raise). ``progress(edges_written, n_edges)`` is called after each committed batch.
    Up to EDGE_BATCH edges: one transaction. More: (1) header, features, nodes and feature
    summary; (2..) edge batches; (last) the flip to ``complete = true`` (see the module doc).
    """
    t0 = time.perf_counter()
    h = rows.header
    gid = h["id"]
    state = session.execute_read(
        lambda tx: tx.run(STATE, transcoder=h["transcoder"], id=gid).single().data()
    )
    if on_state is not None:
        on_state(state)
    n_nodes, n_edges = h["n_nodes"], h["n_edges"]
    if state["complete"] is True and state["content_hash"] == h["content_hash"]:
        return WriteResult(gid, False, False, n_nodes, n_edges, time.perf_counter() - t0)
    repaired = state["complete"] is not None
    if repaired:
        delete_graph(session, gid)

    if n_edges <= EDGE_BATCH:
        # Small enough for one transaction: atomic, and two commits fewer per graph.
        if not session.execute_write(_write_whole, rows):  # pragma: no cover
            raise RuntimeError(f"graph {gid} vanished while it was being written")
        if progress is not None:
            progress(n_edges, n_edges)
        return WriteResult(gid, True, repaired, n_nodes, n_edges, time.perf_counter() - t0)

    eids, feature_eids = session.execute_write(_write_nodes, rows)
    done = 0
    for batch in _edge_batches(rows, eids):
        session.execute_write(lambda tx, b=batch: tx.run(EDGES, rows=b).consume())
        done += sum(len(r[1]) for r in batch)
        if progress is not None:
            progress(done, n_edges)

    counted = [[feature_eids[key], n, act] for key, n, act, *_ in rows.features]
    flipped = session.execute_write(_complete, gid, h["prompt_id"], counted)
    if not flipped:  # pragma: no cover - would mean a concurrent delete
        raise RuntimeError(f"graph {gid} vanished while it was being written")
    return WriteResult(gid, True, repaired, n_nodes, n_edges, time.perf_counter() - t0)


def _write_whole(tx, rows: GraphRows) -> bool:
    """A whole graph in one transaction, made visible (and counted) at its end."""
    eids, feature_eids = _write_nodes(tx, rows)
    for batch in _edge_batches(rows, eids):
        tx.run(EDGES, rows=batch).consume()
    counted = [[feature_eids[key], n, act] for key, n, act, *_ in rows.features]
    return _complete(tx, rows.header["id"], rows.header["prompt_id"], counted)


def _write_nodes(tx, rows: GraphRows) -> tuple[list[str], dict[str, str]]:
    """The graph's (:Graph) node, its new features, nodes and feature summary, in one
    transaction; returns the element id of every node (by node index) and of every feature
    (by key)."""
    h = rows.header
    gid = h["id"]
    tx.run(HEADER, h=h).consume()
    feature_eids = _ensure_features(tx, rows.features, h["transcoder"])
    eids: list[str | None] = [None] * h["n_nodes"]
    fnodes = [[feature_eids[r[0]], *r[1:]] for r in rows.feature_nodes]
    for query, all_rows in ((FEATURE_NODES, fnodes), (OTHER_NODES, rows.other_nodes)):
        for start in range(0, len(all_rows), NODE_BATCH):
            for rec in tx.run(query, rows=all_rows[start : start + NODE_BATCH], id=gid):
                eids[rec["i"]] = rec["eid"]
    summary = [[feature_eids[key], n, act] for key, n, act, *_ in rows.features]
    for start in range(0, len(summary), NODE_BATCH):
        tx.run(HAS_FEATURE, id=gid, rows=summary[start : start + NODE_BATCH]).consume()
    return eids, feature_eids


def _ensure_features(tx, features: list[list], transcoder: str) -> dict[str, str]:
    """Element ids of the graph's features, creating the ones the store lacks.
    ``features`` rows: [key, n_nodes, activation sum, layer, index]."""
    keys = [f[0] for f in features]
    found = {r["key"]: r["eid"] for r in tx.run(FIND_FEATURES, keys=keys)}
    missing = [[f[0], f[3], f[4]] for f in features if f[0] not in found]
    for start in range(0, len(missing), NODE_BATCH):
        batch = missing[start : start + NODE_BATCH]
        found.update(
            {r["key"]: r["eid"] for r in tx.run(NEW_FEATURES, rows=batch, transcoder=transcoder)}
        )
    return found


def _edge_batches(rows: GraphRows, eids: list[str | None]):
    """Rows for EDGES, grouped by source node, at most EDGE_BATCH edges per batch."""
    groups: dict[int, list[list]] = defaultdict(lambda: [[], [], []])
    src = rows.edge_source.tolist()
    tgt = rows.edge_target.tolist()
    wts = rows.edge_weight.tolist()
    for k, (s, t, w) in enumerate(zip(src, tgt, wts, strict=True)):
        g = groups[s]
        g[0].append(eids[t])
        g[1].append(w)
        g[2].append(k)
    batch, size = [], 0
    for s, (targets, weights, ks) in groups.items():
        batch.append([eids[s], targets, weights, ks])
        size += len(targets)
        if size >= EDGE_BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
