"""circuit-atlas engine: model adapters, replacement model, attribution, graphs, pruning,
interventions. Typical use::

    from tracer import LanguageModel, ReplacementModel, attribute, prune
    from transcoders import load_transcoder

    model = LanguageModel.load("smollm2")
    rm = ReplacementModel(model, load_transcoder("path/to/clt"))
    graph = attribute(rm, "The capital of the state containing Dallas is")
    circuit = prune(graph)
    report = validate(rm, graph)  # perturbation checks, also in graph.extra["validation"]
"""

from tracer.architectures import ARCHITECTURES, Architecture, architecture_for
from tracer.attribution import AttributionConfig, attribute
from tracer.fetch import BUILTIN_MODELS, BuiltinModel, fetch_model
from tracer.graph import Graph, GraphFormatError
from tracer.hooks import Freeze, run_hooked
from tracer.interventions import (
    FeatureEdit,
    FeatureSwap,
    KeepOnly,
    VectorEdit,
    intervene,
    intervene_batch,
)
from tracer.model import LanguageModel, ModelLoadError, PromptError, truncate_layers
from tracer.prune import error_influence_shares, graph_scores, node_influence, prune
from tracer.replacement import PromptState, ReplacementModel
from tracer.steer import generate
from tracer.validate import ValidationReport, validate  # tracer.validate(rm, graph) -> report
from transcoders.device import DeviceError, DeviceSetting  # the one device/dtype setting

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "AttributionConfig",
    "BUILTIN_MODELS",
    "BuiltinModel",
    "DeviceError",
    "DeviceSetting",
    "FeatureEdit",
    "FeatureSwap",
    "Freeze",
    "Graph",
    "GraphFormatError",
    "KeepOnly",
    "LanguageModel",
    "ModelLoadError",
    "PromptError",
    "PromptState",
    "ReplacementModel",
    "ValidationReport",
    "VectorEdit",
    "architecture_for",
    "attribute",
    "fetch_model",
    "error_influence_shares",
    "generate",
    "graph_scores",
    "intervene",
    "intervene_batch",
    "node_influence",
    "prune",
    "run_hooked",
    "truncate_layers",
    "validate",
]
