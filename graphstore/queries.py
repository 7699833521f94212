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
// $source_key / $target_key: feature keys "<transcoder>/<layer>/<index>".
MATCH (fa:Feature {key: $source_key})<-[:INSTANCE_OF]-(a:Node)-[e:EDGE]->(b:Node)
      -[:INSTANCE_OF]->(fb:Feature {key: $target_key})
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
// $graph: the graph id.
MATCH (a:Graph {id: $graph})-[ua:HAS_FEATURE]->(f:Feature)<-[ub:HAS_FEATURE]-(b:Graph)
WHERE b.complete = true AND b.id <> a.id
WITH a, b, count(f) AS shared,
     sum(CASE WHEN ua.activation < ub.activation THEN ua.activation ELSE ub.activation END)
       AS overlap
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
    parameters, its Cypher text and the function that prepares parameters and runs it."""

    name: str
    description: str
    cypher: str
    params: tuple[Param, ...]
    prepare: Callable[..., tuple[str, dict]] = field(repr=False)


def _recurring(transcoder=None, min_prompts=2, limit=20):
    p = {"transcoder": transcoder, "min_prompts": max(1, int(min_prompts)), "limit": int(limit)}
    return RECURRING_FEATURES, p


def _feeds(source_layer, source_index, target_layer, target_index, transcoder, limit=100):
    return FEATURE_FEEDS, {
        "source_key": feature_key(transcoder, source_layer, source_index),
        "target_key": feature_key(transcoder, target_layer, target_index),
        "limit": int(limit),
    }


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
    }


def _drivers(logit, limit=20):
    return TOKEN_DRIVERS, {"logit": int(logit), "limit": int(limit)}


def _similar(graph, limit=10):
    return SIMILAR_GRAPHS, {"graph": graph, "limit": int(limit)}


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
        ),
    )
}


def run_canned(session, name: str, **kwargs) -> QueryResult:
    """Run canned query ``name`` with its parameters (trusted Cypher, a read transaction)."""
    if name not in CANNED:
        raise ValueError(f"unknown query {name!r}: choose one of {', '.join(CANNED)}")
    cypher, params = CANNED[name].prepare(**kwargs)

    def work(tx):
        result = tx.run(cypher, params)
        return list(result.keys()), [list(r.values()) for r in result]

    columns, rows = session.execute_read(work)
    return QueryResult(columns, rows)
