"""What the cross-prompt commands share: graphs named by file or by stored id, the store they
read and write (``--store URI`` / ``--no-store``), the corpus option and transcoder checks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tracer.cli import CLIError


def add_store_args(p, writes: str) -> None:
    """``--store URI`` and ``--no-store``; ``writes``: what the command writes there."""
    p.add_argument(
        "--store", default=os.environ.get("CIRCUIT_ATLAS_URI"), metavar="URI",
        help="bolt:// or neo4j:// URI of the graph store (default: $CIRCUIT_ATLAS_URI, else "
        "the embedded local store; user, password and database from $CIRCUIT_ATLAS_USER, "
        f"$CIRCUIT_ATLAS_PASSWORD, $CIRCUIT_ATLAS_DATABASE). It receives {writes}",
    )  # fmt: skip
    p.add_argument(
        "--no-store", action="store_true",
        help="graph files only: nothing is read from or written to the store",
    )  # fmt: skip


def add_corpus_args(p, what: str) -> None:
    """``--corpus`` and ``--corpus-seqs``: the corpus sequences ``what`` is measured on."""
    p.add_argument(
        "--corpus", default="public",
        help=f"corpus for {what}: 'public' (the fetched public-domain corpus, the default), a "
        "text file or corpus folder, or 'none' to go without",
    )  # fmt: skip
    p.add_argument("--corpus-seqs", type=int, default=32,
                   help="corpus sequences used (the last N; default 32)")  # fmt: skip


def open_store(where=None):
    """The graph store every command opens, with one credential policy.

    ``where``: a Bolt URI (``bolt://`` / ``neo4j://``), None or "" for the embedded local store,
    or parsed arguments with ``--store URI`` / ``--no-store`` (None with --no-store). A URI's
    user, password and database come from ``$CIRCUIT_ATLAS_USER``, ``$CIRCUIT_ATLAS_PASSWORD``
    and ``$CIRCUIT_ATLAS_DATABASE``; the embedded store needs none."""
    if where is not None and not isinstance(where, str):  # parsed arguments
        if getattr(where, "no_store", False):
            return None
        where = getattr(where, "store", None)
    from graphstore import GraphStore

    if not where:
        return GraphStore()
    env = os.environ.get
    return GraphStore(where, env("CIRCUIT_ATLAS_USER"), env("CIRCUIT_ATLAS_PASSWORD"),
                      env("CIRCUIT_ATLAS_DATABASE"))  # fmt: skip


def corpus_tokens(args, model):
    """The last ``--corpus-seqs`` sequences of ``--corpus`` as a long tensor [S, P] (cut to
    the model's context), or None for ``--corpus none``."""
    import torch

    from tracer.cli.train_cmd import load_corpus

    if args.corpus == "none":
        return None
    if args.corpus_seqs < 1:
        raise CLIError(f"--corpus-seqs {args.corpus_seqs}: give at least 1 (or --corpus none)")
    tokens = load_corpus(args.corpus, model).tokens[-args.corpus_seqs :]
    context = model.facts.max_positions or tokens.shape[1]
    return torch.as_tensor(tokens[:, :context], dtype=torch.long)


@dataclass
class GraphInput:
    """A graph given on the command line: loaded from ``path`` or from the store (path None),
    with its store id."""

    graph: object  # tracer.graph.Graph
    path: Path | None
    graph_id: str

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else self.graph_id


def is_file_ref(ref: str) -> bool:
    """A graph argument that names a file (an existing path or one ending in .parquet)."""
    return Path(ref).exists() or ref.endswith(".parquet")


def load_file_graph(ref: str) -> GraphInput:
    from graphstore import graph_id
    from tracer.graph import Graph

    path = Path(ref)
    if not path.exists():
        raise FileNotFoundError(f"graph file {path} does not exist")
    g = Graph.load(path)
    return GraphInput(g, path, graph_id(g))


def load_stored_graph(ref: str, store) -> GraphInput:
    """A stored graph by id, its stored supernodes in ``extra['supernodes']``."""
    if store is None:
        raise CLIError(
            f"{ref!r} is not a graph file, and --no-store leaves no store to find it in: "
            "give a Parquet graph file or a stored graph id"
        )
    g = store.load(ref)
    found = store.supernodes(ref)
    if found:
        g.extra["supernodes"] = found
    return GraphInput(g, None, ref)


def load_graphs(refs: list[str], args, store_needed: bool):
    """Each argument as a GraphInput, and the store (None with --no-store, or when it is not
    ``store_needed`` and every argument is a file). Files are read first: a bad file fails
    before the store is started."""
    files = {r: load_file_graph(r) for r in refs if is_file_ref(r)}
    store = open_store(args) if store_needed or len(files) < len(refs) else None
    try:
        items = [files[r] if r in files else load_stored_graph(r, store) for r in refs]
    except BaseException:
        if store is not None:
            store.close()
        raise
    return items, store


def full_sibling(path: Path) -> Path | None:
    """``X.full.parquet`` beside a pruned ``X.parquet`` (as ``trace`` writes them), if any."""
    if path.name.endswith(".full.parquet"):
        return None
    sib = path.with_name(path.name[: -len(".parquet")] + ".full.parquet")
    return sib if path.name.endswith(".parquet") and sib.exists() else None


def ensure_stored(store, item: GraphInput) -> str:
    """Store a graph read from a file unless the store already holds it (a graph already there
    is not written again: re-writing it would drop the supernodes and swaps stored with it),
    with the supernodes its file holds. Returns its id."""
    from tracer.graph import Graph

    if item.path is None or item.graph_id in set(store.graph_ids()):
        return item.graph_id
    sib = full_sibling(item.path)
    gid = store.add(item.graph, Graph.load(sib) if sib is not None else None).graph_id
    if item.graph.extra.get("supernodes"):
        store.add_supernodes(gid, item.graph.extra["supernodes"])
    return gid


def check_transcoder(graph, rm) -> None:
    """A graph's features belong to the transcoder it was traced with: refuse another one."""
    want = rm.transcoder.identity.id
    if graph.transcoder_name != want:
        raise CLIError(
            f"the graph of {graph.prompt!r} was traced with transcoder "
            f"{graph.transcoder_name!r}, but --transcoders is {want!r}: give the transcoder "
            "the graph was traced with"
        )


def replacement_for(args, graph=None):
    """The model and transcoder of ``args`` (model_args) as a ReplacementModel, with the start
    token treated as ``graph`` was traced (default: as --keep-bos says)."""
    from tracer.cli.validate_cmd import replacement

    default = not args.keep_bos
    exclude = bool(graph.params.get("exclude_bos", default)) if graph is not None else default
    return replacement(args, exclude_bos=exclude)


def short(text: str, n: int = 32) -> str:
    """A prompt for a table cell: newlines shown as ⏎, cut to ``n`` characters."""
    text = text.replace("\n", "⏎")
    return text if len(text) <= n else text[: n - 1] + "…"


def save_and_store(item: GraphInput, store, write) -> str:
    """Rewrite a graph file with what the command added to it, store the graph (when it is not
    stored yet) and call ``write(graph_id)``; returns where the results went."""
    where = []
    if item.path is not None:
        item.graph.save(item.path)
        where.append(str(item.path))
    if store is not None:
        gid = ensure_stored(store, item)
        write(gid)
        where.append(f"store graph {gid}")
    return " and ".join(where) or "nowhere (--no-store)"
