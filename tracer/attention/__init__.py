"""Attention circuits: which heads carry each edge (head loadings) and why a head attends from
a query to a key (QK attributions), exact in the frozen linear model, for cross-layer and
per-layer transcoders on every architecture of the table.

- :mod:`~tracer.attention.frozen`: shared pieces (frozen patterns, target gradients, the
  forward of graph sources through the frozen model);
- :mod:`~tracer.attention.loadings`: head loadings (``add_head_loadings``, ``edge_head_parts``);
- :mod:`~tracer.attention.qk`: QK attributions (``qk_attribution``).

What it may import: the engine (tracer's model, hooks, replacement model, attribution,
graph type) and transcoders; never graphstore."""

from tracer.attention.frozen import HeadAnalysisError
from tracer.attention.loadings import (
    HEAD_LOADINGS_KEY,
    EdgeHeads,
    HeadParts,
    add_head_loadings,
    edge_head_parts,
    heads_summary,
    read_head_loadings,
    top_heads,
)
from tracer.attention.qk import QKAttribution, qk_attribution

__all__ = [
    "HEAD_LOADINGS_KEY",
    "EdgeHeads",
    "HeadAnalysisError",
    "HeadParts",
    "QKAttribution",
    "add_head_loadings",
    "edge_head_parts",
    "heads_summary",
    "qk_attribution",
    "read_head_loadings",
    "top_heads",
]
