"""Long prompts on SmolLM2-135M with the benchmarks' random CLT: the arithmetic memory plan's
time and memory at long lengths, and prompts traced end to end.

    .venv/bin/python scripts/bench_long_prompts.py                     # estimates: 1k/4k/8k
    .venv/bin/python scripts/bench_long_prompts.py --tokens 2048       # + 2,048 traced
    .venv/bin/python scripts/bench_long_prompts.py --tokens 4096 --estimate-tokens ""

Each measurement runs in its own subprocess (its peak is its own):

- ``estimate``: ``estimate_memory`` from the prompt's tokens alone (arithmetic: the transcoder's
  L0, measured once by an encoder pass on the first 256 tokens and passed as ``l0``), at each
  of ``--estimate-tokens``; recorded: its wall time, the process's peak resident memory (model
  and CLT loaded: what ``trace --estimate`` holds) and the part above the loaded model, the
  predicted peak of the trace, the longest prompt that fits at the budget and what limits it;
- ``trace``: ``attribute`` at ``--tokens`` with ``--budget`` feature rows (default 2,048), the
  attention patterns recomputed (``patterns=auto``), ``profile_memory`` on; recorded: wall and
  CPU time, the measured peak (VmHWM per phase), the plan's prediction (the arithmetic one
  made before the run and the one the run followed), nodes and edges.

The prompt is ``bench_attribution.LONG_TEXT`` repeated to the length asked. The random CLT
(256 features per layer, about 20 active per layer and token) is built once under ``--work``.
Writes ``benchmarks/long_prompts.json`` (runs of the same case and length are replaced) and
``benchmarks/long_prompts.md``. The load average is recorded with each case: the machine is
shared, so wall times vary with it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: shared helpers
from proc_stats import cpu_s, hwm_mb, reset_peak_rss, rss_mb  # noqa: E402

FEATURES, ACTIVE = 256, 20.0  # the benchmarks' random CLT (tracer.random_clt)


def prompt_ids(n_tokens: int) -> list[int]:
    from bench_memory import prompt_ids as ids

    return ids(n_tokens)


def _load(args):
    import torch

    from tracer.model import LanguageModel
    from transcoders.formats import load_transcoder

    torch.set_num_threads(args.threads)
    model = LanguageModel.load("smollm2")
    clt = load_transcoder(args.clt_dir, model=model, lazy=True)
    return model, clt


def worker_estimate(args) -> dict:
    """The arithmetic plan of one length, timed, with the process's peak memory."""
    from tracer.attribution import estimate_memory

    model, clt = _load(args)
    rss_loaded = rss_mb()
    tokens = prompt_ids(args.n_tokens)
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    est = estimate_memory(model, clt, _tensor(tokens), args.budget, l0=args.l0)
    wall = time.perf_counter() - t0
    peak = hwm_mb() if reset else float("nan")
    return {
        "estimate_s": round(wall, 3),
        "process_peak_mb": round(peak, 1),
        "rss_loaded_mb": round(rss_loaded, 1),
        "estimate_above_loaded_mb": round(peak - rss_loaded, 1),
        "counted": est.workload.counted,
        "n_active_features": est.workload.n_active,
        "predicted_peak_mb": round(est.peak_host_bytes / 2**20, 1),
        "fits": est.fits,
        "suggested_max_feature_nodes": est.suggested_max_feature_nodes,
        "pattern_placement": est.pattern_placement,
        "row_store_placement": est.row_store_placement,
        "longest_prompt": est.longest_prompt,
        "limiting_part": est.limiting_part,
        "plan": est.lines(),
    }


def _tensor(ids):
    import torch

    return torch.tensor(ids, dtype=torch.long)


def worker_trace(args) -> dict:
    """One attribution of ``n_tokens`` at ``budget``, measured."""
    from tracer.attribution import attribute, estimate_memory
    from tracer.replacement import ReplacementModel

    model, clt = _load(args)
    rss_loaded = rss_mb()
    tokens = _tensor(prompt_ids(args.n_tokens))
    before = estimate_memory(model, clt, tokens, args.budget, l0=args.l0)
    rm = ReplacementModel(model, clt, exclude_bos=True)
    c0, t0 = cpu_s(), time.perf_counter()
    g = attribute(rm, tokens, max_feature_nodes=args.budget, batch_size=args.batch_size,
                  progress=True, profile_memory=True, memory_limit_gb=args.limit_gb,
                  spill_dir=args.spill_dir)  # fmt: skip
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    phases = g.extra.get("memory_phases") or []
    peak = max((ph["host_peak_mb"] for ph in phases), default=float("nan"))
    ran = g.extra["memory_estimate"]
    return {
        "rss_loaded_mb": round(rss_loaded, 1),
        "arithmetic_predicted_peak_mb": round(before.peak_host_bytes / 2**20, 1),
        "arithmetic_n_active_features": before.workload.n_active,
        "predicted_peak_mb": round(ran["peak_host_bytes"] / 2**20, 1),
        "measured_peak_mb": round(peak, 1),
        "predicted_over_measured": round(ran["peak_host_bytes"] / 2**20 / peak, 3),
        "arithmetic_over_measured": round(before.peak_host_bytes / 2**20 / peak, 3),
        "row_store_placement": ran["row_store_placement"],
        "row_store_used_mb": round(g.extra["row_store_bytes"] / 2**20, 1),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "timing_s": g.extra.get("timing_s"),
        "n_active_features": int(g.params["n_active_features"]),
        "max_feature_nodes": int(g.params["max_feature_nodes"] or g.params["n_active_features"]),
        "n_nodes": int(len(g.kind)),
        "n_edges": int(len(g.weight)),
        "scores": g.scores,
        "memory_plan": g.extra.get("memory_plan"),
        "memory_phases": phases,
    }


def measured_l0(args) -> float:
    """Mean active features per layer and token of the CLT on the first 256 tokens of the
    prompt (one encoder pass): the L0 the arithmetic estimate is given."""
    from tracer.attribution.memory import workload_from_prompt

    model, clt = _load(args)
    w = workload_from_prompt(model, clt, _tensor(prompt_ids(256)))
    return w.n_active / (w.n_layers * (w.n_tokens - 1))


def run_worker(kind: str, n_tokens: int, args, l0: float) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", kind, "--clt-dir", str(args.clt_dir),
        "--n-tokens", str(n_tokens), "--budget", str(args.budget), "--l0", repr(l0),
        "--threads", str(args.threads), "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    if args.limit_gb:
        cmd += ["--limit-gb", str(args.limit_gb)]
    if args.spill_dir:
        cmd += ["--spill-dir", str(args.spill_dir)]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    log = args.work / f"{kind}-{n_tokens}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {n_tokens} failed ({proc.returncode}):\n"
                         f"{log.read_text()[-3000:]}")  # fmt: skip
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info.update(
        case=kind, n_tokens=n_tokens, budget=args.budget, l0_given=round(l0, 3),
        process_wall_s=round(time.perf_counter() - t0, 1),
        loadavg_start=[round(x, 2) for x in load0],
        loadavg_end=[round(x, 2) for x in os.getloadavg()],
    )  # fmt: skip
    return info


def markdown(doc: dict) -> str:
    est = [r for r in doc["cases"] if r["case"] == "estimate"]
    tr = [r for r in doc["cases"] if r["case"] == "trace"]
    out = [
        "# Long prompts (SmolLM2-135M, the benchmarks' random CLT: 256 features/layer)",
        "",
        f"Commit {doc['commit']}, {doc['date']}, {doc['machine']['cpus']} CPUs "
        f"({doc['machine']['platform']}), CPU only. Command: `{doc['command']}`. "
        "Written by scripts/bench_long_prompts.py.",
        "",
        "## `--estimate` (arithmetic: tokens, shapes, L0, budget)",
        "",
        "| tokens | budget | estimate s | process peak MB | above loaded model+CLT MB "
        "| predicted trace peak MB | patterns | longest prompt at budget | limit | load |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in sorted(est, key=lambda r: r["n_tokens"]):
        out.append(
            f"| {r['n_tokens']} | {r['budget']} | {r['estimate_s']:.3f} "
            f"| {r['process_peak_mb']:.0f} | {r['estimate_above_loaded_mb']:.0f} "
            f"| {r['predicted_peak_mb']:.0f} | {r['pattern_placement']} "
            f"| {r['longest_prompt']} | {r['limiting_part']} | {r['loadavg_start'][0]:.1f} |"
        )
    if tr:
        out += [
            "",
            "## Traced end to end",
            "",
            "| tokens | budget | active features | wall s | CPU s | measured peak MB "
            "| predicted (plan run) MB | arithmetic before MB | rows on | edges | load |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
        ]
        for r in sorted(tr, key=lambda r: r["n_tokens"]):
            out.append(
                f"| {r['n_tokens']} | {r['max_feature_nodes']} | {r['n_active_features']:,} "
                f"| {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['measured_peak_mb']:.0f} "
                f"| {r['predicted_peak_mb']:.0f} ({r['predicted_over_measured']:.2f}x) "
                f"| {r['arithmetic_predicted_peak_mb']:.0f} "
                f"({r['arithmetic_over_measured']:.2f}x) | {r['row_store_placement']} "
                f"| {r['n_edges']:,} | {r['loadavg_start'][0]:.1f} |"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimate-tokens", default="1024,4096,8192",
                    help="lengths to estimate (comma-separated; empty: none)")  # fmt: skip
    ap.add_argument("--tokens", default="", help="lengths to trace end to end (comma-separated)")
    ap.add_argument("--budget", type=int, default=2048, help="feature budget")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--limit-gb", type=float, default=None,
                    help="memory the trace plans for (rows spill to disk beyond it)")  # fmt: skip
    ap.add_argument("--spill-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "long_prompts.json")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench" / "attribution")
    ap.add_argument("--worker", choices=("estimate", "trace", "l0"), help=argparse.SUPPRESS)
    ap.add_argument("--clt-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n-tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--l0", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = {"estimate": worker_estimate, "trace": worker_trace,
              "l0": lambda a: {"l0": measured_l0(a)}}[args.worker]  # fmt: skip
        print(json.dumps(fn(args)))
        return
    from tracer.random_clt import write_random_clt

    args.work.mkdir(parents=True, exist_ok=True)
    args.clt_dir = write_random_clt(args.work / f"clt-Lall-F{FEATURES}-a20-s0", None, 0,
                                    FEATURES, ACTIVE, "smollm2")  # fmt: skip
    l0 = run_worker("l0", 256, args, 0.0)["l0"]
    print(f"measured L0 {l0:.2f} (256 tokens, one encoder pass)", flush=True)
    lengths = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    rows = []
    for n in lengths(args.estimate_tokens):
        rows.append(run_worker("estimate", n, args, l0))
        print(f"[estimate {n}] " + json.dumps({k: rows[-1][k] for k in (
            "estimate_s", "process_peak_mb", "predicted_peak_mb", "longest_prompt",
            "limiting_part")}), flush=True)  # fmt: skip
    for n in lengths(args.tokens):
        rows.append(run_worker("trace", n, args, l0))
        print(f"[trace {n}] " + json.dumps({k: rows[-1][k] for k in (
            "wall_s", "measured_peak_mb", "predicted_peak_mb", "arithmetic_predicted_peak_mb",
            "n_edges")}), flush=True)  # fmt: skip
        _write(args, rows)  # a long trace's result is kept as soon as it is there
    _write(args, rows)


def _write(args, rows: list[dict]) -> None:
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    new = {(r["case"], r["n_tokens"]) for r in rows}
    kept = [r for r in old.get("cases", []) if (r["case"], r["n_tokens"]) not in new]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    command = "python scripts/bench_long_prompts.py " + " ".join(sys.argv[1:])
    doc = {
        "what": "long prompts: arithmetic memory plan and end-to-end traces, SmolLM2-135M, "
        "random CLT (256 features/layer, ~20 active per layer and token)",
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": "cpu"},
        "command": command,
        "runs": old.get("runs", [])
        + ([] if old.get("runs", [None])[-1:] == [command] else [command]),
        "cases": kept + rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    main()
