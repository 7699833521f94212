"""Crash mid-write, unreachable server, wrong password, model mismatch, failed writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from graphstore import (
    GraphNotFoundError,
    GraphStore,
    ModelMismatchError,
    StoreAuthError,
    StoreUnavailableError,
    StoreWriteError,
    graph_id,
)
from graphstore.server import free_port
from graphstore.synthetic import synthetic_graph
from tests.graphstore.conftest import assert_graphs_equal, small_graph
from tracer.graph import FEATURE, Graph

HERE = Path(__file__).parent


def _counts(store, gid):
    nodes = store.cypher("MATCH (n:Node {graph: $g}) RETURN count(n)", {"g": gid}).rows[0][0]
    edges = store.cypher(
        "MATCH (a:Node {graph: $g})-[e:EDGE]->() RETURN count(e)", {"g": gid}
    ).rows[0][0]
    return nodes, edges


@pytest.mark.slow
@pytest.mark.faults
def test_killed_writer_leaves_nothing_visible_and_next_write_repairs(store, server_auth, tmp_path):
    seed = 77
    transcoder = f"clt-crash@{uuid.uuid4().hex[:16]}"  # features of this test only
    graph = synthetic_graph(seed, transcoder_name=transcoder)
    gid = graph_id(graph)
    features_before = store.stats()["features"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1])}
    args = [sys.executable, str(HERE / "crash_writer.py"), server_auth["uri"],
            server_auth["user"], server_auth["password"], server_auth["database"],
            str(tmp_path / "crash-archive"), str(seed), "0.3", "150", transcoder]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    try:
        batches = 0
        for line in proc.stdout:
            if line.startswith("BATCH"):
                batches += 1
                if batches == 3:
                    break
        else:
            pytest.fail(f"the writer ended before its third batch (rc {proc.wait()})")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The remains are there (it really was mid-write) ...
    nodes, edges = _counts(store, gid)
    assert nodes == graph.n_nodes and 0 < edges < graph.n_edges
    # ... but nothing is visible.
    assert gid not in store.graph_ids()
    with pytest.raises(GraphNotFoundError):
        store.load(gid)
    assert store.cypher("MATCH (g:Graph {id: $g}) RETURN g.complete", {"g": gid}).rows == [[False]]
    drivers = store.query("similar-graphs", graph=gid)
    assert all(r[0] != gid for r in drivers.rows)
    # Its new features exist but do not count; its claim is left behind.
    new = store.cypher("MATCH (f:Feature {transcoder: $t}) RETURN count(f)", {"t": transcoder})
    assert new.rows[0][0] > 0 and store.stats()["features"] == features_before
    claim = "MATCH (c:WriteClaim {graph: $g}) RETURN count(c)"
    assert store.cypher(claim, {"g": gid}).rows == [[1]]
    # The next write of the same graph breaks the dead writer's claim at once and repairs it:
    # one complete copy, its features counted once.
    t0 = time.monotonic()
    res = store.add(graph)
    assert res.written and res.repaired and time.monotonic() - t0 < 20
    assert _counts(store, gid) == (graph.n_nodes, graph.n_edges)
    assert_graphs_equal(store.load(gid), graph)
    feats = graph.kind == FEATURE
    distinct = set(zip(graph.layer[feats].tolist(), graph.feature[feats].tolist(), strict=True))
    assert store.stats()["features"] == features_before + len(distinct)
    assert store.cypher(claim, {"g": gid}).rows == [[0]]


def test_unreachable_server(tmp_path):
    uri = f"bolt://127.0.0.1:{free_port()}"
    with pytest.raises(StoreUnavailableError, match="cannot reach a graph server"):
        GraphStore(uri, "root", "whatever", archive_dir=tmp_path, connect_timeout=3)


def test_wrong_password(server_auth, tmp_path):
    with pytest.raises(StoreAuthError, match="wrong user or password"):
        GraphStore(server_auth["uri"], "root", "not-the-password", server_auth["database"],
                   archive_dir=tmp_path)  # fmt: skip


def test_model_mismatch_is_refused_and_graph_kept(store):
    g = small_graph(81, model_name="model-A", transcoder_name="clt-of-A@00000000000000aa")
    store.add(g)
    other = small_graph(82, model_name="model-B", transcoder_name="clt-of-A@00000000000000aa")
    with pytest.raises(ModelMismatchError, match="model-B") as err:
        store.add(other)
    path = store.archive.path_for(graph_id(other))
    assert str(path) in str(err.value)
    assert_graphs_equal(Graph.load(path), other)
    assert graph_id(other) not in store.graph_ids()


def test_bound_store_refuses_other_model(server_auth, tmp_path):
    s = GraphStore(**server_auth, archive_dir=tmp_path, model="model-test")
    try:
        g = small_graph(83, model_name="gpt2")
        with pytest.raises(ModelMismatchError, match="gpt2") as err:
            s.add(g)
        path = s.archive.path_for(graph_id(g))
        assert str(path) in str(err.value) and path.exists()
        assert graph_id(g) not in s.graph_ids()
    finally:
        s.close()


def test_failed_database_write_keeps_parquet(store):
    g = small_graph(84)
    store.database = "no_such_database"  # the server refuses every write there
    with pytest.raises(StoreWriteError, match="saved at") as err:
        store.add(g)
    path = store.archive.path_for(graph_id(g))
    assert str(path) in str(err.value)
    assert_graphs_equal(Graph.load(path), g)
