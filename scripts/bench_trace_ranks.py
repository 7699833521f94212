"""Benchmark many-prompt tracing into the graph store: one process vs ``--workers 2`` vs
``torchrun --nproc_per_node 2``, and the two ways ranks could write to one store.

    .venv/bin/python scripts/bench_trace_ranks.py                       # 20 prompts, all runs
    .venv/bin/python scripts/bench_trace_ranks.py --prompts 4 --max-feature-nodes 32   # quick

Runs: ``one`` (one process, torch's default threads: one per core), ``one1`` (one process,
one thread: what each worker and each rank gets on 2 cores), ``workers2`` (``--workers 2``),
``ranks2`` (``torchrun --nproc_per_node 2``, OMP_NUM_THREADS=1 per rank as torchrun sets it).

Trace part: the first ``--prompts`` prompts of ``tracer/data/prompts.jsonl`` traced on
SmolLM2-135M-Instruct with the trained default CLT when it is cached
(``tracer.fetch.default_transcoder_path``), else the benchmarks' random CLT
(``tracer.random_clt.write_random_clt``: 256 features per layer, ~20 active per layer and
token), ``--max-feature-nodes`` as given, ``--store`` into one managed ArcadeDB server
(started before the timings; emptied before each run). Each run is the real command in a
subprocess; recorded: wall seconds of the whole command (interpreter start, model load, server
connection included) and the command's own summary (from planning to the last stored graph).

Writer part: the graphs of the last trace run are written to an emptied store (1) by one
writer, one graph after another (what the rank-0 collector does), and (2) by two writer
processes at once, half each, with the store's retry-on-conflict with backoff (what "every
rank writes its own graphs" would do). Recorded: wall seconds, transaction attempts (a retry
is an attempt beyond one per graph), final counts (checked equal).

Writes ``benchmarks/trace_ranks.json`` and ``benchmarks/trace_ranks.md``. The machine's load
average is recorded with every run: the benchmark host is shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from graphstore import GraphStore, LocalServer  # noqa: E402
from graphstore.server import ROOT_USER, free_port  # noqa: E402

PY = Path(sys.executable)
TORCHRUN = PY.parent / "torchrun"


def pick_clt(work: Path) -> tuple[Path, str]:
    from tracer.fetch import default_transcoder_path

    trained = default_transcoder_path("smollm2")  # the demo's transcoders, when it has trained them
    if (trained / "circuit_atlas.json").exists() or (trained / "config.yaml").exists():
        return trained, f"trained default CLT ({trained})"
    from tracer.random_clt import write_random_clt  # one random-CLT recipe for all benchmarks

    path = write_random_clt(work / "clt-Lall-F256-a20-s0", None, 0, 256, 20.0)
    return path, "random CLT (256 features/layer, ~20 active per layer and token, seed 0)"


def write_prompts(path: Path, n: int) -> list[str]:
    from tracer.prompts import load_prompts

    prompts = [p.prompt for p in load_prompts()[:n]]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return prompts


def empty_store(store: GraphStore) -> None:
    """Every graph, node and feature removed (a fresh database for the next run)."""
    for gid in [r[0] for r in store.cypher("MATCH (g:Graph) RETURN g.id AS id").rows]:
        store.delete(gid)
    with store._session() as s:
        s.run("MATCH (f:Feature) DETACH DELETE f").consume()
        for label in ("Prompt", "Transcoder", "Model"):
            s.run(f"MATCH (x:{label}) DETACH DELETE x").consume()


def trace_run(name: str, cmd: list[str], env: dict, summary: Path) -> dict:
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{name} failed with exit status {proc.returncode}")
    s = json.loads(summary.read_text())
    row = {
        "run": name,
        "command": " ".join(str(c) for c in cmd),
        "graphs": s["traced"],
        "wall_s": round(wall, 1),
        "graphs_per_min_wall": round(60 * s["traced"] / wall, 2),
        "job_s": round(s["seconds"], 1),
        "graphs_per_min_job": round(s["graphs_per_minute"], 2),
        "per_rank": s["per_rank"],
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(row), flush=True)
    return row


# --- writers ----------------------------------------------------------------------------------


def _count_attempts() -> list[int]:
    """Count database write attempts (each call of the transaction body, retries included)."""
    from graphstore import ingest

    box = [0]
    prepare = ingest._prepare

    def counted(tx, rows):
        box[0] += 1
        return prepare(tx, rows)

    ingest._prepare = counted
    return box


def _writer(auth: dict, paths: list[tuple[str, str]], start, out) -> None:
    from tracer.graph import Graph

    attempts = _count_attempts()
    graphs = [(Graph.load(p), Graph.load(f)) for p, f in paths]
    with GraphStore(**auth) as store:
        out.put("ready")
        start.wait()
        t0 = time.perf_counter()
        for g, full in graphs:
            store.add(g, full)
        out.put({"seconds": time.perf_counter() - t0, "attempts": attempts[0]})


def writers_run(auth: dict, paths: list[tuple[str, str]], n_writers: int) -> dict:
    """The graphs written by ``n_writers`` processes at once (graph k by writer k % n)."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(auth, paths[k::n_writers], start, out))
        for k in range(n_writers)
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every writer has connected and loaded its graphs
        assert out.get(timeout=600) == "ready"
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    start.set()
    results = [out.get(timeout=1800) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    attempts = sum(r["attempts"] for r in results)
    return {
        "writers": n_writers,
        "graphs": len(paths),
        "wall_s": round(wall, 2),
        "graphs_per_s": round(len(paths) / wall, 2),
        "attempts": attempts,
        "retries": attempts - len(paths),
        "loadavg_start": [round(x, 2) for x in load0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-feature-nodes", type=int, default=64)
    ap.add_argument(
        "--runs",
        default="one1,workers2,ranks2",
        help="of one (torch's default threads), one1 (1 thread), workers2, ranks2",
    )
    ap.add_argument("--writer-reps", type=int, default=3, help="repetitions of each writer run")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench" / "trace_ranks")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "trace_ranks.json")
    args = ap.parse_args()

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    clt, clt_label = pick_clt(work)
    prompts_file = work / "prompts.jsonl"
    write_prompts(prompts_file, args.prompts)
    home = work / "home"
    env = {**os.environ, "CIRCUIT_ATLAS_HOME": str(home), "PYTHONPATH": str(ROOT)}
    server = LocalServer(home / "store", bolt_port=free_port())
    info = server.start(timeout=300)
    auth = {"uri": info.uri, "user": ROOT_USER, "password": server.password(),
            "database": info.database, "archive_dir": work / "archive"}  # fmt: skip
    common = ["trace", "--prompts", str(prompts_file), "--model", "smollm2",
              "--transcoders", str(clt), "--max-feature-nodes", str(args.max_feature_nodes),
              "--store"]  # fmt: skip
    rows, writers = [], []
    try:
        with GraphStore(**auth) as store:
            last_out = None
            for name in args.runs.split(","):
                empty_store(store)
                out = work / f"graphs-{name}"
                if out.exists():
                    for f in out.iterdir():
                        f.unlink()
                summary = work / f"summary-{name}.json"
                tail = [*common, "--out", str(out), "--summary", str(summary)]
                run_env = env
                if name == "one":  # torch's default threads (one per core)
                    cmd = [str(PY), "-m", "tracer", *tail]
                elif name == "one1":  # one torch thread, as each worker and each rank has
                    cmd = [str(PY), "-m", "tracer", *tail]
                    run_env = {**env, "OMP_NUM_THREADS": "1"}
                elif name == "workers2":
                    cmd = [str(PY), "-m", "tracer", *tail, "--workers", "2"]
                elif name == "ranks2":
                    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "-m", "tracer", *tail]
                else:
                    raise SystemExit(f"unknown run {name!r}: use one, one1, workers2, ranks2")
                rows.append(trace_run(name, cmd, run_env, summary))
                st = store.stats()
                assert st["graphs"] == args.prompts, st
                last_out = summary
            results = json.loads(last_out.read_text())["results"]
            paths = [(r["pruned_path"], r["full_path"]) for r in results]
            counts = None
            for rep in range(args.writer_reps):
                for n in (1, 2):
                    empty_store(store)
                    w = writers_run(auth, paths, n)
                    st = store.stats()
                    assert counts is None or st == counts, (st, counts)
                    counts = st
                    w["rep"] = rep
                    print(json.dumps(w), flush=True)
                    writers.append(w)
            empty_store(store)
    finally:
        server.stop()

    report = {
        "what": "many-prompt tracing into the graph store: 1 process vs --workers 2 vs 2 ranks",
        "model": "smollm2 (SmolLM2-135M-Instruct, 30 layers)",
        "transcoder": clt_label,
        "prompts": args.prompts,
        "prompt_file": "first prompts of tracer/data/prompts.jsonl",
        "max_feature_nodes": args.max_feature_nodes,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "note": "shared with other jobs: see each run's load average",
        },  # fmt: skip
        "command": "python scripts/bench_trace_ranks.py " + " ".join(sys.argv[1:]),
        "trace_runs": rows,
        "writer_runs": writers,
        "store_counts": counts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    md = [
        f"# Many-prompt tracing: 1 process vs --workers 2 vs 2 ranks\n\n`{report['command']}`"
        f"\n\n{args.prompts} prompts, SmolLM2-135M-Instruct, {clt_label}, max_feature_nodes "
        f"{args.max_feature_nodes}, --store (managed ArcadeDB). Machine: {os.cpu_count()} CPU "
        "cores shared with other jobs (load average at start / end of each run).\n",
        "| run | graphs | wall s | graphs/min (wall) | job s | graphs/min (job) | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(f"| {r['run']} | {r['graphs']} | {r['wall_s']} | {r['graphs_per_min_wall']} | "
                  f"{r['job_s']} | {r['graphs_per_min_job']} | {r['loadavg_start'][0]} / "
                  f"{r['loadavg_end'][0]} |")  # fmt: skip
    md += ["", "Writers (the last run's graphs into an emptied store):", "",
           "| writers | rep | graphs | wall s | graphs/s | attempts | retries | load |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for w in writers:
        md.append(f"| {w['writers']} | {w['rep']} | {w['graphs']} | {w['wall_s']} | "
                  f"{w['graphs_per_s']} | {w['attempts']} | {w['retries']} | "
                  f"{w['loadavg_start'][0]} |")  # fmt: skip
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
