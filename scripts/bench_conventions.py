"""Check that our circuit-tracer convention is circuit-tracer's: same graph, both prune/score.

    .venv/bin/python scripts/bench_attribution.py --setup-ct     # once: artifacts/ct-venv
    nice -n 10 .venv/bin/python scripts/bench_conventions.py      # 3 prompts x 4 and 30 layers
    .venv/bin/python scripts/bench_conventions.py --depths 4 --prompts dallas   # quick check

For each prompt and depth, circuit-tracer 0.5.0 (its own virtual environment, through
``scripts/bench_ct_runner.py --prune``) attributes the prompt on SmolLM2 (cut to 4 layers, or
all 30) with the random CLT of ``scripts/bench_attribution.py`` and applies its own
``prune_graph`` and ``compute_graph_scores`` for each threshold pair, as shipped (float32) and
with torch's default dtype float64. Its adjacency comes back as COO edges and becomes one of
our ``Graph``s (the same float32 weights, logit weights = its probabilities normalised, as our
attribution writes them); ``tracer.prune.prune`` and ``graph_scores`` with
``convention="circuit-tracer"`` then run on it. So any difference is in pruning and scoring,
not in attribution. Compared: node masks, edge masks (the stored edges with both ends kept),
replacement and completeness (tolerance 1e-5), node influence (ours times the logit
probabilities' sum: circuit-tracer weights logits by the probabilities, we by them normalised,
which no rule depends on). Each differing node or edge is
listed with its score and circuit-tracer's cut, which tells float32 rounding at a cut from a
rule that differs.

Without a feature budget (4 layers) our own attribution of the same prompt is also pruned with
the circuit-tracer convention and compared with circuit-tracer's (``end_to_end``): there the
start position's error nodes carry edges (ours keep that position's MLP output, circuit-tracer
zeroes it), which the convention must treat as constants.

Writes ``benchmarks/conventions.json`` and ``benchmarks/conventions.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from bench_attribution import CT_VERSION, node_keys, run_worker  # noqa: E402

from tracer.random_clt import write_random_clt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = {
    "dallas": "The capital of the state containing Dallas is",
    "opposite": 'The opposite of "hot" is "',
    "jordan": "Fact: Michael Jordan plays the sport of",
}
THRESHOLDS = ((0.8, 0.98), (0.6, 0.9))
SCORE_TOLERANCE = 1e-5


@dataclass
class Depth:
    """A model depth: ``n_layers`` (None = all 30) and circuit-tracer's feature budget."""

    name: str
    n_layers: int | None
    max_feature_nodes: int | None


DEPTHS = {"4": Depth("4", 4, None), "30": Depth("30", None, 512)}


def graph_from_npz(d: dict, n_layers: int, tokens: list[int]):
    """One of our Graphs from a runner's .npz (circuit-tracer's or ours): the same nodes, edges
    and float32 weights; logit weights = the logit probabilities normalised to sum to one."""
    from tracer.graph import LOGIT, Graph

    info = json.loads(str(d["info"]))
    kind = d["kind"].astype(np.int8)
    probs = np.zeros(len(kind), np.float32)
    probs[kind == LOGIT] = info["logit_probabilities"]
    return Graph.from_coo(
        kind=kind, layer=d["layer"], position=d["position"], feature=d["feature"],
        target=d["target"], source=d["source"], weight=d["weight"], tokens=tokens,
        n_layers=n_layers, probability=probs, model_name="smollm2", transcoder_name="random",
        params={"exclude_bos": True},
    )  # fmt: skip


def our_masks(g, node_t: float, edge_t: float) -> tuple[np.ndarray, np.ndarray]:
    """([n_nodes], [n_edges]) bool masks of ``tracer.prune.prune`` (circuit-tracer
    convention) on ``g``."""
    from tracer.prune import prune_masks

    return prune_masks(g, node_t, edge_t, convention="circuit-tracer")


def diff_nodes(g, ours: np.ndarray, theirs: np.ndarray, infl: np.ndarray, cut: float) -> list:
    return [
        {"node": g.node_id(i), "ours": bool(ours[i]), "circuit_tracer": bool(theirs[i]),
         "ct_influence": float(infl[i]), "ct_node_cut": cut}
        for i in np.where(ours != theirs)[0]
    ]  # fmt: skip


def diff_edges(g, ours, theirs, score, cut: float, limit: int = 10) -> dict:
    idx = np.where(ours != theirs)[0]
    rel = np.abs(score[idx] - cut) / cut if cut > 0 else np.zeros(len(idx))
    return {
        "count": int(len(idx)),
        "only_ours": int((ours & ~theirs).sum()),
        "only_circuit_tracer": int((theirs & ~ours).sum()),
        "max_score_distance_from_cut_relative": float(rel.max()) if len(idx) else 0.0,
        "examples": [
            {"target": g.node_id(int(g.target[i])), "source": g.node_id(int(g.source[i])),
             "ours": bool(ours[i]), "ct_score": float(score[i]), "ct_edge_cut": cut}
            for i in idx[:limit]
        ],
    }  # fmt: skip


def compare_same_graph(d: dict, g, info: dict) -> dict:
    """Our pruning/scoring on circuit-tracer's graph ``g`` vs circuit-tracer's own (``d``)."""
    from tracer.prune import graph_scores, node_influence

    ours_scores = graph_scores(g, "circuit-tracer")
    # circuit-tracer weights the logits by their probabilities, we by those normalised: its
    # influence is ours times the probabilities' sum.
    ours_infl = node_influence(g, convention="circuit-tracer") * sum(info["logit_probabilities"])
    out = {"ours": {"scores": ours_scores}, "circuit_tracer": {}}
    masks = [our_masks(g, nt, et) for nt, et in THRESHOLDS]
    out["ours"]["runs"] = [
        {"node_threshold": nt, "edge_threshold": et, "nodes_kept": int(nm.sum()),
         "edges_kept": int(em.sum())}
        for (nt, et), (nm, em) in zip(THRESHOLDS, masks, strict=True)
    ]  # fmt: skip
    for dtype in ("float32", "float64"):
        facts = info["prune"][dtype]
        ct_infl = d[f"{dtype}_influence"].astype(np.float64)
        scale = max(np.abs(ct_infl).max(), 1e-30)
        entry = {
            "scores": {"replacement": facts["replacement"], "completeness": facts["completeness"]},
            "score_abs_diff": {
                k: abs(ours_scores[k] - facts[k]) for k in ("replacement", "completeness")
            },
            "influence_max_abs_diff_relative": float(np.abs(ours_infl - ct_infl).max() / scale),
            "runs": [],
        }
        entry["scores_within_tolerance"] = all(
            v <= SCORE_TOLERANCE for v in entry["score_abs_diff"].values()
        )
        for i, (run, (nm, em)) in enumerate(zip(facts["runs"], masks, strict=True)):
            ct_nm, ct_em = d[f"{dtype}_node_mask_{i}"], d[f"{dtype}_edge_mask_{i}"]
            node_diff = diff_nodes(g, nm, ct_nm, ct_infl, run["node_cut"])
            edge_diff = diff_edges(
                g, em, ct_em, d[f"{dtype}_edge_score_{i}"].astype(np.float64), run["edge_cut"]
            )
            entry["runs"].append({
                **run, "node_masks_identical": not node_diff, "node_differences": node_diff,
                "edge_masks_identical": edge_diff["count"] == 0, "edge_differences": edge_diff,
            })  # fmt: skip
        out["circuit_tracer"][dtype] = entry
    return out


def compare_end_to_end(ours_d: dict, ct_d: dict, g_ours, g_ct) -> dict:
    """Our attribution + our pruning vs circuit-tracer's attribution + its pruning (float64),
    over nodes and edges keyed by (kind, layer, position, feature)."""
    from tracer.prune import graph_scores

    ko, kc = node_keys(ours_d), node_keys(ct_d)
    scores = graph_scores(g_ours, "circuit-tracer")
    info = json.loads(str(ct_d["info"]))["prune"]["float64"]
    out = {
        "same_nodes": sorted(ko) == sorted(kc),
        "ours_scores": scores,
        "score_abs_diff": {k: abs(scores[k] - info[k]) for k in ("replacement", "completeness")},
        "runs": [],
    }
    for i, (nt, et) in enumerate(THRESHOLDS):
        nm, em = our_masks(g_ours, nt, et)
        ct_nm, ct_em = ct_d[f"float64_node_mask_{i}"], ct_d[f"float64_edge_mask_{i}"]
        on = {ko[j] for j in np.where(nm)[0]}
        cn = {kc[j] for j in np.where(ct_nm)[0]}

        def edges(d, keys, mask):
            pairs = zip(d["target"][mask], d["source"][mask], strict=True)
            return {(keys[t], keys[s]) for t, s in pairs}

        oe, ce = edges(ours_d, ko, em), edges(ct_d, kc, ct_em)
        out["runs"].append({
            "node_threshold": nt, "edge_threshold": et,
            "nodes_only_ours": len(on - cn), "nodes_only_circuit_tracer": len(cn - on),
            "edges_only_ours": len(oe - ce), "edges_only_circuit_tracer": len(ce - oe),
            "nodes_kept": len(on), "edges_kept": len(oe),
        })  # fmt: skip
    return out


def markdown(doc: dict) -> str:
    lines = [
        f"# circuit-tracer convention vs circuit-tracer {CT_VERSION}'s own pruning and scores",
        "",
        f"Command: `{doc['command']}`. Machine: {doc['machine']['cpus']} CPUs, load average "
        f"{doc['loadavg_start'][0]:.1f} at the start, {doc['loadavg_end'][0]:.1f} at the end"
        + (
            f" (attribution by `{r['command']}`: {r['wall_s']:.0f} s wall, load "
            f"{r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f}; circuit-tracer "
            f"attribution {sum(c['ct_attribution_cpu_s'] for c in doc['cases']):.0f} CPU s)."
            if (r := doc.get("attribution_run"))
            else "."
        ),
        "Same adjacency on both sides (circuit-tracer's); ours = `tracer.prune` with "
        '`convention="circuit-tracer"`; circuit-tracer = `prune_graph` / '
        "`compute_graph_scores` in float64 (and, in brackets, as shipped in float32).",
        "",
        "| prompt | layers | nodes | edges | thresholds | nodes kept | edges kept "
        "| node mask diffs | edge mask diffs | replacement | completeness | max score diff "
        "| max influence diff (rel.) |",
        "|---|---:|---:|---:|---|---:|---:|---|---|---:|---:|---|---|",
    ]
    for c in doc["cases"]:
        s = c["same_graph"]
        c64, c32 = s["circuit_tracer"]["float64"], s["circuit_tracer"]["float32"]
        d64 = max(c64["score_abs_diff"].values())
        d32 = max(c32["score_abs_diff"].values())
        for r64, r32 in zip(c64["runs"], c32["runs"], strict=True):
            lines.append(
                f"| {c['prompt']} | {c['n_layers']} | {c['n_nodes']} | {c['n_edges']} "
                f"| {r64['node_threshold']}/{r64['edge_threshold']} | {r64['nodes_kept']} "
                f"| {r64['edges_kept']} | {len(r64['node_differences'])} "
                f"({len(r32['node_differences'])}) | {r64['edge_differences']['count']} "
                f"({r32['edge_differences']['count']}) | {s['ours']['scores']['replacement']:.6f} "
                f"| {s['ours']['scores']['completeness']:.6f} | {d64:.1e} ({d32:.1e}) "
                f"| {c64['influence_max_abs_diff_relative']:.1e} "
                f"({c32['influence_max_abs_diff_relative']:.1e}) |"
            )
    e2e = [c for c in doc["cases"] if "end_to_end" in c]
    if e2e:
        lines += [
            "",
            "End to end (our attribution + our pruning vs circuit-tracer's attribution + its "
            "pruning, float64; no feature budget):",
            "",
            "| prompt | layers | same nodes | thresholds | nodes only ours / only ct "
            "| edges only ours / only ct | max score diff |",
            "|---|---:|---|---|---|---|---|",
        ]
        for c in e2e:
            e = c["end_to_end"]
            for r in e["runs"]:
                lines.append(
                    f"| {c['prompt']} | {c['n_layers']} | {e['same_nodes']} "
                    f"| {r['node_threshold']}/{r['edge_threshold']} "
                    f"| {r['nodes_only_ours']} / {r['nodes_only_circuit_tracer']} "
                    f"| {r['edges_only_ours']} / {r['edges_only_circuit_tracer']} "
                    f"| {max(e['score_abs_diff'].values()):.1e} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default=",".join(PROMPTS), help=f"of {', '.join(PROMPTS)}")
    ap.add_argument("--depths", default=",".join(DEPTHS), help="4 and/or 30 layers")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "conventions.json")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "bench" / "attribution")
    ap.add_argument("--ct-venv", type=Path, default=ROOT / "artifacts" / "ct-venv")
    ap.add_argument("--features", type=int, default=256, help="CLT features per layer")
    ap.add_argument("--active", type=float, default=20.0, help="target active per layer/token")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both engines")
    ap.add_argument("--no-end-to-end", action="store_true", help="skip our own attribution")
    ap.add_argument(
        "--reuse", action="store_true", help="reuse attribution .npz files left in --work"
    )
    args = ap.parse_args()
    ct_python = args.ct_venv / "bin" / "python"
    if not ct_python.exists():
        raise SystemExit(
            f"no circuit-tracer environment at {args.ct_venv}: run "
            "scripts/bench_attribution.py --setup-ct, or pass --ct-venv DIR"
        )
    from tracer.fetch import fetch_model
    from tracer.model import LanguageModel

    model_dir = fetch_model("smollm2", verbose=False)
    lm = LanguageModel.load("smollm2")
    prune_arg = ",".join(f"{nt}:{et}" for nt, et in THRESHOLDS)
    load0, t_start = os.getloadavg(), time.perf_counter()
    cases = []
    for depth in (DEPTHS[x.strip()] for x in args.depths.split(",")):
        # The CLT of scripts/bench_attribution.py, in the same folder (built once per settings).
        tag = f"L{depth.n_layers or 'all'}-F{args.features}-a{args.active:g}-s{args.seed}"
        clt_dir = write_random_clt(
            args.work / f"clt-{tag}", depth.n_layers, args.seed, args.features, args.active
        )
        for name in (x.strip() for x in args.prompts.split(",")):
            ids = lm.tokenize(PROMPTS[name]).tolist()
            base = args.work / f"conventions-{name}-{tag}"
            common = ["--tokens", ",".join(map(str, ids)), "--clt-dir", str(clt_dir),
                      "--threads", str(args.threads)]  # fmt: skip
            if depth.n_layers:
                common += ["--n-layers", str(depth.n_layers)]
            if depth.max_feature_nodes:
                common += ["--max-feature-nodes", str(depth.max_feature_nodes)]
            print(f"[{name}, {depth.name} layers] circuit-tracer ...", flush=True)
            ct_npz = base.with_suffix(".ct.npz")
            ct_cmd = [
                str(ct_python), str(ROOT / "scripts" / "bench_ct_runner.py"), *common,
                "--model-dir", str(model_dir), "--batch-size", "64", "--prune", prune_arg,
                "--out", str(ct_npz),
            ]  # fmt: skip
            if not (args.reuse and ct_npz.exists()):
                run_worker(ct_cmd, base.with_suffix(".ct.log"))
            ct_d = dict(np.load(ct_npz))
            ct_info = json.loads(str(ct_d["info"]))
            ran = [
                (r["node_threshold"], r["edge_threshold"])
                for r in ct_info["prune"]["float64"]["runs"]
            ]
            if ran != list(THRESHOLDS):
                raise SystemExit(f"{ct_npz} was pruned at {ran}, not {THRESHOLDS}: drop --reuse")
            n_layers = depth.n_layers or 30
            g = graph_from_npz(ct_d, n_layers, ids)
            t0 = time.perf_counter()
            entry = {
                "prompt": PROMPTS[name], "prompt_key": name, "n_tokens": len(ids),
                "n_layers": n_layers, "max_feature_nodes": depth.max_feature_nodes,
                "n_nodes": g.n_nodes, "n_edges": g.n_edges,
                "ct_attribution_cpu_s": ct_info["cpu_s"],
                "same_graph": compare_same_graph(ct_d, g, ct_info),
            }  # fmt: skip
            entry["ours_prune_and_scores_s"] = round(time.perf_counter() - t0, 3)
            if depth.max_feature_nodes is None and not args.no_end_to_end:
                ours_npz = base.with_suffix(".ours.npz")
                ours_cmd = [
                    sys.executable, str(ROOT / "scripts" / "bench_attribution.py"), "--worker",
                    *common, "--model", "smollm2", "--worker-out", str(ours_npz),
                ]  # fmt: skip
                if not (args.reuse and ours_npz.exists()):
                    run_worker(ours_cmd, base.with_suffix(".ours.log"))
                ours_d = dict(np.load(ours_npz))
                g_ours = graph_from_npz(ours_d, n_layers, ids)
                entry["end_to_end"] = compare_end_to_end(ours_d, ct_d, g_ours, g)
            s = entry["same_graph"]["circuit_tracer"]["float64"]
            print(
                "  nodes/edges identical:",
                [(r["node_masks_identical"], r["edge_masks_identical"]) for r in s["runs"]],
                "score diff:", max(s["score_abs_diff"].values()), flush=True,
            )  # fmt: skip
            cases.append(entry)
    doc = {
        "what": f"circuit-atlas convention='circuit-tracer' vs circuit-tracer {CT_VERSION} "
        "prune_graph / compute_graph_scores on the same graphs",
        "thresholds": [list(t) for t in THRESHOLDS],
        "score_tolerance": SCORE_TOLERANCE,
        "depths": [asdict(DEPTHS[x.strip()]) for x in args.depths.split(",")],
        "clt": {
            "features_per_layer": args.features,
            "target_active": args.active,
            "seed": args.seed,
        },  # fmt: skip
        "torch_threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "loadavg_start": list(load0),
        "loadavg_end": list(os.getloadavg()),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "command": "python scripts/bench_conventions.py " + " ".join(sys.argv[1:]),
        "cases": cases,
    }
    if args.reuse and args.out.exists():  # keep the facts of the run that attributed
        old = json.loads(args.out.read_text())
        keys = ("command", "wall_s", "loadavg_start", "loadavg_end")
        doc["attribution_run"] = old.get("attribution_run") or {k: old.get(k) for k in keys}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
