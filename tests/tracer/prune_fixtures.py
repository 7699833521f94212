"""Small hand-built graphs whose influence, masks and scores the tests work out by hand."""

from __future__ import annotations

import numpy as np

from tracer.graph import LOGIT, Graph


def make_graph(kind, layer, position, edges, n_layers=2, params=None) -> Graph:
    """A graph from node arrays and (target, source, weight) triples; one logit of weight 1
    unless several (then equal weights)."""
    kind = np.asarray(kind, np.int8)
    n = len(kind)
    t, s, w = (np.array(x) for x in zip(*edges, strict=True)) if edges else ([], [], [])
    logit = kind == LOGIT
    lw = np.where(logit, 1.0 / max(1, int(logit.sum())), 0.0).astype(np.float32)
    return Graph(
        prompt="x", tokens=[1, 7, 8], token_strings=["<s>", "x", "y"], model_name="m",
        transcoder_name="t", n_layers=n_layers, kind=kind,
        layer=np.asarray(layer, np.int32), position=np.asarray(position, np.int32),
        feature=np.arange(n, dtype=np.int64), activation=np.ones(n, np.float32),
        probability=lw.copy(), target=np.asarray(t, np.int32), source=np.asarray(s, np.int32),
        weight=np.asarray(w, np.float32), logit_weights=lw, params=dict(params or {}),
    )  # fmt: skip


def hand_graph() -> Graph:
    """0 feature A (L0), 1 feature B (L1), 2 error (L0), 3 token, 4 logit, all at position 1.
    Edges: logit<-B 2, logit<-A -1, logit<-err 1, B<-A 3, B<-tok 1, A<-tok 2."""
    edges = [(4, 1, 2.0), (4, 0, -1.0), (4, 2, 1.0), (1, 0, 3.0), (1, 3, 1.0), (0, 3, 2.0)]
    return make_graph([0, 0, 1, 2, 3], [0, 1, 0, -1, 2], [1, 1, 1, 1, 1], edges)


def start_graph() -> Graph:
    """A start-position error node: 0 feature F (L1 @1), 1 error e0 (L0 @0), 2 error e1 (L0 @1),
    3 token t0, 4 token t1, 5 logit. Edges: logit<-F 2, logit<-e0 1, logit<-e1 1, logit<-t1 1,
    F<-e0 2, F<-t1 1, F<-t0 1."""
    edges = [(5, 0, 2.0), (5, 1, 1.0), (5, 2, 1.0), (5, 4, 1.0), (0, 1, 2.0), (0, 4, 1.0),
             (0, 3, 1.0)]  # fmt: skip
    return make_graph([0, 1, 1, 2, 2, 3], [1, 0, 0, -1, -1, 2], [1, 0, 1, 0, 1, 1], edges,
                      params={"exclude_bos": True})  # fmt: skip
