#!/usr/bin/env python
"""Bounded user queries on the managed ArcadeDB server: does a timed-out query stop on the
server? Loads a few SmolLM2-sized synthetic graphs into a fresh managed server (temporary
folder, stopped at the end), then runs the issue's pathological query
``MATCH (a)-[*1..6]-(b) RETURN count(*)`` three ways, sampling the server process's own CPU
time (/proc/PID/stat) once a second:

1. ``GraphStore.cypher(q, timeout=T)``: time to the error, the server's CPU while the query
   ran and after the error, and the latency of a canned query run meanwhile;
2. the driver's transaction timeout alone (``neo4j.Query(q, timeout=T)``, what Neo4j
   enforces): is the query still running on the server 3 T seconds later?
3. a client killed (SIGKILL) while its unbounded query runs: the server's CPU after the kill,
   until its command ceiling (``--ceiling`` seconds) stops the query;
4. ``GraphStore.cypher(q, timeout=0)`` (no client bound): the error the ceiling gives.

    .venv/bin/python scripts/bench_query_bounds.py --out benchmarks/query_bounds.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import neo4j  # noqa: E402

from graphstore import GraphStore, LocalServer, QueryTimeoutError, StoreError  # noqa: E402
from graphstore.server import ROOT_USER, free_port, process_cpu_seconds  # noqa: E402
from graphstore.synthetic import synthetic_graph  # noqa: E402

QUERY = "MATCH (a)-[*1..6]-(b) RETURN count(*) AS paths"
FIND = (
    "SHOW TRANSACTIONS YIELD transactionId, currentQuery "
    "WHERE currentQuery CONTAINS $f RETURN transactionId"
)


class CpuSampler:
    """The server's CPU rate (cores) in 1-second windows, from a background thread."""

    def __init__(self, pid: int):
        self.pid, self.samples, self._stop = pid, [], threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        c, t = process_cpu_seconds(self.pid), time.monotonic()
        while not self._stop.wait(1.0):
            c2, t2 = process_cpu_seconds(self.pid), time.monotonic()
            self.samples.append((round(t2 - self._t0, 2), round((c2 - c) / (t2 - t), 3)))
            c, t = c2, t2

    def stop(self) -> list:
        self._stop.set()
        self._thread.join()
        return self.samples

    def at(self) -> float:
        return time.monotonic() - self._t0


def running(store: GraphStore) -> list[str]:
    with store._session() as s:
        return [r["transactionId"] for r in s.run(FIND, f="[*1..6]")]


def wait_for(pred, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def first_idle_after(samples, t: float, idle: float = 0.05):
    """Seconds after ``t`` at which a 1-second window first used at most ``idle`` cores."""
    for at, rate in samples:
        if at > t and rate <= idle:
            return round(at - t, 2)
    return None


def settle(pid: int, idle: float = 0.05, limit: float = 120.0) -> float:
    """Wait until the server is idle (background work after ingest done); seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        c = process_cpu_seconds(pid)
        time.sleep(1.0)
        if process_cpu_seconds(pid) - c <= idle:
            break
    return round(time.monotonic() - t0, 1)


def bench_timeout(store, pid, timeout: float) -> dict:
    settled = settle(pid)
    cpu = CpuSampler(pid)
    time.sleep(2.0)  # idle baseline
    t_start = cpu.at()
    box: dict = {}

    def run():
        try:
            store.cypher(QUERY, timeout=timeout)
        except QueryTimeoutError as err:
            box["error"] = str(err)
        box["at"] = cpu.at()

    worker = threading.Thread(target=run)
    worker.start()
    wait_for(lambda: running(store), timeout)
    t0 = time.perf_counter()
    canned = store.query("recurring-features", min_prompts=2, limit=20)
    canned_s = time.perf_counter() - t0
    canned_during = worker.is_alive()
    worker.join()
    gone = wait_for(lambda: not running(store), 10.0)
    time.sleep(8.0)
    samples = cpu.stop()
    busy = [r for at, r in samples if t_start + 1 < at <= box["at"]]
    return {
        "settled_before_s": settled,
        "timeout_s": timeout,
        "error": box.get("error"),
        "time_to_error_s": round(box["at"] - t_start, 3),
        "server_cores_while_running": round(sum(busy) / max(1, len(busy)), 3),
        "transaction_gone_after_error_s": None if gone is None else round(gone, 3),
        "server_idle_after_error_s": first_idle_after(samples, box["at"]),
        "canned_recurring_features_s": round(canned_s, 3),
        "canned_rows": len(canned.rows),
        "canned_completed_while_query_ran": canned_during,
        "cpu_samples": samples,
    }


def bench_tx_timeout_only(store, info, password, timeout: float) -> dict:
    """The driver's transaction timeout alone, no termination by the client."""
    box: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            with neo4j.GraphDatabase.driver(info.uri, auth=(ROOT_USER, password)) as d:
                with d.session(database=info.database) as s:
                    s.run(neo4j.Query(QUERY, timeout=timeout)).consume()
            box["outcome"] = "completed"
        except neo4j.exceptions.Neo4jError as err:
            box["outcome"] = f"{err.code}: {err.message}"
        box["s"] = time.monotonic() - t0

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    wait_for(lambda: running(store), timeout)
    time.sleep(3 * timeout)
    still = running(store)
    with store._session() as s:  # clean up
        if still:
            s.run("TERMINATE TRANSACTIONS $ids", ids=still).consume()
    worker.join(10)
    return {
        "tx_timeout_s": timeout,
        "still_running_after_s": 3 * timeout,
        "still_running": bool(still),
        "client_outcome": box.get("outcome"),
    }


def bench_killed_client(store, pid, args, env) -> dict:
    """An unbounded query whose client is killed: the server's CPU until its ceiling."""
    settle(pid)
    cpu = CpuSampler(pid)
    # A bare Bolt client (what `circuit-atlas cypher` holds while it waits), without this
    # package's timeout: it is killed mid-query, as in the issue.
    code = (
        "import sys, neo4j; "
        "d = neo4j.GraphDatabase.driver(sys.argv[1], auth=('root', sys.argv[2])); "
        f"d.session(database=sys.argv[3]).run({QUERY!r}).consume()"
    )
    t_start = cpu.at()
    child = subprocess.Popen(
        [sys.executable, "-c", code, store.uri, args["password"], store.database], env=env
    )
    wait_for(lambda: running(store), 120)
    time.sleep(1.0)
    child.send_signal(signal.SIGKILL)
    child.wait()
    t_kill = cpu.at()
    gone = wait_for(lambda: not running(store), args["ceiling"] + 20)
    time.sleep(5.0)
    samples = cpu.stop()
    after_kill = [r for at, r in samples if t_kill + 1 < at <= t_kill + 5]
    return {
        "server_ceiling_s": args["ceiling"],
        "killed_after_s": round(t_kill - t_start, 2),
        "server_cores_in_4_s_after_kill": round(sum(after_kill) / max(1, len(after_kill)), 3),
        "query_gone_after_kill_s": None if gone is None else round(gone, 2),
        "server_idle_after_kill_s": first_idle_after(samples, t_kill),
        "cpu_samples": samples,
    }


def bench_ceiling_error(store, pid) -> dict:
    settle(pid)
    t0 = time.monotonic()
    try:
        store.cypher(QUERY, timeout=0)
        error = None
    except StoreError as err:
        error = f"{type(err).__name__}: {err}"
    return {"error": error, "time_to_error_s": round(time.monotonic() - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--graphs", type=int, default=5, help="synthetic SmolLM2-sized graphs")
    ap.add_argument("--timeout", type=float, default=3.0, help="the user query's timeout, s")
    ap.add_argument("--ceiling", type=float, default=15.0, help="the server's ceiling, s")
    ap.add_argument("--out", default="benchmarks/query_bounds.json")
    args = ap.parse_args()
    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-bounds-") as tmp:
        server = LocalServer(
            Path(tmp) / "store", bolt_port=free_port(), heap="1g", command_timeout=args.ceiling
        )
        info = server.start(timeout=180)
        password = server.password()
        try:
            with GraphStore(
                info.uri, ROOT_USER, password, info.database, archive_dir=Path(tmp) / "g"
            ) as store:
                store.add_many([synthetic_graph(s) for s in range(args.graphs)])
                stats = store.stats()
                print(f"stored {stats}", flush=True)
                out = {"timeout": bench_timeout(store, info.pid, args.timeout)}
                load["after_timeout"] = os.getloadavg()
                print(json.dumps({k: v for k, v in out["timeout"].items() if k != "cpu_samples"}))
                out["tx_timeout_only"] = bench_tx_timeout_only(store, info, password, args.timeout)
                print(json.dumps(out["tx_timeout_only"]), flush=True)
                env = dict(os.environ, PYTHONPATH=str(ROOT))
                out["killed_client"] = bench_killed_client(
                    store,
                    info.pid,
                    {"password": password, "ceiling": args.ceiling},
                    env,
                )
                k = out["killed_client"]
                print(json.dumps({k2: v for k2, v in k.items() if k2 != "cpu_samples"}))
                out["ceiling_error"] = bench_ceiling_error(store, info.pid)
                print(json.dumps(out["ceiling_error"]), flush=True)
        finally:
            server.stop()
    load["end"] = os.getloadavg()
    out.update(
        query=QUERY,
        store=stats,
        server="managed ArcadeDB (arcadedb-embedded), 1 GB heap",
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
        load_average_1_5_15=load,
        command=" ".join(["scripts/bench_query_bounds.py", *sys.argv[1:]]),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
