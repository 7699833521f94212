"""``circuit-atlas contrast GRAPH_A GRAPH_B``: what differs between two prompts' graphs
(tracer.analyses.contrast), printed as tables; the difference graph and summary written to files."""

from __future__ import annotations

import json
from pathlib import Path

from tracer.cli import CLIError
from tracer.cli.graph_args import add_store_args, load_graphs
from tracer.cli.store_cmd import format_result


def register(sub) -> None:
    p = sub.add_parser(
        "contrast",
        help="what differs between the graphs of two prompts",
        description="Features and edges found in one graph only, shared edges that change sign "
        "or size most (matched by feature identity: both graphs must come from the same "
        "transcoder), and a difference graph (activations a - b, weights w_a - w_b).",
    )
    p.add_argument("graph_a", metavar="GRAPH_A", help="graph Parquet file or stored graph id")
    p.add_argument("graph_b", metavar="GRAPH_B", help="graph Parquet file or stored graph id")
    p.add_argument("--top", type=int, default=10, help="rows per list (default 10)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/contrast"),
        help="folder for the difference graph (.parquet) and summary (.json)",
    )
    add_store_args(p, "nothing (it is read for graph ids only)")
    p.set_defaults(func=_contrast)


def _contrast(args) -> int:
    from tracer.analyses.contrast import contrast, describe
    from tracer.batch import slug

    if args.top < 1:
        raise CLIError(f"--top {args.top}: give at least 1")
    items, store = load_graphs([args.graph_a, args.graph_b], args, store_needed=False)
    if store is not None:
        store.close()
    a, b = items[0].graph, items[1].graph
    c = contrast(a, b)
    s = c.summary(n=args.top)
    n = args.top
    print(f"a: {a.prompt!r} ({items[0].label})\nb: {b.prompt!r} ({items[1].label})")
    print(f"features only in a: {s['n_features_only_in_a']}, only in b: "
          f"{s['n_features_only_in_b']}, shared: {s['n_features_shared']}; edges only in a: "
          f"{s['n_edges_only_in_a']}, only in b: {s['n_edges_only_in_b']}; sign flips: "
          f"{s['n_sign_flips']}")  # fmt: skip
    for title, rows in (("only in a", c.only_in_a), ("only in b", c.only_in_b)):
        print(f"\nfeatures {title} (by influence)")
        print(
            format_result(
                ["feature", "activation", "influence"],
                [[f"L{r[0]}/F{r[1]}", r[2], r[3]] for r in rows[:n]],
                "table",
            )
        )
    print("\nshared features whose influence changes most")
    print(
        format_result(
            ["feature", "influence a", "influence b"],
            [[f"L{r[0]}/F{r[1]}", r[4], r[5]] for r in c.shared[:n]],
            "table",
        )
    )
    for title, edges in (("edges that change sign", c.sign_flips),
                         ("edges that change most", c.largest_changes)):  # fmt: skip
        print(f"\n{title}")
        print(format_result(
            ["source", "target", "weight a", "weight b", "change"],
            [[describe(e.source), describe(e.target), e.weight_a, e.weight_b, e.change]
             for e in edges[:n]], "table"))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(a.prompt, 32)}--{slug(b.prompt, 32)}"
    diff = c.difference_graph().save(out / f"{stem}.parquet")
    js = out / f"{stem}.json"
    js.write_text(json.dumps({**s, "graph_a": items[0].label, "graph_b": items[1].label},
                             indent=1, default=str))  # fmt: skip
    print(f"\nwrote {diff} (difference graph) and {js}")
    return 0
