#!/usr/bin/env python
"""Graph-store benchmark: ingest N realistic synthetic pruned graphs (SmolLM2-sized: a few
hundred nodes and a few thousand edges each, features from a shared Zipf-skewed vocabulary),
then time every canned query. Writes a JSON file and prints a markdown table.

    .venv/bin/python scripts/bench_store.py --graphs 1000 --out benchmarks/store.json

By default a fresh managed ArcadeDB server is started in a temporary folder (and stopped at
the end); ``--uri`` benchmarks a running server instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from graphstore import GraphStore, LocalServer, graph_id  # noqa: E402
from graphstore.server import ROOT_USER, free_port  # noqa: E402
from graphstore.synthetic import synthetic_graph  # noqa: E402
from tracer.graph import FEATURE, LOGIT, TOKEN  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def query_cases(graphs, rng: random.Random, n: int) -> dict[str, list[dict]]:
    """``n`` parameter sets per canned query, drawn from the stored graphs."""
    cases: dict[str, list[dict]] = {k: [] for k in (
        "recurring-features", "feature-feeds", "token-to-logit-paths", "token-drivers",
        "similar-graphs")}  # fmt: skip
    tc = graphs[0].transcoder_name
    for _ in range(n):
        g = rng.choice(graphs)
        cases["recurring-features"].append({"min_prompts": rng.choice([2, 5, 10]), "limit": 20})
        # An edge between two features of this graph: F feeding G.
        fe = [k for k in range(g.n_edges)
              if g.kind[g.source[k]] == FEATURE and g.kind[g.target[k]] == FEATURE]  # fmt: skip
        k = rng.choice(fe)
        s, t = int(g.source[k]), int(g.target[k])
        cases["feature-feeds"].append({
            "source_layer": int(g.layer[s]), "source_index": int(g.feature[s]),
            "target_layer": int(g.layer[t]), "target_index": int(g.feature[t]),
            "transcoder": tc, "limit": 100})  # fmt: skip
        logits = g.feature[g.kind == LOGIT].tolist()
        tok = int(rng.choice(np.flatnonzero(g.kind == TOKEN).tolist()))
        cases["token-to-logit-paths"].append({
            "graph": graph_id(g), "position": int(g.position[tok]),
            "logit": int(rng.choice(logits)), "max_hops": 4, "limit": 10})  # fmt: skip
        cases["token-drivers"].append({"logit": int(rng.choice(logits)), "limit": 20})
        cases["similar-graphs"].append({"graph": graph_id(g), "limit": 10})
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--graphs", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=30, help="timed runs per canned query")
    ap.add_argument("--out", default="benchmarks/store.json")
    ap.add_argument("--uri", default=None, help="benchmark this server (default: a fresh one)")
    ap.add_argument("--user", default=None)
    ap.add_argument("--password", default=None)
    ap.add_argument("--database", default=None)
    ap.add_argument("--heap", default="4g", help="Java heap of the fresh server")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    load_at_start = os.getloadavg()
    tmp = tempfile.TemporaryDirectory(prefix="bench-store-")
    server = None
    if args.uri is None:
        server = LocalServer(Path(tmp.name) / "store", bolt_port=free_port(), heap=args.heap)
        info = server.start(timeout=300)
        uri, user, password, database = info.uri, ROOT_USER, server.password(), info.database
    else:
        uri, user, password, database = args.uri, args.user, args.password, args.database
    try:
        store = GraphStore(uri, user, password, database, archive_dir=Path(tmp.name) / "archive")
        t0 = time.perf_counter()
        graphs = [synthetic_graph(args.seed * 1_000_000 + i) for i in range(args.graphs)]
        gen_s = time.perf_counter() - t0
        n_nodes = [g.n_nodes for g in graphs]
        n_edges = [g.n_edges for g in graphs]
        print(f"{len(graphs)} synthetic graphs in {gen_s:.1f} s: nodes median "
              f"{statistics.median(n_nodes):.0f}, edges median {statistics.median(n_edges):.0f}, "
              f"total edges {sum(n_edges):,}", flush=True)  # fmt: skip

        t0 = time.perf_counter()
        c0 = time.process_time()
        results = store.add_many(graphs)
        ingest_s = time.perf_counter() - t0
        client_cpu = time.process_time() - c0
        assert all(r.written for r in results)
        per_graph = [r.seconds for r in results]
        stats = store.stats()
        assert stats["graphs"] == len(graphs) and stats["edges"] == sum(n_edges), stats

        rng = random.Random(args.seed)
        cases = query_cases(graphs, rng, args.reps)
        timings: dict[str, dict] = {}
        for name, params in cases.items():
            store.query(name, **params[0])  # warm-up (plan cache, page cache)
            ms, rows = [], []
            for p in params:
                t = time.perf_counter()
                res = store.query(name, **p)
                ms.append((time.perf_counter() - t) * 1e3)
                rows.append(len(res.rows))
            timings[name] = {
                "median_ms": round(statistics.median(ms), 2),
                "p95_ms": round(percentile(ms, 95), 2),
                "max_ms": round(max(ms), 2),
                "runs": len(ms),
                "mean_rows": round(statistics.mean(rows), 1),
            }
            print(f"  {name}: median {timings[name]['median_ms']} ms, "
                  f"p95 {timings[name]['p95_ms']} ms", flush=True)  # fmt: skip
        store.close()
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()

    report = {
        "graphs": len(graphs),
        "nodes_total": int(sum(n_nodes)),
        "edges_total": int(sum(n_edges)),
        "nodes_per_graph_median": float(statistics.median(n_nodes)),
        "edges_per_graph_median": float(statistics.median(n_edges)),
        "features_distinct": int(stats["features"]),
        "ingest_seconds": round(ingest_s, 2),
        "ingest_edges_per_s": round(sum(n_edges) / ingest_s, 1),
        "ingest_graph_seconds_median": round(statistics.median(per_graph), 4),
        "ingest_graph_seconds_p95": round(percentile(per_graph, 95), 4),
        "client_cpu_seconds": round(client_cpu, 2),
        "queries": timings,
        "goals": {"ingest_edges_per_s": 20000, "query_p95_ms": 500},
        "server": "managed ArcadeDB (arcadedb-embedded)" if server else uri,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": os.getloadavg(),
        },  # fmt: skip
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    ok_ingest = report["ingest_edges_per_s"] >= 20000
    print()
    print(f"| measure ({len(graphs)} graphs, {report['edges_total']:,} edges) | value | goal |")
    print("|---|---|---|")
    print(f"| ingest | {report['ingest_edges_per_s']:,.0f} edges/s | >= 20,000 "
          f"{'(met)' if ok_ingest else '(missed)'} |")  # fmt: skip
    for name, t in timings.items():
        met = "(met)" if t["p95_ms"] <= 500 else "(missed)"
        print(f"| `{name}` median / p95 | {t['median_ms']:.0f} / {t['p95_ms']:.0f} ms "
              f"| p95 <= 500 ms {met} |")  # fmt: skip
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
