"""Head loadings: which attention heads carry each edge of an attribution graph.

The partition
-------------
With attention patterns and norm denominators frozen and the MLPs replaced by (features +
error nodes), an edge ``A[t, s]`` (the direct effect of source s on target t) is a sum over
paths from where s writes to where t reads. A path moves along the residual stream, through
frozen attention heads (the only way to change position) and, for a skip transcoder, through
the skip matrices; it never passes through another node. Group the paths by their **last
attention hop**, the (layer l, head h) nearest the target:

    A[t, s] = residual part (paths with no attention hop: same position only)
              + sum over (l, h) of head (l, h)'s part          (exact: a partition of paths)

Every path has exactly one last hop or none, so the parts add up to the edge. A cross-layer
transcoder feature writing into several later layers is no exception: each of its writes
starts its own paths, and each path is grouped the same way.

The computation
---------------
After its last attention hop a path is attention-free, so it stays at the target's position
p_t. Let ``u_l`` be the gradient of t w.r.t. resid_mid of layer l at p_t through attention-free
paths only (``u = g_t`` at t's own read layer; below it ``u_l = u_{l+1} + skip_l^T u_{l+1}``,
no skip: ``u_l = g_t``). Head (l, h) adds ``post_l(z_h W_O,h^T)`` to resid_mid of layer l, so

    part_(l,h)(t, s) = o_t[l, h] . z_s[l, h, p_t]

    o_t[l, h]       = (post_l^T u_l) W_O,h              [d_head]: the gradient of t w.r.t. the
                      output of head h at (l, p_t) (before o_proj), restricted to paths
                      with no attention hop above it;
    z_s[l, h, q]    = sum_k pattern[l, h, q, k] x_s[l, k] W_V,h^T   [d_head]: what s adds
                      to that head's output, through every path (the full frozen model
                      below layer l; x_s is s's contribution to the normed attention input).

The heads at layer l count for a feature target reading layer ``l_t`` when l <= l_t (attention
comes before the MLP input), for a logit at every layer. The residual part is the
attention-free path alone: ``u_{j+1} . w_j`` summed over the layers j < l_t that s writes
``w_j`` into at p_t (a token node: ``u_0 . embed``). So one cheap attention-free backward per
target (``o_t``: [L, H, d_head]) and one forward of the frozen model per batch of sources
(``z_s``, :class:`~tracer.attention.frozen.SourceForward`) give every head's part of every
edge between them: ``E x L x H`` dot products of length d_head. Nothing is a remainder: the
residual part and each head's part are computed directly, and their sum is checked against
the edge (``max_rel_error``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from tracer.attention.frozen import (
    HeadAnalysisError,
    SourceForward,
    state_feature_index,
    target_gradients,
)
from tracer.attribution.frozen_view import gather_view
from tracer.graph import ERROR, FEATURE, TOKEN, Graph

HEAD_LOADINGS_KEY = "head_loadings"
LOADINGS_FORMAT = 1


@dataclass
class HeadParts:
    """Every head's part of a list of edges (dense, before any thresholding).

    target, source [E]: graph node indices; weight [E]: the graph's edge weights;
    residual [E] float64: the attention-free part; heads [E, L, H] float64: head (l, h)'s part.
    """

    target: np.ndarray
    source: np.ndarray
    weight: np.ndarray
    residual: np.ndarray
    heads: np.ndarray

    @property
    def total(self) -> np.ndarray:
        """residual + sum of the head parts [E]: equal to ``weight`` up to rounding."""
        return self.residual + self.heads.sum(axis=(1, 2))

    def max_rel_error(self) -> float:
        """max |total - weight| over the edges, relative to the largest |weight|."""
        if len(self.weight) == 0:
            return 0.0
        scale = float(np.abs(self.weight).max()) or 1.0
        return float(np.abs(self.total - self.weight).max() / scale)


def _edge_weights(graph: Graph, target: np.ndarray, source: np.ndarray) -> np.ndarray:
    A = graph.adjacency()
    return np.asarray(A[target, source]).reshape(-1).astype(np.float64)


@torch.no_grad()
def edge_head_parts(
    rm, graph: Graph, target, source, *, state=None, dtype: torch.dtype = torch.float32,
    batch_sources: int = 256, progress: bool = False,
) -> HeadParts:  # fmt: skip
    """Residual and per-head parts of the edges ``(target[i], source[i])`` of ``graph`` (node
    indices; targets are feature or logit nodes). ``state``: the prompt's record (made here if
    None). Computes in ``dtype`` (float32 default, as the attribution) on the model's device;
    see the module doc."""
    if state is None:
        state = rm.record(torch.as_tensor(graph.tokens))
    target = np.asarray(target, dtype=np.int64)
    source = np.asarray(source, dtype=np.int64)
    view = gather_view(rm, state, dtype=dtype)
    dev, L, H, dh, d = view.device, view.n_layers, view.n_heads, view.d_head, view.d_model
    E = len(target)
    weight = _edge_weights(graph, target, source)
    residual = np.zeros(E)
    heads = np.zeros((E, L, H))
    if E == 0:
        return HeadParts(target, source, weight, residual, heads)

    # Targets: attention-free gradients u_l [T, L+1, d] and head-output gradients o_t [T, L, H, dh].
    t_nodes, t_of_e = np.unique(target, return_inverse=True)
    tg = target_gradients(rm, state, graph, view, t_nodes)
    T = len(t_nodes)
    Lt, pt = tg.layer.to(dev), tg.pos.to(dev)
    U = torch.zeros(T, L + 1, d, device=dev, dtype=dtype)
    U[torch.arange(T, device=dev), Lt] = tg.grad
    for l in reversed(range(L)):
        act = (Lt > l).nonzero().squeeze(1)
        if len(act) == 0:
            continue
        cur = U[act, l + 1]
        if view.W_skip is not None:  # the skip path: resid_mid -> (MLP input) -> MLP output
            gi = cur @ view.W_skip[l]
            if rm.input_site != "resid_mid":
                gi = view.norm_T(view.g_mlp[l], view.scales["mlp_norm"][l, pt[act]], gi)
            cur = cur + gi
        U[act, l] = cur
    O = torch.zeros(T, L, H, dh, device=dev, dtype=dtype)
    for l in range(L):
        act = (Lt >= l).nonzero().squeeze(1)  # logits (Lt = L) read above every layer
        if len(act) == 0:
            continue
        u = U[act, l]
        if view.g_post[l] is not None:
            u = view.norm_T(view.g_post[l], view.scales["attn_out_norm"][l, pt[act]], u)
        O[act, l] = (u @ view.W_O[l]).view(len(act), H, dh)

    # Sources: their feature decoders, once.
    s_nodes, s_of_e = np.unique(source, return_inverse=True)
    s_kind = graph.kind[s_nodes]
    s_layer, s_pos = graph.layer[s_nodes].astype(np.int64), graph.position[s_nodes].astype(np.int64)
    s_feat = np.full(len(s_nodes), -1, dtype=np.int64)
    is_f = s_kind == FEATURE
    if is_f.any():
        s_feat[is_f] = state_feature_index(state, graph, s_nodes[is_f]).numpy()
    fw = SourceForward(rm, state, view, torch.as_tensor(s_feat[is_f]))

    # Residual parts: same position, attention-free. Source s writes w at U index u (a token:
    # u = 0, its embedding; an error or a feature writing into layer j's MLP output: u = j + 1);
    # its part of edge (t, s) sums U[t, u] . w over its writes (U is zero above t's read
    # layer). Per U index and position, every (target, source) product at once.
    te_t = torch.as_tensor(t_of_e, device=dev)
    pe = pt[te_t]  # target position of each edge
    s_idx = torch.as_tensor(s_of_e, device=dev)
    e_same = (torch.as_tensor(s_pos, device=dev)[s_idx] == pe).nonzero().squeeze(1)
    res = torch.zeros(E, device=dev, dtype=dtype)
    for u, (src, vec) in enumerate(_writes(view, fw, s_kind, s_layer, s_pos, s_feat)):
        if len(src) == 0 or len(e_same) == 0:
            continue
        slot = torch.full((len(s_nodes),), -1, dtype=torch.long, device=dev)
        slot[src] = torch.arange(len(src), device=dev)
        e_u = e_same[slot[s_idx[e_same]] >= 0]
        for p in torch.unique(pe[e_u]).tolist():
            e_p = e_u[pe[e_u] == p]
            tu, t_loc = torch.unique(te_t[e_p], return_inverse=True)
            su, s_loc = torch.unique(slot[s_idx[e_p]], return_inverse=True)
            res[e_p] += (U[tu, u] @ vec[su].T)[t_loc, s_loc]
    residual[:] = res.cpu().numpy()

    # Head parts: one forward per batch of sources; per layer and target position, every
    # (target, source) product of that batch at once, then the edges picked out.
    n_layers = min(L, int(Lt.max()) + 1)
    n_pos = int(pt.max()) + 1
    heads_t = torch.zeros(E, L, H, device=dev, dtype=dtype)
    starts = range(0, len(s_nodes), batch_sources)
    for c0 in tqdm(starts, desc="head loadings", unit="batch", disable=not progress):
        c1 = min(c0 + batch_sources, len(s_nodes))
        e = ((s_idx >= c0) & (s_idx < c1)).nonzero().squeeze(1)
        groups = []
        for p in torch.unique(pe[e]).tolist():
            e_p = e[pe[e] == p]
            tu, t_loc = torch.unique(te_t[e_p], return_inverse=True)
            groups.append((p, e_p, tu, t_loc, s_idx[e_p] - c0))
        for l, z in fw.head_outputs(s_kind[c0:c1], s_layer[c0:c1], s_pos[c0:c1],
                                    s_feat[c0:c1], n_layers, n_pos):  # fmt: skip
            for p, e_p, tu, t_loc, b in groups:
                D = torch.einsum("thd,bhd->tbh", O[tu, l], z[:, :, p])  # [T_p, B, H]
                heads_t[e_p, l] = D[t_loc, b]
    heads[:] = heads_t.cpu().numpy()
    return HeadParts(target, source, weight, residual, heads)


def _writes(view, fw: SourceForward, kind, layer, pos, feat) -> list:
    """What the sources write, by U index u (0: the residual before layer 0; j + 1: layer j's
    MLP output): a list over u of (source indices [S_u], vectors [S_u, d])."""
    dev = view.device
    L = view.n_layers
    kind_t = torch.as_tensor(kind, device=dev)
    lay = torch.as_tensor(layer, device=dev).long()
    pos_t = torch.as_tensor(pos, device=dev).long()
    reach = torch.as_tensor(fw.n_targets, device=dev)[lay.clamp(min=0)]
    loc = torch.full((len(kind),), -1, dtype=torch.long, device=dev)
    is_f = kind_t == FEATURE
    if bool(is_f.any()):
        feats = np.asarray(feat)[is_f.cpu().numpy()]
        loc[is_f] = torch.as_tensor([fw.local[int(f)] for f in feats], device=dev)
    tok = (kind_t == TOKEN).nonzero().squeeze(1)
    out = [(tok, view.embed[pos_t[tok]])]
    for j in range(L):
        err = ((kind_t == ERROR) & (lay == j)).nonzero().squeeze(1)
        fe = (is_f & (lay <= j) & (j < lay + reach)).nonzero().squeeze(1)
        vec = torch.cat([view.errors[j, pos_t[err]], fw.dec.written(loc[fe], j)])
        out.append((torch.cat([err, fe]), vec))
    return out


def top_heads(parts: HeadParts, min_share: float = 0.01, max_heads: int = 8) -> list[list]:
    """Per edge, the heads holding at least ``min_share`` of |edge|, largest |part| first, at
    most ``max_heads``: a list of ``[layer, head, part]`` per edge."""
    E, L, H = parts.heads.shape
    flat = parts.heads.reshape(E, L * H)
    order = np.argsort(-np.abs(flat), axis=1, kind="stable")[:, :max_heads]
    out = []
    for i in range(E):
        cut = min_share * abs(float(parts.weight[i]))
        keep = [int(c) for c in order[i] if abs(flat[i, c]) >= cut and flat[i, c] != 0.0]
        out.append([[c // H, c % H, float(flat[i, c])] for c in keep])
    return out


def loadings_record(graph: Graph, parts: HeadParts, min_share: float, max_heads: int) -> dict:
    """The JSON-ready record kept in ``graph.extra["head_loadings"]``: per edge (by node ids,
    so it reads the same in the full graph and its circuit) the edge weight, the residual part,
    the kept heads ``[layer, head, part]`` and the remainder (edge - residual - kept heads)."""
    kept = top_heads(parts, min_share, max_heads)
    remainder = [
        float(w - r - sum(p for _, _, p in k))
        for w, r, k in zip(parts.weight, parts.residual, kept, strict=True)
    ]
    return {
        "format": LOADINGS_FORMAT,
        "partition": "last attention hop",
        "min_share": min_share,
        "max_heads": max_heads,
        "n_layers": int(parts.heads.shape[1]),
        "n_heads": int(parts.heads.shape[2]),
        "max_rel_error": parts.max_rel_error(),
        "target": [graph.node_id(int(i)) for i in parts.target],
        "source": [graph.node_id(int(i)) for i in parts.source],
        "weight": [float(w) for w in parts.weight],
        "residual": [float(r) for r in parts.residual],
        "heads": kept,
        "remainder": remainder,
    }


def circuit_edges_in(graph: Graph, circuit: Graph) -> tuple[np.ndarray, np.ndarray]:
    """The circuit's edges as (target, source) node indices of the full ``graph``."""
    index = {graph.node_id(i): i for i in range(graph.n_nodes)}
    ids = [circuit.node_id(i) for i in range(circuit.n_nodes)]
    try:
        full = np.array([index[n] for n in ids], dtype=np.int64)
    except KeyError as err:
        raise HeadAnalysisError(
            f"the circuit has node {err.args[0]} that the full graph lacks: pass the circuit "
            "pruned from this graph"
        ) from err
    if len(full) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return full[circuit.target], full[circuit.source]


def add_head_loadings(
    rm, graph: Graph, circuit: Graph | None = None, *, state=None, min_share: float = 0.01,
    max_heads: int = 8, dtype: torch.dtype = torch.float32, progress: bool = False,
) -> dict:  # fmt: skip
    """Head loadings of the circuit's edges, written into ``graph.extra["head_loadings"]`` and
    (when given) ``circuit.extra``; returns the record (:func:`loadings_record`).

    ``circuit``: the pruned graph (default: ``prune(graph)`` with its convention's defaults).
    """
    t0 = time.perf_counter()
    if circuit is None:
        from tracer.prune import prune

        circuit = prune(graph)
    target, source = circuit_edges_in(graph, circuit)
    parts = edge_head_parts(rm, graph, target, source, state=state, dtype=dtype,
                            progress=progress)  # fmt: skip
    record = loadings_record(graph, parts, min_share, max_heads)
    record["seconds"] = round(time.perf_counter() - t0, 4)
    graph.extra[HEAD_LOADINGS_KEY] = record
    if circuit is not graph:
        circuit.extra[HEAD_LOADINGS_KEY] = record
    return record


@dataclass
class EdgeHeads:
    """One edge's head loading, read from a graph: weight, residual part, kept heads
    ``[(layer, head, part)]`` (largest first) and the remainder (the other heads together)."""

    target: str
    source: str
    weight: float
    residual: float
    heads: list[tuple[int, int, float]]
    remainder: float


def read_head_loadings(graph: Graph, where: str = "this graph") -> dict[tuple[str, str], EdgeHeads]:
    """The head loadings a graph carries, by (target id, source id); a clear error if none."""
    rec = graph.extra.get(HEAD_LOADINGS_KEY)
    if not rec:
        raise HeadAnalysisError(
            f"{where} has no head loadings: trace it with 'circuit-atlas trace ... --heads' "
            "(or attribute(..., head_loadings=True))"
        )
    out = {}
    for i, (t, s) in enumerate(zip(rec["target"], rec["source"], strict=True)):
        hs = [(int(l), int(h), float(p)) for l, h, p in rec["heads"][i]]
        out[(t, s)] = EdgeHeads(t, s, rec["weight"][i], rec["residual"][i], hs,
                                rec["remainder"][i])  # fmt: skip
    return out


def heads_summary(circuit: Graph, n: int = 3) -> str:
    """One line on a circuit's head loadings: how many edges, and the heads carrying the most
    of its cross-position edges (summed |part|)."""
    loads = read_head_loadings(circuit)
    pos = {circuit.node_id(i): int(circuit.position[i]) for i in range(circuit.n_nodes)}
    total: dict[tuple[int, int], float] = {}
    for eh in loads.values():
        if pos.get(eh.target) != pos.get(eh.source):
            for l, h, p in eh.heads:
                total[(l, h)] = total.get((l, h), 0.0) + abs(p)
    rec = circuit.extra[HEAD_LOADINGS_KEY]
    top = sorted(total.items(), key=lambda kv: -kv[1])[:n]
    heads = ", ".join(f"L{l}.H{h} ({v:.3g})" for (l, h), v in top) or "none"
    return (f"head loadings: {len(loads)} circuit edges (parts sum to each edge within "
            f"{rec['max_rel_error']:.1e} of the largest); heads carrying the most across "
            f"positions: {heads}")  # fmt: skip
