"""Head loadings and QK attributions: what they cost beside the attribution they explain.

    nice -n 10 .venv/bin/python scripts/bench_heads.py [--transcoders PATH] [--budget 1024]
        [--features 512] [--threads 2] [--results benchmarks/heads]

On SmolLM2-135M (all 30 layers), one prompt, a feature budget of ``--budget``: the wall time
of ``attribute``, of ``add_head_loadings`` on its graph (every edge of the default circuit)
and of ``attribute(head_loadings=True)``; the time of the top heads of a 100-edge circuit
(``edge_head_parts`` on the circuit's 100 strongest edges) and of one QK attribution (the top
head of the strongest cross-position edge, at the positions it connects: building the frozen
linear model, and reusing it); the process's peak resident memory after each part.
``--transcoders``: a trained CLT for SmolLM2; without it a random CLT (``--features`` per
layer, thresholds leaving a few percent active) stands in: the cost depends on the number of
active features and circuit edges, not on what they mean. Writes ``<results>.json`` and
``<results>.md``; every part records the load average (the CPU is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "heads"
PROMPT = "The capital of the state containing Dallas is"


def peak_rss_gb() -> float:
    """The process's resident-memory high-water mark so far, GB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def random_clt(model, prompt: str, n_features: int, seed: int = 0):
    """A random CLT for ``model`` whose pre-activations on ``prompt`` have unit spread at every
    layer (encoder rows scaled by the layer's median MLP-input norm), with threshold 2: about
    2% of the features active at each position."""
    import torch

    from transcoders.clt import CrossLayerTranscoder, TranscoderConfig

    f = model.facts
    with torch.no_grad():
        run = model.run(model.tokenize(prompt), record_sites=("mlp_in",))
    norms = run.sites["mlp_in"][0, :, 1:].float().norm(dim=-1).median(dim=1).values  # [L]
    torch.manual_seed(seed)
    cfg = TranscoderConfig(n_layers=f.n_layers, d_model=f.d_model, n_features=n_features,
                           kind="clt", input_site="mlp_in", activation="jumprelu")  # fmt: skip
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        clt.W_enc.normal_(0, 1.0).div_(norms[:, None, None])
        clt.b_enc.zero_()
        clt.threshold.fill_(2.0)
        clt.b_dec.zero_()
        for w in clt.W_dec:
            w.normal_(0, 0.2 / f.d_model**0.5)
    for p in clt.parameters():
        p.requires_grad_(False)
    return clt


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transcoders", help="a trained CLT for SmolLM2 (default: a random one)")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--features", type=int, default=512, help="random CLT: features per layer")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    import numpy as np
    import torch

    from tracer.attention import add_head_loadings, edge_head_parts, read_head_loadings
    from tracer.attention.qk import qk_attribution
    from tracer.attribution import FrozenLinearModel, attribute
    from tracer.model import LanguageModel
    from tracer.prune import prune
    from tracer.replacement import ReplacementModel
    from transcoders.formats import load_transcoder

    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    doc = {
        "command": "python scripts/bench_heads.py " + " ".join(sys.argv[1:]),
        "commit": commit,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "platform": platform.platform(),
            "shared": True,
        },  # fmt: skip
        "prompt": args.prompt,
        "budget": args.budget,
        "parts": {},
    }
    out = Path(args.results)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(doc))

    def part(name, fn):
        load0 = load_avg()
        res, sec = timed(fn)
        doc["parts"][name] = {"seconds": sec, "load_start": load0, "load_end": load_avg(),
                              "peak_rss_gb": peak_rss_gb()}  # fmt: skip
        save()
        print(f"{name}: {sec:.2f} s (load {load0[0]:.1f})", flush=True)
        return res

    model = LanguageModel.load("smollm2")
    if args.transcoders:
        clt = load_transcoder(args.transcoders, model=model)
        doc["transcoder"] = clt.identity.id
    else:
        clt = random_clt(model, args.prompt, args.features)
        doc["transcoder"] = (f"random CLT, {args.features} features per layer, unit-spread "
                             "pre-activations, threshold 2")  # fmt: skip
    rm = ReplacementModel(model, clt)
    kw = {"max_feature_nodes": args.budget, "progress": False}
    plain = part("attribute", lambda: attribute(rm, args.prompt, **kw))
    doc["n_active_features"] = plain.params.get("n_active_features")
    doc["graph_edges"] = plain.n_edges
    state = rm.record(torch.as_tensor(plain.tokens))
    circuit0 = prune(plain)
    part("head_loadings", lambda: add_head_loadings(rm, plain, circuit0, state=state))
    with_heads = part("attribute_with_head_loadings",
                      lambda: attribute(rm, args.prompt, head_loadings=True, **kw))  # fmt: skip
    rec = with_heads.extra["head_loadings"]
    doc["circuit_edges"] = len(rec["target"])
    doc["head_loadings_seconds_inside"] = rec["seconds"]
    doc["max_rel_error"] = rec["max_rel_error"]
    p = doc["parts"]
    doc["ratio_with_vs_without"] = round(
        (p["attribute"]["seconds"] + p["head_loadings"]["seconds"]) / p["attribute"]["seconds"], 3
    )
    doc["ratio_end_to_end"] = round(
        p["attribute_with_head_loadings"]["seconds"] / p["attribute"]["seconds"], 3
    )
    save()

    circuit = prune(with_heads)
    strongest = np.argsort(-np.abs(circuit.weight))[:100]
    index = {with_heads.node_id(i): i for i in range(with_heads.n_nodes)}
    t100 = np.array([index[circuit.node_id(int(i))] for i in circuit.target[strongest]])
    s100 = np.array([index[circuit.node_id(int(i))] for i in circuit.source[strongest]])
    parts100 = part("top_heads_100_edges",
                    lambda: edge_head_parts(rm, with_heads, t100, s100, state=state))  # fmt: skip
    doc["max_rel_error_100"] = parts100.max_rel_error()

    loads = read_head_loadings(circuit)
    pos = {circuit.node_id(i): int(circuit.position[i]) for i in range(circuit.n_nodes)}
    cross = sorted((v for v in loads.values() if v.heads and pos[v.target] != pos[v.source]),
                   key=lambda v: -abs(v.weight))  # fmt: skip
    if cross:
        eh = cross[0]
        l, h, _ = eh.heads[0]
        q, k = pos[eh.target], pos[eh.source]
        doc["qk_case"] = {"edge": [eh.target, eh.source], "layer": l, "head": h, "query": q,
                          "key": k}  # fmt: skip
        tokens = torch.as_tensor(with_heads.tokens)
        res = part("qk_attribution", lambda: qk_attribution(rm, tokens, l, h, q, k, state=state))
        lin = FrozenLinearModel(rm, state, dtype=torch.float64)
        part("qk_attribution_reusing_linear_model",
             lambda: qk_attribution(rm, tokens, l, h, q, k, state=state, lin=lin))  # fmt: skip
        doc["qk_case"].update(
            score=res.score, unexplained=res.unexplained, n_query_nodes=res.n_query_nodes,
            n_key_nodes=res.n_key_nodes,
        )  # fmt: skip
    doc["peak_rss_gb"] = peak_rss_gb()
    save()
    print(markdown(doc))
    return 0


def markdown(doc: dict) -> str:
    p = doc["parts"]
    lines = [
        "# Head loadings and QK attributions: cost",
        "",
        f"Commit {doc['commit']}, {doc['date']}; command `{doc['command']}`; machine: "
        f"{doc['machine']['cpus']} CPUs shared with other work, {doc['machine']['torch_threads']}"
        " torch threads (load averages beside each row).",
        f"SmolLM2-135M, 30 layers; prompt {doc['prompt']!r}; feature budget {doc['budget']}; "
        f"transcoder: {doc.get('transcoder', '?')}; {doc.get('n_active_features', '?')} active "
        f"features, {doc.get('graph_edges', '?')} graph edges, "
        f"{doc.get('circuit_edges', '?')} circuit edges.",
        "",
        "| part | seconds | load (1-min) start / end | peak RSS GB |",
        "|---|---|---|---|",
    ]
    for name, r in p.items():
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['load_start'][0]:.1f} / "
                     f"{r['load_end'][0]:.1f} | {r['peak_rss_gb']:.2f} |")  # fmt: skip
    if "ratio_with_vs_without" in doc:
        lines += [
            "",
            f"(attribute + head loadings) / attribute, same graph: "
            f"**{doc['ratio_with_vs_without']}x** (goal <= 2x); attribute(head_loadings=True) / "
            f"attribute, two runs: {doc['ratio_end_to_end']}x (the load moves between runs); "
            f"head loadings inside the second run {doc['head_loadings_seconds_inside']:.2f} s "
            f"for {doc['circuit_edges']} circuit edges; residual + heads vs edges: max "
            f"relative error {doc['max_rel_error']:.1e}.",
        ]
    if "qk_case" in doc and "score" in doc["qk_case"]:
        c = doc["qk_case"]
        lines.append(
            f"QK case: head L{c['layer']}.H{c['head']}, query {c['query']} -> key {c['key']} "
            f"(top head of the strongest cross-position edge), score {c['score']:+.3f} over "
            f"{c['n_query_nodes']} x {c['n_key_nodes']} nodes, unexplained "
            f"{c['unexplained']:+.1e}."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
