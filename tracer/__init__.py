"""circuit-atlas engine: model adapters, replacement model, attribution, graphs, pruning,
interventions. Typical use::

    from tracer import LanguageModel, ReplacementModel, attribute, prune
    from transcoders import load_transcoder

    model = LanguageModel.load("smollm2")
    rm = ReplacementModel(model, load_transcoder("path/to/clt"))
    graph = attribute(rm, "The capital of the state containing Dallas is")
    circuit = prune(graph)
    report = validate(rm, graph)  # perturbation checks, also in graph.extra["validation"]

The public names are given lazily (PEP 562): ``import tracer`` loads nothing heavy, and
``tracer.graph`` / ``tracer.subgraph`` (the graph type, numpy and pyarrow only) never load torch,
so ``graphstore`` (which reads graphs) stays light. A name loads its module on first use.

What this package may import: ``transcoders`` (the engine reads transcoders) but never
``graphstore``, except in the apps (``tracer.cli``, ``tracer.explorer``), which wire all three.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transcoders.lazy_exports import install

# public name -> the module that holds it
_EXPORTS: dict[str, str] = {
    "ARCHITECTURES": "tracer.architectures",
    "Architecture": "tracer.architectures",
    "architecture_for": "tracer.architectures",
    "AttributionConfig": "tracer.attribution",
    "attribute": "tracer.attribution",
    "BUILTIN_MODELS": "tracer.fetch",
    "BuiltinModel": "tracer.fetch",
    "fetch_model": "tracer.fetch",
    "Graph": "tracer.graph",
    "GraphFormatError": "tracer.graph",
    "Freeze": "tracer.hooks",
    "run_hooked": "tracer.hooks",
    "FeatureEdit": "tracer.interventions",
    "FeatureSwap": "tracer.interventions",
    "KeepOnly": "tracer.interventions",
    "VectorEdit": "tracer.interventions",
    "intervene": "tracer.interventions",
    "intervene_batch": "tracer.interventions",
    "LanguageModel": "tracer.model",
    "ModelLoadError": "tracer.model",
    "PromptError": "tracer.model",
    "truncate_layers": "tracer.model",
    "error_influence_shares": "tracer.prune",
    "graph_scores": "tracer.prune",
    "node_influence": "tracer.prune",
    "prune": "tracer.prune",
    "paths": "tracer.analyses.paths",
    "add_head_loadings": "tracer.attention",
    "qk_attribution": "tracer.attention",
    "PromptState": "tracer.replacement",
    "ReplacementModel": "tracer.replacement",
    "generate": "tracer.steer",
    "ValidationReport": "tracer.analyses.validate",
    "validate": "tracer.analyses.validate",  # tracer.validate(rm, graph) -> report
    "DeviceError": "transcoders.device",  # the one device/dtype setting
    "DeviceSetting": "transcoders.device",
}

install(__name__, _EXPORTS)

if TYPE_CHECKING:  # names for type checkers and editors; nothing is imported at run time
    from tracer.analyses.paths import paths  # noqa: F401
    from tracer.analyses.validate import ValidationReport, validate  # noqa: F401
    from tracer.architectures import ARCHITECTURES, Architecture, architecture_for  # noqa: F401
    from tracer.attention import add_head_loadings, qk_attribution  # noqa: F401
    from tracer.attribution import AttributionConfig, attribute  # noqa: F401
    from tracer.fetch import BUILTIN_MODELS, BuiltinModel, fetch_model  # noqa: F401
    from tracer.graph import Graph, GraphFormatError  # noqa: F401
    from tracer.hooks import Freeze, run_hooked  # noqa: F401
    from tracer.interventions import (  # noqa: F401
        FeatureEdit,
        FeatureSwap,
        KeepOnly,
        VectorEdit,
        intervene,
        intervene_batch,
    )
    from tracer.model import LanguageModel, ModelLoadError, PromptError, truncate_layers  # noqa: F401
    from tracer.prune import error_influence_shares, graph_scores, node_influence, prune  # noqa: F401
    from tracer.replacement import PromptState, ReplacementModel  # noqa: F401
    from tracer.steer import generate  # noqa: F401
    from transcoders.device import DeviceError, DeviceSetting  # noqa: F401
