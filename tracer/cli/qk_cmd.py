"""``circuit-atlas qk``: why a head attends from a query to a key, and which heads carry an edge.

``circuit-atlas qk GRAPH --layer L --head H --query Q --key K --transcoders T`` splits head
(L, H)'s pre-softmax score from position Q to position K on the graph's prompt into (query-side
node x key-side node) pairs plus constants (``tracer.attention.qk``). ``--edge TARGET SOURCE``
(node ids as the graph names them, e.g. ``f_12_5_301 t_2``) prints the edge's head loadings (a
graph traced with ``trace --heads``) and the QK attribution of its top heads at the positions
it connects.
"""

from __future__ import annotations

import json

from transcoders.device import add_device_arguments, setting_from_args


def register(sub) -> None:
    p = sub.add_parser("qk", help="QK attribution of a head's score; the heads of an edge")
    p.add_argument("graph", help="graph file (Parquet) written by 'circuit-atlas trace'")
    p.add_argument("--layer", type=int, help="attention layer")
    p.add_argument("--head", type=int, help="query head of that layer")
    p.add_argument("--query", type=int, help="query position (0 = the start token)")
    p.add_argument("--key", type=int, help="key position (at or before the query)")
    p.add_argument("--edge", nargs=2, metavar=("TARGET", "SOURCE"),
                   help="an edge of the circuit by node ids: its heads (needs trace --heads) "
                   "and their QK attributions")  # fmt: skip
    p.add_argument("--top-heads", type=int, default=3, help="with --edge: heads to attribute")
    p.add_argument("--top", type=int, default=20, help="pairs and marginals shown (default 20)")
    p.add_argument("--model", help="model folder or 'smollm2' (default: the graph's model)")
    p.add_argument("--transcoders", required=True, help="the transcoder the graph was traced with")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_device_arguments(p)
    p.set_defaults(func=_qk)


def node_label(node: str, tokens: list[str]) -> str:
    """A readable label for a node id: ``L3/F12@5 'cat'``, ``err L2@5``, ``tok 'cat'@5``."""
    parts = node.split("_")
    if node == "bias":
        return "bias (constant)"
    if parts[0] == "f":
        l, p, f = (int(x) for x in parts[1:])
        return f"L{l}/F{f}@{p} {tokens[p]!r}"
    if parts[0] == "e":
        l, p = int(parts[1]), int(parts[2])
        return f"err L{l}@{p}"
    if parts[0] == "t":
        p = int(parts[1])
        return f"tok {tokens[p]!r}@{p}"
    return node


def format_qk(res, in_graph: set[str] | None = None) -> str:
    """The text the command prints for one QK attribution."""
    toks = res.tokens
    mark = (lambda n: "*" if n in in_graph else " ") if in_graph else (lambda n: " ")
    lines = [
        f"head L{res.layer}.H{res.head}: query {res.query_pos} {toks[res.query_pos]!r} -> key "
        f"{res.key_pos} {toks[res.key_pos]!r}: score {res.score:+.4f} (pre-softmax"
        + (f", soft-capped {res.capped:+.4f}" if res.capped is not None else "")
        + f"), pattern {res.pattern:.4f}",
        f"nodes: {res.n_query_nodes} on the query side, {res.n_key_nodes} on the key side"
        + ("; * = in the graph" if in_graph else ""),
        "top pairs (query node x key node):",
    ]
    for q, k, v in res.pairs:
        lines.append(
            f"  {v:+.4f}  {mark(q)}{node_label(q, toks)}  x  {mark(k)}{node_label(k, toks)}"
        )
    lines.append("query-side marginals (summed over every key node):")
    for n, v in res.query_marginals:
        lines.append(f"  {v:+.4f}  {mark(n)}{node_label(n, toks)}")
    lines.append("key-side marginals (summed over every query node):")
    for n, v in res.key_marginals:
        lines.append(f"  {v:+.4f}  {mark(n)}{node_label(n, toks)}")
    c = res.constants
    lines.append(
        f"constants: bias x bias {c['bias_x_bias']:+.4f}, query bias x key nodes "
        f"{c['query_bias_x_keys']:+.4f}, query nodes x key bias {c['queries_x_key_bias']:+.4f}"
    )
    lines.append(f"pieces minus the recorded score: {res.unexplained:+.2e}")
    return "\n".join(lines)


def _qk(args) -> int:
    from tracer.attention import HeadAnalysisError, read_head_loadings
    from tracer.attention.qk import check_head_request, qk_attribution
    from tracer.attribution import FrozenLinearModel
    from tracer.cli import CLIError
    from tracer.cli.trace_cmd import load_replacement
    from tracer.graph import Graph

    head_args = [args.layer, args.head, args.query, args.key]
    if args.edge is None and any(a is None for a in head_args):
        raise CLIError("give --layer, --head, --query and --key (or --edge TARGET SOURCE)")
    if args.edge is not None and any(a is not None for a in head_args):
        raise CLIError("give either --edge or --layer/--head/--query/--key, not both")
    setting = setting_from_args(args)
    graph = Graph.load(args.graph)
    loads = None
    if args.edge is not None:
        loads = read_head_loadings(graph, args.graph)  # fails before any model is loaded
        key = tuple(args.edge)
        if key not in loads:
            raise HeadAnalysisError(
                f"edge {key[0]} <- {key[1]} is not among the {len(loads)} circuit edges with "
                f"head loadings in {args.graph}: give node ids of a circuit edge (target first)"
            )
    rm = load_replacement(args.model or graph.model_name, args.transcoders, setting,
                          exclude_bos=bool(graph.params.get("exclude_bos", True)))  # fmt: skip
    if rm.transcoder.identity.id != graph.transcoder_name:
        raise CLIError(
            f"{args.graph} was traced with transcoder {graph.transcoder_name} but --transcoders "
            f"loads {rm.transcoder.identity.id}: give the transcoder the graph was traced with"
        )
    import torch

    tokens = torch.as_tensor(graph.tokens)
    state = rm.record(tokens)
    in_graph = {graph.node_id(i) for i in range(graph.n_nodes)}
    lin = None
    results, out = [], []
    if args.edge is None:
        check_head_request(rm.model, state, args.layer, args.head, args.query, args.key)
        lin = FrozenLinearModel(rm, state, dtype=torch.float64)
        res = qk_attribution(rm, tokens, args.layer, args.head, args.query, args.key,
                             args.top, state=state, lin=lin)  # fmt: skip
        results.append(res)
        out.append(format_qk(res, in_graph))
    else:
        eh = loads[tuple(args.edge)]
        toks = graph.token_strings
        index = {graph.node_id(i): i for i in range(graph.n_nodes)}
        t, s = index[eh.target], index[eh.source]
        q = int(graph.position[t])
        k = int(graph.position[s])
        out.append(f"edge {node_label(eh.target, toks)} <- {node_label(eh.source, toks)}: "
                   f"{eh.weight:+.4f}")  # fmt: skip
        out.append(f"  residual (no attention hop) {eh.residual:+.4f}")
        for l, h, p in eh.heads:
            out.append(f"  head L{l}.H{h} {p:+.4f} ({abs(p) / max(abs(eh.weight), 1e-30):.0%})")
        out.append(f"  other heads {eh.remainder:+.4f}")
        for l, h, _ in eh.heads[: args.top_heads]:
            try:
                check_head_request(rm.model, state, l, h, q, k)
            except HeadAnalysisError as err:
                out.append(f"\nhead L{l}.H{h}: no QK attribution at ({q}, {k}): {err}")
                continue
            if lin is None:
                lin = FrozenLinearModel(rm, state, dtype=torch.float64)
            res = qk_attribution(rm, tokens, l, h, q, k, args.top, state=state, lin=lin)
            results.append(res)
            out.append("\n" + format_qk(res, in_graph))
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        print("\n".join(out))
    return 0
