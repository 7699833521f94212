"""The intervention mechanism: exact baselines, composition, batching, against an independent
hand-written free-mode replacement model."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import make_random_clt, make_tiny_model

from tracer.interventions import (
    FeatureEdit,
    FeatureSwap,
    InterventionError,
    KeepOnly,
    VectorEdit,
    intervene,
    intervene_batch,
)
from tracer.replacement import ReplacementModel

TOKENS = torch.tensor([1, 5, 9, 22, 40, 7, 13])


def setup(arch="llama", skip=False, input_site="mlp_in"):
    model = make_tiny_model(arch)
    rm = ReplacementModel(model, make_random_clt(3, 32, 16, skip=skip, input_site=input_site))
    return rm, rm.record(TOKENS)


def active(state, k):
    """The k-th active feature as (layer, position, feature)."""
    return tuple(int(t[k]) for t in (state.feat_layer, state.feat_pos, state.feat_index))


def reference_free(rm, state, edit):
    """Free mode written out independently: every layer's features recomputed from the live
    input, edited by ``edit(layer, acts [P, F])``, decoded densely with the bias, plus the
    recorded error; attention patterns frozen. Returns logits [P, vocab]."""
    tc, L = rm.transcoder, rm.model.facts.n_layers
    acts = {}
    inputs = {}

    def read(l):
        def fn(x):
            inputs[l] = x[0]
            a = tc.activate(l, tc.pre_activations(l, x[0]))
            a[~rm.feature_mask(state.n_pos)] = 0
            acts[l] = edit(l, a.clone())
            return x

        return fn

    def write(l):
        def fn(x):
            out = tc.b_dec[l] + state.errors[l]
            for i in range(l + 1):
                if l - i < tc.cfg.n_targets(i):
                    out = out + acts[i] @ tc.decoder(i)[:, l - i]
            if tc.W_skip is not None:
                out = out + inputs[l] @ tc.W_skip[l].T
            return out[None]

        return fn

    edits = {}
    for l in range(L):
        edits[(rm.input_site, l)] = read(l)
        edits[("mlp_out", l)] = write(l)
    from tracer.hooks import Freeze

    with torch.no_grad():
        return rm.model.run(state.tokens, edits=edits, freeze=Freeze(patterns=state.patterns))


@pytest.mark.parametrize("mode", ["free", "free_mlp", "live"])
def test_zero_intervention_reproduces_model_exactly(tiny_model, mode):
    rm = ReplacementModel(tiny_model, make_random_clt(3, 32, 16))
    state = rm.record(TOKENS)
    real = tiny_model.run(TOKENS, record=False).logits[0]
    prompt = TOKENS if mode == "live" else state
    # One run: bit for bit (an intervention that changes nothing adds exactly nothing).
    assert torch.equal(intervene_batch(rm, prompt, [[]], mode).logits[0], real)
    if mode != "live":
        assert torch.equal(intervene(rm, state, [], mode).logits, real)
    # A batch of runs: equal up to the rounding of batched matrix products.
    out = intervene_batch(rm, prompt, [[], [], []], mode)
    for b in range(3):
        torch.testing.assert_close(out.logits[b], real, atol=2e-5, rtol=1e-5)


def test_free_mode_matches_independent_replacement():
    """One and two edits at once (ablate + clamp + scale, several layers) against the dense
    hand-written free-mode model."""
    for skip, site in [(False, "mlp_in"), (True, "resid_mid")]:
        rm, state = setup("gemma2", skip=skip, input_site=site)
        a, b = active(state, 0), active(state, state.n_active // 2)
        items = [
            FeatureEdit(a[0], a[2], a[1], "ablate"),
            FeatureEdit(b[0], b[2], b[1], "clamp", 3.0),
            FeatureEdit(2, 5, None, "scale", 2.5),
        ]

        def edit(l, acts, a=a, b=b):
            if l == a[0]:
                acts[a[1], a[2]] = 0
            if l == b[0]:
                acts[b[1], b[2]] = 3.0
            if l == 2:
                acts[1:, 5] *= 2.5  # position None: every position but the start token
            return acts

        ref = reference_free(rm, state, edit).logits[0]
        got = intervene(rm, state, items, "free").logits
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        # And the edit did something.
        assert (got - state.logits).abs().max() > 1e-3


def test_constrained_effects_add_up():
    """The frozen model is linear in the node values: removing two nodes (a feature and an
    error node, or a token) at once changes everything by the sum of the single changes."""
    rm, state = setup("qwen3")
    a, b = active(state, 1), active(state, state.n_active - 1)
    fa = FeatureEdit(a[0], a[2], a[1])
    fb = FeatureEdit(b[0], b[2], b[1])
    err = VectorEdit("mlp_out", 1, 3, -state.errors[1, 3])
    tok = VectorEdit("resid_pre", 0, 2, -state.sites["resid_pre"][0, 2])
    base = intervene(rm, state, [], "constrained")
    for x, y in [(fa, fb), (fa, err), (err, tok)]:
        both, one, two = (intervene(rm, state, i) for i in ([x, y], [x], [y]))
        for name in ("logits", "pre"):
            d_both = getattr(both, name) - getattr(base, name)
            d_sum = (
                getattr(one, name) - getattr(base, name) + getattr(two, name) - getattr(base, name)
            )
            torch.testing.assert_close(d_both, d_sum, atol=2e-5, rtol=1e-4)
        assert (both.logits - base.logits).abs().max() > 1e-4


def test_order_independence_and_dependence():
    rm, state = setup()
    a, b = active(state, 0), active(state, 5)
    x = FeatureEdit(a[0], a[2], a[1], "scale", 0.5)
    y = FeatureEdit(b[0], b[2], b[1], "ablate")
    for mode in ("constrained", "free"):
        xy, yx = (intervene(rm, state, i, mode) for i in ([x, y], [y, x]))
        assert torch.equal(xy.logits, yx.logits)  # different features commute
    # The same feature: set-then-scale is not scale-then-set.
    s = FeatureEdit(a[0], a[2], a[1], "set", 2.0)
    k = FeatureEdit(a[0], a[2], a[1], "scale", 3.0)
    sk, ks = (intervene(rm, state, i).acts[a] for i in ([s, k], [k, s]))
    assert float(sk) == pytest.approx(6.0) and float(ks) == pytest.approx(2.0)
    add = intervene(rm, state, [FeatureEdit(a[0], a[2], a[1], "add", 0.25)]).acts[a]
    assert float(add) == pytest.approx(float(state.feat_value[0]) + 0.25)


def test_batch_rows_equal_single_runs():
    rm, state = setup("gpt2")
    a, b = active(state, 2), active(state, 9)
    lists = [
        [],
        [FeatureEdit(a[0], a[2], a[1])],
        [FeatureEdit(b[0], b[2], b[1], "clamp", 1.5), VectorEdit("mlp_out", 0, 4, torch.ones(32))],
        [FeatureSwap(a[0], a[2], 3, a[1])],
    ]
    watch = torch.tensor([list(active(state, k)) for k in range(0, state.n_active, 3)])
    for mode in ("constrained", "free", "free_mlp"):
        batch = intervene_batch(rm, state, lists, mode, watch=watch)
        for i, items in enumerate(lists):
            one = intervene(rm, state, items, mode)
            torch.testing.assert_close(batch.logits[i], one.logits, atol=1e-5, rtol=1e-5)
            pre = one.pre[watch[:, 0], watch[:, 1], watch[:, 2]]
            torch.testing.assert_close(batch.watched_pre[i], pre, atol=1e-5, rtol=1e-5)


def test_swap_and_keep_only():
    rm, state = setup()
    l, p, f = active(state, 3)
    other = (f + 1) % 16
    res = intervene(rm, state, [FeatureSwap(l, f, other, p)])
    assert float(res.acts[l, p, other]) == pytest.approx(float(state.feat_value[3]))
    assert float(res.acts[l, p, f]) == 0.0
    keep = torch.tensor([list(active(state, k)) for k in (0, 4)])
    for mode in ("constrained", "free"):
        res = intervene(rm, state, [KeepOnly(keep)], mode)
        nonzero = {tuple(x) for x in res.acts.nonzero().tolist()}
        assert nonzero <= {tuple(x) for x in keep.tolist()}
        for k, (kl, kp, kf) in zip((0, 4), keep.tolist(), strict=True):
            if mode == "constrained":  # kept features keep their recorded values
                want = float(state.feat_value[k])
            else:  # recomputed from the live residual stream they now read
                want = float(rm.transcoder.activate(kl, res.pre[kl, kp])[kf])
            assert float(res.acts[kl, kp, kf]) == pytest.approx(want, rel=1e-6, abs=1e-7)
    constrained_kept = intervene(rm, state, [KeepOnly(keep)], "constrained").acts
    assert float(constrained_kept[tuple(keep[0])]) != 0.0
    # Keeping every active feature changes nothing; keeping none equals ablating them all.
    everything = torch.stack([state.feat_layer, state.feat_pos, state.feat_index], 1)
    full = intervene(rm, state, [KeepOnly(everything)], "constrained").logits
    assert torch.equal(full, intervene(rm, state, [], "constrained").logits)
    none = intervene(rm, state, [KeepOnly(torch.zeros(0, 3, dtype=torch.long))]).logits
    every = [
        FeatureEdit(int(state.feat_layer[k]), int(state.feat_index[k]), int(state.feat_pos[k]))
        for k in range(state.n_active)
    ]
    torch.testing.assert_close(none, intervene(rm, state, every).logits, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    rm, state = setup()
    P = state.n_pos
    cases = [
        (FeatureEdit(0, 16, 2), "feature index 16 out of range 0..15"),
        (FeatureEdit(0, 3, P), f"position {P} is past the prompt"),
        (FeatureEdit(3, 3, 2), "layer 3 out of range"),
        (FeatureEdit(0, 3, 0), "start token"),
        (FeatureEdit(0, 3, 1, op="double"), "unknown feature op"),
        (FeatureSwap(0, 2, 99, 1), "feature index 99"),
        (VectorEdit("mlp_out", 0, 1, torch.ones(5)), r"need \(32,\)"),
        (VectorEdit("resid_pre", 1, 1, torch.ones(32)), "layer 0"),
        (KeepOnly(torch.tensor([[0, 1, 40]])), "feature is out of range"),
        ("ablate", "not an intervention"),
    ]
    for item, msg in cases:
        with pytest.raises(InterventionError, match=msg):
            intervene(rm, state, [item])
    with pytest.raises(InterventionError, match="pass rm.record"):
        intervene_batch(rm, TOKENS, [[]], "free")
    with pytest.raises(InterventionError, match="unknown mode"):
        intervene(rm, state, [], "frozen")
    with pytest.raises(InterventionError, match="empty batch"):
        intervene_batch(rm, state, [], "free")
    with pytest.raises(InterventionError, match="watch"):
        intervene_batch(rm, state, [[]], watch=torch.zeros(3))


def test_smollm2_free_ablation_matches_reference(smollm2):
    clt = make_random_clt(4, 576, 64, seed=1)
    with torch.no_grad():
        clt.threshold.fill_(0.05)
    rm = ReplacementModel(smollm2, clt)
    state = rm.record(smollm2.tokenize("The capital of France is"))
    real = smollm2.run(state.tokens, record=False).logits[0]
    assert torch.equal(intervene(rm, state, [], "free").logits, real)
    a = active(state, 0)

    def edit(l, acts):
        if l == a[0]:
            acts[a[1], a[2]] = 0
        return acts

    ref = reference_free(rm, state, edit).logits[0]
    got = intervene(rm, state, [FeatureEdit(a[0], a[2], a[1])], "free").logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_lazy_decoder_reads_only_rows():
    """With a lazy decoder an intervention reads only the decoder rows it needs."""
    model = make_tiny_model("llama")
    clt = make_random_clt(3, 32, 16)
    full = [w.clone() for w in clt.W_dec]
    rm = ReplacementModel(model, clt)
    state = rm.record(TOKENS)
    a = active(state, 0)
    expected = intervene(rm, state, [FeatureEdit(a[0], a[2], a[1])], "free").logits
    lazy = make_random_clt(3, 32, 16)
    asked = []
    for i in range(3):
        lazy.set_lazy_decoder(
            i, lambda i=i: full[i], rows=lambda f, i=i: (asked.append(len(f)), full[i][f])[1]
        )
    rm2 = ReplacementModel(model, lazy)
    got = intervene(rm2, state, [FeatureEdit(a[0], a[2], a[1])], "free").logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert all(lazy._lazy_dec[i] is not None for i in range(3))  # never fully loaded
    assert 0 < sum(asked) < 3 * 16 * state.n_pos
