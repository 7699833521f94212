"""run_hooked reads exactly what the model computes, and its overrides and freezes act exactly.

Every architecture in the table (tiny random models) and SmolLM2 truncated to 4 layers are
checked against an independent forward (hook_reference: HF's output_hidden_states and
output_attentions from a separate eager copy, plain module hooks, hand-computed norms, a
hand-written layer loop)."""

from __future__ import annotations

import pytest
import torch
from hook_reference import (
    decoder_layers,
    eager_copy,
    expected_sites,
    forward_from,
    hand_norm,
    independent_record,
    layout,
)
from model_fixtures import TINY_TYPES, make_tiny_model

from tracer.hooks import NORMS, SITES, Freeze

MODELS = (*TINY_TYPES, "smollm2")
# Tiny models reproduce bit for bit; SmolLM2's residual norms reach ~100, so allow float noise.
TOL = {"atol": 1e-5, "rtol": 1e-5}
# Real models with a far larger residual stream: test_gemma3.py runs these tests on Gemma-3-270M
# cut to 6 layers, whose residual elements reach 2.5e4, where one float32 ulp is 2^-9 = 1.95e-3
# (measured: batched vs single runs differ by up to 5.5e-4 on a site element).
# SmolLM2 cut to 4 layers: logits reach about 20 (one float32 ulp there is 1.9e-6) and a
# batched GEMM sums in another order than a single-row one; measured up to 1.43e-5 on a logit
# element. A run that mixed batch rows differs by O(1), far above either bound.
REAL_TOL = {"gemma3-270m": {"atol": 2e-3, "rtol": 1e-4}, "smollm2": {"atol": 5e-5, "rtol": 1e-5}}


def tol(model, rtol: float | None = None) -> dict:
    """The tolerance for comparisons on ``model`` (``rtol`` overrides the relative part)."""
    t = dict(REAL_TOL.get(model.facts.name.split("[")[0], TOL))
    return t if rtol is None else {**t, "rtol": rtol}


@pytest.fixture(scope="module")
def smollm2_eager(smollm2):
    """A separately loaded SmolLM2 (eager attention), cut to the same 4 layers."""
    from transformers import AutoModelForCausalLM

    from tracer.fetch import fetch_smollm2

    hf = AutoModelForCausalLM.from_pretrained(
        str(fetch_smollm2()), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    del hf.model.layers[smollm2.facts.n_layers :]
    hf.config.num_hidden_layers = smollm2.facts.n_layers
    return hf


@pytest.fixture(params=MODELS)
def case(request):
    """(LanguageModel, independent eager HF model, token ids [2, P])."""
    torch.manual_seed(1)
    if request.param == "smollm2":
        model = request.getfixturevalue("smollm2")
        twin = request.getfixturevalue("smollm2_eager")
        a = model.tokenize("The capital of France is Paris, and of Italy")
        b = model.tokenize("Mary and John went to the store; John gave a drink to")
        n = min(len(a), len(b))
        ids = torch.stack([a[:n], b[:n]])
        return model, twin, ids
    model = make_tiny_model(request.param)
    return model, eager_copy(model.hf), torch.randint(3, 101, (2, 11))


def _norm_modules(hf, l: int) -> dict[str, torch.nn.Module]:
    lay = layout(hf)
    layer = decoder_layers(hf)[l]
    named = {"attn_norm": lay.attn_norm, "attn_out_norm": lay.post_attn,
             "mlp_norm": lay.mlp_norm, "mlp_out_norm": lay.post_mlp}  # fmt: skip
    return {k: getattr(layer, v) for k, v in named.items() if v}


def _norm_io_key(name: str) -> str:
    return {"attn_norm": "attn_norm", "attn_out_norm": "post_attn", "mlp_norm": "mlp_norm",
            "mlp_out_norm": "post_mlp"}[name]  # fmt: skip


# --- reads ------------------------------------------------------------------------------------


def test_sites_patterns_scales_match_independent_forward(case):
    model, twin, ids = case
    with torch.no_grad():
        run = model.run(ids)
    ref = independent_record(twin, ids)
    n = model.facts.n_layers
    want = expected_sites(twin, ref)

    torch.testing.assert_close(run.logits, ref["logits"], **tol(model))
    assert set(run.sites) == set(SITES)
    for site in SITES:
        torch.testing.assert_close(run.sites[site], want[site], **tol(model), msg=site)
    # The residual bookkeeping closes: each site is the sum of the ones before it.
    s = run.sites
    torch.testing.assert_close(s["resid_mid"], s["resid_pre"] + s["attn_out"], **tol(model))
    nxt = torch.cat([s["resid_pre"][:, 1:], s["resid_final"][:, None]], dim=1)
    torch.testing.assert_close(nxt, s["resid_mid"] + s["mlp_out"], **tol(model))

    assert run.patterns.shape == (2, n, model.facts.n_heads, ids.shape[1], ids.shape[1])
    torch.testing.assert_close(run.patterns, ref["attentions"], **tol(model))

    # Norm denominators recomputed by hand from the norm's own input; the hand norm with that
    # denominator reproduces the module's output, so it is the denominator really used.
    expected_names = {"attn_norm", "mlp_norm", "final_norm"}
    if layout(twin).post_attn:
        expected_names |= {"attn_out_norm", "mlp_out_norm"}
    assert set(run.scales) == expected_names
    for name in expected_names - {"final_norm"}:
        got = run.scales[name]
        assert got.shape == (2, n, ids.shape[1])
        for l in range(n):
            x_in, x_out = ref["io"][(_norm_io_key(name), l)]
            y, scale = hand_norm(twin, x_in, _norm_modules(twin, l)[name])
            torch.testing.assert_close(y, x_out.float(), **tol(model))
            torch.testing.assert_close(got[:, l], scale, **tol(model), msg=f"{name} layer {l}")
    x_in, x_out = ref["io"][("final", 0)]
    y, scale = hand_norm(twin, x_in, getattr(getattr(twin, layout(twin).body), layout(twin).final))
    torch.testing.assert_close(y, ref["hidden_states"][-1], **tol(model))  # HF's last_hidden_state
    torch.testing.assert_close(run.scales["final_norm"], scale, **tol(model))


def test_batched_run_equals_single_runs(case):
    model, _, ids = case
    with torch.no_grad():
        both = model.run(ids)
        for b in range(ids.shape[0]):
            one = model.run(ids[b])
            torch.testing.assert_close(both.logits[b], one.logits[0], **tol(model))
            for site in SITES:
                torch.testing.assert_close(both.sites[site][b], one.sites[site][0], **tol(model))
            torch.testing.assert_close(both.patterns[b], one.patterns[0], **tol(model))
            for name, v in both.scales.items():
                torch.testing.assert_close(v[b], one.scales[name][0], **tol(model))
    # The two prompts differ, so a run that mixed batch rows would have been caught.
    assert not torch.allclose(both.logits[0], both.logits[1])


# --- overrides --------------------------------------------------------------------------------


def test_overriding_mlp_out_with_read_value_leaves_logits(case):
    model, _, ids = case
    n = model.facts.n_layers
    with torch.no_grad():
        run = model.run(ids)
        mlp = run.sites["mlp_out"]
        same = {("mlp_out", l): (lambda x, l=l: mlp[:, l].clone()) for l in range(n)}
        torch.testing.assert_close(model.run(ids, edits=same).logits, run.logits,
                                   **tol(model, rtol=0))  # fmt: skip
        # The override really replaces the tensor: layer 0 given layer 1's output changes logits.
        swapped = model.run(ids, edits={("mlp_out", 0): lambda x: mlp[:, 1].clone()}).logits
    assert (swapped - run.logits).abs().max() > 1e-3


def test_mlp_out_edit_equals_plain_module_hook(case):
    """Adding a vector to one layer's MLP output through run_hooked equals doing the same with a
    plain forward hook on the module in HF's own forward."""
    model, twin, ids = case
    l = model.facts.n_layers - 2
    delta = torch.randn(model.facts.d_model) * 0.5
    lay = layout(twin)
    mod = getattr(decoder_layers(twin)[l], lay.post_mlp or lay.mlp)
    handle = mod.register_forward_hook(lambda m, a, out: out + delta)
    try:
        with torch.no_grad():
            want = twin(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    with torch.no_grad():
        got = model.run(ids, edits={("mlp_out", l): lambda x: x + delta}).logits
        base = model.run(ids, record=False).logits
    torch.testing.assert_close(got, want, **tol(model))
    assert (got - base).abs().max() > 1e-4


@pytest.mark.parametrize("where", ["first", "middle"])
def test_resid_pre_edit_equals_independent_forward(case, where):
    model, twin, ids = case
    n = model.facts.n_layers
    l = 0 if where == "first" else max(1, n // 2)
    v = torch.randn(model.facts.d_model) * 0.7
    with torch.no_grad():
        got = model.run(ids, edits={("resid_pre", l): lambda x: x + v}, record=False).logits
        base = model.run(ids, record=False).logits
        ref = twin(input_ids=ids, output_hidden_states=True, use_cache=False)
        hidden = ref.hidden_states[l]
        # The hand-written loop reproduces the unedited model before it is trusted with the edit.
        torch.testing.assert_close(forward_from(twin, hidden, l), ref.logits, **tol(model))
        want = forward_from(twin, hidden + v, l)
        if l == 0:
            # HF's own forward with the change in its input embeddings agrees too.
            embeds = twin.get_input_embeddings()(ids) + v
            hf_want = twin(inputs_embeds=embeds, use_cache=False).logits
            torch.testing.assert_close(hf_want, want, **tol(model))
    torch.testing.assert_close(got, want, **tol(model))
    assert (got - base).abs().max() > 1e-4


def test_edit_at_one_position_leaves_earlier_positions(case):
    model, _, ids = case
    p = ids.shape[1] // 2

    def bump(x):
        x = x.clone()
        x[:, p] += 3.0
        return x

    with torch.no_grad():
        base = model.run(ids)
        run = model.run(ids, edits={("resid_mid", 0): bump})
    # Causal: positions before p untouched (bit for bit), position p and later changed.
    assert torch.equal(run.logits[:, :p], base.logits[:, :p])
    assert (run.logits[:, p:] - base.logits[:, p:]).abs().amax(dim=-1).min() > 0
    torch.testing.assert_close(run.sites["resid_mid"][:, 0], bump(base.sites["resid_mid"][:, 0]))


# --- freezing ---------------------------------------------------------------------------------


def _freeze_from(run) -> Freeze:
    return Freeze(patterns=run.patterns[0], scales={k: v[0] for k, v in run.scales.items()})


def test_freezing_at_recorded_values_leaves_logits(case):
    model, _, ids = case
    one = ids[:1]
    with torch.no_grad():
        run = model.run(one)
        frozen = model.run(one, freeze=_freeze_from(run))
        only_patterns = model.run(one, freeze=Freeze(patterns=run.patterns[0]))
        only_scales = model.run(one, freeze=Freeze(scales=_freeze_from(run).scales))
    for r in (frozen, only_patterns, only_scales):
        torch.testing.assert_close(r.logits, run.logits, **tol(model, rtol=0))
        for site in SITES:
            torch.testing.assert_close(r.sites[site], run.sites[site], **tol(model))


def test_frozen_quantities_really_stay_fixed(case):
    """Under an edit, frozen patterns are the ones applied and every norm uses its frozen
    denominator: the MLP input equals the hand norm of the (edited) residual at the frozen
    scale, not at its live one."""
    model, twin, ids = case
    one = ids[:1]
    v = torch.randn(model.facts.d_model)
    edit = {("resid_pre", 0): lambda x: x + v}
    with torch.no_grad():
        run = model.run(one)
        fz = _freeze_from(run)
        frozen = model.run(one, edits=edit, freeze=fz)
        live = model.run(one, edits=edit)
    torch.testing.assert_close(frozen.patterns, run.patterns, atol=0, rtol=0)
    assert (live.patterns - run.patterns).abs().max() > 1e-4
    for l in range(model.facts.n_layers):
        norm = _norm_modules(twin, l)["mlp_norm"]
        resid_mid = frozen.sites["resid_mid"][0, l]
        at_frozen, live_scale = hand_norm(twin, resid_mid, norm, fz.scales["mlp_norm"][l])
        assert (live_scale - fz.scales["mlp_norm"][l]).abs().max() > 1e-6  # the edit moved it
        torch.testing.assert_close(frozen.sites["mlp_in"][0, l], at_frozen, **tol(model))
    assert (frozen.logits - live.logits).abs().max() > 1e-4


def test_gemma_post_norm_edits_survive_frozen_scales():
    """Regression: on Gemma the attn_out/mlp_out sites are post-norm outputs. With that norm's
    scale frozen, an edit at the site must still reach the residual stream."""
    model = make_tiny_model("gemma2")
    ids = torch.randint(3, 101, (1, 9))
    with torch.no_grad():
        run = model.run(ids)
        fz = _freeze_from(run)
        for site in ("attn_out", "mlp_out"):
            zero = {(site, 1): torch.zeros_like}
            r = model.run(ids, edits=zero, freeze=fz)
            assert torch.equal(r.sites[site][:, 1], torch.zeros_like(r.sites[site][:, 1]))
            torch.testing.assert_close(
                r.sites["resid_pre"][:, 2], r.sites["resid_mid"][:, 1] if site == "mlp_out"
                else r.sites["resid_pre"][:, 1] + r.sites["mlp_out"][:, 1],
            )  # fmt: skip
            assert (r.logits - run.logits).abs().max() > 1e-3


def test_freeze_shape_errors_are_clear(tiny_model):
    ids = torch.randint(3, 101, (1, 7))
    with torch.no_grad():
        run = tiny_model.run(ids)
        other = tiny_model.run(torch.randint(3, 101, (1, 5)))
    n = tiny_model.facts.n_layers
    bad = [
        (Freeze(patterns=other.patterns[0]), "positions"),  # another prompt's length
        (Freeze(patterns=run.patterns[0, :, :2]), "heads"),  # wrong head count
        (Freeze(patterns=run.patterns[0, :2]), f"n_layers={n}"),  # too few layers
        (Freeze(patterns=run.patterns), f"n_layers={n}"),  # batch dim left in
        (Freeze(scales={"mlp_norm": run.scales["mlp_norm"]}), "run.scales"),  # batch dim left in
        (Freeze(scales={"final_norm": other.scales["final_norm"][0]}), "n_pos=7"),
        (Freeze(scales={"ln_2": run.scales["mlp_norm"][0]}), "unknown norm"),
    ]
    for freeze, words in bad:
        with pytest.raises(ValueError, match=words.replace("[", r"\[")):
            tiny_model.run(ids, freeze=freeze)
    assert set(NORMS) >= set(run.scales)


def test_unknown_site_and_layer_errors(tiny_model):
    ids = torch.randint(3, 101, (1, 5))
    n = tiny_model.facts.n_layers
    with pytest.raises(ValueError, match="unknown hook site 'mlp_output'.*sites are resid_pre"):
        tiny_model.run(ids, edits={("mlp_output", 0): lambda x: x})
    with pytest.raises(
        ValueError, match=rf"layer {n} out of range for site 'mlp_out' \(0..{n - 1}\)"
    ):
        tiny_model.run(ids, edits={("mlp_out", n): lambda x: x})
    with pytest.raises(ValueError, match="unknown hook site 'resid_post'"):
        tiny_model.run(ids, record_sites=("mlp_out", "resid_post"))
    with pytest.raises(ValueError, match=r"layer -1 out of range"):
        tiny_model.run(ids, edits={("resid_pre", -1): lambda x: x})
    # resid_final lives at layer n_layers only.
    with torch.no_grad():
        r = tiny_model.run(ids, edits={("resid_final", n): lambda x: x * 0})
    assert torch.equal(r.sites["resid_final"], torch.zeros_like(r.sites["resid_final"]))


def test_edit_returning_wrong_shape_is_a_clear_error(tiny_model):
    ids = torch.randint(3, 101, (2, 5))
    d = tiny_model.facts.d_model
    bad = [
        (lambda x: torch.zeros(d), rf"returned \({d},\); it must return a tensor shaped"),
        (lambda x: x[:, :-1], rf"returned \(2, 4, {d}\).*input \(2, 5, {d}\)"),
        (lambda x: None, r"returned NoneType"),
    ]
    for fn, words in bad:
        with pytest.raises(ValueError, match=r"edit at \('mlp_out', 1\) " + words):
            tiny_model.run(ids, edits={("mlp_out", 1): fn})
    with torch.no_grad():  # expand_as is the documented way to broadcast a replacement
        r = tiny_model.run(ids, edits={("mlp_out", 1): lambda x: torch.zeros(d).expand_as(x)})
    assert torch.equal(r.sites["mlp_out"][:, 1], torch.zeros(2, 5, d))
