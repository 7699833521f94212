"""Canned cross-prompt queries: each one a documented Cypher text and a Python function.

Every query reads complete graphs only (``(:Graph {complete: true})``). Feature ids are
``(layer, index)`` of the store's transcoder (pass ``transcoder`` when the store holds several).
Results are :class:`graphstore.readonly.QueryResult` (columns + rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from graphstore.readonly import QueryResult
from graphstore.schema import feature_key

RECURRING_FEATURES = """
// Features that recur in the circuits of many prompts. Feature.prompts / .graphs / .nodes /
// .activation count complete graphs only; they are kept up to date in the transaction that
// makes a graph visible (or hides it), so this reads Feature nodes, not every graph.
// $min_prompts: keep features seen in at least this many distinct prompts (>= 1); $limit: rows.
MATCH (f:Feature)
WHERE f.prompts >= $min_prompts AND ($transcoder IS NULL OR f.transcoder = $transcoder)
RETURN f.transcoder AS transcoder, f.layer AS layer, f.index AS index,
       f.prompts AS prompts, f.graphs AS graphs, f.nodes AS nodes, f.activation AS activation
ORDER BY prompts DESC, graphs DESC, layer ASC, index ASC
LIMIT $limit
"""

FEATURE_FEEDS = """
// Prompts whose circuit contains feature F feeding feature G (a direct edge F -> G).
// $source_key: F's key "<transcoder>/<layer>/<index>"; $target_layer, $target_index: G's.
// (G is recognised by the target node's own layer and index: an edge joins two nodes of one
// graph, so the target's transcoder is F's; no second hop to G's Feature node is needed.)
MATCH (fa:Feature {key: $source_key})<-[:INSTANCE_OF]-(a:Node)-[e:EDGE]->(b:Node)
WHERE b.kind = 'feature' AND b.layer = $target_layer AND b.feature = $target_index
MATCH (g:Graph {id: a.graph})
WHERE g.complete = true
RETURN g.prompt AS prompt, g.id AS graph, a.position AS source_position,
       b.position AS target_position, e.weight AS weight
ORDER BY abs(e.weight) DESC, graph ASC, source_position ASC, target_position ASC
LIMIT $limit
"""

# The same, walked from G's side: cheaper when G has fewer instances than F (the function picks
# the direction from the features' instance counters).
FEATURE_FEEDS_BACKWARD = """
MATCH (fb:Feature {key: $target_key})<-[:INSTANCE_OF]-(b:Node)<-[e:EDGE]-(a:Node)
WHERE a.kind = 'feature' AND a.layer = $source_layer AND a.feature = $source_index
MATCH (g:Graph {id: a.graph})
WHERE g.complete = true
RETURN g.prompt AS prompt, g.id AS graph, a.position AS source_position,
       b.position AS target_position, e.weight AS weight
ORDER BY abs(e.weight) DESC, graph ASC, source_position ASC, target_position ASC
LIMIT $limit
"""

# The hop bound of a variable-length pattern cannot be a parameter in Cypher; it is a validated
# integer formatted into the text ({max_hops}).
TOKEN_TO_LOGIT_PATHS = """
// Strongest paths from a prompt token to a logit: path strength = product of edge weights
// (direct effects along the path); ranked by |strength|, at most {max_hops} edges.
// $graph: one graph id, or null for every complete graph; $token: the token string or null;
// $position: the token position or null; $logit: vocabulary id of the output token.
MATCH (g:Graph)
WHERE g.complete = true AND ($graph IS NULL OR g.id = $graph)
MATCH (t:Node {{graph: g.id, kind: 'token'}})
WHERE ($token IS NULL OR t.token = $token) AND ($position IS NULL OR t.position = $position)
MATCH p = (t)-[:EDGE*1..{max_hops}]->(l:Node {{kind: 'logit', feature: $logit}})
WITH g, p, reduce(s = 1.0, e IN relationships(p) | s * e.weight) AS strength
RETURN g.id AS graph, g.prompt AS prompt, [n IN nodes(p) | n.i] AS path,
       [n IN nodes(p) | n.kind] AS kinds, [n IN nodes(p) | n.layer] AS layers,
       [n IN nodes(p) | n.feature] AS features, strength
ORDER BY abs(strength) DESC, graph ASC
LIMIT $limit
"""

TOKEN_DRIVERS = """
// Features most influential for an output token across prompts: the direct effect of each
// feature node on the token's de-meaned logit (edge weight into its logit node), summed over
// every complete graph that has that logit.
// $logit: vocabulary id of the output token.
MATCH (l:Node {kind: 'logit', feature: $logit})
MATCH (g:Graph {id: l.graph})
WHERE g.complete = true
MATCH (f:Feature)<-[:INSTANCE_OF]-(n:Node)-[e:EDGE]->(l)
WITH f, count(DISTINCT g.prompt_id) AS prompts, count(e) AS edges, sum(e.weight) AS total,
     max(e.weight) AS strongest
RETURN f.transcoder AS transcoder, f.layer AS layer, f.index AS index, prompts, edges, total,
       strongest
ORDER BY total DESC, layer ASC, index ASC
LIMIT $limit
"""

SIMILAR_GRAPHS = """
// Graphs similar to a given graph by shared features, weighted: each graph gives each of its
// features a mass (sum of |activation| over the feature's nodes); similarity is the weighted
// Jaccard index sum(min(mass_a, mass_b)) / (total_a + total_b - sum(min(mass_a, mass_b))).
// (Filtering b after the aggregation reads each other graph once, not once per shared feature.)
// $graph: the graph id.
MATCH (a:Graph {id: $graph})-[ua:HAS_FEATURE]->(f:Feature)<-[ub:HAS_FEATURE]-(b:Graph)
WITH a, b, count(f) AS shared,
     sum(CASE WHEN ua.activation < ub.activation THEN ua.activation ELSE ub.activation END)
       AS overlap
WHERE b.complete = true AND b.id <> a.id
RETURN b.id AS graph, b.prompt AS prompt, shared,
       overlap / (a.feature_mass + b.feature_mass - overlap) AS similarity
ORDER BY similarity DESC, graph ASC
LIMIT $limit
"""


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    help: str
    default: object = None
    required: bool = False


@dataclass(frozen=True)
class CannedQuery:
    """One canned query: its name (CLI: ``circuit-atlas query NAME``), what it answers, its
    parameters, its Cypher text and the function that prepares parameters. ``execute``, when
    set, computes the same answer as the Cypher text a faster way (inside a read transaction),
    ``parallel`` over several read transactions at once; otherwise the Cypher text runs."""

    name: str
    description: str
    cypher: str
    params: tuple[Param, ...]
    prepare: Callable[..., tuple[str, dict]] = field(repr=False)
    execute: Callable[..., QueryResult] | None = field(default=None, repr=False)
    # Computes the same answer over several sessions at once (the server runs each on its own
    # thread), given a function that opens a session; used when the caller passes one.
    parallel: Callable[..., QueryResult] | None = field(default=None, repr=False)

    def text(self, max_hops: int = 4, **_params) -> str:
        """The Cypher text as it runs (the path query's hop bound filled in)."""
        return (
            self.cypher.format(max_hops=int(max_hops))
            if "{max_hops}" in self.cypher
            else (self.cypher)
        )


def _recurring(transcoder=None, min_prompts=2, limit=20):
    p = {"transcoder": transcoder, "min_prompts": max(1, int(min_prompts)), "limit": int(limit)}
    return RECURRING_FEATURES, p


def _feeds(source_layer, source_index, target_layer, target_index, transcoder, limit=100):
    return FEATURE_FEEDS, {
        "source_key": feature_key(transcoder, source_layer, source_index),
        "target_key": feature_key(transcoder, target_layer, target_index),
        "source_layer": int(source_layer),
        "source_index": int(source_index),
        "target_layer": int(target_layer),
        "target_index": int(target_index),
        "limit": int(limit),
    }


def _recurring_exec(tx, params: dict, _kwargs: dict) -> QueryResult:
    """RECURRING_FEATURES, sorting as few Feature rows as possible: the server's cost grows
    with the rows that pass ``prompts >= t`` (measured at 1,000 graphs: t = 256 ~10 ms,
    t = 2 ~300 ms). Every feature below t ranks after every feature at or above it, so once
    ``limit`` rows pass t they are the answer; t starts high and drops (by 4x) to
    $min_prompts."""
    t = max(params["min_prompts"], 256)
    while True:
        result = tx.run(RECURRING_FEATURES, {**params, "min_prompts": t})
        columns, rows = list(result.keys()), [list(r.values()) for r in result]
        if len(rows) >= params["limit"] or t <= params["min_prompts"]:
            return QueryResult(columns, rows)
        t = max(params["min_prompts"], t // 4)


def _feeds_exec(tx, params: dict, _kwargs: dict) -> QueryResult:
    """FEATURE_FEEDS, expanded from whichever of F and G has fewer instances."""
    rec = tx.run(
        "OPTIONAL MATCH (a:Feature {key: $source_key}) "
        "OPTIONAL MATCH (b:Feature {key: $target_key}) "
        "RETURN a.nodes AS na, b.nodes AS nb",
        params,
    ).single()
    columns = ["prompt", "graph", "source_position", "target_position", "weight"]
    if rec["na"] is None or rec["nb"] is None:
        return QueryResult(columns, [])
    cypher = FEATURE_FEEDS if rec["na"] <= rec["nb"] else FEATURE_FEEDS_BACKWARD
    result = tx.run(cypher, params)
    return QueryResult(list(result.keys()), [list(r.values()) for r in result])


def _paths(logit, graph=None, token=None, position=None, max_hops=4, limit=10):
    max_hops = int(max_hops)
    if not 1 <= max_hops <= 8:
        raise ValueError(f"max_hops must be between 1 and 8 (got {max_hops})")
    if token is None and position is None:
        raise ValueError("name the start token: give token (its string) or position")
    return TOKEN_TO_LOGIT_PATHS.format(max_hops=max_hops), {
        "graph": graph,
        "token": token,
        "position": None if position is None else int(position),
        "logit": int(logit),
        "limit": int(limit),
        "max_hops": max_hops,  # (already in the text; the DP function reads it here)
    }


# The variable-length pattern above enumerates every path of up to max_hops edges leaving the
# token before it looks at where they end (tens of thousands in a SmolLM2-sized circuit), so the
# function computes the same ranking by dynamic programming over each candidate graph's edges.
PATH_CANDIDATES = """
MATCH (l:Node {kind: 'logit', feature: $logit})
WHERE $graph IS NULL OR l.graph = $graph
MATCH (g:Graph {id: l.graph})
WHERE g.complete = true
MATCH (t:Node {graph: g.id, kind: 'token'})
WHERE ($token IS NULL OR t.token = $token) AND ($position IS NULL OR t.position = $position)
RETURN g.id AS graph, g.prompt AS prompt, l.i AS logit_node, collect(t.i) AS starts
"""

# One row each, lists inside: ArcadeDB streams result rows slowly (~45 us a row), lists fast.
GRAPH_NODES = """
MATCH (n:Node {graph: $graph})
RETURN collect([n.i, n.kind, n.layer, n.feature]) AS rows
"""

GRAPH_EDGES = """
MATCH (a:Node {graph: $graph})-[e:EDGE]->(b:Node)
RETURN collect(a.i) AS a, collect(b.i) AS b, collect(e.weight) AS w
"""


def _paths_dp(tx, params: dict, _kwargs: dict) -> QueryResult:
    """TOKEN_TO_LOGIT_PATHS by dynamic programming: keeping the best ``limit`` partial paths
    by |strength| into every (node, hop count) is enough, since |strength| is a product of
    |weights|; so the top paths come out exactly, in O(edges * limit * max_hops) per graph."""
    import heapq

    max_hops, limit = params["max_hops"], params["limit"]
    found = []  # (|strength|, graph, path, strength, prompt)
    node_info: dict[str, dict[int, list]] = {}
    for cand in tx.run(PATH_CANDIDATES, params).data():
        gid, end = cand["graph"], cand["logit_node"]
        node_info[gid] = {r[0]: r[1:] for r in tx.run(GRAPH_NODES, graph=gid).single()["rows"]}
        out_edges: dict[int, list[tuple[int, float]]] = {}
        in_nodes: dict[int, list[int]] = {}
        edges = tx.run(GRAPH_EDGES, graph=gid).single()
        for a, b, w in zip(edges["a"], edges["b"], edges["w"], strict=True):
            out_edges.setdefault(a, []).append((b, w))
            in_nodes.setdefault(b, []).append(a)
        # hops_to_end[v]: fewest edges from v to the logit; nodes that cannot reach it within
        # the hops left are never extended (most of a circuit, for one logit).
        hops_to_end, ring = {end: 0}, [end]
        for h in range(1, max_hops + 1):
            ring = [u for v in ring for u in in_nodes.get(v, ()) if u not in hops_to_end]
            for u in ring:
                hops_to_end.setdefault(u, h)
        # frontier: node -> best (strength, path) reaching it with exactly h hops
        frontier = {s: [(1.0, (s,))] for s in cand["starts"]}
        for h in range(1, max_hops + 1):
            nxt: dict[int, list] = {}
            for u, partials in frontier.items():
                for v, w in out_edges.get(u, ()):
                    if hops_to_end.get(v, max_hops + 1) > max_hops - h:
                        continue
                    nxt.setdefault(v, []).extend((st * w, path + (v,)) for st, path in partials)
            frontier = {
                v: heapq.nlargest(limit, ps, key=lambda p: abs(p[0])) for v, ps in nxt.items()
            }
            for strength, path in frontier.get(end, ()):
                found.append((abs(strength), gid, list(path), strength, cand["prompt"]))
    found.sort(key=lambda r: (-r[0], r[1]))
    rows = []
    for _, gid, path, strength, prompt in found[:limit]:
        info = node_info[gid]
        rows.append([
            gid, prompt, path, [info[i][0] for i in path], [info[i][1] for i in path],
            [info[i][2] for i in path], strength,
        ])  # fmt: skip
    columns = ["graph", "prompt", "path", "kinds", "layers", "features", "strength"]
    return QueryResult(columns, rows)


def _drivers(logit, limit=20):
    return TOKEN_DRIVERS, {"logit": int(logit), "limit": int(limit)}


def _similar(graph, limit=10):
    return SIMILAR_GRAPHS, {"graph": graph, "limit": int(limit)}


# similar-graphs in parts that the server runs at once: part p aggregates the (shared feature,
# other graph) pairs of the target's features with (layer + index) % parts = p; the function
# adds the parts up. (The pairs are the whole cost: one HAS_FEATURE edge record each.)
SIMILAR_PART = """
MATCH (a:Graph {id: $graph})-[ua:HAS_FEATURE]->(f:Feature)
WHERE (f.layer + f.index) % $parts = $part
WITH ua.activation AS x, f
MATCH (f)<-[ub:HAS_FEATURE]-(b:Graph)
WITH b, count(*) AS shared,
     sum(CASE WHEN x < ub.activation THEN x ELSE ub.activation END) AS overlap
WHERE b.complete = true AND b.id <> $graph
RETURN collect([b.id, shared, overlap, b.feature_mass]) AS rows
"""

SIMILAR_NAMES = """
UNWIND $ids AS id
MATCH (b:Graph {id: id})
RETURN collect([b.id, b.prompt]) AS prompts
"""


def _similar_parallel(open_session, params: dict, parts: int = 2) -> QueryResult:
    """SIMILAR_GRAPHS in ``parts`` concurrent read transactions (see SIMILAR_PART); the
    overlap of each graph is the sum of its parts' overlaps."""
    from concurrent.futures import ThreadPoolExecutor

    def part(p: int) -> list:
        with open_session() as s:
            return s.execute_read(
                lambda tx: tx.run(
                    SIMILAR_PART, graph=params["graph"], parts=parts, part=p
                ).single()["rows"]
            )

    with ThreadPoolExecutor(max_workers=parts) as pool:
        results = list(pool.map(part, range(parts)))
    agg: dict[str, list] = {}
    for rows in results:
        for gid, shared, overlap, mass in rows:
            a = agg.setdefault(gid, [0, 0.0, mass])
            a[0] += shared
            a[1] += overlap
    columns = ["graph", "prompt", "shared", "similarity"]
    if not agg:
        return QueryResult(columns, [])
    with open_session() as s:
        m_a = s.execute_read(
            lambda tx: tx.run(
                "MATCH (a:Graph {id: $graph}) RETURN a.feature_mass AS m", graph=params["graph"]
            ).single()["m"]
        )
        ranked = sorted(
            ((gid, sh, o / (m_a + m_b - o)) for gid, (sh, o, m_b) in agg.items()),
            key=lambda r: (-r[2], r[0]),
        )[: params["limit"]]
        names = dict(
            s.execute_read(
                lambda tx: tx.run(SIMILAR_NAMES, ids=[r[0] for r in ranked]).single()["prompts"]
            )
        )
    return QueryResult(columns, [[gid, names[gid], sh, sim] for gid, sh, sim in ranked])


CANNED: dict[str, CannedQuery] = {
    q.name: q
    for q in (
        CannedQuery(
            "recurring-features",
            "features that recur in the circuits of many prompts",
            RECURRING_FEATURES,
            (
                Param("min_prompts", int, "least number of distinct prompts", 2),
                Param("limit", int, "rows to return", 20),
                Param("transcoder", str, "only graphs of this transcoder"),
            ),
            _recurring,
            _recurring_exec,
        ),
        CannedQuery(
            "feature-feeds",
            "prompts whose circuit contains feature F feeding feature G",
            FEATURE_FEEDS,
            (
                Param("source_layer", int, "layer of F", required=True),
                Param("source_index", int, "index of F", required=True),
                Param("target_layer", int, "layer of G", required=True),
                Param("target_index", int, "index of G", required=True),
                Param("transcoder", str, "transcoder of F and G (default: the store's)"),
                Param("limit", int, "rows to return", 100),
            ),
            _feeds,
            _feeds_exec,
        ),
        CannedQuery(
            "token-to-logit-paths",
            "strongest paths from a prompt token to a logit",
            TOKEN_TO_LOGIT_PATHS,
            (
                Param("logit", int, "vocabulary id of the output token", required=True),
                Param("graph", str, "graph id (default: every graph)"),
                Param("token", str, "start token string"),
                Param("position", int, "start token position"),
                Param("max_hops", int, "longest path in edges (1-8)", 4),
                Param("limit", int, "paths to return", 10),
            ),
            _paths,
            _paths_dp,
        ),
        CannedQuery(
            "token-drivers",
            "features most influential for an output token across prompts",
            TOKEN_DRIVERS,
            (
                Param("logit", int, "vocabulary id of the output token", required=True),
                Param("limit", int, "rows to return", 20),
            ),
            _drivers,
        ),
        CannedQuery(
            "similar-graphs",
            "graphs similar to a given graph (weighted shared features)",
            SIMILAR_GRAPHS,
            (
                Param("graph", str, "graph id", required=True),
                Param("limit", int, "rows to return", 10),
            ),
            _similar,
            parallel=_similar_parallel,
        ),
    )
}


# Cross-prompt queries (supernodes, contrasts, global weights, swaps) live in their own module.
from graphstore.crossprompt_queries import CROSSPROMPT  # noqa: E402 (needs the classes above)

CANNED.update({q.name: q for q in CROSSPROMPT})
from graphstore.heads import HEAD_QUERIES  # noqa: E402 (attention heads: graphstore.heads)

CANNED.update({q.name: q for q in HEAD_QUERIES})


def run_canned(session, name: str, open_session=None, **kwargs) -> QueryResult:
    """Run canned query ``name`` with its parameters (trusted Cypher, a read transaction;
    with ``open_session``, a function that opens more sessions, possibly several at once)."""
    if name not in CANNED:
        raise ValueError(f"unknown query {name!r}: choose one of {', '.join(CANNED)}")
    query = CANNED[name]
    cypher, params = query.prepare(**kwargs)
    if query.parallel is not None and open_session is not None:
        return query.parallel(open_session, params)
    if query.execute is not None:
        return session.execute_read(query.execute, params, kwargs)

    def work(tx):
        result = tx.run(cypher, params)
        return list(result.keys()), [list(r.values()) for r in result]

    columns, rows = session.execute_read(work)
    return QueryResult(columns, rows)
