"""The causal tests on SmolLM2 with a CLT (default: the demo's): swaps, supernodes against random
groups, feature cards of the most influential features, contrasts, global weights.

    .venv/bin/python scripts/bench_crossprompt.py                 # the demo's CLT, default parts
    .venv/bin/python scripts/bench_crossprompt.py --transcoders PATH --out /tmp/x/crossprompt
    .venv/bin/python scripts/bench_crossprompt.py --parts swap,cards --layers 8-20

Parts (``--parts``, default ``swap,supernodes,cards``; ``contrast`` and ``weights`` on request):

1. swap: for each pair of SWAP_PAIRS (same category, same token length: capitals of France /
   Germany / Italy, an antonym), ``prompt``'s features are replaced by ``other``'s, live mode
   (:func:`tracer.analyses.swap.concept_swaps`): every active feature at the concept position (where
   the prompts differ), the same restricted to ``--layers``, and at the concept and last
   positions. Reported: whether the top token moved, and moved to the other prompt's answer
   (its unedited top token), that answer's probability and rank before and after.
2. supernodes: the five demo prompts (``tracer.prompts.DEMO_PROMPTS``) attributed
   (``--max-feature-nodes``), pruned, their circuit features grouped
   (:func:`tracer.analyses.supernodes.find_supernodes`, co-activation over ``--corpus-seqs``
   held-out
   sequences of ``--corpus``) and each supernode ablated against ``--n-random`` random groups
   of its size (:func:`tracer.analyses.supernode_check.validate_supernodes`; effect rank = the share
   of
   random groups whose effect is smaller). A prompt passes at mean effect rank >= 0.75.
3. cards: the ten most influential features of each demo graph (the full graph, influence by
   :func:`tracer.prune.node_influence`; :func:`tracer.analyses.feature_topics.feature_cards`):
   influence, top contexts from the CLT's ``feature_contexts.parquet`` (activating token
   «marked»), promoted tokens, and the documented check "top contexts about countries, cities
   or capitals" (:mod:`tracer.analyses.feature_topics`).
4. contrast: one pair of prompts per category of ``tracer/data/prompts.jsonl`` (PAIRS), both
   attributed and pruned, then :func:`tracer.analyses.contrast.contrast`.
5. weights: top-k global weights (corpus-mean MLP-norm convention) and, on the Dallas circuit,
   how much of each same-position feature-to-feature edge the direct path explains.

Writes ``OUT.json`` and ``OUT.md`` (default ``benchmarks/crossprompt``) after every item, with
commit, command, machine, date and load average, no absolute paths. Resumable: a re-run with
the same CLT (fingerprint) and settings keeps what is done (``--fresh`` starts over); graphs
are kept in ``--work`` (default ``$CIRCUIT_ATLAS_HOME/bench-crossprompt/<fingerprint>``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

# Swap pairs: the same category, the same token length (the concept at one position).
SWAP_PAIRS = (
    ("The capital of France is", "The capital of Germany is"),
    ("The capital of Germany is", "The capital of Italy is"),
    ("The capital of Italy is", "The capital of France is"),
    ('The opposite of "hot" is "', 'The opposite of "big" is "'),
)
# Contrast pairs: prompts of the shipped set that differ in one concept.
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
FRANCE = "The capital of France is"
RANK_PASS = 0.75
DEFAULT_PARTS = "swap,supernodes,cards"
ALL_PARTS = ("swap", "supernodes", "cards", "contrast", "weights")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def shown(path: Path | str) -> str:
    """A path without the machine's absolute prefix: under $CIRCUIT_ATLAS_HOME, the repo or
    the temp folder, relative to it (named), else only its name."""
    from tracer.fetch import cache_root

    p = Path(path).resolve()
    for base, name in ((cache_root(), "$CIRCUIT_ATLAS_HOME"), (ROOT, "."),
                       (Path(tempfile.gettempdir()), "<tmp>")):  # fmt: skip
        try:
            return f"{name}/{p.relative_to(base.resolve())}"
        except ValueError:
            continue
    return f"<...>/{p.name}"


def commit() -> str:
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "scripts", "tracer", "transcoders"],
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(threads: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores, torch threads {threads}"


def demo_transcoder_path() -> Path:
    """Where ``circuit-atlas demo`` (its default settings) keeps the CLT it trains: the same
    call as :func:`tracer.cli.demo_cmd.ensure_transcoder`, under $CIRCUIT_ATLAS_HOME."""
    from tracer.cli import build_parser
    from tracer.fetch import default_transcoder_path

    d = build_parser().parse_args(["demo"])
    return default_transcoder_path(
        d.model, d.features_per_layer, corpus=d.corpus, minutes=d.train_minutes
    )


def demo_corpus() -> str:
    from tracer.cli import build_parser

    return build_parser().parse_args(["demo"]).corpus


def check_prompts() -> None:
    from tracer.prompts import load_prompts

    shipped = {p.prompt for p in load_prompts()}
    for cat, pair in [*PAIRS.items(), *(("swap", p) for p in SWAP_PAIRS)]:
        for p in pair:
            if p not in shipped:
                raise SystemExit(f"prompt {p!r} ({cat}) is not in tracer/data/prompts.jsonl")


class Graphs:
    """Full and pruned graphs of prompts, traced once and kept as Parquet files in ``work``."""

    def __init__(self, rm, work: Path):
        self.rm, self.work, self.mem = rm, work, {}
        work.mkdir(parents=True, exist_ok=True)

    def _path(self, prompt: str, budget: int, kind: str) -> Path:
        return (
            self.work / f"{hashlib.sha1(prompt.encode()).hexdigest()[:12]}-{budget}.{kind}.parquet"
        )

    def both(self, prompt: str, budget: int):
        """(full graph, circuit) of ``prompt`` (a graph traced before is reused, any budget)."""
        from tracer import attribute, prune
        from tracer.graph import Graph

        if prompt in self.mem:
            return self.mem[prompt]
        pf, pc = self._path(prompt, budget, "full"), self._path(prompt, budget, "circuit")
        if pf.exists() and pc.exists():
            pair = Graph.load(pf), Graph.load(pc)
        else:
            full = attribute(self.rm, prompt, max_feature_nodes=budget, progress=False)
            pair = full, prune(full, 0.8, 0.98)
            pair[0].save(pf)
            pair[1].save(pc)
        self.mem[prompt] = (pair, budget)
        return self.mem[prompt]

    def get(self, prompt: str, budget: int):
        """The circuit (pruned graph) of ``prompt``."""
        return self.both(prompt, budget)[0][1]

    def full(self, prompt: str, budget: int):
        return self.both(prompt, budget)[0][0]

    def save(self, prompt: str) -> None:
        """Write the circuit again (after supernodes were added to it)."""
        (_, circuit), budget = self.mem[prompt]
        circuit.save(self._path(prompt, budget, "circuit"))


def top_token(graph) -> str:
    from tracer.graph import LOGIT

    logits = np.where(graph.kind == LOGIT)[0]
    i = logits[np.argmax(graph.probability[logits])]
    return graph.extra["token_text"][str(int(graph.feature[i]))]


def part_swap(rm, args, done: list, save) -> list[dict]:
    from tracer.analyses.swap import SwapVariant, concept_swaps, parse_layers

    mid = parse_layers(args.layers)
    variants = [SwapVariant("concept"), SwapVariant("concept", mid), SwapVariant("concept+last")]
    have = {(r["prompt"], r["other_prompt"]) for r in done}
    for a, b in SWAP_PAIRS:
        if (a, b) in have:
            continue
        load0, t0 = load_avg(), time.perf_counter()
        row = concept_swaps(rm, a, b, variants, max_new_tokens=args.max_new_tokens)
        row.update(seconds=round(time.perf_counter() - t0, 1), load_start=load0,
                   load_end=load_avg())  # fmt: skip
        done.append(row)
        save()
        for e in row["experiments"]:
            o = e["other_answer"]
            print(f"[swap] {a!r} <- {b!r}, {e['what']}: {e['top_before'][0][0]!r} -> "
                  f"{e['top_after'][0][0]!r}; to the other answer {e['moved_to_other']}; "
                  f"{o['token']!r} p {o['p_before']:.3g} -> {o['p_after']:.3g}, rank "
                  f"{o['rank_before']} -> {o['rank_after']}", flush=True)  # fmt: skip
    return done


def part_supernodes(rm, book, corpus, graphs: Graphs, args, done: list, save) -> list[dict]:
    from tracer.analyses.supernode_check import validate_supernodes
    from tracer.analyses.supernodes import corpus_activations, find_supernodes
    from tracer.graph import FEATURE
    from tracer.prompts import DEMO_PROMPTS

    have = {r["prompt"] for r in done}
    for prompt in DEMO_PROMPTS:
        if prompt in have:
            continue
        load0, t0 = load_avg(), time.perf_counter()
        circuit = graphs.get(prompt, args.max_feature_nodes)
        t_trace = time.perf_counter() - t0
        feats = np.where(circuit.kind == FEATURE)[0]
        t0 = time.perf_counter()
        pairs = [(int(circuit.layer[i]), int(circuit.feature[i])) for i in feats]
        # A circuit without features (a weak CLT's) has nothing to group: no corpus pass.
        acts = corpus_activations(rm, corpus, pairs, progress=False) if pairs else None
        t_corpus = time.perf_counter() - t0
        t0 = time.perf_counter()
        found = find_supernodes(circuit, transcoder=rm.transcoder, activations=acts, book=book,
                                min_similarity=args.min_similarity) if pairs else []  # fmt: skip
        t_group = time.perf_counter() - t0
        t0 = time.perf_counter()
        checks = validate_supernodes(rm, circuit, found, n_random=args.n_random, progress=False)
        t_check = time.perf_counter() - t0
        graphs.save(prompt)
        agree = [c["agreement"] for c in checks]
        rand = [c["random_mean_agreement"] for c in checks if c["n_random"]]
        rank = [c["effect_rank"] for c in checks if c["effect_rank"] is not None]
        mean_rank = float(np.mean(rank)) if rank else None
        row = {
            "prompt": prompt, "top_token": top_token(circuit),
            "circuit_features": len(feats), "n_supernodes": len(found),
            "grouped_features": sum(s.size for s in found),
            "mean_agreement": float(np.mean(agree)) if agree else None,
            "mean_random_agreement": float(np.mean(rand)) if rand else None,
            "mean_effect_rank": mean_rank,
            "passes": mean_rank is not None and mean_rank >= RANK_PASS,
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
        done.append(row)
        save()
        print(f"[supernodes] {prompt!r}: {len(found)} supernodes, effect rank {mean_rank}, "
              f"agreement {row['mean_agreement']} (random {row['mean_random_agreement']}), "
              f"load {row['load_end'][0]}", flush=True)  # fmt: skip
    return done


def part_cards(rm, book, graphs: Graphs, args, done: list, save) -> list[dict]:
    from tracer.analyses.feature_topics import TopicError, feature_cards, place_words
    from tracer.prompts import DEMO_PROMPTS

    try:
        words = place_words()
    except TopicError as err:
        print(f"[cards] no place-topic check: {err}", flush=True)
        words = None
    have = {r["prompt"] for r in done}
    for prompt in DEMO_PROMPTS:
        if prompt in have:
            continue
        load0, t0 = load_avg(), time.perf_counter()
        g = graphs.full(prompt, args.max_feature_nodes)  # features pruned away still rank
        cards = [c.to_dict() for c in feature_cards(g, book, words, n=args.n_cards)]
        flags = [c["about_places"] for c in cards if c["about_places"] is not None]
        row = {
            "prompt": prompt, "n_cards": len(cards), "n_with_contexts": len(flags),
            "n_about_places": sum(flags) if words is not None and flags else None,  # None: unknown
            "cards": cards, "seconds": round(time.perf_counter() - t0, 1),
            "load_start": load0, "load_end": load_avg(),
        }  # fmt: skip
        done.append(row)
        save()
        print(f"[cards] {prompt!r}: {row['n_about_places']} of {len(cards)} top features about "
              f"countries/cities/capitals ({len(flags)} with contexts)", flush=True)  # fmt: skip
    return done


def part_contrast(graphs: Graphs, args, done: list, save) -> list[dict]:
    from tracer.analyses.contrast import contrast

    have = {r["category"] for r in done}
    for cat, (pa_, pb_) in PAIRS.items():
        if cat in have:
            continue
        load0, t0 = load_avg(), time.perf_counter()
        ga, gb = (
            graphs.get(pa_, args.contrast_feature_nodes),
            graphs.get(pb_, args.contrast_feature_nodes),
        )
        s = contrast(ga, gb).summary(n=5)
        done.append({
            "category": cat, "prompt_a": pa_, "prompt_b": pb_,
            "top_a": top_token(ga), "top_b": top_token(gb),
            **{k: v for k, v in s.items() if k.startswith("n_")},
            "separating_a": s["only_in_a"], "separating_b": s["only_in_b"],
            "shared_most_changed": s["shared_most_changed"],
            "sign_flips": s["sign_flips"][:3], "largest_changes": s["largest_changes"][:3],
            "seconds": round(time.perf_counter() - t0, 1),
            "load_start": load0, "load_end": load_avg(),
        })  # fmt: skip
        save()
        print(f"[contrast] {cat}: {s['n_features_only_in_a']} / {s['n_features_only_in_b']} "
              f"features only in a / b, {s['n_sign_flips']} sign flips", flush=True)  # fmt: skip
    return done


def part_weights(rm, corpus, graphs: Graphs, args) -> dict:
    from tracer.analyses.global_weights import (
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
    circuit = graphs.get("The capital of the state containing Dallas is", args.max_feature_nodes)
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
        "top_k": args.top_k, "norm": gw.norm, "n_pairs": len(gw), "seconds": round(t_weights, 1),
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


# --- the report -----------------------------------------------------------------------------------


def summary(res: dict) -> dict:
    """The issue-26 goals, from whatever parts are done."""
    out: dict = {}
    if res.get("swap"):
        exps = [e for r in res["swap"] for e in r["experiments"]]
        out["swaps_moved_to_other"] = sum(e["moved_to_other"] for e in exps)
        out["swaps_moved"] = sum(e["moved"] for e in exps)
        out["swaps"] = len(exps)
    if res.get("supernodes"):
        rows = res["supernodes"]
        out["prompts_effect_rank_ge_0.75"] = sum(bool(r["passes"]) for r in rows)
        out["prompts_with_supernodes"] = len(rows)
        out["effect_ranks"] = [r["mean_effect_rank"] for r in rows]
    france = next((r for r in res.get("cards") or [] if r["prompt"] == FRANCE), None)
    if france is not None:
        out["france_top_features_about_places"] = france["n_about_places"]
        out["france_top_features"] = france["n_cards"]
    return out


def summary_lines(s: dict) -> list[str]:
    lines = []
    if "swaps" in s:
        lines.append(f"swaps: {s['swaps_moved_to_other']} of {s['swaps']} moved the answer to the "
                     f"other prompt's ({s['swaps_moved']} moved at all); goal >= 1")  # fmt: skip
    if "prompts_with_supernodes" in s:
        ranks = ", ".join("n/a" if r is None else f"{r:.2f}" for r in s["effect_ranks"])
        n_pass = s["prompts_effect_rank_ge_0.75"]
        n_all = s["prompts_with_supernodes"]
        lines.append(f"supernodes: effect rank >= 0.75 on {n_pass} of {n_all} demo prompts "
                     f"({ranks}); goal 3 of 5")  # fmt: skip
    if "france_top_features" in s:
        lines.append(f"cards: {s['france_top_features_about_places']} of the France graph's "
                     f"{s['france_top_features']} most influential features have top contexts "
                     "about countries, cities or capitals; goal >= 3")  # fmt: skip
    return lines


def clip(context: str, side: int = 45) -> str:
    """A marked context cut to ``side`` characters either side of the «activating token»."""
    i, j = context.find("«"), context.find("»")
    lo, hi = (max(0, i - side), j + 1 + side) if 0 <= i < j else (0, 2 * side)
    return context[lo:hi].replace("\n", "⏎").replace("|", "\\|")


def markdown(res: dict) -> str:
    def f(x, nd=2):
        return "n/a" if x is None else f"{x:.{nd}f}"

    def tok(t):
        return repr(t).replace("|", "\\|")

    lines = [
        "# Causal tests across prompts (scripts/bench_crossprompt.py)", "",
        f"- Transcoder: `{res['transcoder']}` (fingerprint {res['fingerprint']})",
        f"- Commit: {res['commit']}", f"- Command: `{res['command']}`",
        f"- Machine: {res['machine']}", f"- Date: {res['date']}",
        f"- Load average at start / end: {res['load_start']} / {res.get('load_end')}",
        f"- Seconds: {res.get('seconds')}", "",
    ]  # fmt: skip
    s = summary(res)
    if s:
        lines += ["## Goals (issue 26)", ""] + [f"- {x}" for x in summary_lines(s)] + [""]
    if res.get("swap"):
        lines += ["## Swaps (live mode)", "",
                  "| prompt <- other | what | removed / inserted | top before -> after | "
                  "moved to other | other answer p before -> after | rank before -> after | "
                  "continuation after |",
                  "|---|---|---:|---|---|---|---|---|"]  # fmt: skip
        for r in res["swap"]:
            for e in r["experiments"]:
                o = e["other_answer"]
                lines.append(
                    f"| {tok(r['prompt'])} <- {tok(r['other_prompt'])} | {e['what']} | "
                    f"{e['n_removed']} / {e['n_inserted']} | {tok(e['top_before'][0][0])} "
                    f"{e['top_before'][0][2]:.3f} -> {tok(e['top_after'][0][0])} "
                    f"{e['top_after'][0][2]:.3f} | {e['moved_to_other']} | {o['token']!r} "
                    f"{o['p_before']:.3g} -> {o['p_after']:.3g} | {o['rank_before']} -> "
                    f"{o['rank_after']} | {tok(e['continuation_after'])} |"
                )
        lines.append("")
    if res.get("supernodes"):
        lines += ["## Supernodes of the demo prompts against random groups of their size", "",
                  "| prompt | top token | circuit features | supernodes | grouped | agreement | "
                  "random-group agreement | effect rank vs random | >= 0.75 | load |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
        for r in res["supernodes"]:
            lines.append(
                f"| {tok(r['prompt'])} | {tok(r['top_token'])} | {r['circuit_features']} | "
                f"{r['n_supernodes']} | {r['grouped_features']} | {f(r['mean_agreement'])} | "
                f"{f(r['mean_random_agreement'])} | {f(r['mean_effect_rank'])} | {r['passes']} | "
                f"{r['load_end'][0]} |"
            )
        lines.append("")
        for r in res["supernodes"]:
            lines.append(f"**{r['prompt']!r}**: " + "; ".join(
                f"{s['id']} [{s['name']}] x{s['size']} effect rank {f(s.get('effect_rank'))}"
                for s in r["supernodes"][:5]))  # fmt: skip
            lines.append("")
    if res.get("cards"):
        lines += ["## Feature cards: the most influential features of each demo graph", "",
                  "About places: at least half of the top-8 contexts have a country, city or "
                  "capital (WordNet) or the word capital/city/country within 3 words of the "
                  "activating token (tracer/analyses/feature_topics.py).", ""]  # fmt: skip
        for r in res["cards"]:
            lines += [f"### {r['prompt']!r}: {r['n_about_places']} of {r['n_cards']} about "
                      "places", "",
                      "| feature | influence | positions | frequency | about places | "
                      "top contexts (3 of 8) | promoted |",
                      "|---|---:|---|---:|---|---|---|"]  # fmt: skip
            for c in r["cards"]:
                t = c["topic"]
                about = (
                    "n/a"
                    if t is None
                    else f"{c['about_places']} ({t['n_counting']}/{t['n_contexts']})"
                )
                ctx = "<br>".join(clip(x) for x in c["contexts"][:3])
                prom = " ".join(tok(p) for p, _ in c["promoted"][:5])
                freq = "n/a" if c["frequency"] is None else f"{100 * c['frequency']:.2f}%"
                lines.append(f"| L{c['layer']}/F{c['index']} | {c['influence']:.4f} | "
                             f"{c['positions']} | {freq} | {about} | {ctx} | {prom} |")  # fmt: skip
            lines.append("")
    if res.get("contrast"):
        lines += ["## Contrastive pairs", "",
                  "| category | a | b | top a / b | only in a | only in b | shared | sign flips | "
                  "top separating (a) | top separating (b) |",
                  "|---|---|---|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
        for r in res["contrast"]:
            sep_a = ", ".join(x["feature"] for x in r["separating_a"][:3])
            sep_b = ", ".join(x["feature"] for x in r["separating_b"][:3])
            lines.append(
                f"| {r['category']} | {tok(r['prompt_a'])} | {tok(r['prompt_b'])} | "
                f"{tok(r['top_a'])} / {tok(r['top_b'])} | {r['n_features_only_in_a']} | "
                f"{r['n_features_only_in_b']} | {r['n_features_shared']} | {r['n_sign_flips']} | "
                f"{sep_a} | {sep_b} |"
            )
        lines.append("")
    if res.get("weights"):
        lines += ["## Global weights", "", "```", json.dumps(res["weights"], indent=2), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transcoders", help="CLT folder (default: the demo's trained CLT under "
                    "$CIRCUIT_ATLAS_HOME)")  # fmt: skip
    ap.add_argument("--parts", default=DEFAULT_PARTS, help=f"of {','.join(ALL_PARTS)}")
    ap.add_argument("--corpus", help="corpus of the held-out sequences (default: the demo's)")
    ap.add_argument("--layers", default="8-20", help="the middle layers of the swaps")
    ap.add_argument("--max-feature-nodes", type=int, default=512)
    ap.add_argument("--contrast-feature-nodes", type=int, default=256)
    ap.add_argument("--corpus-seqs", type=int, default=32, help="held-out corpus sequences")
    ap.add_argument("--n-random", type=int, default=16, help="random groups per supernode")
    ap.add_argument("--min-similarity", type=float, default=0.5)
    ap.add_argument("--n-cards", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=4, help="swap continuations")
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "crossprompt"),
                    help="OUT.json and OUT.md are written")  # fmt: skip
    ap.add_argument("--work", help="graph folder (default under $CIRCUIT_ATLAS_HOME)")
    ap.add_argument("--fresh", action="store_true", help="ignore earlier results in OUT.json")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in ALL_PARTS]
    if bad:
        print(f"unknown part(s) {bad}: use some of {','.join(ALL_PARTS)}", file=sys.stderr)
        return 2
    from tracer.analyses.swap import SwapError, parse_layers

    try:
        parse_layers(args.layers)
    except SwapError as err:
        print(f"--layers: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    check_prompts()
    path = Path(args.transcoders) if args.transcoders else demo_transcoder_path()
    if not path.is_dir():
        where = "--transcoders" if args.transcoders else "the demo's default CLT"
        print(f"no transcoder at {path} ({where}): run `circuit-atlas demo` first or give "
              "--transcoders PATH", file=sys.stderr)  # fmt: skip
        return 2
    t_start = time.perf_counter()
    from tracer.cli.train_cmd import load_corpus
    from tracer.fetch import cache_root
    from tracer.model import LanguageModel
    from tracer.replacement import ReplacementModel
    from tracer.reports.feature_book import FeatureBook
    from transcoders.formats import load_transcoder
    from transcoders.identity import fingerprint

    model = LanguageModel.load("smollm2")
    rm = ReplacementModel(model, load_transcoder(path, model=model))
    fp = fingerprint(rm.transcoder)
    book = FeatureBook.load(path) if (path / "feature_contexts.parquet").exists() else None
    corpus_spec = args.corpus or demo_corpus()
    corpus = torch.as_tensor(load_corpus(corpus_spec, model).tokens[-args.corpus_seqs :])
    kept = ("max_feature_nodes", "contrast_feature_nodes", "corpus_seqs", "n_random",
            "min_similarity", "n_cards", "max_new_tokens", "top_k", "layers")  # fmt: skip
    settings = {k: getattr(args, k) for k in kept} | {"corpus": corpus_spec}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    old = out.with_suffix(".json")
    if old.exists() and not args.fresh:
        try:
            prev = json.loads(old.read_text())
        except json.JSONDecodeError:
            prev = {}
        if prev.get("fingerprint") == fp and prev.get("settings") == settings:
            res = prev
            print(f"resuming {shown(old)}: done {[p for p in ALL_PARTS if prev.get(p)]}")
    argv_shown = [shown(a) if os.path.isabs(a) else a for a in (argv or sys.argv[1:])]
    res.update({
        "transcoder": shown(path), "fingerprint": fp, "book": book is not None,
        "commit": commit(), "machine": machine(args.threads),
        "command": shlex.join([".venv/bin/python", "scripts/bench_crossprompt.py", *argv_shown]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": settings, "load_start": load_avg(),
    })  # fmt: skip
    before = float(res.get("seconds") or 0.0)  # seconds of the runs this one resumes
    graphs = Graphs(rm, Path(args.work) if args.work else cache_root() / "bench-crossprompt" / fp)

    def save() -> None:
        res["load_end"] = load_avg()
        res["seconds"] = round(before + time.perf_counter() - t_start, 1)  # all runs
        res["summary"] = summary(res)
        # Written after every item, so a later failure keeps the earlier results.
        old.write_text(json.dumps(res, indent=2, default=str))
        out.with_suffix(".md").write_text(markdown(res))

    runs = {  # cheapest first: cards need only the five traces
        "cards": lambda: part_cards(rm, book, graphs, args, res.setdefault("cards", []), save),
        "supernodes": lambda: part_supernodes(rm, book, corpus, graphs, args,
                                              res.setdefault("supernodes", []), save),
        "swap": lambda: part_swap(rm, args, res.setdefault("swap", []), save),
        "contrast": lambda: part_contrast(graphs, args, res.setdefault("contrast", []), save),
        "weights": lambda: res.get("weights") or part_weights(rm, corpus, graphs, args),
    }  # fmt: skip
    for name, run in runs.items():
        if name in parts:
            res[name] = run()
            save()
    print("\n".join(summary_lines(summary(res))))
    print(f"wrote {shown(old)} and {shown(out.with_suffix('.md'))} in "
          f"{time.perf_counter() - t_start:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
