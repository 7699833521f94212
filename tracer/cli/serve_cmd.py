"""``circuit-atlas serve``: the explorer, a local web app over the store and graph files."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("serve", help="the interactive circuit explorer (a local web app)")
    p.add_argument(
        "--store", nargs="?", const="", default=None, metavar="URI",
        help="read graphs from the graph store: the embedded local one, or a bolt:// URI "
        "(default: the local store when no --graphs folder is given)",
    )  # fmt: skip
    p.add_argument("--graphs", help="a folder of Parquet graphs (as `circuit-atlas trace` writes)")
    p.add_argument("--transcoders", help="the transcoder: feature contexts and interventions")
    p.add_argument("--model", default=None, help="model for interventions (with --transcoders)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--token", default=None,
                   help="access token requests must carry (default: a random one, printed in "
                        "the URL)")  # fmt: skip
    p.add_argument("--no-token", action="store_true",
                   help="no access token (loopback --host only; Host, Origin and CSRF checks "
                        "stay)")  # fmt: skip
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (a DNS name this "
                        "machine is reached by; repeatable; '*' for any)")  # fmt: skip
    p.set_defaults(func=_serve)


def build(args):
    """(app, store or None) from the parsed arguments; nothing is loaded that is not asked for
    (the model loads on the first intervention)."""
    from tracer.explorer import ExplorerConfig, GraphSource, InterventionService, create_app
    from tracer.explorer.app import check_built

    check_built()
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a port number (1-65535)")
    if args.graphs and not Path(args.graphs).is_dir():
        raise FileNotFoundError(
            f"--graphs {args.graphs} is not a folder: give the folder `circuit-atlas trace --out` "
            "wrote (default runs/graphs)"
        )
    if args.graphs:  # every graph file checked first: a bad one is one line, exit 2
        from tracer.graph import Graph

        for path in sorted(Path(args.graphs).glob("*.parquet")):
            if not path.name.endswith(".full.parquet"):
                Graph.load(path)
    if args.model and not args.transcoders:
        raise ValueError("--model needs --transcoders (the transcoder of the graphs' features)")
    store = None
    if args.store is not None or not args.graphs:
        from tracer.cli.graph_args import open_store

        store = open_store(args.store or None)
    features = None
    loader = None
    if args.transcoders:
        from tracer.reports.feature_book import CONTEXTS_FILE, FeatureBook
        from transcoders.formats.hub import looks_like_reference
        from transcoders.formats.presets import preset

        source_name = args.transcoders  # a folder, or a published name (hub id, preset, hf://)
        tpath = Path(source_name)
        published = looks_like_reference(source_name) or preset(source_name) is not None
        if not tpath.exists() and not published:
            raise FileNotFoundError(f"--transcoders {tpath} does not exist")
        if tpath.exists() and (tpath / CONTEXTS_FILE).exists():
            features = FeatureBook.load(tpath)
        model = args.model or "smollm2"

        def loader():
            from tracer.batch import load_replacement

            return load_replacement(model, source_name)

    source = GraphSource(store=store, folder=args.graphs)
    decode = None
    app = create_app(
        source,
        features=features,
        interventions=InterventionService(loader=loader),
        config=ExplorerConfig(
            token=getattr(args, "token", None),
            host=args.host,
            allow_hosts=tuple(getattr(args, "allow_host", ()) or ()),
        ),
        decode=decode,
    )
    return app, store


def _serve(args) -> int:
    from tracer.explorer.server import access_token, serve, url

    args.token = access_token(args.host, args.token, args.no_token)
    app, store = build(args)
    print(f"circuit-atlas explorer: {url(args.host, args.port, args.token)}", file=sys.stderr)
    try:
        serve(app, args.host, args.port)
    finally:
        if store is not None:
            store.close()
    return 0
