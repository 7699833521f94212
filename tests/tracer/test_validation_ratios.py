"""Sufficiency and necessity beside the raw logit-metric values they come from, checked against
ablations run here, and undefined (None, with the reason) below the floor: in the report, its
text (CLI and HTML) and the store's properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import make_random_clt, make_tiny_model

from tracer.analyses.validate import validate
from tracer.analyses.validation_report import circuit_ratios, ratio_text
from tracer.attribution import attribute
from tracer.graph import FEATURE, LOGIT
from tracer.interventions import FeatureEdit, intervene
from tracer.prune import prune
from tracer.replacement import ReplacementModel

TOKENS = torch.tensor([1, 5, 9, 22, 40, 7, 13])


def test_circuit_ratios_by_hand():
    r = circuit_ratios(m_full=3.0, m_none=1.0, m_circuit=2.5, m_ablated=1.5, floor=0.5)
    assert (r.features_effect, r.circuit_effect, r.circuit_ablation_effect) == (2.0, 1.5, 1.5)
    assert r.sufficiency == 0.75 and r.necessity == 0.75 and r.undefined is None
    # |D| = 0.04 < floor 0.25: both undefined, whatever the numerators.
    r = circuit_ratios(m_full=1.00, m_none=1.04, m_circuit=1.2, m_ablated=0.9, floor=0.25)
    assert r.sufficiency is None and r.necessity is None
    assert r.undefined == "denominator -0.04 below floor 0.25"
    assert circuit_ratios(1.0, 1.0, 1.0, 1.0, floor=0.0).sufficiency is None  # D = 0
    assert circuit_ratios(1.0, 0.0, 1.0, 1.0, floor=1.0).sufficiency == 1.0  # |D| = floor


def metric(graph, logits) -> float:
    """sum_k w_k (logit_k - mean logit) at the last position, from the model's logits."""
    last = logits[-1].double()
    ids = graph.feature[graph.kind == LOGIT]
    w = graph.logit_weights[graph.kind == LOGIT]
    return float(((last[ids] - last.mean()).numpy() * w).sum())


@pytest.fixture(scope="module")
def validated():
    rm = ReplacementModel(make_tiny_model("llama"), make_random_clt(3, 32, 32, seed=0))
    graph = attribute(rm, TOKENS, progress=False)
    rep = validate(rm, graph, max_circuit=4, n_random=4, progress=False)
    return rm, graph, rep


def test_raw_values_and_ratios_match_ablations(validated):
    rm, graph, rep = validated
    state = rm.record(TOKENS)
    circuit = prune(graph, 0.8, 0.98)
    keys = {(int(circuit.layer[i]), int(circuit.position[i]), int(circuit.feature[i]))
            for i in np.where(circuit.kind == FEATURE)[0]}  # fmt: skip
    P, L, F = len(TOKENS), 3, 32  # the start position has no feature nodes
    every = [FeatureEdit(l, f, p) for l in range(L) for p in range(1, P) for f in range(F)]
    outside = [e for e in every if (e.layer, e.position, e.feature) not in keys]
    inside = [e for e in every if (e.layer, e.position, e.feature) in keys]
    m_full = metric(graph, state.logits)
    m_none = metric(graph, intervene(rm, state, every, "free").logits)
    m_circuit = metric(graph, intervene(rm, state, outside, "free").logits)
    m_ablated = metric(graph, intervene(rm, state, inside, "free").logits)
    assert rep.convention == "circuit-tracer" == circuit.params["convention"]
    assert rep.logit_metric == pytest.approx(m_full, abs=1e-5)
    assert rep.logit_metric_no_features == pytest.approx(m_none, abs=1e-5)
    assert rep.logit_metric_circuit_only == pytest.approx(m_circuit, abs=1e-5)
    assert rep.logit_metric_circuit_ablated == pytest.approx(m_ablated, abs=1e-5)
    assert rep.features_effect == pytest.approx(m_full - m_none, abs=1e-5)
    std = float(state.logits[-1].double().std())
    assert rep.logit_std == pytest.approx(std) and rep.ratio_floor == pytest.approx(0.1 * std)
    assert abs(m_full - m_none) >= 0.1 * std  # this graph's ratios are defined ...
    assert rep.sufficiency == pytest.approx((m_circuit - m_none) / (m_full - m_none), rel=1e-3)
    assert rep.necessity == pytest.approx((m_full - m_ablated) / (m_full - m_none), rel=1e-3)
    assert rep.ratios_undefined is None
    text = "\n".join(rep.lines())
    assert f"sufficiency {rep.sufficiency:.3f}" in text
    assert f"circuit only {m_circuit:.3f}" in text and f"no features {m_none:.3f}" in text


def test_ratios_undefined_below_the_floor(validated):
    from graphstore.ingest import flat_properties

    rm, graph, rep = validated
    k = 2 * abs(rep.features_effect) / rep.logit_std  # a floor of twice the denominator
    low = validate(rm, graph, max_circuit=4, n_random=4, ratio_floor_std=k, progress=False)
    assert low.sufficiency is None and low.necessity is None
    assert low.ratio_floor == pytest.approx(2 * abs(rep.features_effect))
    why = f"denominator {rep.features_effect:.3g} below floor {low.ratio_floor:.3g}"
    assert low.ratios_undefined == why
    assert f"undefined ({why})" in "\n".join(low.lines())
    assert low.logit_metric_circuit_only == pytest.approx(rep.logit_metric_circuit_only)
    d = low.to_dict()
    assert d["sufficiency"] is None and f"undefined ({why})" in ratio_text(d)
    props = flat_properties(graph)  # validate stored this report in the graph
    assert props["validation_ratios_undefined"] == why
    assert "validation_sufficiency" not in props  # null: no property
    assert props["validation_logit_metric_circuit_only"] == pytest.approx(
        rep.logit_metric_circuit_only
    )
