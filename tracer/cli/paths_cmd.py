"""``circuit-atlas paths GRAPH [--target TOKEN] [-k K]``: the strongest paths from the prompt's
tokens to a logit (or from a node up to the logits), by product of row-normalised |edge|
weights (tracer.analyses.paths). Light: loads no torch."""

from __future__ import annotations

import json

from tracer.cli import CLIError
from tracer.cli.graph_args import add_store_args, load_graphs


def register(sub) -> None:
    p = sub.add_parser(
        "paths",
        help="the strongest paths from the tokens to a logit (or from a node up)",
        description="List the K strongest paths of a graph: from any input token to the chosen "
        "logit (default: the most probable), or, when --target names another node, from that "
        "node up to the logits. A path's score is the product of its edges' |weight| divided "
        "by the total |weight| into each edge's target (tracer.analyses.paths).",
    )
    p.add_argument("graph", metavar="GRAPH", help="graph Parquet file or stored graph id")
    p.add_argument(
        "--target", default=None, metavar="TOKEN",
        help="a logit token ('Paris', '␣Paris' or ' Paris') or a node id (Neuronpedia form, e.g. "
        "3_17_5 or E_504_2); default: the most probable logit",
    )  # fmt: skip
    p.add_argument("-k", type=int, default=5, help="how many paths (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_store_args(p, "nothing (it is only read)")
    p.set_defaults(func=_paths)


def _paths(args) -> int:
    from tracer.analyses.paths import node_step, paths, resolve_target
    from tracer.graph import LOGIT

    if args.k < 1:
        raise CLIError(f"-k {args.k}: ask for at least one path")
    items, store = load_graphs([args.graph], args, store_needed=False)
    try:
        g = items[0].graph
        target = resolve_target(g, args.target)
        found = paths(g, target, args.k)
    finally:
        if store is not None:
            store.close()
    if args.json:
        doc = {"graph": items[0].graph_id, "target": node_step(g, target),
               "paths": [p.to_dict(g) for p in found]}  # fmt: skip
        print(json.dumps(doc, ensure_ascii=False, indent=1))
        return 0
    way = "to" if g.kind[target] == LOGIT else "from"
    print(f"{len(found)} strongest path(s) {way} {node_step(g, target)} in {items[0].label}")
    for j, p in enumerate(found, 1):
        print(f"{j:>3}. {p.score:.4g}  {p.text(g)}")
    if not found:
        print("    (no path: the node is not connected to the logits)")
    return 0
