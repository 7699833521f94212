"""The scoring convention is shown wherever a score is: the HTML report (page and index), the
Neuronpedia export (metadata, and circuit-tracer's cumulative influence on the nodes) and the
store's (:Graph) properties."""

from __future__ import annotations

import pytest
from prune_fixtures import start_graph

from graphstore.ingest import flat_properties
from tracer.prune import prune
from tracer.reports.neuronpedia import to_neuronpedia
from tracer.reports.report import write_index, write_report


@pytest.mark.parametrize("conv", ["circuit-tracer", "atlas"])
def test_report_export_and_store_name_the_convention(conv, tmp_path):
    full = start_graph()
    full.params["convention"] = conv
    p = prune(full, 0.8, 0.98)
    files = write_report(p, tmp_path, name="g")
    page = files.html.read_text(encoding="utf-8")
    assert f"<p class='convention'>{conv} convention</p>" in page
    index = write_index(tmp_path, [files]).read_text(encoding="utf-8")
    assert f"<td>{conv}</td>" in index
    meta = to_neuronpedia(p)["metadata"]
    assert meta["pruning_settings"]["convention"] == conv
    assert meta["info"]["scores"] == {**p.scores, "convention": conv}
    props = flat_properties(p)
    assert props["param_convention"] == props["score_convention"] == conv
    assert props["score_replacement"] == pytest.approx(p.scores["replacement"])


def test_neuronpedia_influence_is_circuit_tracers_cumulative_share():
    p = prune(start_graph(), 0.8, 0.98, convention="circuit-tracer")
    nodes = {n["node_id"]: n["influence"] for n in to_neuronpedia(p)["nodes"]}
    # Full-graph influence F .5, t1 .5, e1 .25, t0 .25, e0 0 (total 1.5), sorted in that order
    # (ties by node order): running shares 1/3, 2/3, 5/6, 1; the logit carries none.
    assert nodes["1_0_1"] == pytest.approx(1 / 3)  # feature F: layer 1, index 0, position 1
    assert nodes["E_4_1"] == pytest.approx(2 / 3)  # token at position 1 (vocab id: its index)
    assert nodes["0_-1_1"] == pytest.approx(5 / 6)
    assert nodes["E_3_0"] == pytest.approx(1.0)
    assert nodes["3_5_1"] is None


def test_report_shows_raw_values_and_undefined_ratios(tmp_path):
    p = prune(start_graph(), 0.8, 0.98)
    p.extra["validation"] = {
        "logit_metric": 2.0, "logit_metric_no_features": 1.99, "logit_metric_circuit_only": 2.1,
        "logit_metric_circuit_ablated": 1.7, "sufficiency": None, "necessity": None,
        "ratio_floor": 0.25, "ratio_floor_std": 0.1, "logit_std": 2.5,
        "ratios_undefined": "denominator 0.01 below floor 0.25", "convention": "circuit-tracer",
    }  # fmt: skip
    page = write_report(p, tmp_path, name="v").html.read_text(encoding="utf-8")
    assert "undefined (denominator 0.01 below floor 0.25)" in page
    assert "circuit only 2.100" in page and "no features 1.990" in page
