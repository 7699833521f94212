"""``circuit-atlas supernodes GRAPH...``: group each graph's features into supernodes
(tracer.analyses.supernodes), check them by perturbation (tracer.analyses.supernode_check), write
them to the
graph files and the store, print them as a table."""

from __future__ import annotations

import sys
from pathlib import Path

from tracer.cli import CLIError
from tracer.cli.graph_args import (
    add_corpus_args,
    add_store_args,
    check_transcoder,
    corpus_tokens,
    load_graphs,
    replacement_for,
    save_and_store,
    short,
)
from tracer.cli.store_cmd import format_result
from tracer.cli.validate_cmd import model_args
from transcoders.device import setting_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "supernodes",
        help="group a graph's features into supernodes and check each by perturbation",
        description="Group the feature nodes of each graph by decoder-direction, edge-profile "
        "and corpus co-activation similarity (tracer.analyses.supernodes), name the groups by "
        "shared "
        "promoted tokens and contexts, and check each group by ablation against random groups "
        "of its size (tracer.analyses.supernode_check). A graph file gets the supernodes in "
        "extra['supernodes']; the store gets (:Supernode) nodes with the graph.",
    )
    p.add_argument("graphs", nargs="+", metavar="GRAPH",
                   help="pruned graph Parquet file or stored graph id")  # fmt: skip
    model_args(p)
    add_corpus_args(p, "the co-activation signal")
    p.add_argument("--features", type=Path, default=None,
                   help="feature information for the names (default: the transcoder folder's "
                   "feature contexts, when it has them)")  # fmt: skip
    p.add_argument(
        "--min-similarity",
        type=float,
        default=0.5,
        help="clusters merge while their mean similarity is at least this",
    )
    p.add_argument("--min-size", type=int, default=2, help="smallest group reported")
    p.add_argument("--n-random", type=int, default=16, help="random groups per supernode")
    p.add_argument("--seed", type=int, default=0, help="seed of the random groups")
    p.add_argument("--no-check", action="store_true", help="skip the perturbation check")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_store_args(p, "the graphs and their supernodes")
    p.set_defaults(func=_supernodes)


def _supernodes(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from tracer.analyses.supernode_check import validate_supernodes
    from tracer.analyses.supernodes import corpus_activations, find_supernodes
    from tracer.graph import FEATURE
    from tracer.reports.feature_book import CONTEXTS_FILE, FeatureBook, load_features

    setting_from_args(args)  # a bad --device/--dtype fails first, with one line
    if args.min_size < 1 or args.n_random < 0:
        raise CLIError("--min-size must be at least 1 and --n-random at least 0")
    if args.features is not None:
        book = load_features(args.features)
    elif (Path(args.transcoders) / CONTEXTS_FILE).exists():
        book = FeatureBook.load(args.transcoders)
    else:
        book = None
    items, store = load_graphs(args.graphs, args, store_needed=True)
    try:
        rm = replacement_for(args, items[0].graph)
        for item in items:
            check_transcoder(item.graph, rm)
        tokens = corpus_tokens(args, rm.model)
        rows = []
        for item in tqdm(items, desc="graphs", unit="graph", disable=args.quiet or len(items) < 2):
            g = item.graph
            feats = np.where(g.kind == FEATURE)[0]
            acts = None
            if tokens is not None:
                pairs = [(int(g.layer[i]), int(g.feature[i])) for i in feats]
                acts = corpus_activations(rm, tokens, pairs, progress=not args.quiet)
            found = find_supernodes(g, transcoder=rm.transcoder, activations=acts, book=book,
                                    min_similarity=args.min_similarity,
                                    min_size=args.min_size)  # fmt: skip
            if found and not args.no_check:
                validate_supernodes(rm, g, found, n_random=args.n_random, seed=args.seed,
                                    progress=not args.quiet)  # fmt: skip
            where = save_and_store(item, store, lambda gid, g=g: store.add_supernodes(
                gid, g.extra["supernodes"]))  # fmt: skip
            rows += [_supernode_row(g, s) for s in found]
            print(f"{len(found)} supernodes of {g.prompt!r} ({len(feats)} features): {where}",
                  file=sys.stderr)  # fmt: skip
    finally:
        if store is not None:
            store.close()
    cols = ["prompt", "supernode", "name", "size", "influence", "cohesion", "agreement",
            "random agreement", "effect rank"]  # fmt: skip
    print(format_result(cols, rows, "table"))
    return 0


def _supernode_row(graph, s) -> list:
    v = s.validation or {}
    return [short(graph.prompt), s.id, s.name, s.size, s.influence, s.cohesion,
            v.get("agreement"), v.get("random_mean_agreement"), v.get("effect_rank")]  # fmt: skip
