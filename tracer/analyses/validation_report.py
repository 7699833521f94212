"""The numbers of one validation (:class:`ValidationReport`) and the circuit ratios.

Sufficiency and necessity are ratios over the features' whole effect on the logit metric,

    D = m_full - m_none
    sufficiency = (m_circuit - m_none) / D
    necessity   = (m_full - m_ablated) / D

(m_full: unablated; m_none: every feature ablated; m_circuit: only the circuit's features may
be active; m_ablated: the circuit's features ablated). When |D| is small the features barely
move the metric and the ratios measure noise: two effects of a few hundredths of a logit over a
denominator of a few hundredths gave "necessity 4.11" on a demo prompt. So a ratio is reported
only when |D| >= the floor

    F = ratio_floor_std x std(logits)

with std(logits) the standard deviation of the model's logits over the vocabulary at the last
position (the spread that separates likely from unlikely tokens: SmolLM2-135M's is about 2-3) and
``ratio_floor_std`` 0.1 by default: below a tenth of that spread, ablating every feature does not
change the prediction in any way worth a ratio. An undefined ratio is ``None`` (JSON null) with
the reason in ``ratios_undefined``; the raw metric values and effects are always reported.

Light on purpose (no torch): the HTML report and the CLI format validations with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_RATIO_FLOOR_STD = 0.1


@dataclass(frozen=True)
class CircuitRatios:
    """Sufficiency and necessity with their parts (logit-metric units, see the module doc)."""

    features_effect: float  # D = m_full - m_none
    circuit_effect: float  # m_circuit - m_none
    circuit_ablation_effect: float  # m_full - m_ablated
    ratio_floor: float  # F
    sufficiency: float | None
    necessity: float | None
    undefined: str | None  # why the ratios are None, else None


def circuit_ratios(
    m_full: float, m_none: float, m_circuit: float, m_ablated: float, floor: float
) -> CircuitRatios:
    """The ratios of the module doc; both None when |m_full - m_none| < ``floor`` (>= 0)."""
    d = m_full - m_none
    num_s, num_n = m_circuit - m_none, m_full - m_ablated
    if not abs(d) >= floor or d == 0:
        why = f"denominator {d:.3g} below floor {floor:.3g}"
        return CircuitRatios(d, num_s, num_n, floor, None, None, why)
    return CircuitRatios(d, num_s, num_n, floor, num_s / d, num_n / d, None)


def ratio_text(v: Mapping) -> str:
    """One line on a validation's circuit ratios (a :meth:`ValidationReport.to_dict`): values
    with the raw metric beside them, or "undefined (denominator D below floor F)"."""

    def num(key: str) -> str:
        x = v.get(key)
        return "n/a" if x is None else f"{x:.3f}"

    if v.get("ratios_undefined"):
        ratios = f"sufficiency and necessity undefined ({v['ratios_undefined']})"
    else:
        ratios = f"sufficiency {num('sufficiency')}, necessity {num('necessity')}"
    conv = f" ({v['convention']} circuit)" if v.get("convention") else ""
    return (
        f"circuit{conv} {ratios}; logit metric full {num('logit_metric')}, no features "
        f"{num('logit_metric_no_features')}, circuit only {num('logit_metric_circuit_only')}, "
        f"circuit ablated {num('logit_metric_circuit_ablated')}; floor "
        f"{num('ratio_floor')} = {v.get('ratio_floor_std', DEFAULT_RATIO_FLOOR_STD):g} x logit "
        f"std {num('logit_std')}"
    )


@dataclass
class ValidationReport:
    """Numbers of one validation (definitions in :mod:`tracer.analyses.validate` and above). Ratios
    are
    None when their denominator is zero (e.g. a Spearman correlation over constant values) or,
    for sufficiency and necessity, below the floor."""

    n_sampled: int
    n_circuit_sampled: int
    n_random_sampled: int
    n_circuit_features: int
    n_constrained_columns: int
    constrained_max_abs_error: float
    constrained_max_rel_error: float
    spearman: float | None
    spearman_pvalue: float | None
    spearman_linear: float | None
    spearman_edges: float | None
    sign_agreement: float | None
    sign_agreement_weighted: float | None
    n_sign_edges: int
    logit_metric: float
    logit_metric_no_features: float
    sufficiency: float | None
    necessity: float | None
    node_threshold: float
    edge_threshold: float
    seed: int
    logit_metric_circuit_only: float | None = None
    logit_metric_circuit_ablated: float | None = None
    features_effect: float | None = None
    circuit_effect: float | None = None
    circuit_ablation_effect: float | None = None
    logit_std: float | None = None
    ratio_floor_std: float = DEFAULT_RATIO_FLOOR_STD
    ratio_floor: float | None = None
    ratios_undefined: str | None = None
    convention: str | None = None
    nodes: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        def f(x):
            return "n/a" if x is None else f"{x:.3f}"

        return [
            f"sampled {self.n_sampled} feature nodes ({self.n_circuit_sampled} of the "
            f"{self.n_circuit_features} circuit features, {self.n_random_sampled} others)",
            f"constrained: {self.n_constrained_columns} columns, max error "
            f"{self.constrained_max_abs_error:.2e} (relative {self.constrained_max_rel_error:.2e})",
            f"free: Spearman(influence, |effect|) {f(self.spearman)}, linear "
            f"{f(self.spearman_linear)}, edges {f(self.spearman_edges)}",
            f"sign agreement {f(self.sign_agreement)} over {self.n_sign_edges} edges "
            f"(weighted {f(self.sign_agreement_weighted)})",
            ratio_text(self.to_dict()),
        ]


def validation_path(graph_path: str | Path) -> Path:
    """Where the JSON report of a graph file goes: ``<name>.validation.json`` beside it."""
    p = Path(graph_path)
    return p.with_name(p.name.removesuffix(".parquet") + ".validation.json")


def save_report(report: ValidationReport, path: str | Path) -> Path:
    """Write the report as JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2))
    tmp.replace(path)
    return path
