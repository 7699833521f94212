"""Where the demo graphs' unexplained influence sits, for one or more trained CLTs side by side.

    .venv/bin/python scripts/bench_graph_scores.py --clt NAME=PATH [--clt NAME=PATH ...]
        [--results benchmarks/graph_scores] [--threads 2]

For each CLT: the five demo prompts attributed as the demo traces them (2,048 feature nodes,
circuit-tracer convention; ``tracer.analyses.prompt_scores``), each graph's replacement and
completeness
scores and, from :func:`tracer.prune.error_influence_shares`, the share of the token + error
influence carried by the error nodes of each layer and position (they sum to 1 - replacement).
Also each error share at the positions the CLT's training called outliers (MLP-output norm >
``outlier_factor`` x the layer's median, from the prompt's own MLP outputs) and at the first
real token (position 1), since massive first-token outputs are the usual suspects. Writes
``<results>.json`` and ``<results>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "graph_scores"


def outlier_positions(model, prompt: str, factor: float) -> list[tuple[int, int]]:
    """(layer, position) pairs, start token excluded, whose MLP-output norm exceeds ``factor``
    x that layer's median over the prompt's non-start positions."""
    import torch

    with torch.no_grad():
        run = model.run(model.tokenize(prompt), record_sites=("mlp_out",))
    norms = run.sites["mlp_out"][0].float().norm(dim=-1)[:, 1:]  # [L, P-1]
    med = norms.median(dim=1, keepdim=True).values
    hits = (norms > factor * med).nonzero().tolist()
    return [(int(l), int(p) + 1) for l, p in hits]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clt", action="append", required=True, help="NAME=PATH (repeatable)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from tracer.analyses.prompt_scores import PromptScoreConfig, prompt_graph_scores
    from tracer.model import LanguageModel
    from transcoders.formats import load_transcoder

    torch.set_num_threads(args.threads)
    model = LanguageModel.load("smollm2")
    cfg = PromptScoreConfig()
    report = {
        "command": "python scripts/bench_graph_scores.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start": os.getloadavg(),
        },  # fmt: skip
        "clts": [],
    }
    for spec in args.clt:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--clt {spec!r}: give NAME=PATH, e.g. --clt default=runs/clt")
        clt = load_transcoder(path, model=model)
        recipe = clt.cfg.training.get("recipe") or {}  # the TrainConfig it was trained with
        factor = float(recipe.get("outlier_factor") or 50.0)
        t0 = time.perf_counter()
        scores = prompt_graph_scores(model, clt, cfg, progress=False)
        for row in scores["prompts"]:
            sh = row["error_shares"]
            out = outlier_positions(model, row["prompt"], factor)
            by_node = {(t["layer"], t["position"]): t["share"] for t in sh["top"]}
            row["outliers"] = [list(o) for o in out]
            row["first_token_share"] = sh["by_position"][1] if len(sh["by_position"]) > 1 else 0
            # Outlier error nodes' shares where they are among the top nodes (the rest are small).
            row["outlier_share_in_top"] = sum(by_node.get(o, 0.0) for o in out)
        report["clts"].append({
            "name": name, "path": str(path), "identity": clt.identity.id,
            "training": {k: recipe.get(k) for k in ("kind", "n_features", "skip",
                                                    "outlier_rule", "outlier_factor",
                                                    "outlier_weight")},
            "nmse": (clt.cfg.training.get("metrics") or {}).get("nmse"),
            "seconds": round(time.perf_counter() - t0, 1), **scores,
        })  # fmt: skip
    md = markdown(report)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=2)), (".md", md)):
        Path(args.results).with_suffix(suffix).write_text(text)
    print(md)
    return 0


def markdown(report: dict) -> str:
    lines = [
        "## Where the demo graphs' unexplained influence sits",
        "",
        f"`{report['command']}`",
        "",
        "Five demo prompts, 2,048 feature nodes, circuit-tracer convention (the start "
        "position's error nodes are constants). Error share: an error node's influence over "
        "token + error influence, so a graph's error shares sum to 1 - replacement. "
        f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['torch_threads']} torch "
        f"threads, load {report['machine']['load_average_start'][0]:.1f} at the start.",
        "",
        "| CLT | prompt | replacement | completeness | error share at position 1 | outlier "
        "positions | largest error nodes (layer@position share) | error share by layer "
        "(largest three) |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    for c in report["clts"]:
        for p in c["prompts"]:
            sh = p["error_shares"]
            by_layer = sorted(enumerate(sh["by_layer"]), key=lambda t: -t[1])[:3]
            lines.append(
                f"| {c['name']} | {p['prompt'][:40]!r} | {p['replacement']:.3f} | "
                f"{p['completeness']:.3f} | {p['first_token_share']:.3f} | "
                + (", ".join(f"L{l}@{q}" for l, q in p["outliers"]) or "none")
                + " | "
                + ", ".join(f"L{t['layer']}@{t['position']} {t['share']:.3f}" for t in sh["top"])
                + " | "
                + ", ".join(f"L{l} {v:.3f}" for l, v in by_layer)
                + " |"
            )
    lines.append("")
    for c in report["clts"]:
        lines.append(
            f"- {c['name']} (`{c['identity']}`; outliers {c['training'].get('outlier_rule')} "
            f"x{c['training'].get('outlier_factor')}, weight "
            f"{c['training'].get('outlier_weight')}; held-out NMSE {c['nmse']}): mean "
            f"replacement {c['replacement']:.3f}, completeness {c['completeness']:.3f}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
