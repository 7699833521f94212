"""Benchmark exact attribution on SmolLM2-135M with a random CLT, side by side with circuit-tracer.

    .venv/bin/python scripts/bench_attribution.py                      # all SmolLM2 cases
    .venv/bin/python scripts/bench_attribution.py --cases dallas --n-layers 4   # quick check
    .venv/bin/python scripts/bench_attribution.py --setup-ct           # create the ct venv first
    .venv/bin/python scripts/bench_attribution.py --skip-ct --device cuda --dtype bfloat16
    .venv/bin/python scripts/bench_attribution.py --cases gemma3 --skip-ct \
        --out benchmarks/attribution_ours_gemma3.json                  # Gemma-3-270M, ours only

The ``gemma3`` case traces the Dallas prompt through all 18 layers of Gemma-3-270M (built from
its PyPI package) with a random CLT made the same way for that model; ours only.

Each case runs each engine in its own subprocess (so peak resident memory is per engine and
per graph): ours through ``tracer.attribution.attribute`` under this interpreter, and
circuit-tracer 0.5.0 through ``scripts/bench_ct_runner.py`` under a separate virtual
environment (``--ct-venv``; never a dependency of circuit-atlas). Both engines read the same
model folder, the same CLT files (written here in circuit-tracer's layout from a fixed seed)
and the same token ids, with the same conventions:

- the start token is position 0; features at position 0 are not nodes (circuit-tracer zeroes
  them; ours: ``ReplacementModel(exclude_bos=True)``);
- circuit-tracer also zeroes the error vectors at position 0, so its 30 start-position error
  nodes have no edges, while ours keep that position's MLP output (minus the decoder bias) in
  them. Those columns are compared separately (``bos_error_*``); every other edge must agree;
- the CLT reads the MLP's actual input (after its norm and gain): circuit-tracer hook
  ``mlp.hook_in``, our site ``mlp_in``; it writes ``hook_mlp_out``;
- logit targets: top logits until cumulative probability 0.95, at most 10 (both defaults);
- with a feature budget, both re-rank features by estimated influence after every 256 rows
  (circuit-tracer: batch 64 x update_interval 4; ours: ``batch_size`` 256 for that case).

Writes ``benchmarks/attribution.json`` (per case and engine: wall seconds per graph, process CPU
seconds, peak RSS MB, nodes, edges; per case the edge comparison) and prints a markdown table.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from proc_stats import cpu_s, hwm_mb, peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CT_VERSION = "0.5.0"
CT_TORCH = "2.13.0"
PROMPTS = {
    "dallas": "The capital of the state containing Dallas is",
}
LONG_TEXT = (
    "The history of the river valley is a long one. Farmers came first, clearing the forest "
    "along the banks and planting wheat and barley in the dark soil. Later, traders arrived "
    "with boats that carried salt, cloth and iron tools from the coast. Small villages grew "
    "into market towns, and the towns built bridges, mills and churches. In the spring the "
    "river often flooded, and the people learned to build their houses on higher ground. "
    "Over the centuries the valley saw wars, plagues and good harvests, and each generation "
    "left its mark on the land. Today visitors walk along the old towpaths, read the signs "
    "that tell the story of the mills, and eat bread baked in ovens that are hundreds of "
    "years old. The museum in the largest town keeps maps, letters and tools from every age, "
    "and the children of the valley learn its history at school, from the first farmers to "
    "the engineers who built the railway and the dam that finally tamed the floods. When the "
    "railway came, the valley changed again: factories rose beside the stations, workers "
    "moved in from the hills, and the old market squares filled with shops selling goods "
    "from distant cities. Some of the mills were turned into workshops, others fell into "
    "ruin, and a few were saved by people who loved the sound of the water wheels."
)


@dataclass
class Case:
    """One benchmark case. ``n_tokens`` keeps the prompt's first tokens (start token included);
    the long cases take the first 33 / 256 tokens of ``LONG_TEXT``."""

    name: str
    prompt_key: str
    n_tokens: int | None
    max_feature_nodes: int | None
    ours_batch_size: int
    ct: bool
    edge_tolerance: float = 0.0
    model: str = "smollm2"  # a built-in model name (tracer.fetch.BUILTIN_MODELS)


CASES = {
    "dallas": Case("dallas", "dallas", None, None, 1024, True),
    "long33": Case("long33", "long", 33, 512, 256, True),
    "long256": Case("long256", "long", 256, 4096, 1024, False),
    "gemma3": Case("gemma3", "dallas", None, None, 1024, False, model="gemma3-270m"),
}
DEFAULT_CASES = "dallas,long33,long256"


# --- our engine (worker subprocess) -----------------------------------------------------------


def run_ours(args: argparse.Namespace) -> None:
    """Worker: one attribution with our engine, written to ``args.out`` (.npz)."""
    import torch

    from tracer.attribution import attribute
    from tracer.model import LanguageModel, truncate_layers
    from tracer.prune import prune
    from tracer.replacement import ReplacementModel
    from transcoders.device import DeviceSetting
    from transcoders.formats import load_transcoder

    if args.threads:
        torch.set_num_threads(args.threads)
    setting = DeviceSetting.parse(args.device, args.dtype)
    cuda = setting.is_cuda
    t_start = time.perf_counter()
    m = LanguageModel.load(args.model, device=setting)
    if args.n_layers:
        m = truncate_layers(m, args.n_layers)
    rm = ReplacementModel(m, load_transcoder(args.clt_dir, device=setting), exclude_bos=True)
    if cuda:
        torch.cuda.synchronize(setting.device)
        torch.cuda.reset_peak_memory_stats(setting.device)
    load_s = time.perf_counter() - t_start
    tokens = torch.tensor([int(t) for t in args.tokens.split(",")], dtype=torch.long)
    gc.collect()
    load_peak = peak_rss_mb()  # read first: the reset below clears it too
    rss_before, hwm_reset = rss_mb(), reset_peak_rss()
    c0, t0 = cpu_s(), time.perf_counter()
    g = attribute(
        rm, tokens, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size,
        edge_tolerance=args.edge_tolerance, progress=False,
    )  # fmt: skip
    if cuda:
        torch.cuda.synchronize(setting.device)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    rss_graph = hwm_mb() if hwm_reset else peak_rss_mb()
    t1 = time.perf_counter()
    pruned = prune(g)
    prune_s = time.perf_counter() - t1
    info = {
        "engine": "circuit-atlas",
        "device": setting.describe(),
        **setting.to_dict(),
        "peak_device_mb": (
            round(torch.cuda.max_memory_allocated(setting.device) / 2**20, 1) if cuda else None
        ),
        "model": m.facts.name,
        "n_layers": m.facts.n_layers,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 3),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "peak_rss_mb": round(rss_graph, 1),
        "peak_rss_is_attribution_only": hwm_reset,
        "rss_before_attribution_mb": round(rss_before, 1),
        "process_peak_rss_mb": round(max(load_peak, peak_rss_mb()), 1),
        "prune_s": round(prune_s, 3),
        "pruned_nodes": int(len(pruned.kind)),
        "pruned_edges": int(len(pruned.weight)),
        "n_active_features": int(g.params["n_active_features"]),
        "n_nodes": int(len(g.kind)),
        "n_edges": int(len(g.weight)),
        "logit_probabilities": [float(p) for p in g.probability[g.kind == 3]],
        "batch_size": args.batch_size,
        "max_feature_nodes": args.max_feature_nodes,
        "edge_tolerance": args.edge_tolerance,
        "timing_s": g.extra.get("timing_s"),
        "scores": {k: float(v) for k, v in g.scores.items()},
    }
    np.savez(
        args.out, kind=g.kind, layer=g.layer, position=g.position, feature=g.feature,
        target=g.target, source=g.source, weight=g.weight, activation=g.activation,
        info=json.dumps(info),
    )  # fmt: skip
    print(json.dumps(info))


# --- comparison -------------------------------------------------------------------------------


def node_keys(d) -> list[tuple[int, int, int, int]]:
    """(kind, layer, position, feature-or-token) per node; logits keyed by token only."""
    keys = []
    for k, lay, p, f in zip(d["kind"], d["layer"], d["position"], d["feature"], strict=True):
        k = int(k)
        keys.append((k, -1, -1, int(f)) if k == 3 else (k, int(lay), int(p), int(f)))
    return keys


def compare(ours: dict, ct: dict) -> dict:
    """Edges of both graphs over their common nodes: max |difference| relative to the largest
    |edge|, with the start-position error columns (zero in circuit-tracer) reported apart."""
    import scipy.sparse as sp

    ko, kc = node_keys(ours), node_keys(ct)
    io = {k: i for i, k in enumerate(ko)}
    ic = {k: i for i, k in enumerate(kc)}
    common = [k for k in ko if k in ic]
    only_ours = [k for k in ko if k not in ic]
    only_ct = [k for k in kc if k not in io]
    n = len(common)
    o_idx = np.array([io[k] for k in common])
    c_idx = np.array([ic[k] for k in common])

    def restricted(d, idx, n_all):
        a = sp.csr_matrix(
            (d["weight"].astype(np.float64), (d["target"], d["source"])), shape=(n_all, n_all)
        )
        return a[idx][:, idx].tocsr()

    A = restricted(ours, o_idx, len(ko))
    B = restricted(ct, c_idx, len(kc))
    bos_err = np.array([k[0] == 1 and k[2] == 0 for k in common])
    keep = sp.diags((~bos_err).astype(np.float64))
    drop = sp.diags(bos_err.astype(np.float64))
    diff = (A - B) @ keep
    scale = max(abs(A).max(), abs(B).max())
    max_diff = abs(diff).max() if diff.nnz else 0.0
    ours_bos = abs(A @ drop).max() if (A @ drop).nnz else 0.0
    ct_bos = abs(B @ drop).max() if (B @ drop).nnz else 0.0
    kinds = {0: "feature", 1: "error", 2: "token", 3: "logit"}

    def describe(keys):
        out: dict[str, int] = {}
        for k in keys:
            out[kinds[k[0]]] = out.get(kinds[k[0]], 0) + 1
        return out

    return {
        "common_nodes": n,
        "nodes_only_ours": describe(only_ours),
        "nodes_only_circuit_tracer": describe(only_ct),
        "examples_only_ours": [list(k) for k in only_ours[:5]],
        "examples_only_circuit_tracer": [list(k) for k in only_ct[:5]],
        "largest_abs_edge": float(scale),
        "max_abs_edge_diff": float(max_diff),
        "max_abs_edge_diff_relative": float(max_diff / scale) if scale else 0.0,
        "edges_compared_ours": int((A @ keep).nnz),
        "edges_compared_circuit_tracer": int((B @ keep).nnz),
        "bos_error_columns_max_abs_ours": float(ours_bos),
        "bos_error_columns_max_abs_circuit_tracer": float(ct_bos),
        "identical_within_1e-4": bool(scale and max_diff <= 1e-4 * scale) and not only_ct,
    }


# --- driver -----------------------------------------------------------------------------------


def setup_ct(venv: Path) -> None:
    """Create the separate circuit-tracer environment (CPU torch first, then circuit-tracer)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install"]
    cpu_index = ["--index-url", "https://download.pytorch.org/whl/cpu"]
    if subprocess.run([*pip, f"torch=={CT_TORCH}", *cpu_index]).returncode != 0:
        subprocess.run([*pip, f"torch=={CT_TORCH}"], check=True)  # the PyPI wheel instead
    subprocess.run([*pip, f"circuit-tracer=={CT_VERSION}"], check=True)


def prompt_tokens(case: Case) -> list[int]:
    from tracer.model import LanguageModel

    m = LanguageModel.load(case.model)
    text = LONG_TEXT if case.prompt_key == "long" else PROMPTS[case.prompt_key]
    ids = m.tokenize(text).tolist()
    if case.n_tokens is not None:
        if len(ids) < case.n_tokens:
            raise SystemExit(f"prompt for {case.name} has {len(ids)} tokens < {case.n_tokens}")
        ids = ids[: case.n_tokens]
    return ids


def prompt_text(ids: list[int], model: str) -> str:
    from tracer.model import LanguageModel

    return LanguageModel.load(model).decode(ids[1:])


def run_worker(cmd: list[str], log: Path, timeout: float | None = None) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["process_wall_s"] = round(time.perf_counter() - t0, 3)
    return info


def table(results: list[dict]) -> str:
    head = (
        "| case | engine | tokens | wall s / graph | CPU s | peak RSS MB (attribution) "
        "| peak RSS MB (process) | nodes | edges | max abs edge diff (rel.) |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for r in results:
        cmp = r.get("comparison")
        rel = f"{cmp['max_abs_edge_diff_relative']:.1e}" if cmp else "-"
        for e in r["engines"]:
            rows.append(
                f"| {r['case']} | {e['engine']} | {r['n_tokens']} | {e['wall_s']:.1f} "
                f"| {e['cpu_s']:.1f} | {e['peak_rss_mb']:.0f} | {e['process_peak_rss_mb']:.0f} "
                f"| {e['n_nodes']} "
                f"| {e['n_edges']} | {rel} |"
            )
        if len(r["engines"]) == 2:
            o, c = r["engines"]
            rows.append(
                f"| {r['case']} | ratio ct/ours | | {c['wall_s'] / o['wall_s']:.1f}x "
                f"| {c['cpu_s'] / o['cpu_s']:.1f}x | {c['peak_rss_mb'] / o['peak_rss_mb']:.1f}x "
                f"| {c['process_peak_rss_mb'] / o['process_peak_rss_mb']:.1f}x | | | |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"of {', '.join(CASES)}")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "attribution.json")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench" / "attribution")
    ap.add_argument("--ct-venv", type=Path, default=ROOT / "artifacts" / "ct-venv")
    ap.add_argument("--setup-ct", action="store_true", help="create the circuit-tracer venv")
    ap.add_argument("--skip-ct", action="store_true", help="run our engine only")
    ap.add_argument(
        "--ct-timeout", type=float, default=None, help="stop a circuit-tracer run after S seconds"
    )
    ap.add_argument("--n-layers", type=int, default=None, help="truncate the model (quick checks)")
    ap.add_argument("--features", type=int, default=256, help="CLT features per layer")
    ap.add_argument("--active", type=float, default=20.0, help="target active per layer/token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both engines")
    ap.add_argument("--device", default="cpu", help="our engine's device: cpu, cuda[:N], auto")
    ap.add_argument("--dtype", default="float32", help="weights: float32, bfloat16, float16")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)
    ap.add_argument("--clt-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--max-feature-nodes", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=1024, help=argparse.SUPPRESS)
    ap.add_argument("--edge-tolerance", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", dest="out_npz", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.out = args.out_npz
        run_ours(args)
        return

    from transcoders.device import DeviceError, DeviceSetting

    try:
        setting = DeviceSetting.parse(args.device, args.dtype)  # a bad one fails here, clearly
    except DeviceError as err:
        raise SystemExit(f"bench_attribution: {err}") from None
    if args.setup_ct:
        setup_ct(args.ct_venv)
    ct_python = args.ct_venv / "bin" / "python"
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}: choose from {', '.join(CASES)}")
    need_ct = not args.skip_ct and any(CASES[c].ct for c in names)
    if need_ct and not ct_python.exists():
        raise SystemExit(
            f"no circuit-tracer environment at {args.ct_venv}: run with --setup-ct, pass "
            "--ct-venv DIR, or --skip-ct"
        )

    from tracer.fetch import fetch_model
    from tracer.random_clt import write_random_clt

    tag = f"L{args.n_layers or 'all'}-F{args.features}-a{args.active:g}-s{args.seed}"
    load0 = os.getloadavg()
    results = []
    for name in names:
        case = CASES[name]
        model_dir = fetch_model(case.model, verbose=False)  # the cached folder (built once)
        # SmolLM2's CLT keeps its old folder name; other models' CLTs are named after them.
        prefix = "clt" if case.model == "smollm2" else f"clt-{case.model}"
        clt_dir = write_random_clt(args.work / f"{prefix}-{tag}", args.n_layers, args.seed,
                           args.features, args.active, case.model)  # fmt: skip
        ids = prompt_tokens(case)
        tok_arg = ",".join(map(str, ids))
        base = args.work / f"{name}-{tag}"
        common = ["--tokens", tok_arg, "--clt-dir", str(clt_dir), "--threads", str(args.threads)]
        if args.n_layers:
            common += ["--n-layers", str(args.n_layers)]
        if case.max_feature_nodes:
            common += ["--max-feature-nodes", str(case.max_feature_nodes)]
        case_load0 = os.getloadavg()
        print(f"[{name}] {len(ids)} tokens: circuit-atlas ...", flush=True)
        ours_cmd = [
            sys.executable, __file__, "--worker", *common, "--model", case.model, "--batch-size",
            str(case.ours_batch_size), "--edge-tolerance", str(case.edge_tolerance),
            "--device", str(setting.device), "--dtype", setting.to_dict()["dtype"],
            "--worker-out", str(base.with_suffix(".ours.npz")),
        ]  # fmt: skip
        engines = [run_worker(ours_cmd, base.with_suffix(".ours.log"))]
        print(f"  wall {engines[0]['wall_s']} s, peak {engines[0]['peak_rss_mb']} MB", flush=True)
        entry = {"case": name, "n_tokens": len(ids), "prompt_tokens": ids, "engines": engines}
        entry["prompt"] = prompt_text(ids, case.model)
        entry["model"], entry["n_layers"] = case.model, engines[0]["n_layers"]
        entry["settings"] = asdict(case)
        if case.ct and not args.skip_ct:
            print(f"[{name}] circuit-tracer ...", flush=True)
            ct_cmd = [
                str(ct_python), str(ROOT / "scripts" / "bench_ct_runner.py"), *common,
                "--model-dir", str(model_dir), "--batch-size", "64",
                "--out", str(base.with_suffix(".ct.npz")),
            ]  # fmt: skip
            try:
                engines.append(run_worker(ct_cmd, base.with_suffix(".ct.log"), args.ct_timeout))
            except subprocess.TimeoutExpired:
                entry["circuit_tracer_timeout_s"] = args.ct_timeout
                print(f"  circuit-tracer stopped after {args.ct_timeout} s", flush=True)
                entry["loadavg_start"], entry["loadavg_end"] = (
                    list(case_load0),
                    list(os.getloadavg()),
                )
                results.append(entry)
                continue
            print(f"  wall {engines[1]['wall_s']} s, peak {engines[1]['peak_rss_mb']} MB")
            entry["comparison"] = compare(
                dict(np.load(base.with_suffix(".ours.npz"))),
                dict(np.load(base.with_suffix(".ct.npz"))),
            )
            print("  " + json.dumps(entry["comparison"]), flush=True)
        entry["loadavg_start"], entry["loadavg_end"] = list(case_load0), list(os.getloadavg())
        results.append(entry)
    models = sorted({CASES[n].model for n in names})
    doc = {
        "what": f"exact attribution, {' / '.join(models)} + random CLT (circuit-tracer layout)",
        "model": models[0] if len(models) == 1 else models,
        "n_layers": depths.pop()
        if len(depths := {r["n_layers"] for r in results}) == 1
        else sorted(depths),
        "clt": {
            "features_per_layer": args.features,
            "target_active": args.active,
            "seed": args.seed,
        },  # fmt: skip
        "torch_threads": args.threads,
        "device": setting.describe(),
        **setting.to_dict(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "loadavg_start": list(load0),
        "loadavg_end": list(os.getloadavg()),
        "command": "python scripts/bench_attribution.py " + " ".join(sys.argv[1:]),
        "cases": results,
    }
    # Cases run separately are merged into one file (same settings only).
    if args.out.exists():
        old = json.loads(args.out.read_text())
        keys = ("n_layers", "clt", "torch_threads", "device", "dtype")
        # Files written before --device existed are CPU float32 runs.
        old = {"device": "cpu", "dtype": "float32", **old}
        same = all(old.get(k) == doc[k] for k in keys)
        if same:
            kept = [c for c in old.get("cases", []) if c["case"] not in names]
            doc["cases"] = kept + results
            doc["runs"] = [*old.get("runs", [old.get("command")]), doc["command"]]
            results = doc["cases"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
