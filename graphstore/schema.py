"""The database schema: labels, relationships, constraints and indexes, in one place.

Schema (every property name below is what queries use)::

    (:Model {name})
    (:Transcoder {name, readable, fingerprint, model})-[:FOR_MODEL]->(:Model)
                                     name = identity "readable@fingerprint" (transcoders.identity)
    (:Feature {key, transcoder, layer, index,           shared by all prompts; key "tc/layer/index"
               graphs, prompts, nodes, activation})     counters over complete graphs
    (:Prompt {id, text, model, tokens, token_strings})
    (:Graph {id, complete, model, transcoder, transcoder_readable, transcoder_fingerprint,
             prompt_id, prompt, n_nodes, n_edges, n_layers,
             parquet_path, content_hash, params_json, scores_json, extra_json, feature_mass,
             param_<k>, score_<k>, validation_<k>})
    (:Graph)-[:OF_PROMPT]->(:Prompt), (:Graph)-[:USES]->(:Transcoder)
    (:Graph)-[:HAS_FEATURE {nodes, activation}]->(:Feature)   per-graph feature summary
    (:Node {graph, i, kind, layer, position, feature, activation, probability, logit_weight,
            token, influence})                           one per pruned-graph node; influence:
                                         pruning's (null when the graph records none)
    (:Node)-[:INSTANCE_OF]->(:Feature)                   feature nodes only
    (:Node)-[:EDGE {weight, k}]->(:Node)   source -> target, weight = A[target, source]
    (:Supernode), (:Swap), [:VIRTUAL] global weights: see graphstore.crossprompt
    (:Subgraph {key, graph, name, doc_json, updated_ms})  a saved view of graph ``graph``
                                         (pinned nodes, supernodes, labels; graphstore.subgraphs)
    (:WriteClaim {graph, owner, host, pid, pid_start, heartbeat})  the one writer of a graph
                                         while it writes (graphstore.ingest); none at rest

``Graph.complete`` is false while a graph is being written; every query reads only complete
graphs. Neo4j 5 and ArcadeDB accept the same DDL below (checked against ArcadeDB 26.10); the
dialect table keeps any divergence here.
"""

from __future__ import annotations

from dataclasses import dataclass

LABELS = ("Model", "Transcoder", "Feature", "Prompt", "Graph", "Node", "Supernode", "Swap",
          "Subgraph", "WriteClaim", "Head", "FeatureLabel")  # fmt: skip
RELATIONSHIPS = ("FOR_MODEL", "OF_PROMPT", "USES", "HAS_FEATURE", "INSTANCE_OF", "EDGE",
                 "HAS_SUPERNODE", "MEMBER", "VIRTUAL", "HAS_SWAP", "SWAP_FROM",
                 "CARRIES")  # fmt: skip

# Composite uniqueness is expressed through one string key (Feature.key) so the same constraint
# works on Neo4j Community, Enterprise and ArcadeDB.
_COMMON = (
    "CREATE CONSTRAINT model_name IF NOT EXISTS FOR (m:Model) REQUIRE m.name IS UNIQUE",
    "CREATE CONSTRAINT transcoder_name IF NOT EXISTS FOR (t:Transcoder) REQUIRE t.name IS UNIQUE",
    "CREATE CONSTRAINT feature_key IF NOT EXISTS FOR (f:Feature) REQUIRE f.key IS UNIQUE",
    "CREATE CONSTRAINT prompt_id IF NOT EXISTS FOR (p:Prompt) REQUIRE p.id IS UNIQUE",
    "CREATE CONSTRAINT graph_id IF NOT EXISTS FOR (g:Graph) REQUIRE g.id IS UNIQUE",
    "CREATE CONSTRAINT subgraph_key IF NOT EXISTS FOR (s:Subgraph) REQUIRE s.key IS UNIQUE",
    "CREATE INDEX subgraph_graph IF NOT EXISTS FOR (s:Subgraph) ON (s.graph)",
    # One writer per graph (graphstore.ingest's claim): a second claim of a graph conflicts.
    "CREATE CONSTRAINT write_claim_graph IF NOT EXISTS FOR (c:WriteClaim) REQUIRE c.graph "
    "IS UNIQUE",
    "CREATE INDEX node_graph IF NOT EXISTS FOR (n:Node) ON (n.graph)",
    "CREATE INDEX node_kind_feature IF NOT EXISTS FOR (n:Node) ON (n.kind, n.feature)",
    "CREATE INDEX graph_complete IF NOT EXISTS FOR (g:Graph) ON (g.complete)",
    "CREATE INDEX graph_prompt IF NOT EXISTS FOR (g:Graph) ON (g.prompt_id)",
    "CREATE CONSTRAINT supernode_id IF NOT EXISTS FOR (s:Supernode) REQUIRE s.id IS UNIQUE",
    "CREATE INDEX supernode_graph IF NOT EXISTS FOR (s:Supernode) ON (s.graph)",
    "CREATE CONSTRAINT swap_id IF NOT EXISTS FOR (s:Swap) REQUIRE s.id IS UNIQUE",
    "CREATE INDEX swap_graph IF NOT EXISTS FOR (s:Swap) ON (s.graph)",
    "CREATE CONSTRAINT head_key IF NOT EXISTS FOR (h:Head) REQUIRE h.key IS UNIQUE",
    # Edited feature labels (graphstore.labels), one per feature identity.
    "CREATE CONSTRAINT feature_label_key IF NOT EXISTS FOR (l:FeatureLabel) REQUIRE l.key "
    "IS UNIQUE",
    # Feature.prompts is not indexed (earlier stores had this index; dropped here): every
    # ingest rewrites the counters of ~200 features, and removing an old key from an index
    # where thousands of features share it (prompts = 1) scans them all (measured: 16% of the
    # server's ingest time), while ArcadeDB answers "prompts >= t" by a label scan anyway.
    "DROP INDEX feature_prompts IF EXISTS",
)


@dataclass(frozen=True)
class Dialect:
    """What differs between servers that speak Bolt and Cypher."""

    name: str
    ddl: tuple[str, ...]
    # ArcadeDB reports query_type "w" for every EXPLAIN (checked: 26.10), so EXPLAIN cannot
    # classify queries there; the read-only guard then relies on its other two layers.
    explain_classifies: bool
    default_database: str | None


NEO4J = Dialect("neo4j", _COMMON, explain_classifies=True, default_database=None)
ARCADEDB = Dialect("arcadedb", _COMMON, explain_classifies=False, default_database="atlas")


def detect_dialect(agent: str) -> Dialect:
    """The dialect of a server from its Bolt agent string, e.g. ``Neo4j/5.26.0 compatible
    (ArcadeDB 26.10.2)`` or ``Neo4j/5.20.0``."""
    return ARCADEDB if "arcadedb" in agent.lower() else NEO4J


def feature_key(transcoder: str, layer: int, index: int) -> str:
    """The unique key of a transcoder feature: ``"<transcoder>/<layer>/<index>"``."""
    return f"{transcoder}/{int(layer)}/{int(index)}"


def ensure_schema(session, dialect: Dialect) -> None:
    """Create constraints and indexes (idempotent: IF NOT EXISTS). Run before any data is
    loaded, so every later MERGE is backed by an index."""
    for statement in dialect.ddl:
        session.run(statement).consume()
