"""Memory plans for Gemma-2-2B with published transcoders, from their published shapes.

Arithmetic only (nothing is downloaded or run): ``tracer.attribution.memory.estimate_from_shapes``
plans one attribution for Gemma-2-2B (26 layers, d_model 2304, 8 heads / 4 key-value heads of
256, vocabulary 256,000, two attention-mask kinds) with the GemmaScope width-16k per-layer set,
the 426k CLT and the 2.5M CLT (``transcoders.formats.presets.GEMMA2_2B_SETS``), on an 80 GB GPU
(host
128 GiB) and on this machine's CPU (its total RAM). What stays resident is counted beside the
plan: the model's weights (2,614,341,888 parameters) and the transcoder's encoders, biases and
thresholds (a lazy load keeps decoders on disk and reads rows of active features); on the GPU
they take device memory before attribution starts, on the CPU host memory.

Active features follow from an assumed L0 per layer and token (``--l0``, default 25 and 100:
the published sets' measured L0 is not known here), so each row also gives the active feature
count it planned for. Writes benchmarks/published_memory.{json,md}.

    python scripts/bench_published_memory.py [--tokens 128 1024] [--budget 8192] [--l0 25 100]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from tracer.attribution.memory import GB, ModelShapes, TranscoderShapes, estimate_from_shapes
from transcoders.formats.presets import GEMMA2_2B_SETS

GEMMA2_2B_PARAMS = 2_614_341_888
GPU_BYTES = 80e9  # an 80 GB GPU (H100 / A100 80GB)
GPU_HOST_BYTES = 128 * 2**30
INTERPRETER_BYTES = 0.8e9  # python + torch + transformers imported, before any weights
ITEMSIZE = {"float32": 4, "bfloat16": 2}


def total_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_row(name: str, machine: str, dtype: str, n_tokens: int, budget: int, l0: float) -> dict:
    shape = GEMMA2_2B_SETS[name]
    size = ITEMSIZE[dtype]
    model = ModelShapes(26, 2304, 8, 4, 256, 256_000, 8192, weight_itemsize=size, n_mask_kinds=2)
    tc = TranscoderShapes(shape.n_features, l0=l0, n_targets=shape.n_targets())
    weights = GEMMA2_2B_PARAMS * size
    resident = shape.resident_bytes(size)
    if machine == "gpu-80GB":
        avail_dev = GPU_BYTES - weights - resident
        est = estimate_from_shapes(
            model, tc, n_tokens, budget, device="cuda", available_device_bytes=avail_dev,
            available_host_bytes=GPU_HOST_BYTES - INTERPRETER_BYTES,
            baseline_host_bytes=INTERPRETER_BYTES, find_longest=True,
        )  # fmt: skip
        peak_dev = weights + resident + est.peak_device_bytes
        peak_host = est.peak_host_bytes
        have = GPU_BYTES
    else:
        ram = total_ram()
        base = INTERPRETER_BYTES + weights + resident
        est = estimate_from_shapes(
            model, tc, n_tokens, budget, device="cpu", available_host_bytes=ram - base,
            baseline_host_bytes=base, find_longest=True,
        )  # fmt: skip
        peak_dev = 0
        peak_host = est.peak_host_bytes
        have = ram
    fits_weights = (weights + resident) < (GPU_BYTES if machine == "gpu-80GB" else have)
    return {
        "set": name,
        "repo": shape.repo,
        "machine": machine,
        "dtype": dtype,
        "tokens": n_tokens,
        "budget": budget,
        "l0": l0,
        "total_features": shape.total_features,
        "active_features": est.workload.n_active,
        "model_weights_gb": round(weights / GB, 2),
        "transcoder_resident_gb": round(resident / GB, 2),
        "decoders_on_disk_gb": round(shape.decoder_bytes(size) / GB, 1),
        "attribution_device_gb": round(est.peak_device_bytes / GB, 2),
        "peak_device_gb": round(peak_dev / GB, 2),
        "peak_host_gb": round(peak_host / GB, 2),
        "memory_gb": round(have / GB, 1),
        "row_store": est.row_store_placement,
        "decoder_rows_gb": round(est.decoder_bytes / GB, 2),
        "limiting_part": est.limiting_part,
        "fits": bool(est.fits and fits_weights),
        "suggested_budget": est.suggested_max_feature_nodes if fits_weights else 0,
        "longest_prompt_at_budget": est.longest_prompt if fits_weights else 0,
    }


def table(rows: list[dict]) -> str:
    head = ("| set | machine | dtype | L0 | tokens | active | weights + encoders GB | decoders on "
            "disk GB | active rows GB | rows on | peak device GB | peak host GB | fits (budget) "
            "| budget that fits | longest prompt | limited by |")  # fmt: skip
    out = [head, "|" + "---|" * 16]
    for r in rows:
        out.append(
            f"| {r['set']} | {r['machine']} | {r['dtype']} | {r['l0']:g} | {r['tokens']} | "
            f"{r['active_features']:,} | {r['model_weights_gb']} + {r['transcoder_resident_gb']}"
            f" | {r['decoders_on_disk_gb']} | {r['decoder_rows_gb']} | {r['row_store']} | "
            f"{r['peak_device_gb']} | {r['peak_host_gb']} | "
            f"{'yes' if r['fits'] else 'no'} ({r['budget']:,}) | {r['suggested_budget']:,} | "
            f"{r['longest_prompt_at_budget']:,} | {r['limiting_part']} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--budget", type=int, default=8192, help="--max-feature-nodes planned for")
    ap.add_argument("--l0", type=float, nargs="+", default=[25.0, 100.0],
                    help="active features per layer and token (assumed)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("benchmarks/published_memory.json"))
    args = ap.parse_args()
    rows = []
    runs = [("gpu-80GB", "bfloat16"), ("this-cpu", "bfloat16"), ("this-cpu", "float32")]
    for name in GEMMA2_2B_SETS:
        for machine, dtype in runs:
            for l0 in args.l0:
                for n in args.tokens:
                    rows.append(plan_row(name, machine, dtype, n, args.budget, l0))
                    print(json.dumps(rows[-1]), flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    command = "python scripts/bench_published_memory.py " + " ".join(sys.argv[1:])
    doc = {
        "what": "memory plans (arithmetic, tracer.attribution.memory.estimate_from_shapes) for "
        "Gemma-2-2B with published transcoders, from their published shapes",
        "commit": commit,
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "ram_gb": round(total_ram() / GB, 1), "gpu": "planned: 80 GB, host 128 GiB"},
        "assumptions": {
            "l0": args.l0, "interpreter_gb": INTERPRETER_BYTES / GB,
            "gemma2_2b_parameters": GEMMA2_2B_PARAMS,
            "sets": {k: v.note for k, v in GEMMA2_2B_SETS.items()},
        },
        "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    md = [
        "# Memory plans: Gemma-2-2B with published transcoders",
        "",
        f"Commit {commit}, {doc['date']}, `{doc['command']}`; arithmetic from published shapes "
        f"(nothing downloaded or run). This CPU: {doc['machine']['cpus']} cores, "
        f"{doc['machine']['ram_gb']} GB RAM (shared). L0: assumed active features per layer "
        "and token; budget = --max-feature-nodes; active rows: the active features' decoder "
        "rows the plan holds. Weights + encoders: what a lazy load "
        "keeps resident (decoders stay on disk, read by rows of active features). Peak device "
        "includes them on the GPU; peak host includes them on the CPU.",
        "",
        table(rows),
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    print(table(rows))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
