"""Writing pruned graphs to the database: batched ``UNWIND $rows`` in managed transactions.

A graph with more than EDGE_BATCH edges is written as (1) one transaction with its (:Graph)
node (``complete = false``), new features, nodes and per-graph feature summary, (2) its edges
in batches, (3) one last transaction that sets ``complete = true`` and adds the graph to the
per-feature counters. Every query reads complete graphs only, so a writer that dies part-way
leaves nothing visible; the next write of the same graph id deletes the remains first.
A smaller graph (the usual pruned circuit) goes in a single transaction of two statements (three
when it brings new features): PREPARE (stored state, features to create) and one statement
that writes header, feature summary and counters, nodes and edges; it is visible at commit.

One writer per graph: any write that is not that single first transaction (a large graph, or a
rewrite of stored remains) first takes the graph's claim, a ``(:WriteClaim {graph})`` node
(unique per graph). A second writer of the same graph waits on the claim, then finds the graph
complete and skips it; a claim whose owner died (same host: its process is gone; else: no
heartbeat for CLAIM_STALE_S) is broken. The owner's edge batches and its completion check
that the claim is still its own, and completion (the flip, the counters and the claim's
release) is one transaction, after the writer counted every edge written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import neo4j
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
    with ``_``); ``score_convention`` names the scoring convention beside the scores."""
    out: dict = {}

    def put(prefix: str, d: dict) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                put(_prop_name(prefix, k) + "_", v)
            elif (s := _scalar(v)) is not None:
                out[_prop_name(prefix, k)] = s

    put("param_", graph.params)
    put("score_", graph.scores)
    if graph.scores and isinstance(graph.params.get("convention"), str):
        out["score_convention"] = graph.params["convention"]  # the rules the scores follow
    validation = graph.extra.get("validation")
    if isinstance(validation, dict):
        put("validation_", validation)
    return out


def node_influence(graph: Graph) -> list:
    """Per-node influence recorded by pruning (``graph.extra['influence']``, aligned with the
    nodes) as floats (None where not finite), or all None when the graph has none."""
    values = graph.extra.get("influence")
    if not isinstance(values, list | tuple | np.ndarray) or len(values) != graph.n_nodes:
        return [None] * graph.n_nodes
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        return [None] * graph.n_nodes
    return [float(v) if np.isfinite(v) else None for v in arr.tolist()]


@dataclass
class GraphRows:
    """A graph flattened into parameter rows for the write queries (rows are lists, see above).

    ``nodes`` rows: [i, kind, layer, position, feature, activation, probability, logit_weight,
    token, slot, influence], where ``slot`` indexes ``features`` for feature nodes (None
    otherwise) and ``influence`` is pruning's per-node influence (``graph.extra['influence']``;
    None when the graph does not record it), stored so queries can sort nodes by it.
    ``features`` rows: [key, n_nodes, activation sum, layer, index], one per distinct feature.
    """

    header: dict
    nodes: list[list]
    features: list[list]
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
    influence = node_influence(graph)
    nodes: list[list] = []
    slots: dict[str, int] = {}
    features: list[list] = []
    tc = graph.transcoder_name
    for i in range(n):
        slot, tok = None, None
        if kind[i] == FEATURE:
            key = feature_key(tc, layer[i], feature[i])
            slot = slots.setdefault(key, len(features))
            if slot == len(features):
                features.append([key, 0, 0.0, layer[i], feature[i]])
            features[slot][1] += 1
            features[slot][2] += abs(activation[i])
        elif kind[i] == TOKEN:
            tok = graph.token_strings[position[i]]
        nodes.append(
            [i, NODE_KINDS[kind[i]], layer[i], position[i], feature[i], activation[i],
             probability[i], logit_w[i], tok, slot, influence[i]]
        )  # fmt: skip
    header = {
        "id": gid,
        "model": graph.model_name,
        "transcoder": graph.transcoder_name,  # identity: name@fingerprint
        "transcoder_readable": graph.transcoder_name.rpartition("@")[0],
        "transcoder_fingerprint": graph.transcoder_name.rpartition("@")[2],
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
        nodes=nodes,
        features=features,
        edge_source=np.asarray(graph.source),
        edge_target=np.asarray(graph.target),
        edge_weight=np.asarray(graph.weight, dtype=np.float64),
    )


# --- Cypher ---------------------------------------------------------------------------------------

STATE = """
OPTIONAL MATCH (t:Transcoder {name: $transcoder})
OPTIONAL MATCH (g:Graph {id: $id})
OPTIONAL MATCH (c:WriteClaim {graph: $id})
RETURN t.model AS transcoder_model, g.complete AS complete, g.content_hash AS content_hash,
       c IS NOT NULL AS claimed
"""

HIDE = """
MATCH (g:Graph {id: $id})
WITH g, g.complete AS was_complete
SET g.complete = false
RETURN was_complete, g.prompt_id AS prompt_id
"""

# Per-feature counters over complete graphs (Feature.graphs, .prompts, .nodes, .activation),
# updated in the transaction that makes a graph visible (or hides it), so "which features
# recur" reads a few thousand Feature nodes instead of aggregating every graph's features at
# query time. Feature rows r: [key, nodes, activation, counts-as-new-prompt (0/1)].
_COUNTERS = """
SET f.graphs = coalesce(f.graphs, 0) + $sign,
    f.prompts = coalesce(f.prompts, 0) + $sign * r[3],
    f.nodes = coalesce(f.nodes, 0) + $sign * r[1],
    f.activation = coalesce(f.activation, 0.0) + $sign * r[2]
"""

GRAPH_FEATURES = """
MATCH (g:Graph {id: $id})-[u:HAS_FEATURE]->(f:Feature)
RETURN collect([f.key, u.nodes, u.activation]) AS rows
"""

# Keys of the features that another complete graph of the same prompt already counted (a
# prompt counts once per feature). Usually no such graph exists: one index lookup.
SAME_PROMPT_FEATURES = """
MATCH (h:Graph {prompt_id: $prompt_id})-[:HAS_FEATURE]->(f:Feature)
WHERE h.complete = true AND h.id <> $id
RETURN collect(DISTINCT f.key) AS keys
"""

COUNT_FEATURES = (
    """
UNWIND $rows AS r
MATCH (f:Feature {key: r[0]})
"""
    + _COUNTERS
)

DELETE_NODES = """
MATCH (n:Node {graph: $id})
WITH n LIMIT $batch
DETACH DELETE n
RETURN count(*) AS deleted
"""

DELETE_GRAPH = "MATCH (g:Graph {id: $id}) DETACH DELETE g"

# What cross-prompt results hang on a graph (graphstore.crossprompt) goes with it.
DELETE_ATTACHED = (
    "MATCH (s:Supernode {graph: $id}) DETACH DELETE s",
    "MATCH (s:Swap {graph: $id}) DETACH DELETE s",
)

# What a write needs to know, in one statement: the stored state (as STATE), the keys of the
# graph's features that another complete graph of the same prompt already counted, and the keys
# of the features the store lacks (created by NEW_FEATURES: per-row MERGE is several times
# slower on ArcadeDB, measured ~1.3 ms a row).
PREPARE = """
OPTIONAL MATCH (t:Transcoder {name: $transcoder})
OPTIONAL MATCH (g:Graph {id: $id})
OPTIONAL MATCH (c:WriteClaim {graph: $id})
WITH t.model AS transcoder_model, g.complete AS complete, g.content_hash AS content_hash,
     c IS NOT NULL AS claimed
OPTIONAL MATCH (h:Graph {prompt_id: $prompt_id})-[:HAS_FEATURE]->(f:Feature)
WHERE h.complete = true AND h.id <> $id
WITH transcoder_model, complete, content_hash, claimed, collect(DISTINCT f.key) AS seen
UNWIND (CASE WHEN size($keys) = 0 THEN [null] ELSE $keys END) AS key
OPTIONAL MATCH (x:Feature {key: key})
RETURN transcoder_model, complete, content_hash, claimed, seen,
       collect(CASE WHEN x IS NULL THEN key END) AS missing
"""

NEW_FEATURES = """
UNWIND $rows AS r
CREATE (:Feature {key: r[0], transcoder: $transcoder, layer: r[1], index: r[2],
                  graphs: 0, prompts: 0, nodes: 0, activation: 0.0})
"""

# One graph is written by one statement built from the parts below (HEADER, FEATURES or
# NO_FEATURES, NODES, then EDGES_BY_INDEX + DONE, or NODE_IDS): no element id makes a round
# trip, nodes are reached by their index in the collected list ``ns``, features by their slot
# in ``fs`` (ArcadeDB streams result rows slowly, ~45 us each, and every statement costs a
# round trip). All features exist beforehand (PREPARE / NEW_FEATURES), so the MATCH
# keeps every row and ``fs[slot]`` is the slot's feature; the statement returns their number
# so the writer can check that.
HEADER = """
MERGE (m:Model {name: $h.model})
MERGE (t:Transcoder {name: $h.transcoder})
  ON CREATE SET t.model = $h.model, t.readable = $h.transcoder_readable,
                t.fingerprint = $h.transcoder_fingerprint
MERGE (t)-[:FOR_MODEL]->(m)
MERGE (p:Prompt {id: $h.prompt_id})
  ON CREATE SET p.text = $h.prompt, p.model = $h.model, p.tokens = $h.tokens,
                p.token_strings = $h.token_strings
CREATE (g:Graph {id: $h.id})
SET g += $h, g.complete = $complete
CREATE (g)-[:OF_PROMPT]->(p)
CREATE (g)-[:USES]->(t)
WITH g
"""

FEATURES = """
UNWIND $features AS r
MATCH (f:Feature {key: r[0]})
CREATE (g)-[:HAS_FEATURE {nodes: r[1], activation: r[2]}]->(f)
"""

COUNTED_FEATURES = FEATURES + _COUNTERS

_COLLECT_FEATURES = "WITH g, collect(f) AS fs\n"
NO_FEATURES = "WITH g, [] AS fs\n"

NODES = """
UNWIND $nodes AS r
CREATE (n:Node {graph: $h.id, i: r[0], kind: r[1], layer: r[2], position: r[3], feature: r[4],
                activation: r[5], probability: r[6], logit_weight: r[7], token: r[8],
                influence: r[10]})
FOREACH (f IN CASE WHEN r[9] IS NULL THEN [] ELSE [fs[r[9]]] END |
  CREATE (n)-[:INSTANCE_OF]->(f))
WITH size(fs) AS nf, collect(n) AS ns
"""

# Edge rows: [source index, target index, weight, edge index k].
EDGES_BY_INDEX = """
UNWIND $edges AS e
WITH nf, ns[e[0]] AS a, ns[e[1]] AS b, e
CREATE (a)-[:EDGE {weight: e[2], k: e[3]}]->(b)
WITH nf, count(*) AS edges
"""

DONE = "RETURN nf AS features, edges\n"
NO_EDGES_DONE = "RETURN nf AS features, 0 AS edges\n"
NODE_IDS = "RETURN nf AS features, [n IN ns | elementId(n)] AS eids\n"

# Edges of a graph written in several transactions, between nodes written earlier: grouped by
# source node, one lookup of the source per group. Row: [source eid, [target eids], [weights],
# [edge indices]].
EDGES = """
UNWIND $rows AS r
MATCH (a) WHERE elementId(a) = r[0]
UNWIND range(0, size(r[1]) - 1) AS j
MATCH (b) WHERE elementId(b) = r[1][j]
CREATE (a)-[:EDGE {weight: r[2][j], k: r[3][j]}]->(b)
RETURN count(*) AS edges
"""

COMPLETE = "MATCH (g:Graph {id: $id}) SET g.complete = true RETURN g.id AS id"

# --- the claim: one writer per graph (see the module doc) ------------------------------------

CLAIM_STALE_S = 60.0  # a claim without a heartbeat for this long is dead (owner elsewhere)
CLAIM_POLL_S = 0.25  # how often a waiting writer looks again

CLAIM = """
CREATE (:WriteClaim {graph: $id, owner: $owner, host: $host, pid: $pid, pid_start: $pid_start,
                     heartbeat: $now})
"""
READ_CLAIM = """
MATCH (c:WriteClaim {graph: $id})
RETURN c.owner AS owner, c.host AS host, c.pid AS pid, c.pid_start AS pid_start,
       c.heartbeat AS heartbeat
"""
BEAT = """
MATCH (c:WriteClaim {graph: $id, owner: $owner})
SET c.heartbeat = $now
RETURN count(c) AS held
"""
RELEASE = "MATCH (c:WriteClaim {graph: $id, owner: $owner}) DELETE c"

_HELD: set[str] = set()  # the claims (owner tokens) this process holds now
_HOST = socket.gethostname()


class ClaimLostError(RuntimeError):
    """This writer's claim on a graph was broken by another writer (it judged this one dead);
    nothing more is written, and the graph stays incomplete until that writer finishes."""


def _pid_start(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks since boot, /proc), None when it is gone;
    -1 where /proc is missing but the process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return -1


def _claim_is_dead(claim: dict) -> bool:
    """A claim whose owner cannot be writing any more."""
    if claim["host"] == _HOST:
        if claim["pid"] == os.getpid():
            return claim["owner"] not in _HELD  # this process knows what it holds
        started = _pid_start(int(claim["pid"]))
        if started is None or started not in (-1, claim["pid_start"]):
            return True  # the process is gone (or its pid was reused)
    heartbeat = claim["heartbeat"] or 0.0
    return time.time() - heartbeat > CLAIM_STALE_S  # alive but silent, or on another host


def _is_conflict(err: Exception) -> bool:
    if isinstance(err, neo4j.exceptions.ConstraintError):
        return True
    text = str(err).lower()
    return isinstance(err, neo4j.exceptions.ClientError) and (
        "duplicat" in text or "concurrent" in text
    )


def acquire_claim(session, gid: str, on_wait=None) -> str:
    """Take graph ``gid``'s claim, waiting while a live writer holds it (breaking a dead
    writer's); returns this writer's owner token. ``on_wait(claim)`` is called once when it
    has to wait."""
    token = uuid.uuid4().hex
    me = os.getpid()
    params = dict(id=gid, owner=token, host=_HOST, pid=me, pid_start=_pid_start(me))
    waited = False
    while True:
        try:
            session.execute_write(lambda tx: tx.run(CLAIM, **params, now=time.time()).consume())
            _HELD.add(token)
            return token
        except neo4j.exceptions.Neo4jError as err:
            if not _is_conflict(err):
                raise
        claim = session.execute_read(lambda tx: tx.run(READ_CLAIM, id=gid).single())
        if claim is None:
            continue  # released in between
        claim = claim.data()
        if claim["owner"] == token:  # our create committed, its answer was lost
            _HELD.add(token)
            return token
        if _claim_is_dead(claim):
            session.execute_write(
                lambda tx, o=claim["owner"]: tx.run(RELEASE, id=gid, owner=o).consume()
            )
            continue
        if not waited and on_wait is not None:
            on_wait(claim)
        waited = True
        time.sleep(CLAIM_POLL_S)


def release_claim(session, gid: str, token: str) -> None:
    """Give the claim back (best effort: a claim left by a failed release is broken later)."""
    _HELD.discard(token)
    try:  # one attempt (no retries): a writer whose server died gives up at once
        with session.begin_transaction() as tx:
            tx.run(RELEASE, id=gid, owner=token).consume()
            tx.commit()
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError, OSError):
        pass


@contextmanager
def claimed(session, gid: str, on_wait=None):
    """Hold graph ``gid``'s claim for the block (see acquire_claim); yields the owner token."""
    token = acquire_claim(session, gid, on_wait)
    try:
        yield token
    finally:
        release_claim(session, gid, token)


def _beat(tx, gid: str, token: str) -> None:
    """Renew the claim in transaction ``tx``; ClaimLostError when it is no longer ours."""
    if tx.run(BEAT, id=gid, owner=token, now=time.time()).single()["held"] != 1:
        raise ClaimLostError(
            f"another writer broke this writer's claim on graph {gid} (it judged this one "
            "dead) and rewrites it; nothing more was written by this one"
        )


@dataclass
class WriteResult:
    graph_id: str
    written: bool  # False when an identical complete copy was already stored
    repaired: bool  # True when remains of an earlier (crashed or different) write were removed
    n_nodes: int
    n_edges: int
    seconds: float


def _prompt_seen(tx, gid: str, prompt: str) -> set[str]:
    return set(tx.run(SAME_PROMPT_FEATURES, prompt_id=prompt, id=gid).single()["keys"])


def _counter_rows(features: list[list], seen: set[str]) -> list[list]:
    """COUNT_FEATURES rows from (key, nodes, activation, ...) rows."""
    return [[f[0], f[1], f[2], 0 if f[0] in seen else 1] for f in features]


def _count_features(tx, gid: str, prompt: str, features: list[list], sign: int) -> None:
    """Add (sign +1) or remove (-1) one complete graph's contribution to the feature counters.
    ``features`` rows: [key, nodes, activation, ...]. A prompt counts once per feature, so
    features another complete graph of the same prompt already has do not change ``prompts``."""
    rows = _counter_rows(features, _prompt_seen(tx, gid, prompt))
    for start in range(0, len(rows), NODE_BATCH):
        tx.run(COUNT_FEATURES, rows=rows[start : start + NODE_BATCH], sign=sign).consume()


def _hide(tx, gid: str) -> bool:
    rec = tx.run(HIDE, id=gid).single()
    if rec is None:
        return False
    if rec["was_complete"]:
        feats = tx.run(GRAPH_FEATURES, id=gid).single()["rows"]
        _count_features(tx, gid, rec["prompt_id"], feats, -1)
    return True


def _complete(tx, gid: str, prompt: str, features: list[list], token: str) -> bool:
    """Make the graph visible, add it to the feature counters and release the claim: one
    transaction, so the graph is counted exactly when it is visible."""
    _beat(tx, gid, token)
    rec = tx.run(COMPLETE, id=gid).single()
    if rec is None:  # pragma: no cover - would mean a concurrent delete
        return False
    _count_features(tx, gid, prompt, features, +1)
    tx.run(RELEASE, id=gid, owner=token).consume()
    return True


def delete_graph(session, gid: str, token: str | None = None) -> bool:
    """Remove a graph (complete or not) and everything that belongs to it; True if found.
    ``token``: the caller's claim on the graph, renewed with each batch."""
    found = session.execute_write(_hide, gid)
    while True:

        def batch(tx):
            if token is not None:
                _beat(tx, gid, token)
            return tx.run(DELETE_NODES, id=gid, batch=DELETE_BATCH).single()["deleted"]

        if not session.execute_write(batch):
            break
    for statement in DELETE_ATTACHED:
        session.execute_write(lambda tx, q=statement: tx.run(q, id=gid).consume())
    session.execute_write(lambda tx: tx.run(DELETE_GRAPH, id=gid).consume())
    return found


def write_rows(session, rows: GraphRows, on_state=None, progress=None, on_wait=None) -> WriteResult:
    """Write one graph's rows.

    ``on_state(state)`` sees the stored state first (the caller checks model consistency there
    and may raise). ``progress(edges_written, n_edges)`` is called after each committed batch;
    ``on_wait(claim)`` once if another writer holds the graph's claim (this one then waits).
    Up to EDGE_BATCH edges and nothing stored under the id: one transaction, which also reads
    the state. Otherwise, under the graph's claim: remains removed, then (small) that one
    transaction, or (large) header, features, nodes and feature summary; edge batches; the
    flip to ``complete = true`` with the counters (see the module doc).
    """
    t0 = time.perf_counter()
    h = rows.header
    gid = h["id"]
    n_nodes, n_edges = h["n_nodes"], h["n_edges"]
    small = n_edges <= EDGE_BATCH

    def result(written: bool, repaired: bool) -> WriteResult:
        if written and progress is not None and small:
            progress(n_edges, n_edges)
        return WriteResult(gid, written, repaired, n_nodes, n_edges, time.perf_counter() - t0)

    def read_state() -> dict:
        return session.execute_read(
            lambda tx: tx.run(STATE, transcoder=h["transcoder"], id=gid).single().data()
        )

    if small:
        # Written at once unless something is stored (or claimed) under this id.
        state = session.execute_write(_write_whole, rows, on_state, False)
        if state is None:
            return result(True, False)
    else:
        state = read_state()
        if on_state is not None:
            on_state(state)
    if state["complete"] is True and state["content_hash"] == h["content_hash"]:
        return result(False, False)

    with claimed(session, gid, on_wait) as token:
        state = read_state()  # what the claim's last holder left
        if state["complete"] is True and state["content_hash"] == h["content_hash"]:
            return result(False, False)  # another writer stored it while this one waited
        repaired = state["complete"] is not None
        if repaired:
            delete_graph(session, gid, token)  # a crashed write's remains, or an older version
        if small:
            if session.execute_write(_write_whole, rows, None, True) is not None:
                raise RuntimeError(  # pragma: no cover - the claim excludes it
                    f"graph {gid} was written by another writer that ignored its claim"
                )
            return result(True, repaired)

        eids = session.execute_write(_write_nodes, rows)
        done = 0
        for batch in _edge_batches(rows, eids):

            def write_batch(tx, b=batch):
                _beat(tx, gid, token)
                return tx.run(EDGES, rows=b).single()["edges"]

            done += session.execute_write(write_batch)
            if progress is not None:
                progress(done, n_edges)
        if done != n_edges:
            raise RuntimeError(
                f"graph {gid}: {done} of its {n_edges} edges were written (nodes vanished "
                "while it was written); it stays invisible: add it again to repair it"
            )
        flipped = session.execute_write(_complete, gid, h["prompt_id"], rows.features, token)
        if not flipped:  # pragma: no cover - would mean a concurrent delete
            raise RuntimeError(f"graph {gid} vanished while it was being written")
        return result(True, repaired)


def _graph_statement(rows: GraphRows, counted: bool, with_edges: bool) -> str:
    """The one statement that writes a graph's header, feature summary (and, when ``counted``,
    its feature counters), nodes, and either its edges (``with_edges``) or nothing more,
    returning the nodes' element ids."""
    parts = [HEADER]
    if rows.features:
        parts += [COUNTED_FEATURES if counted else FEATURES, _COLLECT_FEATURES]
    else:
        parts.append(NO_FEATURES)
    parts.append(NODES)
    if not with_edges:
        parts.append(NODE_IDS)
    elif rows.header["n_edges"]:
        parts += [EDGES_BY_INDEX, DONE]
    else:
        parts.append(NO_EDGES_DONE)
    return "".join(parts)


def _prepare(tx, rows: GraphRows) -> dict:
    """PREPARE for the graph's rows, creating the missing features; returns the state."""
    h = rows.header
    rec = tx.run(
        PREPARE, transcoder=h["transcoder"], id=h["id"], prompt_id=h["prompt_id"],
        keys=[f[0] for f in rows.features],
    ).single()  # fmt: skip
    missing = set(rec["missing"])
    new = [[f[0], f[3], f[4]] for f in rows.features if f[0] in missing]
    for start in range(0, len(new), NODE_BATCH):
        batch = new[start : start + NODE_BATCH]
        tx.run(NEW_FEATURES, rows=batch, transcoder=h["transcoder"]).consume()
    return rec.data()


def _run_graph_statement(tx, rows: GraphRows, complete: bool, seen: set[str]):
    """Run the graph's statement (features exist); checks that every feature was linked.
    ``complete``: the whole graph, visible and counted; else nodes only."""
    h = rows.header
    params = {"h": h, "complete": complete, "nodes": rows.nodes}
    if complete:
        params["features"] = _counter_rows(rows.features, seen)
        params["sign"] = 1
        params["edges"] = _edge_rows(rows)
    else:
        params["features"] = [f[:3] for f in rows.features]
    rec = tx.run(_graph_statement(rows, complete, complete), params).single()
    if rec is None or rec["features"] != len(rows.features):  # pragma: no cover - a bug
        raise RuntimeError(f"graph {h['id']}: a feature vanished while it was being written")
    return rec


def _write_whole(tx, rows: GraphRows, on_state=None, claim_held: bool = False) -> dict | None:
    """A whole graph in one transaction, visible and counted when it commits; unless a graph
    with this id is stored (complete or not), or claimed by a writer (unless ``claim_held``:
    the caller's): then nothing is written and its state returned (``on_state`` sees the state
    either way)."""
    state = _prepare(tx, rows)
    if on_state is not None:
        on_state({k: state[k] for k in ("transcoder_model", "complete", "content_hash")})
    if state["complete"] is not None or (state["claimed"] and not claim_held):
        return state
    rec = _run_graph_statement(tx, rows, True, set(state["seen"]))
    if rec["edges"] != rows.header["n_edges"]:  # pragma: no cover - a bug
        raise RuntimeError(f"graph {rows.header['id']}: {rec['edges']} edges written")
    return None


def _write_nodes(tx, rows: GraphRows) -> list[str]:
    """The graph's (:Graph) node (not yet complete), its new features, nodes and feature
    summary, in one transaction; returns the element id of every node (by node index)."""
    _prepare(tx, rows)
    return _run_graph_statement(tx, rows, False, set())["eids"]


def _edge_rows(rows: GraphRows) -> list[list]:
    """EDGES_BY_INDEX rows: [source index, target index, weight, k], in edge order."""
    src, tgt, wts = rows.edge_source.tolist(), rows.edge_target.tolist(), rows.edge_weight.tolist()
    return [[s, t, w, k] for k, (s, t, w) in enumerate(zip(src, tgt, wts, strict=True))]


def _edge_batches(rows: GraphRows, eids: list[str]):
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
