"""Head loadings are exact: on every architecture, for cross-layer and per-layer (skip)
transcoders, the residual part plus the head parts equal every edge of the graph, and each
head's part equals an independent computation of the same set of paths through the hooked
model (autograd, with every attention pattern above the head's layer zeroed, times the
source's contribution to that head's output read from two frozen forward passes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import TINY_TYPES, make_random_clt, make_tiny_model

from tracer.architectures import frozen_norm, get_module
from tracer.attention import (
    HeadAnalysisError,
    add_head_loadings,
    edge_head_parts,
    read_head_loadings,
)
from tracer.attribution import attribute
from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from tracer.hooks import Freeze
from tracer.prune import prune
from tracer.replacement import ReplacementModel

TOKENS = torch.tensor([1, 5, 9, 22, 40, 7, 13])
TOL = 1e-5  # of the graph's largest |edge|


# --- the independent reference ------------------------------------------------------------------


def _o_proj(model, l):
    arch = model.arch
    attn = get_module(model.layers()[l], arch.attn)
    return get_module(attn, arch.fused_o if arch.attn_weights == "gpt2_fused" else arch.o_proj)


def _writes(rm, state, graph, s):
    """What node s writes: {("mlp_out", j) or ("resid_pre", 0): (position, vector)}."""
    k, l, p, f = (int(graph.kind[s]), int(graph.layer[s]), int(graph.position[s]),
                  int(graph.feature[s]))  # fmt: skip
    if k == TOKEN:
        return {("resid_pre", 0): (p, state.sites["resid_pre"][0, p])}
    if k == ERROR:
        return {("mlp_out", l): (p, state.errors[l, p])}
    tc = rm.transcoder
    sel = (state.feat_layer == l) & (state.feat_pos == p) & (state.feat_index == f)
    a = float(state.feat_value[sel][0])
    w = tc.decoder(l)[f]  # [T, d]
    return {("mlp_out", l + t): (p, a * w[t]) for t in range(w.shape[0])}


def _edits(rm, state, remove=None, capture=None):
    """Edits of the frozen linear model: MLP outputs fixed at recon + error with a live skip
    path, optionally minus what ``remove`` writes; ``capture`` collects live reads."""
    tc, L = rm.transcoder, rm.model.facts.n_layers
    site = rm.input_site
    live = {}
    edits = {}
    rec = state.recon + state.errors

    def keep(l):
        def fn(x):
            live[l] = x
            if capture is not None:
                capture[(site, l)] = x
            return x

        return fn

    def out(l):
        def fn(x):
            y = rec[l].expand_as(x).clone()
            if tc.W_skip is not None:
                W = tc.W_skip[l].to(x.dtype)
                y = y - state.inputs[l] @ W.T + live[l] @ W.T
            if remove is not None and ("mlp_out", l) in remove:
                p, vec = remove[("mlp_out", l)]
                y[:, p] = y[:, p] - vec
            return y

        return fn

    for l in range(L):
        edits[(site, l)] = keep(l)
        edits[("mlp_out", l)] = out(l)
    if remove is not None and ("resid_pre", 0) in remove:
        p, vec = remove[("resid_pre", 0)]

        def emb(x):
            y = x.clone()
            y[:, p] = y[:, p] - vec
            return y

        edits[("resid_pre", 0)] = emb
    if capture is not None:
        edits[("resid_final", L)] = lambda x: capture.__setitem__("final", x) or x
    return edits


def _head_inputs(rm, state, edits, freeze):
    """o_proj inputs [L, P, H*dh] of one hooked run."""
    model = rm.model
    got = {}
    handles = [
        _o_proj(model, l).register_forward_pre_hook(
            lambda m, a, l=l: got.__setitem__(l, a[0][0].detach().clone())
        )
        for l in range(model.facts.n_layers)
    ]
    try:
        with torch.no_grad():
            model.run(state.tokens, edits=edits, freeze=freeze, record=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([got[l] for l in range(model.facts.n_layers)])


def reference_source_z(rm, state, graph, s):
    """What source s adds to every head's output: [L, P, H*dh] (with s minus without)."""
    fz = state.freeze()
    full = _head_inputs(rm, state, _edits(rm, state), fz)
    without = _head_inputs(rm, state, _edits(rm, state, _writes(rm, state, graph, s)), fz)
    return full - without


def reference_head_gradient(rm, state, graph, t, l):
    """Gradient of target t w.r.t. layer l's o_proj input at every position, through the hooked
    frozen model with every attention pattern above layer l zeroed: [P, H*dh]."""
    model = rm.model
    P = state.n_pos
    pats = state.patterns.clone()
    pats[l + 1 :] = 0.0
    fz = Freeze(patterns=pats, scales=dict(state.scales))
    H, dh = model.facts.n_heads, model.facts.d_head
    delta = torch.zeros(1, P, H * dh, requires_grad=True)
    hook = _o_proj(model, l).register_forward_pre_hook(
        lambda m, a: (a[0] + delta.to(a[0].dtype), *a[1:])
    )
    cap = {}
    try:
        model.run(state.tokens, edits=_edits(rm, state, capture=cap), freeze=fz, record=False)
    finally:
        hook.remove()
    kind = int(graph.kind[t])
    if kind == FEATURE:
        lt, pt, f = int(graph.layer[t]), int(graph.position[t]), int(graph.feature[t])
        value = rm.transcoder.W_enc[lt, f].to(delta.dtype) @ cap[(rm.input_site, lt)][0, pt]
    else:
        assert kind == LOGIT
        W_U = get_module(model.hf, model.arch.unembed).weight.detach()
        direction = W_U[int(graph.feature[t])] - W_U.mean(0)
        normed = frozen_norm(model.arch.norm_kind, model.final_norm(), cap["final"][0, P - 1],
                             state.scales["final_norm"][P - 1])  # fmt: skip
        value = direction @ normed
    (grad,) = torch.autograd.grad(value, delta)
    return grad[0]


def reference_parts(rm, state, graph, t, s):
    """Head parts [L, H] of edge (t, s) from the independent pieces."""
    model = rm.model
    L, H, dh = model.facts.n_layers, model.facts.n_heads, model.facts.d_head
    z = reference_source_z(rm, state, graph, s)
    pt = int(graph.position[t]) if graph.kind[t] == FEATURE else state.n_pos - 1
    top = L if graph.kind[t] == LOGIT else int(graph.layer[t]) + 1
    out = np.zeros((L, H))
    for l in range(top):
        g = reference_head_gradient(rm, state, graph, t, l)
        out[l] = (g[pt].view(H, dh) * z[l, pt].view(H, dh)).sum(-1).double().numpy()
    return out


def sample_edges(graph, n=6, seed=0):
    """The strongest cross-position edges plus random ones (all source kinds)."""
    rng = np.random.default_rng(seed)
    cross = np.nonzero(graph.position[graph.source] != graph.position[graph.target])[0]
    strong = cross[np.argsort(-np.abs(graph.weight[cross]))[: n // 2]]
    picks = list(strong)
    for kind in (FEATURE, ERROR, TOKEN):
        idx = np.nonzero(graph.kind[graph.source] == kind)[0]
        if len(idx):
            picks.append(int(rng.choice(idx)))
    return np.array(sorted(set(picks)))


def check_graph(rm, graph, n_ref=6):
    """Sum check on every edge and the reference on a sample: worst errors / max |edge|."""
    parts = edge_head_parts(rm, graph, graph.target, graph.source)
    assert parts.max_rel_error() <= TOL
    scale = float(np.abs(graph.weight).max())
    # Cross-position edges have no residual part, and their heads carry them.
    cross = graph.position[graph.source] != graph.position[graph.target]
    assert np.all(parts.residual[cross] == 0)
    assert np.abs(parts.heads[cross]).sum() > 0
    state = rm.record(torch.as_tensor(graph.tokens))
    worst = 0.0
    for e in sample_edges(graph, n_ref):
        t, s = int(graph.target[e]), int(graph.source[e])
        ref = reference_parts(rm, state, graph, t, s)
        worst = max(worst, float(np.abs(ref - parts.heads[e]).max()) / scale)
    return parts, worst


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TINY_TYPES)
def test_parts_sum_to_edges_and_match_reference_clt(model_type):
    model = make_tiny_model(model_type)
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    graph = attribute(rm, TOKENS, progress=False)
    assert graph.count("feature") > 20
    parts, worst = check_graph(rm, graph)
    assert worst <= TOL
    # A CLT feature writing into several layers: its edges to a later layer's targets have
    # parts at more than one layer (the later writes start their own paths).
    assert (np.abs(parts.heads).sum(axis=2) > 0).sum(axis=1).max() >= 2


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("kind,skip,site", [("plt", False, "mlp_in"), ("plt", True, "resid_mid"),
                                            ("clt", True, "mlp_in")])  # fmt: skip
def test_per_layer_and_skip_transcoders(model_type, kind, skip, site):
    model = make_tiny_model(model_type)
    rm = ReplacementModel(model, make_random_clt(3, 32, 16, kind=kind, skip=skip,
                                                 input_site=site))  # fmt: skip
    graph = attribute(rm, TOKENS, progress=False)
    _, worst = check_graph(rm, graph, n_ref=4)
    assert worst <= TOL


def test_a_wrong_head_is_caught():
    """The reference is sharp: moving a part to the neighbouring head breaks the comparison."""
    model = make_tiny_model("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    graph = attribute(rm, TOKENS, progress=False)
    parts = edge_head_parts(rm, graph, graph.target, graph.source)
    state = rm.record(TOKENS)
    e = sample_edges(graph, 2)[0]
    ref = reference_parts(rm, state, graph, int(graph.target[e]), int(graph.source[e]))
    rolled = np.roll(parts.heads[e], 1, axis=1)
    assert np.abs(ref - rolled).max() > 100 * TOL * np.abs(graph.weight).max()


@pytest.mark.slow
def test_smollm2_truncated(smollm2):
    for kind in ("clt", "plt"):
        clt = make_random_clt(4, 576, 64, seed=1, kind=kind)
        with torch.no_grad():
            clt.threshold.fill_(0.05)
        rm = ReplacementModel(smollm2, clt)
        graph = attribute(rm, "The capital of the state containing Dallas is", progress=False)
        assert graph.count("feature") > 50
        _, worst = check_graph(rm, graph, n_ref=2)
        assert worst <= TOL


def test_attribute_keeps_circuit_loadings_and_parquet_round_trip(tmp_path):
    model = make_tiny_model("qwen3")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    graph = attribute(rm, TOKENS, progress=False, head_loadings=True)
    circuit = prune(graph)
    rec = graph.extra["head_loadings"]
    assert len(rec["target"]) == circuit.n_edges > 0
    for w, r, hs, rem in zip(rec["weight"], rec["residual"], rec["heads"], rec["remainder"],
                             strict=True):  # fmt: skip
        assert len(hs) <= 8
        assert abs(r + sum(p for _, _, p in hs) + rem - w) <= 1e-9 * max(1.0, abs(w))
        assert all(abs(p) >= 0.01 * abs(w) for _, _, p in hs)
        assert [abs(p) for _, _, p in hs] == sorted((abs(p) for _, _, p in hs), reverse=True)
    graph.save(tmp_path / "g.parquet")
    back = read_head_loadings(Graph.load(tmp_path / "g.parquet"))
    # Keyed by node ids: the circuit's edges read the same from the full graph.
    for t, s, w in zip(circuit.target, circuit.source, circuit.weight, strict=True):
        eh = back[(circuit.node_id(int(t)), circuit.node_id(int(s)))]
        assert eh.weight == pytest.approx(float(w), rel=1e-6)


def test_graph_without_loadings_is_a_clear_error():
    model = make_tiny_model("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    graph = attribute(rm, TOKENS, progress=False)
    with pytest.raises(HeadAnalysisError, match="has no head loadings: trace it with"):
        read_head_loadings(graph)
    # and a circuit from another graph is refused by name
    other = attribute(rm, torch.tensor([1, 8, 30, 2]), progress=False)
    with pytest.raises(HeadAnalysisError, match="the full graph lacks"):
        add_head_loadings(rm, graph, prune(other))
