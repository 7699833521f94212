"""``circuit-atlas store start|stop|status|add|export|list``, ``circuit-atlas query NAME ...`` and
``circuit-atlas cypher "MATCH ..."``: the graph store from the command line."""

from __future__ import annotations

import csv
import io
import json
import os
import sys


def register(sub) -> None:
    p = sub.add_parser("store", help="the graph store: local server, adding and exporting graphs")
    ssub = p.add_subparsers(dest="store_command", required=True)
    s = ssub.add_parser("start", help="start the local ArcadeDB server (idempotent)")
    _home_arg(s)
    s.add_argument("--port", type=int, default=None, help="Bolt port (default 7687 or free)")
    s.add_argument("--heap", default="2g", help="Java maximum heap (default 2g)")
    s.add_argument(
        "--command-timeout", type=float, default=None, metavar="S",
        help="ceiling in seconds on every command the server runs, which stops the queries of "
        "clients that died (default $CIRCUIT_ATLAS_SERVER_TIMEOUT, else 300; 0: none)",
    )  # fmt: skip
    s.set_defaults(func=_start)
    s = ssub.add_parser("stop", help="stop the local server")
    _home_arg(s)
    s.set_defaults(func=_stop)
    s = ssub.add_parser("status", help="is the local server running, where")
    _home_arg(s)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_status)
    s = ssub.add_parser("add", help="store graphs from Parquet files (circuit-atlas graph files)")
    s.add_argument("files", nargs="+", help="pruned graph files")
    s.add_argument("--full", nargs="*", default=None, help="full graphs to archive, in order")
    _connection_args(s)
    s.set_defaults(func=_add)
    s = ssub.add_parser("export", help="write a stored graph to a Parquet file")
    s.add_argument("graph", help="graph id")
    s.add_argument("out", help="output .parquet path")
    _connection_args(s)
    s.set_defaults(func=_export)
    s = ssub.add_parser("list", help="stored graphs")
    _connection_args(s)
    _format_arg(s)
    s.set_defaults(func=_list)
    s = ssub.add_parser(
        "migrate",
        help="give a store written before transcoder identities name@fingerprint keys",
        description="Stores written before transcoder identities keyed features by a bare "
        "name (the model's), so features of different transcoders could merge. Name the "
        "transcoder files each bare name stood for (their identity is computed from the "
        "weights), or --unverified to mark them NAME@unverified. Nothing is deleted.",
    )
    s.add_argument(
        "--transcoder", action="append", default=[], metavar="NAME=PATH",
        help="a bare transcoder name in the store and the transcoder it stood for; repeatable",
    )  # fmt: skip
    s.add_argument(
        "--unverified", action="store_true",
        help="rename the remaining bare names to NAME@unverified (when the files are gone)",
    )  # fmt: skip
    _connection_args(s)
    s.set_defaults(func=_migrate)

    from graphstore.queries import CANNED

    q = sub.add_parser("query", help="run a canned cross-prompt query")
    qsub = q.add_subparsers(dest="query_name", required=True, metavar="NAME")
    for cq in CANNED.values():
        c = qsub.add_parser(cq.name, help=cq.description, description=cq.description)
        for prm in cq.params:
            c.add_argument(
                "--" + prm.name.replace("_", "-"),
                dest=prm.name,
                type=prm.type,
                default=prm.default,
                required=prm.required,
                help=prm.help + ("" if prm.default is None else f" (default {prm.default})"),
            )
        c.add_argument("--show-cypher", action="store_true", help="print the Cypher text too")
        _connection_args(c)
        _format_arg(c)
        c.set_defaults(func=_query, canned=cq)

    c = sub.add_parser("cypher", help="run read-only Cypher (writes are refused)")
    c.add_argument("query", help='e.g. "MATCH (g:Graph {complete: true}) RETURN g.id, g.prompt"')
    c.add_argument(
        "--param", action="append", default=[], metavar="NAME=JSON",
        help="query parameter, value as JSON (bare text is a string); repeatable",
    )  # fmt: skip
    c.add_argument(
        "--timeout", type=float, default=None, metavar="S",
        help="stop the query (on the server too) after S seconds "
        "(default $CIRCUIT_ATLAS_QUERY_TIMEOUT, else 30; 0: none)",
    )  # fmt: skip
    c.add_argument(
        "--max-rows", type=int, default=None, metavar="N",
        help="refuse results of more than N rows (default $CIRCUIT_ATLAS_MAX_ROWS, else 10000; "
        "0: no cap)",
    )  # fmt: skip
    _connection_args(c)
    _format_arg(c)
    c.set_defaults(func=_cypher)


def _home_arg(p) -> None:
    p.add_argument("--home", default=None, help="store home (default $CIRCUIT_ATLAS_HOME/store)")


def _connection_args(p) -> None:
    _home_arg(p)
    p.add_argument(
        "--uri",
        default=os.environ.get("CIRCUIT_ATLAS_URI"),
        help="bolt:// or neo4j:// URI (default: $CIRCUIT_ATLAS_URI, else the local server)",
    )
    p.add_argument("--user", default=os.environ.get("CIRCUIT_ATLAS_USER"))
    p.add_argument(
        "--password",
        default=os.environ.get("CIRCUIT_ATLAS_PASSWORD"),
        help="password (default $CIRCUIT_ATLAS_PASSWORD)",
    )
    p.add_argument("--database", default=os.environ.get("CIRCUIT_ATLAS_DATABASE"))


def _format_arg(p) -> None:
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")


def _open(args):
    from graphstore import GraphStore

    return GraphStore(args.uri, args.user, args.password, args.database, home=args.home)


def _server(args):
    from graphstore import LocalServer

    return LocalServer(
        args.home,
        bolt_port=getattr(args, "port", None),
        heap=getattr(args, "heap", "2g"),
        command_timeout=getattr(args, "command_timeout", None),
    )


def _start(args) -> int:
    srv = _server(args)
    info = srv.start()
    state = "started" if srv.launched else "already running"
    print(f"graph store {state}: {info.uri} database {info.database} (pid {info.pid})")
    if info.command_timeout is not None:
        ceiling = f"{info.command_timeout:g} s" if info.command_timeout else "none"
        print(f"command ceiling {ceiling} (--command-timeout; applied at start)")
    print(f"home {srv.home}; password in {srv.password_file}")
    return 0


def _stop(args) -> int:
    srv = _server(args)
    print("graph store stopped" if srv.stop() else f"graph store not running (home {srv.home})")
    return 0


def _status(args) -> int:
    st = _server(args).status()
    if args.json:
        print(json.dumps(st, indent=1))
    elif st["running"]:
        print(
            f"running: {st['uri']} database {st['database']} pid {st['pid']} "
            f"(answering: {st['answering']}, up {st['uptime_s']} s, home {st['home']})"
        )
        ceiling = st.get("command_timeout_s")
        if ceiling is not None:
            print(f"command ceiling {f'{ceiling:g} s' if ceiling else 'none'}")
    else:
        print(f"not running (home {st['home']}); start it with: circuit-atlas store start")
    return 0


def _add(args) -> int:
    from tqdm import tqdm

    from tracer.graph import Graph

    fulls = args.full or []
    if fulls and len(fulls) != len(args.files):
        raise ValueError(f"--full names {len(fulls)} files for {len(args.files)} graphs")
    # Every file is read and checked before any is stored (a bad one stores nothing). Pruned
    # graphs are small and kept; full graphs are read again when stored (they can be large).
    graphs = [Graph.load(path) for path in args.files]
    for path in fulls:
        Graph.load(path)
    with _open(args) as store:
        for i, path in enumerate(tqdm(args.files, unit="graph", disable=len(args.files) < 2)):
            full = Graph.load(fulls[i]) if fulls else None
            r = store.add(graphs[i], full)
            graphs[i] = None  # released once stored
            what = "stored" if r.written else "already stored"
            print(f"{r.graph_id} {what}: {r.n_nodes} nodes, {r.n_edges} edges ({path})")
    return 0


def _migrate(args) -> int:
    from transcoders.formats import load_transcoder
    from transcoders.identity import UNVERIFIED

    with _open(args) as store:
        legacy = store.legacy_transcoders()
        if not legacy:
            print("nothing to migrate: every stored transcoder has an identity")
            return 0
        mapping = {}
        for item in args.transcoder:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--transcoder {item!r}: expected NAME=PATH")
            if name not in legacy:
                raise ValueError(
                    f"--transcoder {name!r}: not a bare transcoder name of this store "
                    f"(those are: {', '.join(sorted(legacy))})"
                )
            clt = load_transcoder(path, lazy=True)
            model = legacy[name]
            if clt.cfg.model_name and model and clt.cfg.model_name != model:
                raise ValueError(
                    f"{path} was trained for {clt.cfg.model_name!r}, but the store's {name!r} "
                    f"belongs to {model!r}: name the transcoder those graphs were traced with"
                )
            mapping[name] = clt.identity.id
        if args.unverified:
            mapping.update({n: f"{n}@{UNVERIFIED}" for n in legacy if n not in mapping})
        missing = sorted(set(legacy) - set(mapping))
        if missing:
            raise ValueError(
                f"no transcoder given for {', '.join(map(repr, missing))}: add "
                + " ".join(f"--transcoder {n}=PATH" for n in missing)
                + " (or --unverified)"
            )
        for r in store.migrate_identities(mapping):
            print(f"{r.old} -> {r.new}: {r.features} features, {r.graphs} graphs")
    return 0


def _export(args) -> int:
    with _open(args) as store:
        print(store.export_parquet(args.graph, args.out))
    return 0


def _list(args) -> int:
    with _open(args) as store:
        res = store.cypher(
            "MATCH (g:Graph) WHERE g.complete = true RETURN g.id AS graph, g.prompt AS prompt, "
            "g.model AS model, g.n_nodes AS nodes, g.n_edges AS edges, "
            "g.score_replacement AS replacement, g.score_completeness AS completeness, "
            "g.score_convention AS convention ORDER BY graph",
            max_rows=0,  # every stored graph
        )
    print(format_result(res.columns, res.rows, args.format))
    return 0


def _query(args) -> int:
    cq = args.canned
    params = {p.name: getattr(args, p.name) for p in cq.params}
    params = {k: v for k, v in params.items() if v is not None}
    if args.show_cypher:
        print(cq.text(**params).strip(), file=sys.stderr)
    with _open(args) as store:
        res = store.query(cq.name, **params)
    print(format_result(res.columns, res.rows, args.format))
    return 0


def _cypher(args) -> int:
    params = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r}: write NAME=VALUE")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    with _open(args) as store:
        res = store.cypher(args.query, params, timeout=args.timeout, max_rows=args.max_rows)
    print(format_result(res.columns, res.rows, args.format))
    return 0


def format_result(columns: list[str], rows: list[list], fmt: str) -> str:
    """Rows as an aligned text table, CSV or JSON (a list of objects)."""
    if fmt == "json":
        return json.dumps([dict(zip(columns, r, strict=True)) for r in rows], indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([_cell(v) for v in r])
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list | dict):
        return json.dumps(v)
    return "" if v is None else str(v)
