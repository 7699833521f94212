"""Exactness of attribution: every adjacency column equals the effect of removing that source in
the frozen (constrained) model, computed independently through the hooked model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import make_random_clt, make_tiny_model

from tracer.analyses.validate import removal, target_values
from tracer.attribution import AttributionConfig, FrozenLinearModel, attribute
from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN
from tracer.interventions import intervene
from tracer.model import PromptError
from tracer.replacement import ReplacementModel

TOKENS = torch.tensor([1, 5, 9, 22, 40, 7, 13])


def check_columns(rm, graph, n_sample=12, seed=0):
    state = rm.record(torch.tensor(graph.tokens))
    base = target_values(rm, state, graph, intervene(rm, state, [], "constrained"))
    A = graph.adjacency().toarray()
    rows = np.r_[np.where(graph.kind == FEATURE)[0], np.where(graph.kind == LOGIT)[0]]
    rng = np.random.default_rng(seed)
    sources = []
    for kind in (FEATURE, ERROR, TOKEN):
        idx = np.where(graph.kind == kind)[0]
        sources += list(rng.choice(idx, size=min(n_sample, len(idx)), replace=False))
    # Each row's error relative to that row's own largest edge: a small target's row is held to
    # the same standard as the largest (a graph-wide scale would let small rows be wrong).
    row_scale = np.abs(A[rows]).max(axis=1)
    assert (row_scale > 0).all()
    worst = 0.0
    for s in sources:
        after = target_values(rm, state, graph, intervene(rm, state, [removal(graph, state, s)]))
        predicted = -A[rows, s]
        err = np.abs((after - base) - predicted) / row_scale
        worst = max(worst, float(err.max()))
    return worst


@pytest.mark.parametrize("site", ["mlp_in", "resid_mid"])
def test_columns_equal_constrained_perturbation(tiny_model, site):
    clt = make_random_clt(3, 32, 16, input_site=site)
    rm = ReplacementModel(tiny_model, clt)
    graph = attribute(rm, TOKENS, progress=False)
    assert graph.count("feature") > 20  # the check means something only with many sources
    assert check_columns(rm, graph) <= 1e-4


@pytest.mark.parametrize("kind,skip", [("plt", False), ("plt", True), ("clt", True)])
def test_per_layer_and_skip_transcoders_exact(kind, skip):
    model = make_tiny_model("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16, kind=kind, skip=skip))
    graph = attribute(rm, TOKENS, progress=False)
    assert check_columns(rm, graph) <= 1e-4


def test_smollm2_truncated_exact(smollm2):
    clt = make_random_clt(4, 576, 64, seed=1)
    with torch.no_grad():
        clt.threshold.fill_(0.05)
    rm = ReplacementModel(smollm2, clt)
    graph = attribute(rm, "The capital of the state containing Dallas is", progress=False)
    assert graph.count("feature") > 50
    assert check_columns(rm, graph, n_sample=8) <= 1e-4


def test_replacement_forward_equals_model(tiny_model):
    rm = ReplacementModel(tiny_model, make_random_clt(3, 32, 16))
    state = rm.record(TOKENS)
    real = tiny_model.run(TOKENS, record=False).logits[0]
    assert torch.allclose(rm.forward_logits(state), real, atol=1e-4)
    free = intervene(rm, state, [], "free").logits
    assert torch.allclose(free, real, atol=1e-4)


def test_rows_sum_to_target_minus_constant():
    """Completeness: a target's incoming edges add up to its value minus what the model's
    constants (biases) give when every node is removed at once."""
    model = make_tiny_model("gpt2")  # biases everywhere
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    graph = attribute(rm, TOKENS, progress=False)
    state = rm.record(TOKENS)
    base = target_values(rm, state, graph, intervene(rm, state, []))
    sources = np.where(graph.kind != LOGIT)[0]
    everything = [removal(graph, state, i) for i in sources]
    constant = target_values(rm, state, graph, intervene(rm, state, everything))
    A = graph.adjacency().toarray()
    rows = np.r_[np.where(graph.kind == FEATURE)[0], np.where(graph.kind == LOGIT)[0]]
    np.testing.assert_allclose(A[rows].sum(1), base - constant, atol=1e-4)


def test_rows_do_not_depend_on_unfrozen_values():
    """Rows depend only on frozen quantities: autograd through the frozen hooked model, on a
    residual stream that differs (other embeddings), gives the same rows as the sweep."""
    model = make_tiny_model("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    state = rm.record(TOKENS)
    lin = FrozenLinearModel(rm, state)
    idx = torch.arange(state.n_active)[-6:]  # targets at the top layers
    rows = lin.sweep(state.feat_layer[idx], state.feat_pos[idx], lin.feature_rows(idx))
    other = torch.randn_like(state.sites["resid_pre"][0]).requires_grad_(True)
    out = state.recon + state.errors
    live_inputs = {}
    edits = {("resid_pre", 0): lambda x: other[None]}
    edits.update({("mlp_out", l): (lambda x, l=l: out[l][None]) for l in range(3)})
    edits.update({("mlp_in", l): (lambda x, l=l: live_inputs.setdefault(l, x)) for l in range(3)})
    model.run(TOKENS, edits=edits, freeze=state.freeze())
    pre = torch.stack([rm.transcoder.pre_activations(l, live_inputs[l][0]) for l in range(3)])
    for r, i in enumerate(idx.tolist()):
        l, p, f = (int(t[i]) for t in (state.feat_layer, state.feat_pos, state.feat_index))
        (grad,) = torch.autograd.grad(pre[l, p, f], other, retain_graph=True)
        token_cols = rows[r, lin.tok_col0 :]
        expected = (grad * state.sites["resid_pre"][0]).sum(-1)  # gradient . embedding
        torch.testing.assert_close(token_cols, expected, atol=1e-5, rtol=1e-4)


def _logit_row_influence(full) -> dict[str, float]:
    """The ranking of one round of the feature budget, from the full graph independently: each
    feature's share of each logit's |inputs| (rows normalised over every source), weighted by
    the logit weights."""
    A = np.abs(full.adjacency().toarray())
    logits = np.flatnonzero(full.kind == LOGIT)
    shares = A[logits] / A[logits].sum(axis=1, keepdims=True)
    score = full.logit_weights[logits] @ shares
    return {full.node_id(i): float(score[i]) for i in np.flatnonzero(full.kind == FEATURE)}


def test_feature_budget_keeps_most_influential():
    model = make_tiny_model("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 32))
    full = attribute(rm, TOKENS, progress=False)
    # One ranking round (batch >= budget): exactly the 10 features with the largest direct
    # influence on the logits.
    one = attribute(rm, TOKENS, progress=False, max_feature_nodes=10, batch_size=10)
    score = _logit_row_influence(full)
    best = sorted(score, key=score.get, reverse=True)
    assert score[best[9]] > score[best[10]] * (1 + 1e-6)  # no tie at the margin
    kept = {one.node_id(i) for i in np.flatnonzero(one.kind == FEATURE)}
    assert kept == set(best[:10])
    small = attribute(rm, TOKENS, progress=False, max_feature_nodes=10, batch_size=4)
    assert small.count("feature") == 10
    # Several rounds: the first batch is the top 4 of the same ranking.
    assert {small.node_id(i) for i in np.flatnonzero(small.kind == FEATURE)} >= set(best[:4])
    assert small.count("error") == full.count("error")
    # Kept edges are exactly the full graph's edges among kept nodes.
    ids_full = {
        (full.node_id(t), full.node_id(s)): w
        for t, s, w in zip(full.target, full.source, full.weight, strict=True)
    }
    for t, s, w in zip(small.target, small.source, small.weight, strict=True):
        expected = ids_full[(small.node_id(t), small.node_id(s))]
        assert expected == pytest.approx(w, rel=1e-5, abs=1e-6)


def test_logit_targets():
    model = make_tiny_model("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    g = attribute(rm, TOKENS, progress=False, target_tokens=[7, 9])
    assert sorted(g.feature[g.kind == LOGIT].tolist()) == [7, 9]
    d = attribute(rm, TOKENS, progress=False, logit_diff=(7, 9))
    assert d.count("logit") == 1 and d.params["logit_target_kind"] == "difference 7-9"
    top = attribute(rm, TOKENS, progress=False, max_n_logits=3, desired_logit_prob=0.999)
    probs = model.run(TOKENS).logits[0, -1].softmax(-1)
    assert top.feature[top.kind == LOGIT].tolist() == probs.topk(3).indices.tolist()
    assert top.logit_weights.sum() == pytest.approx(1.0)


def test_graph_parquet_round_trip(tmp_path):
    model = make_tiny_model("qwen3")
    g = attribute(ReplacementModel(model, make_random_clt(3, 32, 16)), TOKENS, progress=False)
    from tracer.graph import Graph

    h = Graph.load(g.save(tmp_path / "g.parquet"))
    names = ("kind", "layer", "position", "feature", "activation", "target", "source", "weight")
    for name in names:
        np.testing.assert_array_equal(getattr(h, name), getattr(g, name))
    assert h.params == g.params and h.tokens == g.tokens


def test_bad_inputs():
    model = make_tiny_model("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    with pytest.raises(PromptError, match="empty prompt"):
        attribute(rm, "   ", progress=False)
    with pytest.raises(PromptError, match="context"):
        attribute(rm, "x" * 100, progress=False)
    with pytest.raises(PromptError, match="vocabulary"):
        attribute(rm, TOKENS, progress=False, target_tokens=[10_000])
    with pytest.raises(ValueError, match="d_model"):
        ReplacementModel(model, make_random_clt(3, 48, 16))
    with pytest.raises(ValueError, match="layers"):
        ReplacementModel(model, make_random_clt(4, 32, 16))
    assert AttributionConfig().edge_tolerance == 0.0  # exact graphs by default
