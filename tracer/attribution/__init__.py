"""Exact attribution graphs through the frozen, linear replacement model.

- :mod:`~tracer.attribution.frozen_view`: the model's linear pieces and the prompt's frozen
  values, gathered once on the device in the compute dtype;
- :mod:`~tracer.attribution.decoders`: only the active features' decoder rows;
- :mod:`~tracer.attribution.linear`: the batched backward sweep;
- :mod:`~tracer.attribution.rows`: the preallocated row store and influence re-ranking;
- :mod:`~tracer.attribution.memory`: the memory plan (``estimate_memory``; from shapes alone,
  ``estimate_from_shapes``);
- :mod:`~tracer.attribution.attribute`: ``attribute`` and the graph assembly.

What it may import: the engine (tracer's model, hooks, replacement model, graph type) and
transcoders; never graphstore."""

from tracer.attribution.attribute import attribute
from tracer.attribution.config import DEFAULT_MAX_FEATURE_NODES, AttributionConfig
from tracer.attribution.decoders import ActiveDecoders
from tracer.attribution.frozen_view import FrozenView, gather_view
from tracer.attribution.linear import FrozenLinearModel
from tracer.attribution.memory import (
    GB,
    AttributionMemoryError,
    MemoryEstimate,
    ModelShapes,
    TranscoderShapes,
    estimate_from_shapes,
    estimate_memory,
    plan_memory,
)
from tracer.attribution.rows import CausalColumns, RowStore
from tracer.attribution.targets import LogitTargets, select_logit_targets

__all__ = [
    "GB",
    "DEFAULT_MAX_FEATURE_NODES",
    "ActiveDecoders",
    "AttributionConfig",
    "AttributionMemoryError",
    "FrozenLinearModel",
    "FrozenView",
    "LogitTargets",
    "MemoryEstimate",
    "ModelShapes",
    "TranscoderShapes",
    "CausalColumns",
    "RowStore",
    "attribute",
    "estimate_from_shapes",
    "estimate_memory",
    "gather_view",
    "plan_memory",
    "select_logit_targets",
]
