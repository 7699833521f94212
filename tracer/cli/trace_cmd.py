"""``circuit-atlas trace "PROMPT"``: attribute one prompt, prune, save, summarise."""

from __future__ import annotations

import re
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("trace", help="attribution graph for a prompt")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", default="smollm2", help="local folder, hub id or 'smollm2'")
    p.add_argument("--transcoders", required=True, help="transcoder folder or file (any format)")
    p.add_argument("--out", default="runs/graphs", help="folder for the graph files")
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--target", action="append", help="target token (repeatable)")
    p.add_argument("--logit-diff", nargs=2, metavar=("A", "B"), help="trace logit(A) - logit(B)")
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--edge-tolerance", type=float, default=0.0)
    p.set_defaults(func=_trace)


def slug(text: str, n: int = 48) -> str:
    """A file-name-safe short name for a prompt."""
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:n] or "prompt"


def load_replacement(model_src: str, transcoder_src: str):
    """The model and transcoder, checked against each other, as a ReplacementModel."""
    from tracer.model import LanguageModel
    from tracer.replacement import ReplacementModel
    from transcoders.formats import load_transcoder

    model = LanguageModel.load(model_src)
    f = model.facts
    clt = load_transcoder(transcoder_src, n_layers=f.n_layers, d_model=f.d_model)
    return ReplacementModel(model, clt)


def summary(graph, pruned, seconds: float) -> str:
    """One screen: top logits, node counts, scores, time."""
    from tracer.graph import LOGIT

    lines = [f"prompt: {graph.prompt!r} ({len(graph.tokens)} tokens)", "top logits:"]
    names = graph.extra.get("logit_token_strings") or []
    for j, i in enumerate((graph.kind == LOGIT).nonzero()[0]):
        name = repr(names[j]) if j < len(names) else f"#{graph.feature[i]}"
        lines.append(f"  p={graph.probability[i]:.3f}  {name}")
    counts = ", ".join(f"{graph.count(k)} {k}s" for k in ("feature", "error", "token", "logit"))
    lines.append(f"full graph: {graph.n_nodes} nodes ({counts}), {graph.n_edges} edges")
    lines.append(
        f"pruned circuit: {pruned.n_nodes} nodes ({pruned.count('feature')} features), "
        f"{pruned.n_edges} edges"
    )
    sc = graph.scores
    lines.append(
        f"scores: replacement {sc.get('replacement', float('nan')):.3f}, "
        f"completeness {sc.get('completeness', float('nan')):.3f}"
    )
    lines.append(f"time: {seconds:.1f} s")
    return "\n".join(lines)


def _trace(args) -> int:
    from tracer.attribution import attribute
    from tracer.prune import prune

    t0 = time.perf_counter()
    rm = load_replacement(args.model, args.transcoders)
    graph = attribute(
        rm,
        args.prompt,
        max_feature_nodes=args.max_feature_nodes,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        target_tokens=args.target,
        logit_diff=tuple(args.logit_diff) if args.logit_diff else None,
        batch_size=args.batch_size,
        edge_tolerance=args.edge_tolerance,
    )
    pruned = prune(graph, args.node_threshold, args.edge_threshold)
    out = Path(args.out)
    name = slug(args.prompt)
    full_path = graph.save(out / f"{name}.full.parquet")
    pruned_path = pruned.save(out / f"{name}.parquet")
    print(summary(graph, pruned, time.perf_counter() - t0))
    print(f"wrote {full_path} (full) and {pruned_path} (pruned)")
    return 0
