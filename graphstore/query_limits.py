"""Bounded user queries: a timeout that stops the query on the server as well as in the client,
and a cap on the number of rows.

How a query is stopped on the server (measured on the managed ArcadeDB 26.10.2; README, "Graph
store", has the numbers):

- Every user query carries the neo4j driver's transaction timeout (``tx_timeout`` in Bolt
  BEGIN). Neo4j 5 enforces it on the server. ArcadeDB ignores it (a query sent with a 3 s
  transaction timeout was still running after 10 s).
- The client runs the query in a worker thread and waits ``timeout`` seconds. At the deadline
  it finds the query's server transaction by a unique comment appended to the query text
  (``SHOW TRANSACTIONS ... WHERE currentQuery CONTAINS $tag``) and stops it with
  ``TERMINATE TRANSACTIONS``: Neo4j 5 administration commands that ArcadeDB 26 answers over Bolt
  too. ArcadeDB then aborts the running scan at its next check and the server's CPU falls to
  idle at once. One mechanism for both servers, over the connection we already have.
- Closing the Bolt connection does not stop ArcadeDB's work (it notices the dead client only
  when it writes the result). A client that is killed before its deadline cannot terminate its
  query, so the managed server runs with a ceiling on every command
  (``arcadedb.command.timeout``, ``LocalServer.command_timeout``, default 300 s).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from graphstore.errors import QueryTimeoutError, StoreError

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_ROWS = 10_000
TIMEOUT_ENV = "CIRCUIT_ATLAS_QUERY_TIMEOUT"
MAX_ROWS_ENV = "CIRCUIT_ATLAS_MAX_ROWS"
GRACE_S = 2.0  # how long the client waits for the server to confirm that it stopped a query

# Server error codes of a query stopped by a timeout or a termination (Neo4j 5 and ArcadeDB).
TIMED_OUT_CODES = {
    "Neo.ClientError.Transaction.TransactionTimedOut",
    "Neo.ClientError.Transaction.TransactionTimedOutClientConfiguration",
}
TERMINATED_CODES = {
    "Neo.ClientError.Transaction.Terminated",
    "Neo.TransientError.Transaction.Terminated",
}
STOPPED_CODES = TIMED_OUT_CODES | TERMINATED_CODES

_FIND = (
    "SHOW TRANSACTIONS YIELD transactionId, currentQuery "
    "WHERE currentQuery CONTAINS $tag RETURN transactionId"
)
_TERMINATE = "TERMINATE TRANSACTIONS $ids"

T = TypeVar("T")


@dataclass(frozen=True)
class QueryLimits:
    """The bounds of a user query: ``timeout`` in seconds and ``max_rows`` (0: no bound)."""

    timeout: float = DEFAULT_TIMEOUT_S
    max_rows: int = DEFAULT_MAX_ROWS

    def __post_init__(self) -> None:
        if not self.timeout >= 0:
            raise ValueError(f"query timeout {self.timeout!r} s: give seconds >= 0 (0: none)")
        if self.max_rows < 0:
            raise ValueError(f"max_rows {self.max_rows!r}: give a row count >= 0 (0: no cap)")

    @classmethod
    def resolve(cls, timeout: float | None = None, max_rows: int | None = None) -> QueryLimits:
        """Given values, else ``$CIRCUIT_ATLAS_QUERY_TIMEOUT`` / ``$CIRCUIT_ATLAS_MAX_ROWS``,
        else the defaults (30 s, 10,000 rows)."""
        if timeout is None:
            timeout = _env_number(TIMEOUT_ENV, float, DEFAULT_TIMEOUT_S)
        if max_rows is None:
            max_rows = _env_number(MAX_ROWS_ENV, int, DEFAULT_MAX_ROWS)
        return cls(float(timeout), int(max_rows))

    def override(self, timeout: float | None = None, max_rows: int | None = None) -> QueryLimits:
        """These limits with the given values replaced (None keeps a value)."""
        changes = {}
        if timeout is not None:
            changes["timeout"] = float(timeout)
        if max_rows is not None:
            changes["max_rows"] = int(max_rows)
        return replace(self, **changes)

    @property
    def tx_timeout(self) -> float | None:
        """The driver's transaction timeout (None: the server's default, when unbounded)."""
        return self.timeout if self.timeout > 0 else None


def _env_number(name: str, kind: type, default):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(
            f"${name}={raw!r} is not a {'number of seconds' if kind is float else 'row count'}:"
            f" set it to e.g. {default} (0: no bound) or unset it"
        ) from None


def tagged(query: str, tag: str) -> str:
    """``query`` with a trailing comment that identifies it among the server's transactions."""
    return f"{query}\n/* circuit-atlas query {tag} */"


def timeout_message(timeout: float, stopped: str) -> str:
    return (
        f"the query ran past its timeout of {timeout:g} s and {stopped}: add a LIMIT, narrow the "
        "MATCH (bound variable-length patterns such as [*1..3]), or raise the timeout: "
        f"GraphStore.cypher(..., timeout=S), circuit-atlas cypher --timeout S, or ${TIMEOUT_ENV}"
        "=S (0: none)"
    )


def terminate_tagged(open_session: Callable, tag: str) -> list[str]:
    """Stop the server transactions whose current query carries ``tag``; their ids."""
    with open_session() as s:
        ids = [r["transactionId"] for r in s.run(_FIND, tag=tag)]
        if ids:
            s.run(_TERMINATE, ids=ids).consume()
    return ids


class _Job:
    """``fn`` run in a daemon thread (an abandoned one never blocks interpreter exit).

    Completion is an Event, not ``Thread.is_alive``: a ``join`` interrupted by Ctrl-C can leave
    ``is_alive()`` False while the thread still runs (CPython)."""

    def __init__(self, fn: Callable[[], object], name: str):
        self.value: object = None
        self.error: BaseException | None = None
        self.done = threading.Event()

        def target() -> None:
            try:
                self.value = fn()
            except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                self.error = err
            finally:
                self.done.set()

        threading.Thread(target=target, name=name, daemon=True).start()

    def wait(self, timeout: float | None) -> bool:
        """True when the job is done; waits at most ``timeout`` seconds (None: until done)."""
        return self.done.wait(timeout)


def _stop_on_server(open_session: Callable, tag: str, worker: _Job) -> str:
    """Terminate the tagged query, retrying while it has not reached the server yet; wait up
    to GRACE_S for the worker to see it end. Returns how it went, for the error message."""
    deadline = time.monotonic() + GRACE_S
    ids: list[str] = []
    problem = ""
    while not worker.done.is_set() and not ids and time.monotonic() < deadline:
        stop = _Job(lambda: terminate_tagged(open_session, tag), "circuit-atlas-stop")
        if not stop.wait(max(0.0, deadline - time.monotonic())):
            problem = "no answer to TERMINATE TRANSACTIONS"
            break
        if stop.error is not None:
            problem = f"{type(stop.error).__name__}: {stop.error}"
            break
        ids = stop.value or []
        if not ids:
            time.sleep(0.1)
    if worker.wait(max(0.0, deadline - time.monotonic())):
        return "was stopped on the server"
    why = f" ({problem})" if problem else ""
    return f"the client gave up; the server did not confirm that it stopped{why}"


def run_bounded(open_session: Callable, work: Callable[[object, str], T], timeout: float) -> T:
    """Run ``work(session, tag)`` (a query whose text carries ``tagged(.., tag)``) in a new
    session on a worker thread, for at most ``timeout`` seconds (0: no bound). Past the
    deadline the query is terminated on the server and QueryTimeoutError is raised (within
    ``timeout`` + GRACE_S seconds whatever the server does). Ctrl-C terminates it too."""
    import neo4j

    tag = secrets.token_hex(8)

    def job():
        with open_session() as s:
            return work(s, tag)

    worker = _Job(job, "circuit-atlas-query")
    try:
        done = worker.wait(timeout if timeout > 0 else None)
    except KeyboardInterrupt:
        _stop_on_server(open_session, tag, worker)
        raise
    if not done:
        raise QueryTimeoutError(
            timeout_message(timeout, _stop_on_server(open_session, tag, worker))
        )
    err = worker.error
    if err is None:
        return worker.value
    if isinstance(err, neo4j.exceptions.Neo4jError) and err.code in STOPPED_CODES:
        message = err.message or str(err)
        if "command.timeout" in message:
            raise StoreError(
                f"the server stopped the query at its own command ceiling ({message}): raise the "
                "ceiling of the managed server with `circuit-atlas store stop` and then "
                "`circuit-atlas store start --command-timeout S` (or $CIRCUIT_ATLAS_SERVER_TIMEOUT"
                "=S), or bound the query"
            ) from None
        if err.code in TIMED_OUT_CODES and timeout > 0:
            raise QueryTimeoutError(timeout_message(timeout, "the server stopped it")) from None
        raise StoreError(f"the server terminated the query: {message}") from None
    raise err
