"""Reports of graphs: Graphviz drawings, the HTML report, Neuronpedia JSON, feature
cards (FeatureBook) and token annotations. May import the engine and transcoders,
never graphstore."""

from __future__ import annotations

from transcoders.lazy_exports import install

# public name -> the module that holds it (loaded on first use)
_EXPORTS: dict[str, str] = {
    "write_report": "tracer.reports.report",
    "write_index": "tracer.reports.report",
    "ReportConfig": "tracer.reports.report",
    "render_graph": "tracer.reports.render",
    "RenderConfig": "tracer.reports.render",
    "to_neuronpedia": "tracer.reports.neuronpedia",
    "read_subgraph": "tracer.reports.neuronpedia",
    "write_neuronpedia": "tracer.reports.neuronpedia",
    "FeatureBook": "tracer.reports.feature_book",
    "load_features": "tracer.reports.feature_book",
}

install(__name__, _EXPORTS)
