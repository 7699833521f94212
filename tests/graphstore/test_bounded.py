"""Bounded user queries (issue 12, section 3): a pathological query is stopped on the server
within its timeout, the server goes idle, other queries are served meanwhile; a row cap; the
CLI's one-line errors; the read-only guard still decides first.

The timeout test runs on the managed ArcadeDB server (the session fixture) and, when
``CIRCUIT_ATLAS_NEO4J_URI`` is set, on that Neo4j 5 server too (``CIRCUIT_ATLAS_NEO4J_USER``,
default ``neo4j``; ``CIRCUIT_ATLAS_NEO4J_PASSWORD``; ``CIRCUIT_ATLAS_NEO4J_DATABASE``, default
the server's; ``CIRCUIT_ATLAS_NEO4J_PID``, optional: the server's process id when it runs on
this machine, to measure its CPU as well). Use a scratch database: the test adds a few graphs
and deletes them afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from graphstore import (
    GraphStore,
    QueryLimits,
    QueryTimeoutError,
    ReadOnlyViolation,
    ResultTooLargeError,
)
from graphstore import readonly as ro
from graphstore.server import process_cpu_seconds
from tests.graphstore.conftest import small_graph
from tracer.cli import main

# Undirected paths of up to 10 hops over every relationship: on a few small graphs this takes
# far longer than any timeout below (it ran for minutes uninterrupted on the managed server).
PATHOLOGICAL = "MATCH (a)-[*1..10]-(b) RETURN count(*) AS paths"
FRAGMENT = "[*1..10]"
TIMEOUT_S = 3.0
SEEDS = (1201, 1202, 1203)
IDLE_CORES = 0.08  # an idle ArcadeDB JVM uses ~0.01 of a core (measured); a query uses a core
BUSY_CORES = 0.1  # a CPU-bound query thread gets more than this even on a loaded 2-core host


@pytest.fixture(params=["arcadedb", "neo4j"])
def backend(request, tmp_path):
    """(store, pid of the server process or None) on each server, with SEEDS stored."""
    if request.param == "arcadedb":
        server, info = request.getfixturevalue("arcadedb_server")
        store = request.getfixturevalue("store")
        pid = info.pid
    else:
        uri = os.environ.get("CIRCUIT_ATLAS_NEO4J_URI")
        if not uri:
            pytest.skip("CIRCUIT_ATLAS_NEO4J_URI is not set: no Neo4j 5 server to test against")
        store = GraphStore(
            uri,
            os.environ.get("CIRCUIT_ATLAS_NEO4J_USER", "neo4j"),
            os.environ.get("CIRCUIT_ATLAS_NEO4J_PASSWORD", ""),
            os.environ.get("CIRCUIT_ATLAS_NEO4J_DATABASE") or None,
            archive_dir=tmp_path / "archive",
        )
        pid = (
            int(os.environ["CIRCUIT_ATLAS_NEO4J_PID"])
            if "CIRCUIT_ATLAS_NEO4J_PID" in os.environ
            else None
        )
    ids = [store.add(small_graph(s)).graph_id for s in SEEDS]
    yield store, pid
    if request.param == "neo4j":
        for gid in ids:
            store.delete(gid)
        store.close()


def running(store: GraphStore, fragment: str) -> list[str]:
    """Ids of the server transactions whose current query contains ``fragment``."""
    with store._session() as s:
        q = (
            "SHOW TRANSACTIONS YIELD transactionId, currentQuery "
            "WHERE currentQuery CONTAINS $f RETURN transactionId"
        )
        return [r["transactionId"] for r in s.run(q, f=fragment)]


def wait_until(pred, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - examined by the test
            box["error"] = err
        box["at"] = time.monotonic()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def idle_within(pid: int, within: float, window: float = 2.0) -> float | None:
    """The first CPU rate (cores) at most IDLE_CORES over a ``window``-second interval that
    starts within ``within`` seconds; None if none did."""
    deadline = time.monotonic() + within
    while time.monotonic() + window <= deadline + 1e-9:
        c0, t0 = process_cpu_seconds(pid), time.monotonic()
        time.sleep(window)
        rate = (process_cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        if rate <= IDLE_CORES:
            return rate
    return None


@pytest.mark.slow
def test_pathological_query_is_stopped_on_the_server(backend):
    store, pid = backend
    expected = store.query("recurring-features", min_prompts=1, limit=5)
    assert expected.rows, "the canned query must have something to find"
    assert not running(store, FRAGMENT)

    t_start = time.monotonic()
    worker, box = in_thread(lambda: store.cypher(PATHOLOGICAL, timeout=TIMEOUT_S))
    assert wait_until(lambda: running(store, FRAGMENT), TIMEOUT_S), "the query never started"
    t_seen, cpu_seen = time.monotonic(), pid and process_cpu_seconds(pid)

    # Meanwhile the server answers a canned query, correctly, while the bad one still runs.
    got = store.query("recurring-features", min_prompts=1, limit=5)
    assert worker.is_alive(), "the canned query did not complete while the bad one ran"
    assert got == expected

    worker.join(TIMEOUT_S + 10)
    assert not worker.is_alive(), "cypher() did not return"
    err = box.get("error")
    assert isinstance(err, QueryTimeoutError), f"expected a timeout error, got {box}"
    msg = str(err)
    assert f"timeout of {TIMEOUT_S:g} s" in msg and "stopped on the server" in msg
    assert "--timeout" in msg and "CIRCUIT_ATLAS_QUERY_TIMEOUT" in msg
    assert box["at"] - t_start <= TIMEOUT_S + 5

    # The server stopped the work: the transaction is gone and (where we can see the process)
    # its CPU falls to idle, having been busy while the query ran.
    assert wait_until(lambda: not running(store, FRAGMENT), 10.0), "still running on the server"
    if pid:
        busy = (process_cpu_seconds(pid) - cpu_seen) / (box["at"] - t_seen)
        assert busy >= BUSY_CORES, f"the server was not busy with the query ({busy:.2f} cores)"
        idle = idle_within(pid, 10.0)
        assert idle is not None, "the server's CPU did not fall to idle within 10 s"
    # And the store keeps serving.
    assert store.query("recurring-features", min_prompts=1, limit=5) == expected


# A user's Ctrl-C: a separate interpreter (as the CLI is) runs the unbounded query and gets a
# real SIGINT, so no signal handling left behind by other tests in this process can interfere.
CTRL_C_CLIENT = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
from graphstore import GraphStore
uri, user, password, database = sys.argv[1:5]
with GraphStore(uri, user, password, database, archive_dir=sys.argv[5]) as s:
    print("ready", flush=True)
    try:
        s.cypher(sys.argv[6], timeout=0)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
sys.exit(0)
"""


@pytest.mark.slow
def test_ctrl_c_stops_the_query_on_the_server(store, server_auth, tmp_path):
    """Ctrl-C while an unbounded query runs: the query is terminated on the server too."""
    store.add(small_graph(SEEDS[0]))
    assert wait_until(lambda: not running(store, FRAGMENT), 30.0), "an earlier query still runs"
    a = server_auth
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_CLIENT, a["uri"], a["user"], a["password"],
         a["database"], str(tmp_path / "client"), PATHOLOGICAL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert wait_until(lambda: bool(running(store, FRAGMENT)), 60.0), "query never started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in out, (proc.returncode, out, err[-2000:])
    assert wait_until(lambda: not running(store, FRAGMENT), 10.0), "still running on the server"


def test_row_cap(store):
    store.add(small_graph(SEEDS[0]))
    assert store.limits == QueryLimits(30.0, 10_000)  # the defaults
    res = store.cypher("UNWIND range(1, 10000) AS i RETURN i")
    assert [r[0] for r in res.rows] == list(range(1, 10_001))
    with pytest.raises(ResultTooLargeError, match=r"more than 10,000 rows.*--max-rows"):
        store.cypher("UNWIND range(1, 10001) AS i RETURN i")
    # Per call, and 0 for no cap.
    with pytest.raises(ResultTooLargeError, match="more than 3 rows"):
        store.cypher("UNWIND range(1, 4) AS i RETURN i", max_rows=3)
    assert len(store.cypher("UNWIND range(1, 10001) AS i RETURN i", max_rows=0).rows) == 10_001


def test_store_limits_from_arguments_and_environment(server_auth, tmp_path, monkeypatch):
    conn = (server_auth["uri"], server_auth["user"], server_auth["password"])
    monkeypatch.setenv("CIRCUIT_ATLAS_QUERY_TIMEOUT", "7.5")
    monkeypatch.setenv("CIRCUIT_ATLAS_MAX_ROWS", "4")
    with GraphStore(*conn, server_auth["database"], archive_dir=tmp_path / "a") as s:
        assert s.limits == QueryLimits(7.5, 4)
        with pytest.raises(ResultTooLargeError, match="more than 4 rows"):
            s.cypher("UNWIND range(1, 5) AS i RETURN i")
        assert len(s.cypher("UNWIND range(1, 5) AS i RETURN i", max_rows=5).rows) == 5
    with GraphStore(
        *conn, server_auth["database"], archive_dir=tmp_path / "a", query_timeout=2, max_rows=2
    ) as s:
        assert s.limits == QueryLimits(2.0, 2)
        t0 = time.monotonic()
        with pytest.raises(QueryTimeoutError, match="timeout of 2 s"):
            s.cypher(PATHOLOGICAL)
        assert time.monotonic() - t0 <= 2 + 5
        assert wait_until(lambda: not running(s, FRAGMENT), 10.0)
    monkeypatch.setenv("CIRCUIT_ATLAS_MAX_ROWS", "many")
    with pytest.raises(ValueError, match=r"CIRCUIT_ATLAS_MAX_ROWS='many' is not a row count"):
        QueryLimits.resolve()
    with pytest.raises(ValueError, match="seconds >= 0"):
        QueryLimits(-1.0, 5)


def _conn(auth, tmp_path):
    return ["--uri", auth["uri"], "--user", auth["user"], f"--password={auth['password']}",
            "--database", auth["database"], "--home", str(tmp_path / "unused")]  # fmt: skip


def test_cli_timeout_and_cap_are_one_line_with_exit_2(store, server_auth, tmp_path, capsys):
    store.add(small_graph(SEEDS[0]))
    rc = main(["cypher", PATHOLOGICAL, "--timeout", "2", *_conn(server_auth, tmp_path)])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("circuit-atlas: error: the query ran past its timeout of 2 s")
    assert "--timeout S" in lines[0]
    assert wait_until(lambda: not running(store, FRAGMENT), 10.0)

    rc = main(["cypher", "UNWIND range(1, 6) AS i RETURN i", "--max-rows", "5",
               *_conn(server_auth, tmp_path)])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    assert cap.err.strip().splitlines() == [
        "circuit-atlas: error: the query returns more than 5 rows, the row cap: add LIMIT 5 or "
        "aggregate (count, collect), or raise the cap: GraphStore.cypher(..., max_rows=N), "
        "circuit-atlas cypher --max-rows N, or $CIRCUIT_ATLAS_MAX_ROWS=N (0: no cap)"
    ]
    assert main(["cypher", "UNWIND range(1, 6) AS i RETURN i", "--max-rows", "6", "--format",
                 "csv", *_conn(server_auth, tmp_path)]) == 0  # fmt: skip
    assert capsys.readouterr().out.split() == ["i", "1", "2", "3", "4", "5", "6"]


def test_read_only_guard_decides_before_the_timeout(store, monkeypatch):
    """A write is refused at once (not timed out), even one that would also run for ever; and
    the rollback guard still catches a write that passes the lexical check, on the bounded
    path."""
    store.add(small_graph(SEEDS[0]))
    with pytest.raises(ReadOnlyViolation, match="contains SET"):
        store.cypher("MATCH (a)-[*1..10]-(b) SET a.x = 1 RETURN count(*)", timeout=60)
    assert not running(store, FRAGMENT)  # it never reached the server

    canaries = "MATCH (n:Canary) RETURN count(n) AS c"
    before = store.cypher(canaries).rows[0][0]
    monkeypatch.setattr(ro, "lexical_violation", lambda q: None)
    with pytest.raises(ReadOnlyViolation, match="rolled back"):
        store.cypher("CREATE (n:Canary {x: 3})")
    monkeypatch.undo()
    assert store.cypher(canaries).rows[0][0] == before


def test_managed_server_runs_with_its_command_ceiling(arcadedb_server):
    """The managed server's ceiling on every command reaches the Java process."""
    server, info = arcadedb_server
    expected = float(os.environ.get("CIRCUIT_ATLAS_SERVER_TIMEOUT") or 300)  # 300: the default
    assert info.command_timeout == server.command_timeout == expected
    cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes().split(b"\0")
    assert f"-Darcadedb.command.timeout={round(expected * 1000)}".encode() in cmdline
    assert server.status()["command_timeout_s"] == expected


def test_server_ceiling_settings(tmp_path, monkeypatch):
    """`store start --command-timeout`, $CIRCUIT_ATLAS_SERVER_TIMEOUT and the default reach
    the managed server's settings (no server started)."""
    from graphstore import LocalServer
    from tracer.cli import build_parser, store_cmd

    monkeypatch.delenv("CIRCUIT_ATLAS_SERVER_TIMEOUT", raising=False)
    assert LocalServer(tmp_path).command_timeout == 300.0
    args = build_parser().parse_args(
        ["store", "start", "--home", str(tmp_path), "--command-timeout", "42"]
    )
    assert store_cmd._server(args).command_timeout == 42.0
    monkeypatch.setenv("CIRCUIT_ATLAS_SERVER_TIMEOUT", "12.5")
    assert LocalServer(tmp_path).command_timeout == 12.5
    assert LocalServer(tmp_path, command_timeout=0).command_timeout == 0.0
    monkeypatch.setenv("CIRCUIT_ATLAS_SERVER_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="CIRCUIT_ATLAS_SERVER_TIMEOUT='soon' is not a number"):
        LocalServer(tmp_path)
