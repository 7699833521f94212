"""The explorer's feature panel: what is known about one transcoder feature.

Its label is the one a person gave it (kept in the store per feature identity,
graphstore.labels), else the automatic one (:func:`tracer.reports.annotate.auto_label`).

Top-activating contexts, the activation histogram and the promoted / suppressed tokens come
from the feature-contexts table saved beside trained transcoders (read by
:class:`tracer.reports.feature_book.FeatureBook`, as reports do); the graphs where the feature is a
node
come from the store and the graph folder (:meth:`GraphSource.feature_graphs`).
"""

from __future__ import annotations

from tracer.reports.annotate import auto_label, visible, visible_token
from tracer.reports.feature_book import FeatureBook


def feature_panel(
    book: FeatureBook | None, source, transcoder: str, layer: int, index: int
) -> dict:
    """JSON for the panel of feature (layer, index) of ``transcoder``."""
    info = book.get(layer, index) if book is not None else None
    edited = source.feature_labels(transcoder, [(layer, index)]).get((layer, index), "")
    out = {
        "layer": layer,
        "index": index,
        "transcoder": transcoder,
        "label": edited,
        "edited": bool(edited),
        "auto_label": "",
        "can_edit": source.store is not None,
        "frequency": None,
        "contexts": [],
        "histogram": None,
        "promoted": [],
        "suppressed": [],
        "graphs": source.feature_graphs(transcoder, layer, index),
        "note": "",
    }
    if info is None:
        out["note"] = (
            "no feature contexts for this feature: start the explorer with --transcoders T "
            "(a trained transcoder folder with feature_contexts.parquet)"
            if book is None or len(book) == 0
            else "this feature has no entry in the feature-contexts table"
        )
        return out
    out.update(
        label=edited or auto_label(info),
        auto_label=auto_label(info),
        frequency=info.frequency,
        contexts=[
            {
                "tokens": [visible(t) for t in c.tokens],
                "activations": c.activations,
                "peak": c.peak,
            }  # fmt: skip
            for c in info.top_contexts
        ],
        histogram=(
            {"edges": info.histogram_edges, "counts": info.histogram_counts}
            if info.histogram_counts
            else None
        ),
        promoted=[[visible_token(t), w] for t, w in info.promoted_tokens],
        suppressed=[[visible_token(t), w] for t, w in info.suppressed_tokens],
    )
    return out
