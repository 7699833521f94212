"""circuit-atlas engine: model adapters, replacement model, attribution, graphs, pruning,
interventions. Typical use::

    from tracer import LanguageModel, ReplacementModel, attribute, prune
    from transcoders import load_transcoder

    model = LanguageModel.load("smollm2")
    rm = ReplacementModel(model, load_transcoder("path/to/clt"))
    graph = attribute(rm, "The capital of the state containing Dallas is")
    circuit = prune(graph)
"""

from tracer.architectures import ARCHITECTURES, Architecture, architecture_for
from tracer.attribution import AttributionConfig, attribute
from tracer.graph import Graph, GraphFormatError
from tracer.hooks import Freeze, run_hooked
from tracer.interventions import FeatureEdit, FeatureSwap, VectorEdit, intervene
from tracer.model import LanguageModel, ModelLoadError, PromptError, truncate_layers
from tracer.prune import graph_scores, node_influence, prune
from tracer.replacement import PromptState, ReplacementModel

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "AttributionConfig",
    "FeatureEdit",
    "FeatureSwap",
    "Freeze",
    "Graph",
    "GraphFormatError",
    "LanguageModel",
    "ModelLoadError",
    "PromptError",
    "PromptState",
    "ReplacementModel",
    "VectorEdit",
    "architecture_for",
    "attribute",
    "graph_scores",
    "intervene",
    "node_influence",
    "prune",
    "run_hooked",
    "truncate_layers",
]
