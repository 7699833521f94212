"""User Cypher is read-only: writes are refused and nothing is written; data that looks like
Cypher (prompt text, names) is stored as data."""

from __future__ import annotations

import pytest

from graphstore import ReadOnlyViolation, ResultTooLargeError, graph_id
from graphstore import readonly as ro
from tests.graphstore.conftest import assert_graphs_equal, small_graph

WRITES = [
    "CREATE (n:Canary {x: 1}) RETURN n",
    "MERGE (n:Canary {x: 1}) RETURN n",
    "MATCH (n:Node) DETACH DELETE n",
    "MATCH (n:Node) WITH n LIMIT 1 DELETE n",
    "MATCH (g:Graph) SET g.complete = false",
    "match (g:Graph) set g.prompt = 'x'",
    "MATCH (g:Graph) /* a comment */ SET g.n_nodes = 0",
    "MATCH (g:Graph) REMOVE g.prompt",
    "MATCH (g:Graph) FOREACH (x IN [1] | SET g.n_nodes = x)",
    "CREATE INDEX canary IF NOT EXISTS FOR (n:Node) ON (n.activation)",
    "DROP CONSTRAINT graph_id",
    "LOAD CSV FROM 'file:///etc/passwd' AS r RETURN r",
    "CALL db.createLabel('Canary')",
    "MATCH (g:Graph) CALL { WITH g SET g.x = 1 } IN TRANSACTIONS RETURN 1",
]


def _fingerprint(store):
    q = {
        "nodes": "MATCH (n) RETURN count(n)",
        "rels": "MATCH ()-[r]->() RETURN count(r)",
        "complete": "MATCH (g:Graph) WHERE g.complete = true RETURN count(g)",
        "props": "MATCH (g:Graph) RETURN sum(g.n_nodes)",
        "canary": "MATCH (n:Canary) RETURN count(n)",
    }
    out = {k: store.cypher(v).rows[0][0] for k, v in q.items()}
    out["indexes"] = sorted(r[0] for r in store.cypher("SHOW INDEXES YIELD name RETURN name").rows)
    return out


@pytest.mark.parametrize("query", WRITES)
def test_writes_are_refused_and_nothing_is_written(store, query):
    store.add(small_graph(61))
    before = _fingerprint(store)
    with pytest.raises(ReadOnlyViolation, match="read-only"):
        store.cypher(query)
    assert _fingerprint(store) == before


def test_rollback_guard_alone(store):
    """The last guard (explicit transaction, summary check, rollback) on its own: with the
    lexical check switched off, a CREATE is still refused and rolled back."""
    with store._session() as s:
        before = s.run("MATCH (n:Canary) RETURN count(n) AS c").single()["c"]
        orig = ro.lexical_violation
        ro.lexical_violation = lambda q: None
        try:
            with pytest.raises(ReadOnlyViolation, match="rolled back"):
                ro.run_read_only(s, "CREATE (n:Canary {x: 2})", use_explain=False)
        finally:
            ro.lexical_violation = orig
        assert s.run("MATCH (n:Canary) RETURN count(n) AS c").single()["c"] == before


def test_explain_probe_matches_server(store):
    store.cypher("RETURN 1")
    # ArcadeDB reports every EXPLAIN as a write, so the probe must switch that guard off there.
    assert store._explain_ok is (store.dialect.name != "arcadedb")


EDGE_COUNT = "MATCH (n:Node)-[e:EDGE]->(m) RETURN count(e) AS c"


@pytest.mark.parametrize(
    "query, expected",
    [
        ("RETURN 'CREATE (n) SET n.x = 1' AS s", lambda store: [["CREATE (n) SET n.x = 1"]]),
        ('MATCH (g:Graph) WHERE g.prompt CONTAINS "DELETE" RETURN count(g) AS c', lambda _: [[0]]),
        (
            "MATCH (g:Graph) RETURN g.created_at IS NOT NULL AS has_created LIMIT 1",
            lambda _: [[True]],
        ),
        ("RETURN {set: 1, create: 2} AS m", lambda _: [[{"set": 1, "create": 2}]]),
        (
            "MATCH (n:Node)-[e:EDGE]->(m) // DELETE in a comment\nRETURN count(e) AS c",
            lambda store: store.cypher(EDGE_COUNT).rows,
        ),
        ("CALL db.labels()", None),
    ],
)
def test_reads_that_mention_write_words_run(store, query, expected):
    """Each read runs and answers what it asks (the write words are data, comments or keys),
    and nothing was written by it."""
    g = small_graph(62)
    store.add(g)
    before = store.cypher("MATCH (n) RETURN count(n) AS c").rows
    res = store.cypher(query)
    if expected is None:  # db.labels(): the schema's labels, whatever the column is called
        assert {"Graph", "Node", "Feature"} <= {r[0] for r in res.rows}
    else:
        assert res.rows == expected(store)
    assert store.cypher(EDGE_COUNT).rows[0][0] >= g.n_edges > 0
    assert store.cypher("MATCH (n) RETURN count(n) AS c").rows == before


def test_lexical_classifier():
    assert ro.lexical_violation("MATCH (n) RETURN n") is None
    assert ro.lexical_violation("MATCH (n:`CREATE`) RETURN n.`SET`") is None
    assert ro.lexical_violation("MATCH (n) WHERE n.x = 'a\\'DELETE' RETURN n") is None
    assert ro.lexical_violation("MATCH (n) DETACH DELETE n") == "DETACH"
    assert ro.lexical_violation("CALL apoc.create.node(['X'], {})") == "CALL apoc.create.node"
    assert ro.lexical_violation("LOAD CSV FROM 'x' AS r RETURN r") == "LOAD"


def test_parameters_and_max_rows(store):
    g = small_graph(63)
    gid = store.add(g).graph_id
    res = store.cypher("MATCH (n:Node {graph: $g}) RETURN n.i AS i ORDER BY i", {"g": gid})
    assert [r[0] for r in res.rows] == list(range(g.n_nodes))
    # The row cap refuses a larger result (a truncated one would pass for the whole answer).
    with pytest.raises(ResultTooLargeError, match=f"more than {g.n_nodes - 1} rows"):
        store.cypher("MATCH (n:Node {graph: $g}) RETURN n.i", {"g": gid}, max_rows=g.n_nodes - 1)
    res = store.cypher("MATCH (n:Node {graph: $g}) RETURN n.i", {"g": gid}, max_rows=g.n_nodes)
    assert len(res.rows) == g.n_nodes


INJECTIONS = [
    "x'}) MATCH (n) DETACH DELETE n //",
    'x"}) MATCH (n) DETACH DELETE n //',
    "`) DETACH DELETE n; MATCH (m) DETACH DELETE m //",
    "$id } ) SET g.complete = false //",
]


def test_cypher_injection_is_stored_as_data(store):
    g = small_graph(64)
    g.prompt = INJECTIONS[0] + " \\ " + INJECTIONS[3]
    g.token_strings = [INJECTIONS[i % len(INJECTIONS)] for i in range(len(g.tokens))]
    g.transcoder_name = INJECTIONS[1] + "@0f"  # a property value and in feature keys
    g.model_name = INJECTIONS[2]
    before = _fingerprint(store)
    res = store.add(g)
    assert res.written
    back = store.load(graph_id(g))
    assert_graphs_equal(back, g)
    after = _fingerprint(store)
    assert after["complete"] == before["complete"] + 1
    assert after["nodes"] > before["nodes"]
    found = store.cypher(
        "MATCH (g:Graph {id: $id})-[:USES]->(t:Transcoder) RETURN g.prompt, t.name, t.model",
        {"id": graph_id(g)},
    ).rows
    assert found == [[g.prompt, g.transcoder_name, INJECTIONS[2]]]
