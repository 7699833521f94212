"""Read-only user Cypher.

Neither Neo4j's READ access mode nor ``execute_read`` can be relied on: ArcadeDB commits a
CREATE run in a READ session (checked). So user Cypher passes three guards:

1. a lexical check (string literals, comments and quoted names removed first) that refuses
   write clauses (CREATE, MERGE, DELETE, SET, REMOVE, DROP, FOREACH, LOAD CSV, ...) and
   procedures outside a read-only allow-list; it also stops schema commands, which ArcadeDB
   applies outside the transaction (a CREATE INDEX survives a rollback: checked);
2. ``EXPLAIN``, where the server classifies honestly (Neo4j): the summary's ``query_type`` must
   be ``r`` (``w``, ``rw``, ``s`` are refused). ArcadeDB answers ``w`` for every EXPLAIN, so
   this guard is used only where a plain read explains as ``r`` (probed once per connection);
3. the query runs in an explicit transaction that is always rolled back, and its summary must
   say ``r`` with no updates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from graphstore.errors import ReadOnlyViolation, ResultTooLargeError, StoreError

WRITE_KEYWORDS = (
    "CREATE", "MERGE", "DELETE", "DETACH", "SET", "REMOVE", "DROP", "FOREACH", "LOAD",
    "ALTER", "RENAME", "GRANT", "DENY", "REVOKE", "START", "STOP", "TERMINATE", "INSERT",
    "UPDATE", "TRUNCATE", "IMPORT",
)  # fmt: skip

# Procedures that only read (Neo4j 5 built-ins, all answered by ArcadeDB too or refused there).
READ_PROCEDURES = {
    "db.labels",
    "db.relationshiptypes",
    "db.propertykeys",
    "db.schema.visualization",
    "db.schema.nodetypeproperties",
    "db.schema.reltypeproperties",
    "dbms.components",
}

_LITERALS = re.compile(
    r"""
    '(?:[^'\\]|\\.)*'        # single-quoted string
  | "(?:[^"\\]|\\.)*"        # double-quoted string
  | `[^`]*`                  # quoted name
  | //[^\n]*                 # line comment
  | /\*.*?\*/                # block comment
    """,
    re.VERBOSE | re.DOTALL,
)
_WORD = re.compile(r"(?<![\w.$:])([A-Za-z_][A-Za-z_0-9]*)\b(?!\s*:(?!:))")
_CALL = re.compile(r"\bCALL\s+([A-Za-z_][\w.]*)", re.IGNORECASE)


def strip_literals(query: str) -> str:
    """``query`` with strings, quoted names and comments blanked out (keywords inside data
    are data)."""
    return _LITERALS.sub(" ", query)


def lexical_violation(query: str) -> str | None:
    """The first write clause or non-read procedure in ``query``, or None."""
    code = strip_literals(query)
    keywords = set(WRITE_KEYWORDS)
    for m in _WORD.finditer(code):
        word = m.group(1).upper()
        if word in keywords:
            if word == "LOAD" and not re.match(r"\s+CSV\b", code[m.end() :], re.IGNORECASE):
                continue
            return word
    for m in _CALL.finditer(code):
        name = m.group(1).lower()
        if name not in READ_PROCEDURES:
            return f"CALL {m.group(1)}"
    if re.search(r"\bIN\s+TRANSACTIONS\b", code, re.IGNORECASE):
        return "CALL { ... } IN TRANSACTIONS"
    return None


@dataclass
class QueryResult:
    """Rows of a read-only query: ``columns`` and ``rows`` (lists of plain Python values)."""

    columns: list[str]
    rows: list[list]

    def records(self) -> list[dict]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


def _refuse(what: str, query: str) -> ReadOnlyViolation:
    return ReadOnlyViolation(
        f"refused: user Cypher must be read-only, and this query {what}: {query.strip()[:200]!r}. "
        "Use MATCH ... RETURN; graphs are written by GraphStore.add / circuit-atlas store add"
    )


def explain_classifies(session) -> bool:
    """True when the server's EXPLAIN reports a plain read as ``r`` (Neo4j does, ArcadeDB
    26.10 answers ``w`` for everything)."""
    summary = session.run("EXPLAIN MATCH (n) RETURN n LIMIT 1").consume()
    return summary.query_type == "r"


def run_read_only(
    session,
    query: str,
    params: dict | None = None,
    *,
    use_explain: bool,
    max_rows: int = 0,
    tx_timeout: float | None = None,
    tag: str | None = None,
) -> QueryResult:
    """Run user Cypher that must not write; raises ReadOnlyViolation otherwise (nothing is
    written either way: the transaction is rolled back). Checked before anything runs.

    ``max_rows`` > 0: more rows than that raise ResultTooLargeError. ``tx_timeout`` (seconds)
    is sent as the driver's transaction timeout (Neo4j enforces it). ``tag`` is appended to
    the query text as a comment (see graphstore.query_limits). A query stopped by a server timeout
    or termination raises the driver's error unchanged, for the caller to explain."""
    import neo4j

    from graphstore.query_limits import STOPPED_CODES, tagged

    params = params or {}
    word = lexical_violation(query)
    if word is not None:
        raise _refuse(f"contains {word}", query)
    text = tagged(query, tag) if tag else query
    try:
        if use_explain:
            summary = session.run(
                neo4j.Query("EXPLAIN " + text, timeout=tx_timeout), params
            ).consume()
            if summary.query_type != "r":
                raise _refuse(f"is of type {summary.query_type!r} (only 'r' is allowed)", query)
        tx = session.begin_transaction(timeout=tx_timeout)
        try:
            result = tx.run(text, params)
            columns = list(result.keys())
            rows = []
            for rec in result:
                if max_rows and len(rows) >= max_rows:
                    raise _too_many(max_rows)
                rows.append([_plain(v) for v in rec.values()])
            summary = result.consume()
            if summary.query_type not in (None, "r") or summary.counters.contains_updates:
                raise _refuse(f"wrote (type {summary.query_type!r}); it was rolled back", query)
        finally:
            tx.rollback()
            tx.close()
    except neo4j.exceptions.Neo4jError as err:
        if err.code in STOPPED_CODES:
            raise
        raise StoreError(f"the server rejected the query: {err.message}") from err
    return QueryResult(columns, rows)


def _too_many(max_rows: int) -> ResultTooLargeError:
    return ResultTooLargeError(
        f"the query returns more than {max_rows:,} rows, the row cap: add LIMIT {max_rows} or "
        "aggregate (count, collect), or raise the cap: GraphStore.cypher(..., max_rows=N), "
        "circuit-atlas cypher --max-rows N, or $CIRCUIT_ATLAS_MAX_ROWS=N (0: no cap)"
    )


def _plain(value):
    """Driver values (nodes, relationships, paths) as plain dicts/lists for tables and JSON."""
    from neo4j.graph import Node, Path, Relationship

    if isinstance(value, Node):
        return {"labels": sorted(value.labels), **dict(value)}
    if isinstance(value, Relationship):
        return {"type": value.type, **dict(value)}
    if isinstance(value, Path):
        return [_plain(n) for n in value.nodes]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "iso_format"):
        return value.iso_format()
    return value
