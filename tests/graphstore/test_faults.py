"""Fault injection (marker ``faults``): the server killed mid-write, two commands starting the
store at once in a fresh home, an orphaned server adopted, the port probe, two writers of the
same large graph with a reader polling, a read-only or full archive folder, corrupt files
through every command that reads one. The killed writer is in test_failures.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from graphstore import GraphStore, LocalServer, graph_id
from graphstore.server import ROOT_USER, find_servers, free_port, port_is_free
from graphstore.synthetic import synthetic_graph
from tests.graphstore.conftest import assert_graphs_equal, small_graph
from tests.graphstore.test_graph_validation import CASES, _edge_row, _rewrite, _set
from tracer.cli import main
from tracer.graph import FEATURE

pytestmark = pytest.mark.faults

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-c", "import sys; from tracer.cli import main; sys.exit(main())"]


def _writer(auth: dict, archive: Path, seed: int, pause=0.3, batch=150, transcoder=None):
    args = [sys.executable, str(HERE / "crash_writer.py"), auth["uri"], auth["user"],
            auth["password"], auth["database"], str(archive), str(seed), str(pause),
            str(batch)]  # fmt: skip
    if transcoder is not None:
        args.append(transcoder)
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)  # fmt: skip


def _read_until(proc, prefix: str, count: int = 1) -> list[str]:
    """Lines of ``proc`` up to its ``count``-th line starting with ``prefix``."""
    lines, seen = [], 0
    for line in proc.stdout:
        lines.append(line.strip())
        if line.startswith(prefix):
            seen += 1
            if seen == count:
                return lines
    pytest.fail(f"the writer ended before {count} {prefix} lines (rc {proc.wait()}): "
                f"{lines} {proc.stderr.read()[-2000:]}")  # fmt: skip


def _graph_counts(store, gid):
    nodes = store.cypher("MATCH (n:Node {graph: $g}) RETURN count(n)", {"g": gid}).rows[0][0]
    edges = store.cypher(
        "MATCH (a:Node {graph: $g})-[e:EDGE]->() RETURN count(e)", {"g": gid}
    ).rows[0][0]
    return nodes, edges


def _distinct_features(graph) -> int:
    feats = graph.kind == FEATURE
    return len(set(zip(graph.layer[feats].tolist(), graph.feature[feats].tolist(), strict=True)))


# --- the managed server ----------------------------------------------------------------------


def test_port_probe_accepts_a_port_in_time_wait_and_refuses_a_listened_one():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.listen()
    assert not port_is_free(port)  # something listens: taken
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server side closes first: its end of the connection lingers in TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    plain = socket.socket()
    try:
        plain.bind(("127.0.0.1", port))  # a probe without SO_REUSEADDR: the old false positive
        lingering = False
    except OSError:
        lingering = True
    finally:
        plain.close()
    if not lingering:
        pytest.skip("this kernel left no TIME_WAIT connection on the port to probe against")
    assert port_is_free(port)  # the server (SO_REUSEADDR) can bind it, so the probe agrees


@pytest.mark.slow
def test_two_starts_at_once_in_a_fresh_home_share_one_server_and_it_is_never_orphaned(tmp_path):
    home = tmp_path / "fresh" / "store"
    start = [*CLI, "store", "start", "--home", str(home), "--heap", "512m"]
    procs = [subprocess.Popen(start, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV) for _ in range(2)]  # fmt: skip
    try:
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        servers = find_servers(home)
        assert len(servers) == 1, servers  # one server process for the home
        pid = servers[0].pid
        words = Counter(o.splitlines()[0].split(":")[0] for o, _ in outs)
        assert words == {"graph store started": 1, "graph store already running": 1}, outs
        assert all(f"(pid {pid})" in o for o, _ in outs)
        log = (home / "server.log").read_text()
        assert "is locked by another process" not in log

        # server.json lost (a starter killed, a file removed): the server is adopted.
        (home / "server.json").unlink()
        st = LocalServer(home).status()
        assert st["running"] and st["pid"] == pid and st["answering"], st
        out = subprocess.run([*CLI, "store", "status", "--home", str(home)], capture_output=True,
                             text=True, env=ENV, timeout=120)  # fmt: skip
        assert out.returncode == 0 and f"pid {pid}" in out.stdout, out
        info = LocalServer(home).start(timeout=120)  # no second server
        assert info.pid == pid and [s.pid for s in find_servers(home)] == [pid]

        # An asked-for port is never replaced: a clear error, nothing started.
        other = free_port()
        out = subprocess.run([*start, "--port", str(other)], capture_output=True, text=True,
                             env=ENV, timeout=120)  # fmt: skip
        assert out.returncode == 2 and f"not on the asked-for port {other}" in out.stderr, out
        assert len(out.stderr.strip().splitlines()) == 1
        assert [s.pid for s in find_servers(home)] == [pid]
    finally:
        for p in procs:
            p.kill()
        LocalServer(home).stop()
    assert find_servers(home) == [] and not (home / "server.json").exists()


@pytest.mark.slow
def test_server_killed_mid_write_leaves_nothing_visible_and_a_rewrite_repairs(tmp_path):
    home = tmp_path / "store"
    port = free_port()
    server = LocalServer(home, bolt_port=port, heap="512m")
    info = server.start(timeout=180)
    auth = {"uri": info.uri, "user": ROOT_USER, "password": server.password(),
            "database": info.database}  # fmt: skip
    seed = 79
    graph = synthetic_graph(seed)
    gid = graph_id(graph)
    writer = _writer(auth, tmp_path / "archive", seed)
    try:
        _read_until(writer, "BATCH", 2)
        os.kill(info.pid, signal.SIGKILL)
        os.waitpid(info.pid, 0)  # our child: reap it
        _, err = writer.communicate(timeout=120)
        assert writer.returncode not in (0, None), err  # the writer saw the server die
    finally:
        writer.kill()
        writer.wait()
    restarted = LocalServer(home, bolt_port=port, heap="512m")
    try:
        again = restarted.start(timeout=180)  # the same asked-for port: the probe accepts it
        assert again.pid != info.pid and again.bolt_port == port
        with GraphStore(**auth, archive_dir=tmp_path / "archive") as store:
            assert gid not in store.graph_ids()
            assert store.cypher("MATCH (g:Graph {id: $g}) RETURN g.complete",
                                {"g": gid}).rows in ([], [[False]])  # fmt: skip
            raw = store.cypher("MATCH (f:Feature) RETURN count(f)").rows[0][0]
            assert raw > 0 and store.stats()["features"] == 0  # created, not counted
            res = store.add(graph)  # the dead writer's claim is broken at once
            assert res.written and res.repaired
            assert _graph_counts(store, gid) == (graph.n_nodes, graph.n_edges)
            assert_graphs_equal(store.load(gid), graph)
            st = store.stats()
            assert (st["graphs"], st["features"]) == (1, _distinct_features(graph))
            assert st["edges"] == graph.n_edges
    finally:
        restarted.stop()
    assert find_servers(home) == []


# --- writers ---------------------------------------------------------------------------------


def test_two_writers_of_one_large_graph_one_copy_exact_counters_never_seen_incomplete(
    store, server_auth, tmp_path
):
    seed = 81
    transcoder = f"clt-race@{uuid.uuid4().hex[:16]}"  # features of this test only
    graph = synthetic_graph(seed, transcoder_name=transcoder)
    gid = graph_id(graph)
    n, e = graph.n_nodes, graph.n_edges
    assert e > 10 * 250  # more than ten edge batches of the writers below
    seen, errors, stop = [], [], threading.Event()
    complete_q = (
        "MATCH (g:Graph {id: $g}) WHERE g.complete = true MATCH (a:Node {graph: $g}) "
        "OPTIONAL MATCH (a)-[x:EDGE]->() RETURN count(DISTINCT a) AS nodes, count(x) AS edges"
    )

    def reader():
        while not stop.is_set():
            try:
                rows = store.cypher(complete_q, {"g": gid}).rows
                remains = _graph_counts(store, gid)
                seen.append((rows[0] if rows and rows[0][0] else None, remains))
            except Exception as err:  # noqa: BLE001 - every failure is a finding
                errors.append(repr(err))
            time.sleep(0.02)

    poll = threading.Thread(target=reader, daemon=True)
    poll.start()
    first = _writer(server_auth, tmp_path / "a", seed, 0.15, 250, transcoder)
    second = None
    try:
        _read_until(first, "BATCH", 1)  # the first writer holds the claim, mid-write
        second = _writer(server_auth, tmp_path / "b", seed, 0.15, 250, transcoder)
        outs = [p.communicate(timeout=180) for p in (first, second)]
    finally:
        stop.set()
        poll.join(timeout=30)
        for p in (first, second):
            if p is not None:
                p.kill()
                p.wait()
    assert [first.returncode, second.returncode] == [0, 0], outs
    done = sorted(o.strip().splitlines()[-1] for o, _ in outs)
    assert done == ["DONE skipped", "DONE written"], outs
    assert "WAIT" in outs[1][0]  # the second waited on the first's claim
    assert errors == []
    visible = [c for c, _ in seen if c is not None]
    assert all(c == [n, e] for c in visible), visible  # complete means all of it
    assert any(c is None and 0 < r[0] for c, r in seen)  # polled while it was being written
    assert visible, "the reader never saw the graph complete"
    # One copy, read back equal.
    assert store.cypher("MATCH (g:Graph {id: $g}) RETURN count(g)", {"g": gid}).rows == [[1]]
    assert _graph_counts(store, gid) == (n, e)
    assert_graphs_equal(store.load(gid), graph)
    # Counters exact: each feature counted once, computed from the graph itself.
    feats = np.flatnonzero(graph.kind == FEATURE)
    want = Counter(zip(graph.layer[feats].tolist(), graph.feature[feats].tolist(), strict=True))
    got = store.cypher(
        "MATCH (f:Feature {transcoder: $t}) RETURN f.layer, f.index, f.graphs, f.prompts, f.nodes",
        {"t": transcoder}, max_rows=0,
    ).rows  # fmt: skip
    assert {(r[0], r[1]): (r[2], r[3], r[4]) for r in got} == {
        k: (1, 1, c) for k, c in want.items()
    }
    assert store.cypher("MATCH (c:WriteClaim {graph: $g}) RETURN count(c)", {"g": gid}).rows == [
        [0]
    ]


# --- the archive folder ----------------------------------------------------------------------


def _conn(auth, tmp_path):
    return ["--uri", auth["uri"], "--user", auth["user"], f"--password={auth['password']}",
            "--database", auth["database"], "--home", str(tmp_path / "unused")]  # fmt: skip


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                           capture_output=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _add_refused(store, auth, tmp_path, capsys, folder: Path, why: str, path=None):
    g = small_graph(611)
    path = path or g.save(tmp_path / "in" / "g.parquet")
    before = store.graph_ids()
    rc = main(["store", "add", str(path), *_conn(auth, tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and str(folder) in err and why in err, err
    assert store.graph_ids() == before and graph_id(g) not in before
    assert store.cypher("MATCH (x:Graph {id: $g}) RETURN count(x)",
                        {"g": graph_id(g)}).rows == [[0]]  # fmt: skip


def test_read_only_archive_folder_is_named(store, server_auth, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CIRCUIT_ATLAS_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "graphs"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.touch()
            probe.unlink()
            pytest.skip("this user writes into a mode-555 folder (root): see the tmpfs test")
        except PermissionError:
            pass
        _add_refused(store, server_auth, tmp_path, capsys, folder, "Permission denied")
    finally:
        folder.chmod(0o755)


def test_read_only_and_full_tmpfs_archive_folder_is_named(
    store, server_auth, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("CIRCUIT_ATLAS_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "graphs"
    if not _mount_tmpfs(folder, "size=64k,ro"):
        pytest.skip("mounting a tmpfs is not allowed here (needs root or CAP_SYS_ADMIN)")
    try:
        _add_refused(store, server_auth, tmp_path, capsys, folder, "ead-only")
    finally:
        subprocess.run(["umount", str(folder)], check=True, timeout=30)
    assert _mount_tmpfs(folder, "size=16k")
    try:
        filler = folder / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill it to the last byte
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        _add_refused(store, server_auth, tmp_path, capsys, folder, "No space left")
        assert sorted(p.name for p in folder.iterdir()) == ["filler"]  # no partial file
    finally:
        subprocess.run(["umount", str(folder)], check=True, timeout=30)


def test_write_error_of_any_archive_folder_is_named(
    store, server_auth, tmp_path, capsys, monkeypatch
):
    """Where neither a mode-555 folder (root) nor a tmpfs mount (no CAP_SYS_ADMIN) can make
    the disk fail, the writer fails as pyarrow does on a full disk, mid-file."""
    import errno

    import pyarrow.parquet as pq

    monkeypatch.setenv("CIRCUIT_ATLAS_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "graphs"
    real = pq.write_table

    def full(table, where, **kw):
        real(table.slice(0, 1), where, **kw)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    path = small_graph(611).save(tmp_path / "in" / "g.parquet")
    monkeypatch.setattr(pq, "write_table", full)
    _add_refused(store, server_auth, tmp_path, capsys, folder, "No space left", path)
    assert list(folder.iterdir()) == []  # the partial file was removed


# --- corrupt files through the commands that read them ---------------------------------------


CORRUPT = {
    "missing metadata key": CASES["missing metadata key"],
    "missing column": CASES["missing column"],
    "NaN weight": CASES["NaN weight"],
    "out-of-range index": ("source332", "has source 332, outside the"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_file_is_one_line_exit_2_and_stores_nothing(
    store, server_auth, tmp_path, capsys, case
):
    good_graph = small_graph(621)
    good = good_graph.save(tmp_path / "good.parquet")
    g = small_graph(622)
    src = g.save(tmp_path / "src.parquet")
    how, expected = CORRUPT[case]
    if how == "nan":
        how = dict(table=lambda t: _set(t, "weight", _edge_row(g, 3), float("nan")))
    elif how == "source332":
        how = dict(table=lambda t: _set(t, "source", _edge_row(g, 1), 332))
    bad = _rewrite(src, tmp_path / "bad.parquet", **how)
    archive = tmp_path / "home" / "graphs"
    before = store.graph_ids()
    commands = {
        "store add": ["store", "add", str(good), str(bad), *_conn(server_auth, tmp_path)],
        "report": ["report", str(good), str(bad), "--out", str(tmp_path / "reports"),
                   "--no-png"],
        "validate": ["validate", str(bad), "--transcoders", str(tmp_path / "no-clt")],
        "serve --graphs": ["serve", "--graphs", str(bad.parent), "--port", str(free_port())],
    }  # fmt: skip
    env = {"CIRCUIT_ATLAS_HOME": str(tmp_path / "home")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for name, argv in commands.items():
            rc = main(argv)
            err = capsys.readouterr().err.strip()
            assert rc == 2, (name, err)
            assert len(err.splitlines()) == 1, (name, err)
            assert str(bad) in err and expected in err, (name, err)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # Nothing written: the good file named first was not stored or archived, no report.
    assert store.graph_ids() == before and graph_id(good_graph) not in before
    assert not archive.exists() or list(archive.iterdir()) == []
    reports = tmp_path / "reports"
    assert not reports.exists() or list(reports.iterdir()) == []


# --- the claim's rules -----------------------------------------------------------------------


def _plant_claim(store, gid: str, **fields) -> None:
    claim = {"graph": gid, "owner": "someone", "host": "elsewhere", "pid": 1, "pid_start": 0,
             "heartbeat": time.time(), **fields}  # fmt: skip
    with store._session() as s:
        s.run("CREATE (c:WriteClaim) SET c = $c", c=claim).consume()


def test_claim_of_a_dead_local_writer_is_broken_at_once(store):
    g = small_graph(631)
    gid = graph_id(g)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    _plant_claim(store, gid, host=socket.gethostname(), pid=int(dead.stdout))
    t0 = time.monotonic()
    res = store.add(g)  # the fast path sees the claim, so it takes the claim path
    assert res.written and time.monotonic() - t0 < 10
    assert gid in store.graph_ids()
    assert store.cypher("MATCH (c:WriteClaim {graph: $g}) RETURN count(c)", {"g": gid}).rows == [
        [0]
    ]


def test_claim_elsewhere_is_waited_on_until_its_heartbeat_is_stale(store, monkeypatch):
    from graphstore import ingest

    g = small_graph(632)
    gid = graph_id(g)
    _plant_claim(store, gid)  # a live writer on another host, as far as anyone can tell
    monkeypatch.setattr(ingest, "CLAIM_STALE_S", 1.5)
    waits = []
    rows = ingest.graph_rows(g, gid, None)
    t0 = time.monotonic()
    with store._session() as s:
        res = ingest.write_rows(s, rows, on_wait=waits.append)
    waited = time.monotonic() - t0
    assert res.written and len(waits) == 1 and waits[0]["host"] == "elsewhere"
    assert waited >= 1.0  # it waited for the heartbeat to go stale, then broke the claim
    assert gid in store.graph_ids()


def test_stored_nodes_carry_influence_for_sorting(store):
    g = small_graph(641)
    rng = np.random.default_rng(0)
    g.extra["influence"] = rng.random(g.n_nodes).tolist()
    gid = graph_id(g)
    store.add(g)
    res = store.cypher(
        "MATCH (n:Node {graph: $g}) RETURN n.i, n.influence ORDER BY n.influence DESC LIMIT 5",
        {"g": gid},
    )
    want = np.argsort(-np.asarray(g.extra["influence"]), kind="stable")[:5]
    assert [r[0] for r in res.rows] == want.tolist()
    np.testing.assert_allclose([r[1] for r in res.rows], np.asarray(g.extra["influence"])[want])
    assert_graphs_equal(store.load(gid), g)


def test_writer_whose_claim_was_broken_stops_and_never_completes(store, monkeypatch):
    from graphstore import ingest

    transcoder = f"clt-lost@{uuid.uuid4().hex[:16]}"
    g = synthetic_graph(651, transcoder_name=transcoder)
    gid = graph_id(g)
    monkeypatch.setattr(ingest, "EDGE_BATCH", 400)  # several batches
    rows = ingest.graph_rows(g, gid, None)
    batches = []

    def progress(done, total):
        batches.append(done)
        if len(batches) == 1:  # another writer judged this one dead and took over
            with store._session() as other:
                other.run("MATCH (c:WriteClaim {graph: $g}) DELETE c", g=gid).consume()

    with store._session() as s, pytest.raises(ingest.ClaimLostError, match=gid):
        ingest.write_rows(s, rows, progress=progress)
    assert len(batches) == 1  # nothing written after the claim was lost
    assert gid not in store.graph_ids()
    counted = store.cypher(
        "MATCH (f:Feature {transcoder: $t}) RETURN sum(f.graphs)", {"t": transcoder}
    ).rows[0][0]
    assert counted == 0
    res = store.add(g)  # the next writer repairs it
    assert res.written and res.repaired and _graph_counts(store, gid) == (g.n_nodes, g.n_edges)
