"""``circuit-atlas swap GRAPH OTHER ...`` and ``circuit-atlas swap --batch FILE``: swap
experiments (tracer.analyses.swap), stored with the graphs (their files and the store)."""

from __future__ import annotations

import re
from pathlib import Path

from tracer.cli import CLIError
from tracer.cli.graph_args import (
    add_store_args,
    check_transcoder,
    ensure_stored,
    load_file_graph,
    load_graphs,
    open_store,
    replacement_for,
    save_and_store,
    short,
)
from tracer.cli.store_cmd import format_result
from tracer.cli.validate_cmd import model_args
from transcoders.device import setting_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "swap",
        help="swap features (or supernodes) of one prompt for another prompt's",
        description="Ablate features of GRAPH's prompt and set features of OTHER's prompt to "
        "their activations there (positions aligned at the last token), then show the next "
        "tokens and a continuation before and after (tracer.analyses.swap). Features are "
        "supernodes of "
        "the graphs (--remove s0 --insert s1) and/or given directly (L/F@P). --batch runs a "
        "JSON Lines file of {graph, remove, other_graph, insert}. Results go into the graph "
        "files (extra['swaps']) and the store.",
    )
    p.add_argument("graph", nargs="?", metavar="GRAPH",
                   help="graph (file or stored id) of the prompt to edit")  # fmt: skip
    p.add_argument(
        "other",
        nargs="?",
        metavar="OTHER",
        help="graph (file or stored id) of the prompt the inserted features come from",
    )
    p.add_argument(
        "--remove",
        action="append",
        default=[],
        metavar="SUPERNODE",
        help="a supernode of GRAPH to ablate (repeatable)",
    )
    p.add_argument(
        "--insert",
        action="append",
        default=[],
        metavar="SUPERNODE",
        help="a supernode of OTHER to insert (repeatable)",
    )
    p.add_argument(
        "--remove-feature",
        action="append",
        default=[],
        metavar="L/F@P",
        help="a feature active in GRAPH's prompt to ablate (repeatable)",
    )
    p.add_argument(
        "--insert-feature",
        action="append",
        default=[],
        metavar="L/F@P",
        help="a feature active in OTHER's prompt to insert (repeatable)",
    )
    p.add_argument("--batch", type=Path, help="JSON Lines file of swaps (tracer.analyses.swap)")
    model_args(p)
    from tracer.interventions import MODES

    p.add_argument("--mode", choices=MODES, default="live", help="intervention mode")
    p.add_argument("--top-k", type=int, default=5, help="next tokens shown")
    p.add_argument("--max-new-tokens", type=int, default=10, help="continuation length")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_store_args(p, "the graphs and each swap result")
    p.set_defaults(func=_swap)


_FEATURE = re.compile(r"\s*L?(\d+)\s*/\s*F?(\d+)\s*@\s*(\d+)\s*")


def parse_feature(text: str) -> tuple[int, int, int]:
    """``L/F@P`` (``3/120@5`` or ``L3/F120@5``) -> (layer, position, index)."""
    m = _FEATURE.fullmatch(text)
    if m is None:
        raise CLIError(f"{text!r}: write a feature as L/F@P (layer/feature@position), e.g. 3/120@5")
    return int(m.group(1)), int(m.group(3)), int(m.group(2))


def _swap(args) -> int:
    setting_from_args(args)
    if args.batch is not None:
        if args.graph or args.remove or args.insert or args.remove_feature or args.insert_feature:
            raise CLIError("--batch FILE takes its swaps from the file: give no graphs or features")
        return _swap_batch(args)
    if not (args.graph and args.other):
        raise CLIError("give GRAPH and OTHER (the prompt to edit and the one features come "
                       "from), or --batch FILE")  # fmt: skip
    remove_f = [parse_feature(t) for t in args.remove_feature]
    insert_f = [parse_feature(t) for t in args.insert_feature]
    if not (args.remove or args.insert or remove_f or insert_f):
        raise CLIError("nothing to swap: give --remove/--insert SUPERNODE or "
                       "--remove-feature/--insert-feature L/F@P")  # fmt: skip
    items, store = load_graphs([args.graph, args.other], args, store_needed=True)
    try:
        item, other = items
        rm = replacement_for(args, item.graph)
        for it in items:
            check_transcoder(it.graph, rm)
        result = _run_swap(rm, item.graph, other.graph, args, remove_f, insert_f)
        result.label["other_graph"] = other.label
        item.graph.extra.setdefault("swaps", []).append(result.to_dict())
        where = save_and_store(item, store, lambda gid: store.add_swap(
            gid, result.to_dict(), ensure_stored(store, other)))  # fmt: skip
    finally:
        if store is not None:
            store.close()
    print("\n".join(result.lines()))
    print(f"moved: {result.moved}; wrote {where}")
    return 0


def _run_swap(rm, graph, other, args, remove_f, insert_f):
    """One swap: supernodes' members (tracer.analyses.swap.swap_supernodes when only supernodes are
    given) plus features named directly."""
    from tracer.analyses.supernodes import get_supernode
    from tracer.analyses.swap import swap, swap_supernodes

    opts = {"mode": args.mode, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens}
    if not remove_f and not insert_f:
        return swap_supernodes(rm, graph, args.remove, other, args.insert, **opts)
    out_s = [get_supernode(graph, sid) for sid in args.remove]
    in_s = [get_supernode(other, sid) for sid in args.insert]
    out_f = [m for s in out_s for m in s.members] + remove_f
    in_f = [m for s in in_s for m in s.members] + insert_f
    result = swap(rm, graph.prompt, out_f, in_f, other.prompt, **opts)
    result.label = {"remove": args.remove, "insert": args.insert,
                    "remove_names": [s.name for s in out_s],
                    "insert_names": [s.name for s in in_s],
                    "remove_features": remove_f, "insert_features": insert_f}  # fmt: skip
    return result


def _swap_batch(args) -> int:
    from tracer.analyses.swap import read_swap_file, run_swap_file

    recs = read_swap_file(args.batch)
    # Every graph of the file is checked before anything runs.
    graphs = [load_file_graph(str(rec[k])).graph for rec in recs for k in ("graph", "other_graph")]
    store = open_store(args)
    try:
        rm = replacement_for(args, graphs[0])
        for g in graphs:
            check_transcoder(g, rm)
        done = run_swap_file(rm, args.batch, progress=not args.quiet)
        rows = []
        for gpath, result in done:
            item = load_file_graph(str(gpath))
            if store is not None:
                other = load_file_graph(result.label["other_graph"])
                store.add_swap(ensure_stored(store, item), result.to_dict(),
                               ensure_stored(store, other))  # fmt: skip
            names = f"{','.join(result.label['remove'])} -> {','.join(result.label['insert'])}"
            rows.append(
                [
                    short(result.prompt),
                    short(result.other_prompt),
                    names,
                    result.top_before[0][0],
                    result.top_after[0][0],
                    result.moved,
                ]
            )
    finally:
        if store is not None:
            store.close()
    cols = ["prompt", "other prompt", "swap", "top before", "top after", "moved"]
    print(format_result(cols, rows, "table"))
    where = "the graph files" + (" and the store" if store is not None else "")
    print(f"{len(done)} swaps written to {where}")
    return 0
