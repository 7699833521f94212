"""``circuit-atlas report GRAPH.parquet ...``: HTML report, SVG/PNG graph and Neuronpedia JSON
per graph file, plus an index page when several graphs are given."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write HTML reports, rendered graphs and Neuronpedia JSON for graph files",
        description="For each graph file: <slug>.html (self-contained report), <slug>.svg and "
        ".png (the rendered graph) and <slug>.json (Neuronpedia graph JSON); with several "
        "graphs also index.html linking them.",
    )
    p.add_argument("graphs", nargs="+", type=Path, help="graph Parquet file(s)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="output folder")
    p.add_argument(
        "--features",
        type=Path,
        default=None,
        help="feature information (top contexts, histograms, promoted tokens): the transcoder "
        "folder or its feature_contexts.parquet, or a JSON file (see tracer.reports.feature_book)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model whose tokenizer spells logit tokens a graph does not name itself "
        "(folder, hub id or 'smollm2')",
    )
    p.add_argument("--max-nodes", type=int, default=160, help="nodes drawn in the graph picture")
    p.add_argument("--max-edges", type=int, default=500, help="edges drawn in the graph picture")
    p.add_argument("--no-png", action="store_true", help="write SVG only")
    p.add_argument(
        "--scan",
        default=None,
        help="Neuronpedia model id written into the graph JSON (default: the graph's model name)",
    )
    p.set_defaults(func=_report)


def _report(args) -> int:
    from tqdm import tqdm

    from tracer.graph import Graph
    from tracer.reports.feature_book import load_features
    from tracer.reports.render import RenderConfig
    from tracer.reports.report import ReportConfig, ensure_output_dir, write_index, write_report

    # Fail before any work on a bad folder or a bad feature file.
    out = ensure_output_dir(args.out)
    for path in args.graphs:
        if not path.exists():
            raise FileNotFoundError(f"graph file {path} does not exist")
        Graph.load(path)  # checked (GraphFormatError: one line) before any work is done
    book = load_features(args.features)
    decode = None
    if args.model:
        from tracer.model import LanguageModel

        model = LanguageModel.load(args.model)
        decode = lambda vocab_id: model.decode([vocab_id])  # noqa: E731
    config = ReportConfig(
        render=RenderConfig(
            max_nodes=args.max_nodes,
            max_edges=args.max_edges,
            formats=("svg",) if args.no_png else ("svg", "png"),
        ),
        scan=args.scan,
    )
    written = []
    used: set[str] = set()
    for path in tqdm(args.graphs, desc="reports", unit="graph", disable=len(args.graphs) < 2):
        graph = Graph.load(path)
        name = _unique(path.stem, used)
        written.append(write_report(graph, out, book, name=name, config=config, decode=decode))
    for files in written:
        names = [p for p in (files.html, files.svg, files.png, files.json) if p is not None]
        print("  ".join(str(p) for p in names))
    if len(written) > 1:
        print(write_index(out, written))
    return 0


def _unique(stem: str, used: set[str]) -> str:
    """File stems for the outputs; two inputs with the same stem get numbered names."""
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name
