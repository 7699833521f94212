"""Canned cross-prompt queries over supernodes, contrasts and global weights (registered in
:data:`graphstore.queries.CANNED`): ``supernodes``, ``graph-contrast``,
``separating-features``, ``edge-vs-weight``, ``swaps``."""

from __future__ import annotations

from graphstore.queries import CannedQuery, Param
from graphstore.readonly import QueryResult

SUPERNODES = """
// The supernodes of a graph (or of every graph), largest influence first, with their
// members as [layer, position, feature] and their perturbation check.
// $graph: a graph id, or null for every graph.
MATCH (g:Graph)-[:HAS_SUPERNODE]->(s:Supernode)
WHERE g.complete = true AND ($graph IS NULL OR g.id = $graph)
OPTIONAL MATCH (s)-[:MEMBER]->(n:Node)
WITH g, s, collect([n.layer, n.position, n.feature]) AS members
RETURN g.id AS graph, g.prompt AS prompt, s.local_id AS supernode, s.name AS name,
       s.size AS size, s.influence AS influence, s.agreement AS agreement,
       s.effect_rank AS effect_rank, members
ORDER BY graph ASC, influence DESC
LIMIT $limit
"""

GRAPH_CONTRAST = """
// Features of graph $a that graph $b lacks ('a'), and of $b that $a lacks ('b'), by their
// activation mass in their graph (features matched by identity: the Feature node).
MATCH (b:Graph {id: $b})-[:HAS_FEATURE]->(fb:Feature)
WITH collect(fb.key) AS in_b
MATCH (a:Graph {id: $a})-[ua:HAS_FEATURE]->(f:Feature)
WHERE NOT f.key IN in_b
RETURN 'a' AS side, f.layer AS layer, f.index AS index, ua.activation AS activation
ORDER BY activation DESC, layer ASC, index ASC
LIMIT $limit
"""

SEPARATING_FEATURES = """
// Features whose attribution to the target separates two groups of prompts. A graph is in
// group a when its id or prompt id is in $a or its prompt contains one of $a's strings (the
// same for b; a graph matching both counts in a). A feature's attribution to the target in a
// graph: the sum of its nodes' direct edges into the logit nodes, each weighted by the
// logit's weight (its direct share of the graph's logit metric); 0 in graphs where it is
// absent. separation = (mean_a - mean_b) / sqrt((var_a + var_b) / 2 + 1e-12), population
// variances over each group's graphs.
MATCH (g:Graph)
WHERE g.complete = true AND ($transcoder IS NULL OR g.transcoder = $transcoder)
  AND (g.id IN $a OR g.prompt_id IN $a OR any(x IN $a WHERE g.prompt CONTAINS x))
WITH collect(g.id) AS ga
MATCH (g:Graph)
WHERE g.complete = true AND ($transcoder IS NULL OR g.transcoder = $transcoder)
  AND NOT g.id IN ga
  AND (g.id IN $b OR g.prompt_id IN $b OR any(x IN $b WHERE g.prompt CONTAINS x))
WITH ga, collect(g.id) AS gb
WHERE size(ga) > 0 AND size(gb) > 0
UNWIND ga + gb AS gid
MATCH (n:Node {graph: gid})-[e:EDGE]->(l:Node)
WHERE n.kind = 'feature' AND l.kind = 'logit'
MATCH (n)-[:INSTANCE_OF]->(f:Feature)
WITH ga, gb, f, gid, sum(e.weight * l.logit_weight) AS attr
WITH ga, gb, f,
     sum(CASE WHEN gid IN ga THEN attr ELSE 0.0 END) AS sa,
     sum(CASE WHEN gid IN ga THEN attr * attr ELSE 0.0 END) AS qa,
     sum(CASE WHEN gid IN ga THEN 1 ELSE 0 END) AS ca,
     sum(CASE WHEN gid IN ga THEN 0.0 ELSE attr END) AS sb,
     sum(CASE WHEN gid IN ga THEN 0.0 ELSE attr * attr END) AS qb,
     sum(CASE WHEN gid IN ga THEN 0 ELSE 1 END) AS cb
WITH f, ca, cb, size(ga) AS na, size(gb) AS nb,
     sa / size(ga) AS ma, sb / size(gb) AS mb,
     qa / size(ga) - (sa / size(ga)) * (sa / size(ga)) AS va,
     qb / size(gb) - (sb / size(gb)) * (sb / size(gb)) AS vb
WITH f, ca, cb, na, nb, ma, mb,
     (ma - mb) / sqrt((CASE WHEN va > 0 THEN va ELSE 0.0 END
                       + CASE WHEN vb > 0 THEN vb ELSE 0.0 END) / 2 + 1e-12) AS separation
RETURN f.layer AS layer, f.index AS index, ma AS mean_a, mb AS mean_b, ca AS graphs_a,
       cb AS graphs_b, na AS n_a, nb AS n_b, separation
ORDER BY abs(separation) DESC, layer ASC, index ASC
LIMIT $limit
"""

EDGE_VS_WEIGHT = """
// Each feature-to-feature edge of graph $graph beside the global weight of its feature pair
// (stored top-k partners only). The direct path (residual stream, attention excluded) joins
// nodes at the same position only, and contributes source activation x global weight there:
// direct_path is that estimate (0 across positions; null at one position when the pair is
// not among the stored top-k), rest = edge - direct_path is what attention, the skip path
// and the prompt's own norm denominator add. (For an mlp_in transcoder the estimate uses the
// weights' norm convention, Transcoder.virtual_norm.)
MATCH (a:Node {graph: $graph})-[e:EDGE]->(b:Node)
WHERE a.kind = 'feature' AND b.kind = 'feature'
MATCH (a)-[:INSTANCE_OF]->(fa:Feature)
MATCH (b)-[:INSTANCE_OF]->(fb:Feature)
OPTIONAL MATCH (fa)-[v:VIRTUAL]->(fb)
WITH a, b, e, v,
     CASE WHEN a.position <> b.position THEN 0.0
          WHEN v IS NULL THEN null
          ELSE a.activation * v.weight END AS direct
RETURN a.layer AS source_layer, a.position AS source_position, a.feature AS source_index,
       b.layer AS target_layer, b.position AS target_position, b.feature AS target_index,
       e.weight AS edge, v.weight AS global_weight, direct AS direct_path,
       CASE WHEN direct IS NULL THEN null ELSE e.weight - direct END AS rest
ORDER BY abs(e.weight) DESC, source_layer ASC, source_index ASC, target_layer ASC,
         target_index ASC
LIMIT $limit
"""

SWAPS = """
// Swap experiments stored with graph $graph (or every graph): what moved.
MATCH (g:Graph)-[:HAS_SWAP]->(s:Swap)
WHERE g.complete = true AND ($graph IS NULL OR g.id = $graph)
RETURN g.id AS graph, s.prompt AS prompt, s.other_prompt AS other_prompt, s.mode AS mode,
       s.moved AS moved, s.top_before_json AS top_before, s.top_after_json AS top_after,
       s.continuation_after AS continuation_after
ORDER BY graph ASC, s.id ASC
LIMIT $limit
"""


def _supernodes(graph=None, limit=100):
    return SUPERNODES, {"graph": graph, "limit": int(limit)}


def _contrast(a, b, limit=50):
    if a == b:
        raise ValueError("graph-contrast compares two different graphs: give two graph ids")
    return GRAPH_CONTRAST, {"a": a, "b": b, "limit": int(limit)}


def _contrast_exec(tx, params: dict, _kwargs: dict) -> QueryResult:
    """GRAPH_CONTRAST in both directions: rows of side 'a', then side 'b'."""
    rows, columns = [], ["side", "layer", "index", "activation"]
    for side, (x, y) in (("a", ("a", "b")), ("b", ("b", "a"))):
        p = {**params, "a": params[x], "b": params[y]}
        for r in tx.run(GRAPH_CONTRAST, p):
            rows.append([side, r["layer"], r["index"], r["activation"]])
    return QueryResult(columns, rows)


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def _separating(a, b, transcoder=None, limit=20):
    a, b = _as_list(a), _as_list(b)
    if not a or not b:
        raise ValueError(
            "separating-features needs two groups: a and b, each graph ids, prompt ids or "
            "prompt fragments (comma-separated on the command line)"
        )
    return SEPARATING_FEATURES, {"a": a, "b": b, "transcoder": transcoder, "limit": int(limit)}


def _edge_vs_weight(graph, limit=50):
    return EDGE_VS_WEIGHT, {"graph": graph, "limit": int(limit)}


def _swaps(graph=None, limit=50):
    return SWAPS, {"graph": graph, "limit": int(limit)}


CROSSPROMPT = (
    CannedQuery(
        "supernodes",
        "the supernodes of a graph (or of every graph) with members and perturbation check",
        SUPERNODES,
        (Param("graph", str, "graph id (default: every graph)"),
         Param("limit", int, "rows to return", 100)),
        _supernodes,
    ),
    CannedQuery(
        "graph-contrast",
        "features found in one of two graphs and not the other",
        GRAPH_CONTRAST,
        (Param("a", str, "graph id", required=True), Param("b", str, "graph id", required=True),
         Param("limit", int, "rows per side", 50)),
        _contrast,
        _contrast_exec,
    ),
    CannedQuery(
        "separating-features",
        "features whose attribution to the target separates two groups of prompts",
        SEPARATING_FEATURES,
        (Param("a", str, "group a: graph ids, prompt ids or prompt fragments", required=True),
         Param("b", str, "group b: graph ids, prompt ids or prompt fragments", required=True),
         Param("transcoder", str, "only graphs of this transcoder"),
         Param("limit", int, "rows to return", 20)),
        _separating,
    ),
    CannedQuery(
        "edge-vs-weight",
        "each feature edge of a graph beside its global (virtual) weight",
        EDGE_VS_WEIGHT,
        (Param("graph", str, "graph id", required=True),
         Param("limit", int, "rows to return", 50)),
        _edge_vs_weight,
    ),
    CannedQuery(
        "swaps",
        "swap experiments stored with a graph (or every graph)",
        SWAPS,
        (Param("graph", str, "graph id (default: every graph)"),
         Param("limit", int, "rows to return", 50)),
        _swaps,
    ),
)  # fmt: skip
