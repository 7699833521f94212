"""``circuit-atlas store|query|cypher`` against the test server, and the managed server's
lifecycle through the CLI (start survives the command, status, idempotent start, stop)."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from graphstore import graph_id
from tests.graphstore.conftest import small_graph
from tracer.cli import main

ROOT = Path(__file__).parents[2]


def _conn(auth, tmp_path):
    return ["--uri", auth["uri"], "--user", auth["user"], f"--password={auth['password']}",
            "--database", auth["database"], "--home", str(tmp_path / "unused")]  # fmt: skip


def test_query_and_cypher_formats(store, server_auth, tmp_path, capsys):
    g = small_graph(91)
    store.add(g)
    expected = store.query("recurring-features", min_prompts=1, limit=5)
    assert main(["query", "recurring-features", "--min-prompts", "1", "--limit", "5",
                 "--format", "json", *_conn(server_auth, tmp_path)]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out) == expected.records()

    q = "MATCH (n:Node {graph: $g}) RETURN n.i AS i, n.kind AS kind ORDER BY i LIMIT 4"
    assert main(["cypher", q, "--param", f"g={graph_id(g)}", "--format", "csv",
                 *_conn(server_auth, tmp_path)]) == 0  # fmt: skip
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["i", "kind"]
    assert rows[1:] == [[str(i), "feature"] for i in range(4)]

    assert main(["cypher", q, "--param", f"g={graph_id(g)}", *_conn(server_auth, tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["i", "kind"] and "(4 rows)" in out


def test_cypher_write_is_refused(server_auth, tmp_path, capsys):
    rc = main(["cypher", "MATCH (g:Graph) DETACH DELETE g", *_conn(server_auth, tmp_path)])
    assert rc == 2
    assert "read-only" in capsys.readouterr().err


def test_store_add_and_export(server_auth, tmp_path, capsys):
    g = small_graph(92)
    src = g.save(tmp_path / "g.parquet")
    assert main(["store", "add", str(src), *_conn(server_auth, tmp_path)]) == 0
    assert graph_id(g) in capsys.readouterr().out
    out = tmp_path / "back.parquet"
    assert main(["store", "export", graph_id(g), str(out), *_conn(server_auth, tmp_path)]) == 0
    from tests.graphstore.conftest import assert_graphs_equal
    from tracer.graph import Graph

    assert_graphs_equal(Graph.load(out), g)


def _cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "tracer", *args], capture_output=True, text=True, env=env,
        cwd=ROOT, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_store_start_status_stop_lifecycle(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIRCUIT_ATLAS_HOME", str(tmp_path / "home"))
    env = dict(os.environ)
    home = tmp_path / "home" / "store"
    assert main(["store", "status"]) == 0
    assert "not running" in capsys.readouterr().out
    try:
        port = str(__import__("graphstore").server.free_port())
        # In a child process: the server must outlive the command that started it.
        r = _cli("store", "start", "--port", port, "--heap", "512m", env=env)
        assert r.returncode == 0, r.stderr
        assert "started" in r.stdout and f"bolt://127.0.0.1:{port}" in r.stdout
        assert main(["store", "status", "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["running"] and st["answering"] and st["bolt_port"] == int(port)
        assert st["database"] == "atlas"
        assert stat.S_IMODE((home / "password").stat().st_mode) == 0o600
        assert main(["store", "start"]) == 0  # idempotent
        assert "already running" in capsys.readouterr().out
        assert main(["store", "status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["pid"] == st["pid"]
        # The default store (no URI) connects to it.
        assert main(["cypher", "RETURN 1 AS one", "--format", "json"]) == 0
        assert json.loads(capsys.readouterr().out) == [{"one": 1}]
    finally:
        assert main(["store", "stop"]) == 0
    assert "stopped" in capsys.readouterr().out
    assert main(["store", "status"]) == 0
    assert "not running" in capsys.readouterr().out
