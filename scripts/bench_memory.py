"""Benchmark attribution's memory plan on SmolLM2-135M: predicted against measured peak memory,
a lazily loaded wide CLT, and long prompts.

    .venv/bin/python scripts/bench_memory.py                       # every case
    .venv/bin/python scripts/bench_memory.py --cases est32,est128  # some of them

Cases (each one attribution in its own subprocess, so that its peak is its own):

- ``est32``, ``est128``, ``est256``: the estimator at three prompt lengths (the first 32 / 128 /
  256 tokens of ``bench_attribution.LONG_TEXT``), the benchmarks' random CLT (256 features per
  layer, about 20 active per layer and token), budget 1024;
- ``long256``: 256 tokens with budget 4096 and batch 1024 (bench_attribution's ``long256``);
- ``lazy4096``: a random CLT of 4,096 features per layer (decoders 4.4 GB in float32), written to
  disk and loaded lazily, a 32-token prompt, budget 1024;
- ``long1024``: 1,024 tokens (``LONG_TEXT`` repeated) with the budget the estimator suggests for
  the memory limit given by ``--long-limit-gb`` (default: what the machine has available).

Recorded per case: resident memory after the model load and after the transcoder load, the
predicted peak of the plan the attribution followed (``graph.extra["memory_estimate"]``; the
estimate made before the run with ``estimate_memory`` and the prompt, what ``trace --estimate``
shows, is kept as ``estimate_before_run``: at a budget on the edge of what fits it can place the
rows elsewhere, since it sees the memory available before the prompt is recorded), the measured
peak of the attribution (VmHWM, reset at each of its phases: ``memory_phases``, beside the plan's
parts in ``plan_parts_mb``), their ratio, wall and CPU seconds, nodes, edges, and the
transcoder's decoder rows read. Writes ``benchmarks/memory.json`` (cases run
separately are merged) and prints a markdown table. The load average is recorded with each case.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from proc_stats import cpu_s, hwm_mb, reset_peak_rss, rss_mb  # noqa: E402


@dataclass
class Case:
    name: str
    n_tokens: int
    features: int
    max_feature_nodes: int | None  # None: the estimator's suggestion
    batch_size: int = 1024


CASES = {
    "est32": Case("est32", 32, 256, 1024),
    "est128": Case("est128", 128, 256, 1024),
    "est256": Case("est256", 256, 256, 1024),
    "long256": Case("long256", 256, 256, 4096),
    "lazy4096": Case("lazy4096", 32, 4096, 1024),
    "long1024": Case("long1024", 1024, 256, None),
}


def prompt_ids(n_tokens: int) -> list[int]:
    from bench_attribution import LONG_TEXT

    from tracer.model import LanguageModel

    m = LanguageModel.load("smollm2")
    ids = m.tokenize(LONG_TEXT).tolist()
    while len(ids) < n_tokens:  # repeat the text (without its start token) to the length asked
        ids += m.tokenize(" " + LONG_TEXT).tolist()[1:]
    return ids[:n_tokens]


# The memory plan's parts (MemoryEstimate.<part>_bytes), recorded beside the measured phases.
PLAN_PARTS = ("state", "record_peak", "decoder", "writer", "row_store", "sweep", "influence",
              "assembly", "baseline_host")  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    """One attribution: model and transcoder loaded, estimate, measured peak."""
    import torch

    from tracer.attribution import attribute, estimate_memory
    from tracer.model import LanguageModel
    from tracer.replacement import ReplacementModel
    from transcoders.formats import load_transcoder

    torch.set_num_threads(args.threads)
    rss0 = rss_mb()
    model = LanguageModel.load("smollm2")
    gc.collect()
    rss_model = rss_mb()
    clt = load_transcoder(args.clt_dir, model=model, lazy=True)
    rss_clt = rss_mb()
    tokens = torch.tensor([int(t) for t in args.tokens.split(",")], dtype=torch.long)
    limit = args.limit_gb * 1e9 if args.limit_gb else None
    opts = {"available_host_bytes": int(limit)} if limit else {}
    t_est = time.perf_counter()
    est = estimate_memory(model, clt, tokens, args.budget, batch_size=args.batch_size, **opts)
    est_s = time.perf_counter() - t_est
    budget = args.budget if args.budget is not None else est.suggested_max_feature_nodes
    if args.budget is None:  # the plan for the suggested budget
        est = estimate_memory(model, clt, tokens, budget, batch_size=args.batch_size, **opts)
    rm = ReplacementModel(model, clt, exclude_bos=True)
    rows_read = _count_rows(clt)
    gc.collect()
    rss_before = rss_mb()
    reset = reset_peak_rss()
    c0, t0 = cpu_s(), time.perf_counter()
    g = attribute(
        rm, tokens, max_feature_nodes=budget, batch_size=args.batch_size, progress=False,
        memory_limit_gb=args.limit_gb, profile_memory=True,
    )  # fmt: skip
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    phases = g.extra.get("memory_phases") or []
    # Each phase's peak (the high-water mark is reset at every phase boundary); the run's peak
    # is the largest of them.
    peak = max((ph["host_peak_mb"] for ph in phases), default=hwm_mb() if reset else float("nan"))
    share = causal_share(rm, tokens, g)
    # The prediction is the plan the run followed: at a budget on the edge of what fits, the
    # estimate above (made before the prompt was recorded) may place the rows elsewhere.
    ran = g.extra["memory_estimate"]
    info = {
        "rss_start_mb": round(rss0, 1),
        "rss_after_model_mb": round(rss_model, 1),
        "rss_after_transcoder_mb": round(rss_clt, 1),
        "rss_before_attribution_mb": round(rss_before, 1),
        "estimate_s": round(est_s, 2),
        "predicted_peak_mb": round(ran["peak_host_bytes"] / 2**20, 1),
        "predicted_row_store_mb": round(ran["row_store_bytes"] / 2**20, 1),
        "row_store_buffer_mb": round(est.row_store_buffer_bytes / 2**20, 1),
        "row_store_placement": ran["row_store_placement"],
        "estimate_before_run": {
            "peak_mb": round(est.peak_host_bytes / 2**20, 1),
            "row_store_placement": est.row_store_placement,
        },
        # The causal rows actually stored, and their share of the full-width buffer.
        "row_store_used_mb": round(g.extra["row_store_bytes"] / 2**20, 1),
        "feature_row_causal_share": round(share, 3),  # memory.CAUSAL_SHARE's measurement
        "row_store_used_share": round(g.extra["row_store_bytes"] / est.row_store_buffer_bytes, 3),
        "measured_peak_mb": round(peak, 1),
        "predicted_over_measured": round(ran["peak_host_bytes"] / 2**20 / peak, 3),
        "peak_above_model_mb": round(peak - rss_model, 1),
        "suggested_max_feature_nodes": est.suggested_max_feature_nodes,
        "max_feature_nodes": budget,
        "limit_gb": args.limit_gb,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "n_active_features": int(g.params["n_active_features"]),
        "n_nodes": int(len(g.kind)),
        "n_edges": int(len(g.weight)),
        "decoder_rows_read": (counts := rows_read())["rows"],
        "whole_decoders_read": counts["whole_decoders"],
        "decoder_rows_total": int(clt.cfg.n_features * clt.cfg.n_layers),
        "memory_plan": g.extra.get("memory_plan"),
        "memory_phases": phases,
        "plan_parts_mb": {k: round(getattr(est, f"{k}_bytes") / 2**20, 1) for k in PLAN_PARTS},
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(info))


def causal_share(rm, tokens, g) -> float:
    """Mean share of the active features that a kept feature's row can receive from (earlier
    or same position, lower layer): what ``CAUSAL_SHARE`` in the memory plan stands for."""
    import numpy as np

    from tracer.graph import FEATURE

    state = rm.record(tokens)
    pos, lay = state.feat_pos.cpu().numpy(), state.feat_layer.cpu().numpy()
    feats = np.where(g.kind == FEATURE)[0]
    kept = [int(((pos <= g.position[i]) & (lay < g.layer[i])).sum()) for i in feats]
    return float(np.mean(kept)) / len(pos) if kept else 0.0


def _count_rows(clt):
    """Count the distinct decoder rows (source layer, feature) the transcoder reads from here
    on, and the whole decoders it opens (a lazy decoder read in full)."""
    read: set[tuple[int, int]] = set()
    whole: list[int] = []
    rows, full = clt.decoder_rows, clt.decoder

    def counted(layer, idx, *a, **k):
        read.update((int(layer), int(i)) for i in idx.reshape(-1).tolist())
        return rows(layer, idx, *a, **k)

    def counted_full(layer, *a, **k):
        whole.append(int(layer))
        return full(layer, *a, **k)

    clt.decoder_rows, clt.decoder = counted, counted_full
    return lambda: {"rows": len(read), "whole_decoders": len(whole)}


def run_case(case: Case, args, work: Path) -> dict:
    from tracer.random_clt import write_random_clt as make_clt

    clt_dir = make_clt(
        work / f"clt-Lall-F{case.features}-a20-s0", None, 0, case.features, 20.0, "smollm2"
    )
    ids = prompt_ids(case.n_tokens)
    cmd = [
        sys.executable, __file__, "--worker", "--clt-dir", str(clt_dir),
        "--tokens", ",".join(map(str, ids)), "--batch-size", str(case.batch_size),
        "--threads", str(args.threads),
    ]  # fmt: skip
    if case.max_feature_nodes is not None:
        cmd += ["--budget", str(case.max_feature_nodes)]
    if case.name == "long1024" and args.long_limit_gb:
        cmd += ["--limit-gb", str(args.long_limit_gb)]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    log = work / f"{case.name}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{case.name} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info.update(
        case=case.name, n_tokens=case.n_tokens, features_per_layer=case.features,
        batch_size=case.batch_size, process_wall_s=round(time.perf_counter() - t0, 1),
        loadavg_start=[round(x, 2) for x in load0],
        loadavg_end=[round(x, 2) for x in os.getloadavg()],
    )  # fmt: skip
    return info


def table(rows: list[dict]) -> str:
    out = [
        "| case | tokens | features/layer | budget | predicted peak MB | measured peak MB "
        "| predicted/measured | peak above model MB | wall s | rows read / total | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['n_tokens']} | {r['features_per_layer']} "
            f"| {r['max_feature_nodes']} | {r['predicted_peak_mb']:.0f} "
            f"| {r['measured_peak_mb']:.0f} | {r['predicted_over_measured']:.2f} "
            f"| {r['peak_above_model_mb']:.0f} | {r['wall_s']:.0f} "
            f"| {r['decoder_rows_read']:,} / {r['decoder_rows_total']:,} "
            f"| {r['loadavg_start'][0]:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "memory.json")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench" / "attribution")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long-limit-gb", type=float, default=None,
                    help="memory limit the long1024 budget is planned for")  # fmt: skip
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--clt-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--limit-gb", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}: choose from {', '.join(CASES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        print(f"[{name}] ...", flush=True)
        rows.append(run_case(CASES[name], args, args.work))
        print("  " + json.dumps({k: rows[-1][k] for k in (
            "predicted_peak_mb", "measured_peak_mb", "predicted_over_measured", "wall_s",
            "max_feature_nodes")}), flush=True)  # fmt: skip
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    # A case is replaced by a new run of itself under the same memory limit (long1024 is
    # recorded once per --long-limit-gb).
    new_keys = {(r["case"], r.get("limit_gb")) for r in rows}
    kept = [r for r in old.get("cases", []) if (r["case"], r.get("limit_gb")) not in new_keys]
    doc = {
        "what": "attribution memory plan against measured peak RSS, SmolLM2-135M, random CLTs",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": "cpu"},
        "command": "python scripts/bench_memory.py " + " ".join(sys.argv[1:]),
        "runs": [*old.get("runs", []), "python scripts/bench_memory.py " + " ".join(sys.argv[1:])],
        "cases": kept + rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(table(doc["cases"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
