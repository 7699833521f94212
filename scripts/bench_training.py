"""Benchmark transcoder training on this machine: harvest and training throughput, and the
quality the default SmolLM2 recipe reaches in its time budget.

    .venv/bin/python scripts/bench_training.py [--budget-minutes 20] [--out DIR] [-- extra
        `transcoders train` options]

Trains with ``circuit-atlas transcoders train`` (default recipe), saves the CLT to
``$CIRCUIT_ATLAS_HOME/transcoders/smollm2-clt-default`` and writes
``benchmarks/training.json`` and ``benchmarks/training.md`` (per-layer NMSE, L0, dead fraction;
spliced KL, top-1 agreement, CE loss recovered; tokens/s). Goal for the default recipe: mean
NMSE <= 0.25, mean L0 <= 64, dead fraction <= 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = {"nmse": 0.25, "l0": 64, "dead": 0.05}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-minutes", type=float, default=20.0)
    ap.add_argument(
        "--out", help="weights folder (default: <cache>/transcoders/smollm2-clt-default)"
    )
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "training"))
    ap.add_argument("extra", nargs="*", help="more `transcoders train` options (after --)")
    args = ap.parse_args()

    from tracer.cli import build_parser
    from tracer.cli.train_cmd import run_training
    from tracer.fetch import cache_root

    out = Path(args.out) if args.out else cache_root() / "transcoders" / "smollm2-clt-default"
    argv = [
        "transcoders",
        "train",
        "--model",
        "smollm2",
        "--corpus",
        "public",
        "--budget-minutes",
        str(args.budget_minutes),
        "--out",
        str(out),
        *args.extra,
    ]
    targs = build_parser().parse_args(argv)
    load0 = os.getloadavg()
    t0 = time.time()
    result, out = run_training(targs)
    wall = time.time() - t0
    m = result.metrics
    import torch

    report = {
        "command": "circuit-atlas " + " ".join(argv),
        "weights": str(out),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": load0,
            "load_average_end": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "wall_seconds": round(wall, 1),
        "steps": m.get("steps"),
        "harvest_tokens_per_s": m.get("harvest_tokens_per_s"),
        "train_tokens_per_s": m.get("train_tokens_per_s"),
        "recipe": result.clt.cfg.training.get("recipe"),
        "metrics": {k: v for k, v in m.items()},
        "goal": GOAL,
        "goal_met": {
            "nmse": m["nmse"] <= GOAL["nmse"],
            "l0": m["l0"] <= GOAL["l0"],
            "dead": m["dead_heldout"] <= GOAL["dead"],
        },
    }
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(report, indent=2))
    res.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    m = r["metrics"]
    sp = m.get("spliced", {})
    rec = r["recipe"] or {}
    lines = [
        "## Transcoder training benchmark (default SmolLM2 recipe)",
        "",
        f"`{r['command']}`",
        "",
        f"- recipe: {rec.get('kind')} {rec.get('activation')} k={rec.get('topk')}, "
        f"{rec.get('n_features')} features/layer, batch {rec.get('batch_tokens')} tokens, "
        f"lr {rec.get('lr')}, buffer {rec.get('buffer_tokens')} tokens x "
        f"{rec.get('passes')} passes",
        f"- machine: {r['machine']['cpus']} CPUs, {r['machine']['torch_threads']} torch threads, "
        f"load average at start {r['machine']['load_average_start'][0]:.1f} (shared machine)",
        f"- wall time {r['wall_seconds'] / 60:.1f} min, {r['steps']} steps; harvest "
        f"{r['harvest_tokens_per_s']:.0f} tokens/s, training {r['train_tokens_per_s'] or 0:.0f} "
        "tokens/s",
        f"- held-out: mean NMSE **{m['nmse']:.3f}**, mean L0 **{m['l0']:.1f}**, dead (never "
        f"fired on held-out) **{m['dead_heldout']:.1%}**",
        f"- spliced (all 30 MLPs replaced, BOS kept): KL **{sp.get('kl', float('nan')):.3f}** "
        f"nats, top-1 agreement **{sp.get('top1', float('nan')):.1%}**, CE clean "
        f"{sp.get('ce_clean', float('nan')):.3f} / spliced {sp.get('ce_spliced', float('nan')):.3f}"
        f" / MLPs zeroed {sp.get('ce_ablated', float('nan')):.3f}, CE loss recovered "
        f"{sp.get('ce_recovered', float('nan')):.1%}",
        f"- goal (NMSE <= {GOAL['nmse']}, L0 <= {GOAL['l0']}, dead <= {GOAL['dead']:.0%}): "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in r["goal_met"].items()),
        "",
        "| layer | NMSE | L0 | dead (held-out) |",
        "|---:|---:|---:|---:|",
    ]
    for i, (n, l0, d) in enumerate(
        zip(m["nmse_per_layer"], m["l0_per_layer"], m["dead_heldout_per_layer"], strict=True)
    ):
        lines.append(f"| {i} | {n:.3f} | {l0:.1f} | {d:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
