"""Circuits across prompts on SmolLM2 with the default CLT: supernodes, contrasts, a swap, global
weights.

    .venv/bin/python scripts/bench_crossprompt.py                  # everything
    .venv/bin/python scripts/bench_crossprompt.py --parts supernodes,swap

1. supernodes: the five demo prompts (``tracer/cli/demo_cmd.py``) are attributed
   (``--max-feature-nodes``), pruned, and their circuit features grouped
   (:func:`tracer.supernodes.find_supernodes`, co-activation over ``--corpus-seqs`` held-out
   corpus sequences); each supernode is checked by perturbation against ``--n-random`` random
   groups of its size (:func:`tracer.supernode_check.validate_supernodes`).
2. contrast: one pair of prompts per category of ``tracer/data/prompts.jsonl`` (listed in
   PAIRS), both attributed and pruned, then :func:`tracer.contrast.contrast`: the separating
   features (found in one circuit only, by influence) and the shared ones that change most.
3. swap: "The capital of France is" with its France features (the circuit's features at the
   " France" position) replaced by the Germany features of "The capital of Germany is"
   (:func:`tracer.swap.swap`, live mode), and the same with the top supernode at that position.
4. weights: top-k global weights of the CLT (corpus-mean MLP-norm convention) and, on the
   Dallas circuit, how much of each same-position feature-to-feature edge the direct path
   (the global weight, with the prompt's own norm denominator) explains.

Writes ``benchmarks/crossprompt.json`` and ``benchmarks/crossprompt.md``; the machine load
(``os.getloadavg()``) is recorded with every part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# One pair per category: prompts of the shipped set that differ in one concept.
PAIRS = {
    "fact": ("The capital of France is", "The capital of Germany is"),
    "two_hop": (
        "The capital of the country where the Eiffel Tower stands is",
        "The capital of the country where the Colosseum stands is",
    ),
    "antonym": ('The opposite of "hot" is "', 'The opposite of "big" is "'),
    "code": ("def add(a, b):\n    return a", "function add(a, b) {\n  return a"),
    "arithmetic": ("1, 2, 3, 4, ", "2, 4, 6, 8, "),
    "rhyme": (
        "I like to play with my ball; I throw it high against the",
        "He saw a cat and patted its head; then he went to sleep in his",
    ),
    "multilingual": ("Je suis, tu es, il", "Yo soy, tú eres, él"),
    "grammar": (
        "When Mary and John went to the store, John gave a drink to",
        "When Alice and Bob went to the park, Bob gave a ball to",
    ),
}
SWAP = ("The capital of France is", "The capital of Germany is")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def check_pairs() -> None:
    from tracer.prompts import load_prompts

    shipped = {p.prompt for p in load_prompts()}
    for cat, pair in PAIRS.items():
        for p in pair:
            if p not in shipped:
                raise SystemExit(f"pair prompt {p!r} ({cat}) is not in tracer/data/prompts.jsonl")


def trace(rm, prompt: str, budget: int):
    from tracer import attribute, prune

    t0 = time.perf_counter()
    full = attribute(rm, prompt, max_feature_nodes=budget, progress=False)
    circuit = prune(full, 0.8, 0.98)
    return full, circuit, time.perf_counter() - t0


def top_token(graph) -> str:
    from tracer.graph import LOGIT

    logits = np.where(graph.kind == LOGIT)[0]
    i = logits[np.argmax(graph.probability[logits])]
    return graph.extra["token_text"][str(int(graph.feature[i]))]


def part_supernodes(rm, book, corpus, args, graphs: dict) -> list[dict]:
    from tracer.cli.demo_cmd import DEMO_PROMPTS
    from tracer.graph import FEATURE
    from tracer.supernode_check import validate_supernodes
    from tracer.supernodes import corpus_activations, find_supernodes

    rows = []
    for prompt in DEMO_PROMPTS:
        load0 = load_avg()
        full, circuit, t_trace = trace(rm, prompt, args.max_feature_nodes)
        graphs[prompt] = (full, circuit)
        feats = np.where(circuit.kind == FEATURE)[0]
        t0 = time.perf_counter()
        pairs = [(int(circuit.layer[i]), int(circuit.feature[i])) for i in feats]
        acts = corpus_activations(rm, corpus, pairs, progress=False)
        t_corpus = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = find_supernodes(circuit, transcoder=rm.transcoder, activations=acts, book=book,
                                min_similarity=args.min_similarity)  # fmt: skip
        t_group = time.perf_counter() - t0
        t0 = time.perf_counter()
        checks = validate_supernodes(rm, circuit, found, n_random=args.n_random, progress=False)
        t_check = time.perf_counter() - t0
        agree = [c["agreement"] for c in checks]
        rand = [c["random_mean_agreement"] for c in checks if c["n_random"]]
        rank = [c["effect_rank"] for c in checks if c["effect_rank"] is not None]
        row = {
            "prompt": prompt, "top_token": top_token(full),
            "circuit_features": len(feats), "n_supernodes": len(found),
            "grouped_features": sum(s.size for s in found),
            "mean_agreement": float(np.mean(agree)) if agree else None,
            "mean_random_agreement": float(np.mean(rand)) if rand else None,
            "mean_effect_rank": float(np.mean(rank)) if rank else None,
            "supernodes": [
                {"id": s.id, "name": s.name, "size": s.size, "cohesion": round(s.cohesion, 3),
                 "similarity": {k: round(v, 3) for k, v in s.similarity.items()},
                 "positions": sorted({m[1] for m in s.members}), **(s.validation or {})}
                for s in found
            ],
            "seconds": {"trace": round(t_trace, 1), "corpus": round(t_corpus, 1),
                        "group": round(t_group, 2), "check": round(t_check, 1)},
            "load_start": load0, "load_end": load_avg(),
        }  # fmt: skip
        rows.append(row)
        print(f"[supernodes] {prompt!r}: {len(found)} supernodes, mean agreement "
              f"{row['mean_agreement']}, random {row['mean_random_agreement']}, rank "
              f"{row['mean_effect_rank']}, load {row['load_end']}", flush=True)  # fmt: skip
    return rows


def part_contrast(rm, args, graphs: dict) -> list[dict]:
    from tracer.contrast import contrast

    rows = []
    for cat, (pa_, pb_) in PAIRS.items():
        load0 = load_avg()
        t0 = time.perf_counter()
        ga = graphs.get(pa_) or trace(rm, pa_, args.contrast_feature_nodes)[:2]
        gb = graphs.get(pb_) or trace(rm, pb_, args.contrast_feature_nodes)[:2]
        graphs.setdefault(pa_, ga)
        graphs.setdefault(pb_, gb)
        c = contrast(ga[1], gb[1])
        s = c.summary(n=5)
        rows.append({
            "category": cat, "prompt_a": pa_, "prompt_b": pb_,
            "top_a": top_token(ga[0]), "top_b": top_token(gb[0]),
            **{k: v for k, v in s.items() if k.startswith("n_")},
            "separating_a": s["only_in_a"], "separating_b": s["only_in_b"],
            "shared_most_changed": s["shared_most_changed"],
            "sign_flips": s["sign_flips"][:3], "largest_changes": s["largest_changes"][:3],
            "seconds": round(time.perf_counter() - t0, 1),
            "load_start": load0, "load_end": load_avg(),
        })  # fmt: skip
        print(f"[contrast] {cat}: {s['n_features_only_in_a']} / {s['n_features_only_in_b']} "
              f"features only in a / b, {s['n_sign_flips']} sign flips", flush=True)  # fmt: skip
    return rows


def part_swap(rm, book, corpus, args, graphs: dict) -> dict:
    from tracer.graph import FEATURE
    from tracer.supernodes import corpus_activations, find_supernodes
    from tracer.swap import swap

    load0 = load_avg()
    t0 = time.perf_counter()
    a, b = SWAP
    ga = graphs.get(a) or trace(rm, a, args.max_feature_nodes)[:2]
    gb = graphs.get(b) or trace(rm, b, args.max_feature_nodes)[:2]
    ta, tb = rm.model.tokenize(a), rm.model.tokenize(b)
    diff = [int(p) for p in torch.nonzero(ta != tb).flatten()]  # the concept's position(s)

    def at(graph, pos):
        sel = [i for i in np.where(graph.kind == FEATURE)[0] if int(graph.position[i]) in pos]
        return [(int(graph.layer[i]), int(graph.position[i]), int(graph.feature[i])) for i in sel]

    def active_at(prompt, pos):
        st = rm.record(rm.model.tokenize(prompt))
        return [(int(l), int(p), int(f)) for l, p, f in zip(st.feat_layer, st.feat_pos,
                st.feat_index, strict=True) if int(p) in pos]  # fmt: skip

    out = {"prompt": a, "other_prompt": b, "positions": diff, "experiments": []}
    last = [len(ta) - 1]
    all_a, all_b = active_at(a, diff), active_at(b, diff)  # one record of each prompt
    # From the narrowest edit to the widest: the circuit's features at the concept position,
    # every active feature there (all layers), the circuit's features at the last position
    # (where the answer is said), and the last two together.
    sets = [
        ("circuit features at the concept position", at(ga[1], diff), at(gb[1], diff)),
        ("every active feature at the concept position", all_a, all_b),
        ("circuit features at the last position", at(ga[1], last), at(gb[1], last)),
        ("every active feature at the concept position + circuit features at the last",
         all_a + at(ga[1], last), all_b + at(gb[1], last)),
    ]  # fmt: skip
    for what, remove, insert in sets:
        res = swap(rm, a, remove, insert, b, max_new_tokens=8)
        out["experiments"].append({"what": what, **res.to_dict()})
    for g in (ga[1], gb[1]):
        if "supernodes" not in g.extra:  # as in part 1: all three signals
            feats = np.where(g.kind == FEATURE)[0]
            pairs = [(int(g.layer[i]), int(g.feature[i])) for i in feats]
            acts = corpus_activations(rm, corpus, pairs, progress=False)
            find_supernodes(g, transcoder=rm.transcoder, activations=acts, book=book,
                            min_similarity=args.min_similarity)  # fmt: skip

    def top_at(graph):
        from tracer.supernodes import supernodes_of

        cands = [s for s in supernodes_of(graph) if any(m[1] in diff for m in s.members)]
        return cands[0] if cands else None

    sa, sb = top_at(ga[1]), top_at(gb[1])
    if sa is not None and sb is not None:
        res = swap(rm, a, [m for m in sa.members], [m for m in sb.members], b, max_new_tokens=8)
        out["experiments"].append({"what": f"supernode {sa.id} ({sa.name}) -> {sb.id} "
                                   f"({sb.name})", **res.to_dict()})  # fmt: skip
    for e in out["experiments"]:
        print(f"[swap] {e['what']}: {e['top_before'][0]} -> {e['top_after'][0]}; moved "
              f"{e['moved']}; {e['continuation_after']!r}", flush=True)  # fmt: skip
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["load_start"], out["load_end"] = load0, load_avg()
    return out


def part_weights(rm, corpus, args, graphs: dict) -> dict:
    from tracer.global_weights import (
        cumulative_decoders,
        effective_encoders,
        global_weights,
        typical_norm_scales,
    )
    from tracer.graph import FEATURE

    load0 = load_avg()
    t0 = time.perf_counter()
    scales = typical_norm_scales(rm, corpus)
    gw = global_weights(rm.transcoder, rm.model, top_k=args.top_k, norm_scales=scales,
                        progress=False)  # fmt: skip
    t_weights = time.perf_counter() - t0
    prompt = "The capital of the state containing Dallas is"
    full, circuit = graphs.get(prompt) or trace(rm, prompt, args.max_feature_nodes)[:2]
    state = rm.record(torch.as_tensor(circuit.tokens))
    enc = effective_encoders(rm.transcoder, rm.model)  # unit convention: x s(layer, position)
    cum = {}
    stored = set(zip(gw.source_layer.tolist(), gw.source_index.tolist(),
                     gw.target_layer.tolist(), gw.target_index.tolist(), strict=True))  # fmt: skip
    feat = circuit.kind == FEATURE
    e_ok = feat[circuit.source] & feat[circuit.target]
    same = e_ok & (circuit.position[circuit.source] == circuit.position[circuit.target])
    direct, edge, in_topk = [], [], 0
    for k in np.where(e_ok)[0]:
        s, t = int(circuit.source[k]), int(circuit.target[k])
        ls, lt = int(circuit.layer[s]), int(circuit.layer[t])
        key = (ls, int(circuit.feature[s]), lt, int(circuit.feature[t]))
        in_topk += key in stored
        if not same[k]:
            continue
        if lt not in cum:
            cum[lt] = cumulative_decoders(rm.transcoder, lt)
        w = float(cum[lt][ls, key[1]] @ enc[lt, key[3]]) if ls < lt else 0.0
        p = int(circuit.position[t])
        direct.append(float(circuit.activation[s]) * w * float(state.scales["mlp_norm"][lt, p]))
        edge.append(float(circuit.weight[k]))
    direct, edge = np.array(direct), np.array(edge)
    out = {
        "transcoder": str(args.transcoders), "top_k": args.top_k, "norm": gw.norm,
        "n_pairs": len(gw), "seconds": round(t_weights, 1),
        "dallas_feature_edges": int(e_ok.sum()),
        "dallas_same_position_edges": int(same.sum()),
        "dallas_edges_with_stored_pair": int(in_topk),
        "same_position_direct_share": float(np.abs(direct).sum() / np.abs(edge).sum())
        if len(edge) else None,
        "same_position_median_direct_over_edge": float(np.median(direct / edge))
        if len(edge) else None,
        "same_position_sign_agreement": float((np.sign(direct) == np.sign(edge)).mean())
        if len(edge) else None,
        "load_start": load0, "load_end": load_avg(),
    }  # fmt: skip
    print(f"[weights] {json.dumps(out)}", flush=True)
    return out


def markdown(res: dict) -> str:
    def f(x, nd=2):
        return "n/a" if x is None else f"{x:.{nd}f}"

    lines = [f"Transcoder: {res['transcoder']}", f"Machine: {res['machine']}", ""]
    if "supernodes" in res:
        lines += ["## Supernodes of the demo prompts", "",
                  "| prompt | top token | circuit features | supernodes | grouped | agreement | "
                  "random-group agreement | effect rank vs random | load |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in res["supernodes"]:
            lines.append(
                f"| {r['prompt']!r} | {r['top_token']!r} | {r['circuit_features']} | "
                f"{r['n_supernodes']} | {r['grouped_features']} | {f(r['mean_agreement'])} | "
                f"{f(r['mean_random_agreement'])} | {f(r['mean_effect_rank'])} | "
                f"{r['load_end'][0]} |"
            )
        lines.append("")
        for r in res["supernodes"]:
            lines.append(f"**{r['prompt']!r}**: " + "; ".join(
                f"{s['id']} [{s['name']}] x{s['size']} agreement {f(s.get('agreement'))}"
                for s in r["supernodes"][:5]))  # fmt: skip
            lines.append("")
    if "contrast" in res:
        lines += ["## Contrastive pairs", "",
                  "| category | a | b | top a / b | only in a | only in b | shared | sign flips | "
                  "top separating (a) | top separating (b) |",
                  "|---|---|---|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
        for r in res["contrast"]:
            sep_a = ", ".join(x["feature"] for x in r["separating_a"][:3])
            sep_b = ", ".join(x["feature"] for x in r["separating_b"][:3])
            lines.append(
                f"| {r['category']} | {r['prompt_a']!r} | {r['prompt_b']!r} | "
                f"{r['top_a']!r} / {r['top_b']!r} | {r['n_features_only_in_a']} | "
                f"{r['n_features_only_in_b']} | {r['n_features_shared']} | {r['n_sign_flips']} | "
                f"{sep_a} | {sep_b} |"
            )
        lines.append("")
    if "swap" in res:
        s = res["swap"]
        lines += ["## Swap", "", f"{s['prompt']!r} with features from {s['other_prompt']!r} "
                  f"at positions {s['positions']}:", ""]  # fmt: skip
        for e in s["experiments"]:
            lines.append(
                f"- {e['what']}: removed {len(e['removed'])}, inserted {len(e['inserted'])}; "
                f"top before {e['top_before'][0][0]!r} ({e['top_before'][0][2]:.3f}), after "
                f"{e['top_after'][0][0]!r} ({e['top_after'][0][2]:.3f}); moved: {e['moved']}; "
                f"continuation {e['continuation_after']!r} (was {e['continuation_before']!r})"
            )
        lines.append("")
    if "weights" in res:
        w = res["weights"]
        lines += ["## Global weights", "", "```", json.dumps(w, indent=2), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transcoders", help="CLT folder (default: the trained default CLT)")
    ap.add_argument("--parts", default="supernodes,contrast,swap,weights")
    ap.add_argument("--max-feature-nodes", type=int, default=512)
    ap.add_argument("--contrast-feature-nodes", type=int, default=256)
    ap.add_argument("--corpus-seqs", type=int, default=32, help="held-out corpus sequences")
    ap.add_argument("--n-random", type=int, default=16, help="random groups per supernode")
    ap.add_argument("--min-similarity", type=float, default=0.5)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "crossprompt"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    check_pairs()
    from tracer.cli.train_cmd import load_corpus
    from tracer.features import FeatureBook
    from tracer.fetch import default_transcoder_path
    from tracer.model import LanguageModel
    from tracer.replacement import ReplacementModel
    from transcoders.formats import load_transcoder

    path = Path(args.transcoders or default_transcoder_path("smollm2", 256))
    if not (path / "circuit_atlas.json").exists():
        raise SystemExit(f"no trained transcoder at {path}: train it or give --transcoders")
    args.transcoders = path
    model = LanguageModel.load("smollm2")
    rm = ReplacementModel(model, load_transcoder(path, model=model))
    book = FeatureBook.load(path) if (path / "feature_contexts.parquet").exists() else None
    corpus = torch.as_tensor(load_corpus("public", model).tokens[-args.corpus_seqs :])
    parts = args.parts.split(",")
    res: dict = {
        "transcoder": str(path),
        "machine": f"{platform.node()} ({os.cpu_count()} cores), torch threads {args.threads}",
        "settings": {k: str(v) for k, v in vars(args).items()},
        "load_start": load_avg(),
    }
    graphs: dict = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {
        "supernodes": lambda: part_supernodes(rm, book, corpus, args, graphs),
        "swap": lambda: part_swap(rm, book, corpus, args, graphs),
        "contrast": lambda: part_contrast(rm, args, graphs),
        "weights": lambda: part_weights(rm, corpus, args, graphs),
    }
    for name, run in runs.items():
        if name in parts:
            res[name] = run()
            res["load_end"] = load_avg()
            # Written after every part, so a later part's failure keeps the earlier results.
            out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
            out.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
