"""Influence, pruning and graph scores (after Ameisen et al., 2025), in two conventions.

All of it works on |A| with each row normalised, ``N``: a target's inputs as fractions of its
row sum (rows without inputs stay zero; circuit-tracer divides by max(row sum, 1e-10), below).
Influence of a node on the logits sums over paths of every length,

    influence = w (N + N^2 + N^3 + ...)

with ``w`` the logit weights (a row vector over nodes, nonzero on logit nodes). The graph is a
DAG, so the series ends after at most 2 x n_layers + 2 terms. Every rule below is invariant to
the scale of ``w`` (circuit-tracer passes the logit probabilities, we pass them normalised).

Conventions (``convention=``; a graph records the one its scores use in
``graph.params["convention"]``; ``None`` means the graph's own, else the default):

``"circuit-tracer"`` (default) -- circuit-tracer 0.5.0's ``prune_graph`` and
``compute_graph_scores``, rule for rule, so scores and circuits compare with circuit-tracer and
Neuronpedia:

- *row normalisation*: each row of |A| is divided by max(row sum, 1e-10)
  (``ROW_SUM_FLOOR``), circuit-tracer's ``normalize_matrix``: a target whose |inputs| sum to
  s < 1e-10 (in the graph's units) passes on only s / 1e-10 of its influence.
- *start position*: the error nodes at the positions whose features are not nodes (position 0
  when ``params["exclude_bos"]``, the default) are constants: circuit-tracer zeroes those error
  vectors, so their edges count as zero (the graph keeps them: they are exact, and the atlas
  convention and perturbation checks use them) and their influence is zero.
- *nodes*: every node (features, errors, tokens) is ranked by influence; with nodes sorted by
  influence, largest first, the cut is the first node where the running share of the total
  reaches ``node_threshold``, and every node with influence >= that node's is kept (ties kept).
  Tokens and logits are then kept regardless.
- *edges*: on the node-pruned graph (rows and columns of dropped nodes zero, rows re-normalised),
  score = N'[t, s] x (influence'(t) + w(t)); the same cumulative rule over all N x N entries
  (zeros included: if the cut falls among them, every entry is kept).
- *clean-up*, repeated until nothing changes: feature and error nodes need an outgoing kept edge,
  features also an incoming one; edges keep only kept ends. Tokens and logits stay.
- *replacement* = token influence / (token + error influence), on the full graph.
- *completeness* = sum_n (1 - error share of N[n]) (influence(n) + w(n)) / sum_n (influence(n) +
  w(n)) over every node: a node without inputs (a token, an error node, an input-less feature)
  counts as fully explained.

``"atlas"`` -- this project's earlier rules, kept for comparison with graphs scored before
circuit-tracer's convention became the default. Each difference and why it was chosen:

- every row with inputs is normalised to sum to one, however small: the rules then do not
  depend on the units of the edges;
- the start position's error nodes are ordinary error nodes: that position's MLP output (minus
  the decoder bias) is a real part of the model's computation, and treating it as a constant
  hides whatever it contributes;
- only features are pruned by influence (the running share of *feature* influence, stopping at
  the first feature that reaches ``node_threshold``); every error node is kept before the
  clean-up, because dropping an error node makes the circuit look better explained than it is;
- the clean-up drops feature and error nodes without an outgoing kept edge only (a feature whose
  inputs were all cut still carries its influence to the logits; requiring inputs would drop it);
- completeness weights only nodes that have inputs: an input-less node has no inputs to be
  explained, and counting it as fully explained inflates the score (every error node would count
  as a perfectly explained node).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import scipy.sparse as sp

from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph

Convention = Literal["circuit-tracer", "atlas"]
CONVENTIONS: tuple[str, ...] = get_args(Convention)
DEFAULT_CONVENTION: Convention = "circuit-tracer"


def resolve_convention(graph: Graph | None, convention: str | None = None) -> Convention:
    """``convention`` checked, or (None) the graph's recorded one, else the default."""
    if convention is None:
        convention = (graph.params.get("convention") if graph is not None else None) or (
            DEFAULT_CONVENTION
        )
    if convention not in CONVENTIONS:
        raise ValueError(
            f"unknown scoring convention {convention!r}: choose one of {', '.join(CONVENTIONS)}"
        )
    return convention  # type: ignore[return-value]


def convention_label(params: dict) -> str:
    """How reports name the convention of a graph's scores (``params["convention"]``)."""
    conv = params.get("convention")
    if conv:
        return f"{conv} convention"
    return "convention not recorded (atlas rules: scored before conventions were recorded)"


def constant_error_nodes(graph: Graph, convention: str | None = None) -> np.ndarray:
    """[n_nodes] bool: error nodes the convention treats as constants (circuit-tracer: those at
    the start position when its features are excluded; atlas: none)."""
    out = np.zeros(graph.n_nodes, dtype=bool)
    if resolve_convention(graph, convention) == "circuit-tracer" and graph.params.get(
        "exclude_bos", True
    ):
        out = (graph.kind == ERROR) & (graph.position == 0)
    return out


def scoring_adjacency(graph: Graph, convention: str | None = None) -> sp.csr_matrix:
    """A [N, N] CSR (rows targets) as the convention scores it: columns of constant error nodes
    removed (see :func:`constant_error_nodes`)."""
    a = graph.adjacency()
    const = constant_error_nodes(graph, convention)
    if const.any():
        a = sp.csr_matrix(a @ sp.diags((~const).astype(a.dtype)))
        a.eliminate_zeros()
    a.sum_duplicates()  # canonical (sorted indices): later steps may share the index arrays
    return a


# Row normalisation divides |A|'s rows by max(row sum, floor) (module doc).
ROW_SUM_FLOOR: dict[str, float] = {"circuit-tracer": 1e-10, "atlas": 0.0}


def _row_normalized_abs(a: sp.spmatrix, floor: float) -> sp.csr_matrix:
    """|a| [N, N] float64 CSR with each row divided by max(its sum, ``floor``) (rows without
    inputs stay zero)."""
    a = abs(sp.csr_matrix(a, dtype=np.float64, copy=True))  # copy: never touch the caller's
    sums = np.maximum(np.asarray(a.sum(axis=1)).ravel(), floor)
    inv = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
    return (sp.diags(inv) @ a).tocsr()


def normalized_abs_adjacency(graph: Graph, convention: str | None = None) -> sp.csr_matrix:
    """|A| with rows scaled to sum to one (rows without inputs stay zero; circuit-tracer: rows
    summing below ``ROW_SUM_FLOOR`` to less), float64 [N, N] CSR, on the convention's adjacency
    (:func:`scoring_adjacency`)."""
    conv = resolve_convention(graph, convention)
    return _row_normalized_abs(scoring_adjacency(graph, conv), ROW_SUM_FLOOR[conv])


def _influence(norm: sp.csr_matrix, weights: np.ndarray) -> np.ndarray:
    x = np.asarray(weights, dtype=np.float64)
    total = np.zeros(norm.shape[0])
    for _ in range(norm.shape[0] + 1):  # a DAG: the series ends
        x = norm.T @ x
        total += x
        if x.sum() < 1e-14:
            break
    return total


def node_influence(
    graph: Graph, norm: sp.csr_matrix | None = None, convention: str | None = None
) -> np.ndarray:
    """Influence of every node on the logit targets [n_nodes] float64 (logit nodes get 0).
    ``norm``: a precomputed :func:`normalized_abs_adjacency` (then ``convention`` is unused)."""
    norm = normalized_abs_adjacency(graph, convention) if norm is None else norm
    return _influence(norm, graph.logit_weights)


def cumulative_keep(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Bool mask of the highest scores whose sum first reaches ``threshold`` of the total (the
    atlas rule: stops at the first score that reaches it, ties beyond it are not kept)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold {threshold} must be in (0, 1]")
    keep = np.zeros(len(scores), dtype=bool)
    total = scores.sum()
    if len(scores) == 0 or total <= 0:
        return keep
    order = np.argsort(-scores, kind="stable")
    csum = np.cumsum(scores[order]) / total
    n = int(np.searchsorted(csum, threshold - 1e-12)) + 1
    keep[order[: min(n, len(scores))]] = True
    return keep


# cumulative_cut: score arrays longer than this are cut in bounded memory (chunks of this many
# entries, a histogram of CUT_BINS bins per pass) instead of one sort of every score.
CUT_CHUNK = 1 << 22
CUT_BINS = 4096


def cumulative_cut(scores: np.ndarray, threshold: float, n_total: int | None = None) -> float:
    """circuit-tracer's cut: sort ``scores`` (>= 0) largest first, take the first index where the
    running share of the total reaches ``threshold`` (clamped to the last), return that score;
    every score >= it is kept. ``n_total`` > len(scores) counts that many entries in all, the
    missing ones zero (the entries of a sparse matrix that are not stored). ``inf`` when the
    total is zero (nothing to keep).

    More than ``CUT_CHUNK`` scores are never sorted whole (circuit-tracer's out-of-memory point
    at long prompts): passes over chunks narrow a histogram to the bin where the running share
    crosses the threshold, and only that bin's scores are sorted. The cut is the same score
    (running sums may round differently in the last bit: at a threshold of exactly 1, which of
    the smallest scores the share reaches 1 at is rounding either way)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} must be in [0, 1]")
    n_total = len(scores) if n_total is None else n_total
    if len(scores) > CUT_CHUNK:
        return _cumulative_cut_chunked(np.asarray(scores), threshold, n_total)
    total = float(np.sum(scores))
    if n_total == 0 or not total > 0:
        return float("inf")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    share = np.cumsum(ordered) / total
    i = int(np.searchsorted(share, threshold, side="left"))
    if i >= len(ordered):  # past the stored entries: the cut is an unstored zero (or the last)
        return 0.0 if n_total > len(ordered) else float(ordered[-1])
    return float(ordered[i])


def _chunks(scores: np.ndarray):
    for a in range(0, len(scores), CUT_CHUNK):
        yield np.asarray(scores[a : a + CUT_CHUNK], dtype=np.float64)


def _cumulative_cut_chunked(scores: np.ndarray, threshold: float, n_total: int) -> float:
    """:func:`cumulative_cut` with memory bounded by ``CUT_CHUNK`` (module constants)."""
    total = sum(float(np.sum(c)) for c in _chunks(scores))
    if n_total == 0 or not total > 0:
        return float("inf")
    lo = min(float(c.min()) for c in _chunks(scores))
    hi = max(float(c.max()) for c in _chunks(scores))
    above = 0.0  # sum of the scores above the window [lo, hi]
    while True:
        edges = np.linspace(lo, hi, CUT_BINS + 1)
        sums, counts = np.zeros(CUT_BINS), np.zeros(CUT_BINS, dtype=np.int64)
        for c in _chunks(scores):
            sel = c[(c >= lo) & (c <= hi)]
            counts += np.histogram(sel, bins=edges)[0]
            sums += np.histogram(sel, bins=edges, weights=sel)[0]
        acc = above + np.cumsum(sums[::-1])  # running sum from the top bin down
        k = int(np.searchsorted(acc / total, threshold, side="left"))
        if k >= CUT_BINS:  # the threshold is not reached: the smallest score (or a zero)
            return 0.0 if n_total > len(scores) else lo
        b = CUT_BINS - 1 - k  # the bin where the running share crosses
        above = float(acc[k - 1]) if k else above
        new_lo, new_hi = float(edges[b]), float(edges[b + 1])
        if b < CUT_BINS - 1:  # its upper edge belongs to the bin above: the largest below it
            new_hi = float(np.nextafter(new_hi, -np.inf))
        if counts[b] <= CUT_CHUNK or new_hi <= new_lo or (new_lo, new_hi) == (lo, hi):
            lo, hi = new_lo, new_hi
            break
        lo, hi = new_lo, new_hi
    window = np.concatenate([c[(c >= lo) & (c <= hi)] for c in _chunks(scores)])
    ordered = np.sort(window)[::-1]
    share = (above + np.cumsum(ordered)) / total
    i = int(np.searchsorted(share, threshold, side="left"))
    return float(ordered[min(i, len(ordered) - 1)]) if len(ordered) else lo


def cumulative_share(scores: np.ndarray) -> np.ndarray:
    """[n] each entry's running share of the total with entries sorted largest first (circuit-
    tracer's ``cumulative_scores``: the value Neuronpedia's viewer prunes nodes by)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.zeros(len(scores))
    total = scores.sum()
    if len(scores) == 0 or not total > 0:
        return out
    order = np.argsort(-scores, kind="stable")
    out[order] = np.cumsum(scores[order]) / total
    return out


def graph_scores(graph: Graph, convention: str | None = None) -> dict[str, float]:
    """Replacement and completeness of a full graph under ``convention`` (module doc). Both in
    [0, 1]; 1 means the transcoder explains everything (0 when undefined: no influence)."""
    conv = resolve_convention(graph, convention)
    norm = normalized_abs_adjacency(graph, conv)
    infl = node_influence(graph, norm)
    tok = infl[graph.kind == TOKEN].sum()
    err = infl[graph.kind == ERROR].sum()
    from_error = np.asarray(norm[:, graph.kind == ERROR].sum(axis=1)).ravel()
    weight = infl + graph.logit_weights
    if conv == "atlas":
        weight = weight * (np.asarray(norm.sum(axis=1)).ravel() > 0)
    total = weight.sum()
    completeness = float(((1.0 - from_error) * weight).sum() / total) if total > 0 else 0.0
    return {
        "replacement": float(tok / (tok + err)) if tok + err > 0 else 0.0,
        "completeness": completeness,
    }


def error_influence_shares(graph: Graph, convention: str | None = None, top: int = 5) -> dict:
    """Where the unexplained part of a graph sits: each error node's influence as a share of
    the token + error influence (the denominator of the replacement score, so the shares sum
    to 1 - replacement). Returns {``by_layer``: [n_layers], ``by_position``: [n_pos] (floats),
    ``top``: the ``top`` error nodes as [{``layer``, ``position``, ``share``}], largest first}.
    Under the circuit-tracer convention the start position's error nodes are constants with
    zero influence (:func:`constant_error_nodes`)."""
    conv = resolve_convention(graph, convention)
    infl = node_influence(graph, convention=conv)
    err = graph.kind == ERROR
    denom = infl[err].sum() + infl[graph.kind == TOKEN].sum()
    share = infl[err] / denom if denom > 0 else np.zeros(int(err.sum()))
    layer, pos = graph.layer[err], graph.position[err]
    n_pos = len(graph.tokens)
    order = np.argsort(-share, kind="stable")[:top]
    return {
        "by_layer": np.bincount(layer, weights=share, minlength=graph.n_layers).tolist(),
        "by_position": np.bincount(pos, weights=share, minlength=n_pos).tolist(),
        "top": [
            {"layer": int(layer[i]), "position": int(pos[i]), "share": float(share[i])}
            for i in order
        ],
    }


def prune(
    graph: Graph,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    convention: str | None = None,
) -> Graph:
    """The circuit of a full graph: nodes and edges by influence under ``convention`` (module
    doc; None: the graph's recorded convention, else circuit-tracer's).

    The result records ``params["convention"]`` and the thresholds, the full graph's scores
    under that convention, ``extra["influence"]`` per kept node (circuit-tracer: the full
    graph's influence, which ranked the nodes; atlas: the influence within the node-pruned
    graph), ``extra["cumulative_influence"]`` per kept node (circuit-tracer's running share,
    exported to Neuronpedia) and ``extra["full_graph"]`` sizes.
    """
    conv = resolve_convention(graph, convention)
    node_keep, edge_keep, shown, infl = _prune_parts(graph, node_threshold, edge_threshold, conv)
    pruned = graph.subgraph(node_keep, edge_keep)
    pruned.extra["influence"] = shown[node_keep].tolist()
    pruned.extra["cumulative_influence"] = cumulative_share(infl)[node_keep].tolist()
    pruned.params = {
        **graph.params,
        "pruned": True,
        "node_threshold": node_threshold,
        "edge_threshold": edge_threshold,
        "convention": conv,
    }
    pruned.scores = {**graph.scores, **graph_scores(graph, conv)}
    pruned.extra["full_graph"] = {"n_nodes": graph.n_nodes, "n_edges": graph.n_edges}
    return pruned


def prune_masks(
    graph: Graph,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    convention: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`prune` keeps, as masks over ``graph`` itself: node_mask [n_nodes] and
    edge_mask [n_edges] (bool; a kept edge has both ends kept), e.g. to compare two pruning
    implementations on one graph."""
    conv = resolve_convention(graph, convention)
    node_keep, edge_keep, _, _ = _prune_parts(graph, node_threshold, edge_threshold, conv)
    edge_keep = edge_keep & node_keep[graph.target] & node_keep[graph.source]
    return node_keep, edge_keep


def _prune_parts(graph: Graph, node_threshold: float, edge_threshold: float, conv: Convention):
    """(node_keep [n_nodes], edge_keep [n_edges], influence shown per node, influence)."""
    a = scoring_adjacency(graph, conv)
    norm = _row_normalized_abs(a, ROW_SUM_FLOOR[conv])
    infl = _influence(norm, graph.logit_weights)
    if conv == "circuit-tracer":
        node_keep, edge_keep, shown = _prune_circuit_tracer(
            graph, a, infl, node_threshold, edge_threshold
        )
    else:
        node_keep, edge_keep, shown = _prune_atlas(graph, a, infl, node_threshold, edge_threshold)
    return node_keep, edge_keep, shown, infl


def _edge_scores(a: sp.csr_matrix, keep: np.ndarray, weights: np.ndarray, floor: float):
    """Edge scores on the graph restricted to ``keep`` nodes: (coo of the normalised restricted
    |A|, score per stored entry, influence' per node)."""
    d = sp.diags(keep.astype(np.float64))
    sub_norm = _row_normalized_abs(d @ a @ d, floor)
    sub_norm.eliminate_zeros()
    sub_infl = _influence(sub_norm, weights)
    coo = sub_norm.tocoo()
    return coo, coo.data * (sub_infl + weights)[coo.row], sub_infl


def _edge_mask(graph: Graph, coo, kept: np.ndarray) -> np.ndarray:
    """[n_edges] bool: the graph's edges whose (target, source) is a kept entry of ``coo``.
    The kept keys are sorted once and the graph's edges looked up in chunks of ``CUT_CHUNK``
    (no sort of every edge key, as ``np.isin`` would make)."""
    n = np.int64(graph.n_nodes)
    keys = coo.row[kept].astype(np.int64) * n + coo.col[kept]
    keys.sort()
    out = np.zeros(graph.n_edges, dtype=bool)
    if len(keys) == 0:
        return out
    for a in range(0, graph.n_edges, CUT_CHUNK):
        g = graph.target[a : a + CUT_CHUNK].astype(np.int64) * n + graph.source[a : a + CUT_CHUNK]
        at = np.minimum(np.searchsorted(keys, g), len(keys) - 1)
        out[a : a + CUT_CHUNK] = keys[at] == g
    return out


def _prune_circuit_tracer(graph, a, infl, node_threshold, edge_threshold):
    """circuit-tracer's rules (module doc): (node mask, edge mask, influence shown)."""
    w = graph.logit_weights.astype(np.float64)
    always = (graph.kind == TOKEN) | (graph.kind == LOGIT)
    node_keep = (infl >= cumulative_cut(infl, node_threshold)) | always
    coo, score, _ = _edge_scores(a, node_keep, w, ROW_SUM_FLOOR["circuit-tracer"])
    n = graph.n_nodes
    cut = cumulative_cut(score, edge_threshold, n_total=n * n)
    if cut <= 0.0:  # every entry of the N x N matrix is kept: the clean-up finds nothing
        const = constant_error_nodes(graph, "circuit-tracer")
        ends = node_keep[graph.target] & node_keep[graph.source]
        return node_keep, ends & ~const[graph.source], infl
    edge_keep = _edge_mask(graph, coo, score >= cut)
    needs_out = (graph.kind == FEATURE) | (graph.kind == ERROR)
    needs_in = graph.kind == FEATURE
    while True:
        alive = edge_keep & node_keep[graph.target] & node_keep[graph.source]
        has_out = np.bincount(graph.source[alive], minlength=n) > 0
        has_in = np.bincount(graph.target[alive], minlength=n) > 0
        new = node_keep & ~(needs_out & ~has_out) & ~(needs_in & ~has_in)
        if (new == node_keep).all():
            break
        node_keep = new
    edge_keep &= node_keep[graph.target] & node_keep[graph.source]
    return node_keep, edge_keep, infl


def _prune_atlas(graph, a, infl, node_threshold, edge_threshold):
    """The atlas rules (module doc): (node mask, edge mask, influence shown)."""
    is_feat = graph.kind == FEATURE
    node_keep = ~is_feat
    node_keep[np.where(is_feat)[0][cumulative_keep(infl[is_feat], node_threshold)]] = True
    w = graph.logit_weights.astype(np.float64)
    coo, score, sub_infl = _edge_scores(a, node_keep, w, ROW_SUM_FLOOR["atlas"])
    edge_keep = _edge_mask(graph, coo, cumulative_keep(score, edge_threshold))
    prunable = is_feat | (graph.kind == ERROR)
    while True:  # drop nodes without an outgoing kept edge (they cannot reach a logit)
        alive = edge_keep & node_keep[graph.target] & node_keep[graph.source]
        has_out = np.bincount(graph.source[alive], minlength=graph.n_nodes) > 0
        drop = prunable & node_keep & ~has_out
        if not drop.any():
            break
        node_keep &= ~drop
    edge_keep &= node_keep[graph.target] & node_keep[graph.source]
    return node_keep, edge_keep, sub_infl
