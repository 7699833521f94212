"""Check a graph's causal claims by perturbing the model (see shared design, "Perturbation").

For a sample of nodes (features of the pruned circuit, a random sample of the other features,
and in the constrained check a few error and token nodes), :func:`validate` removes each node
and measures:

(a) constrained mode (attention, norms, MLP outputs frozen; :mod:`tracer.interventions`): the
    change of every row target (feature pre-activations and de-meaned logits) must equal minus
    the node's adjacency column, to float precision. ``constrained_max_abs_error`` is the
    largest |observed change + A[t, s]| over all targets t and sampled sources s;
    ``constrained_max_rel_error`` divides it by the largest |edge| of the graph.

(b) free mode (attention patterns frozen; norms, transcoder features and everything downstream
    live): the observed effect on the logit metric

        m = sum_k w_k (de-meaned logit k at the last position)

    (w: the graph's logit weights; a logit-difference graph's one target is logit(a) -
    logit(b)), and on every downstream feature's pre-activation. Reported:

    - ``spearman``: Spearman rank correlation, across the sampled feature nodes, between the
      graph's predicted influence (:func:`tracer.prune.node_influence`, unsigned) and the
      observed |delta m| of ablating the node. ``spearman_linear`` ranks instead by the signed
      total effect the graph predicts when downstream features respond linearly (edge paths of
      every length through active features), and ``spearman_edges`` correlates |A[t, s]| with
      the observed |delta pre-activation of t| over the sampled nodes' direct edges.
    - ``sign_agreement``: over the sampled nodes' direct edges into feature nodes, the fraction
      where the sign of the predicted change (-A[t, s]) equals the sign of t's observed
      pre-activation change under free-mode ablation of s; ``sign_agreement_weighted`` weights
      each edge by |A[t, s]|.
    - circuit ``sufficiency`` and ``necessity``. With m_full the unablated metric, m_none the
      metric with every feature ablated (errors kept as recorded), m_circuit with every
      feature outside the pruned circuit ablated (only circuit features may be active) and
      m_ablated with only the circuit's features ablated:

          sufficiency = (m_circuit - m_none) / (m_full - m_none)
          necessity   = (m_full - m_ablated) / (m_full - m_none)

      the fraction of the features' logit effect the circuit alone retains, and the fraction
      lost when the circuit alone is removed (1 and 1 for a perfect circuit). The four metric
      values are reported beside them; both ratios are None (undefined) when |m_full - m_none|
      is below a floor of ``ratio_floor_std`` x the logits' standard deviation
      (:mod:`tracer.analyses.validation_report` says why). The circuit is pruned under the graph's
      scoring convention (:mod:`tracer.prune`), named in ``convention``.

Results are a :class:`ValidationReport`; ``to_dict()`` is a flat JSON-able dict (plus a small
per-node table) stored in ``graph.extra['validation']`` and beside the graph as JSON.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from tracer.analyses.validation_report import (  # noqa: F401  (save_report, validation_path: re-exported)
    DEFAULT_RATIO_FLOOR_STD,
    ValidationReport,
    circuit_ratios,
    save_report,
    validation_path,
)
from tracer.architectures import frozen_norm
from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from tracer.interventions import (
    BatchInterventionResult,
    FeatureEdit,
    InterventionResult,
    KeepOnly,
    VectorEdit,
    intervene_batch,
)
from tracer.prune import node_influence, prune
from tracer.replacement import PromptState, ReplacementModel


class ValidationError(ValueError):
    """A graph that cannot be validated with this model and transcoder, or a bad request."""


@dataclass
class ValidationConfig:
    """What to sample and how. ``nodes`` (features as (layer, position, feature)) replaces the
    sampling of features; every one must be a feature node of the graph. ``max_circuit``
    circuit features (all when fewer) and ``n_random`` other features are sampled (seeded);
    ``n_error`` / ``n_token`` error and token nodes join the constrained check. The circuit is
    :func:`tracer.prune.prune` at the thresholds given. ``batch_size`` ablations per forward.
    ``ratio_floor_std``: sufficiency and necessity are undefined below this many standard
    deviations of the logits (:mod:`tracer.analyses.validation_report`)."""

    max_circuit: int = 48
    n_random: int = 48
    n_error: int = 8
    n_token: int = 4
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    batch_size: int = 16
    seed: int = 0
    ratio_floor_std: float = DEFAULT_RATIO_FLOOR_STD
    nodes: list[tuple[int, int, int]] | None = None
    progress: bool = True


# --- targets and removals (shared with the attribution tests) -------------------------------


def logit_directions(rm: ReplacementModel, graph: Graph) -> torch.Tensor:
    """De-meaned unembedding directions of the graph's logit nodes [n_logit, d] (a
    logit-difference graph: W_U[a] - W_U[b]), as attribution defines them."""
    W_U = rm.model.unembed_matrix()
    ids = graph.feature[graph.kind == LOGIT].astype(np.int64)
    kind = str(graph.params.get("logit_target_kind", ""))
    diff = re.fullmatch(r"difference (\d+)-(\d+)", kind)
    if diff:
        a, b = int(diff.group(1)), int(diff.group(2))
        return (W_U[a] - W_U[b])[None]
    return W_U[torch.as_tensor(ids)] - W_U.mean(0)


def _frozen_final(rm: ReplacementModel, state: PromptState, x: torch.Tensor) -> torch.Tensor:
    """Final norm with the recorded denominator at the last position: x [..., d]."""
    model = rm.model
    return frozen_norm(model.arch.norm_kind, model.final_norm(), x, state.scales["final_norm"][-1])


def target_values(rm, state: PromptState, graph: Graph, result: InterventionResult) -> np.ndarray:
    """Every row target's value after an intervention (constrained mode): feature
    pre-activations (graph order), then de-meaned logits through the frozen final norm."""
    feats = np.where(graph.kind == FEATURE)[0]
    l, p, f = (torch.as_tensor(a[feats].astype(np.int64)) for a in _lpf(graph))
    pre = result.pre[l, p, f]
    normed = _frozen_final(rm, state, result.sites["resid_final"][-1])
    logits = logit_directions(rm, graph) @ normed.to(torch.float32)
    return np.r_[pre.cpu().numpy(), logits.cpu().numpy()].astype(np.float64)


def _lpf(graph: Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return graph.layer, graph.position, graph.feature


def removal(graph: Graph, state: PromptState, i: int):
    """The intervention that removes source node i entirely."""
    k, l, p = int(graph.kind[i]), int(graph.layer[i]), int(graph.position[i])
    if k == FEATURE:
        return FeatureEdit(layer=l, feature=int(graph.feature[i]), position=p, op="ablate")
    if k == ERROR:
        return VectorEdit("mlp_out", l, p, -state.errors[l, p])
    if k == TOKEN:
        return VectorEdit("resid_pre", 0, p, -state.sites["resid_pre"][0, p])
    raise ValidationError(f"node {graph.node_id(i)} is a logit node: it has no column to remove")


# --- validation --------------------------------------------------------------------------------


def _keys(graph: Graph, idx: np.ndarray) -> list[tuple]:
    return list(
        zip(
            graph.kind[idx].tolist(),
            graph.layer[idx].tolist(),
            graph.position[idx].tolist(),
            graph.feature[idx].tolist(),
            strict=True,
        )
    )


def _check_graph(rm: ReplacementModel, graph: Graph, state: PromptState) -> None:
    """The graph must be a full graph of this prompt under this model and transcoder."""
    feats = np.where(graph.kind == FEATURE)[0]
    have = {
        (int(l), int(p), int(f)): float(v)
        for l, p, f, v in zip(
            state.feat_layer.tolist(),
            state.feat_pos.tolist(),
            state.feat_index.tolist(),
            state.feat_value.tolist(),
            strict=True,
        )
    }
    for i in feats:
        key = (int(graph.layer[i]), int(graph.position[i]), int(graph.feature[i]))
        v = have.get(key)
        if v is None or abs(v - float(graph.activation[i])) > 1e-3 * (1 + abs(v)):
            raise ValidationError(
                f"graph node {graph.node_id(i)} (activation {float(graph.activation[i]):.4g}) is "
                f"not an active feature of this model and transcoder on the graph's prompt "
                f"({'inactive' if v is None else f'activation {v:.4g}'}): validate with the "
                "model and transcoder the graph was built with"
            )


def _resolve_nodes(graph: Graph, nodes: list[tuple[int, int, int]]) -> np.ndarray:
    index = {
        k[1:]: i for i, k in enumerate(_keys(graph, np.arange(graph.n_nodes))) if k[0] == FEATURE
    }
    out = []
    for node in nodes:
        if len(node) != 3:
            raise ValidationError(f"node {node!r}: give (layer, position, feature)")
        key = tuple(int(x) for x in node)
        if key not in index:
            raise ValidationError(
                f"feature L{key[0]}/F{key[2]}@{key[1]} is not a feature node of this graph "
                f"({graph.count('feature')} feature nodes): pick one of the graph's active "
                "features (graph.node_id lists them as f_<layer>_<position>_<feature>)"
            )
        out.append(index[key])
    return np.array(out, dtype=np.int64)


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den != 0 and math.isfinite(num / den) else None


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    r = spearmanr(x, y)
    rho, p = float(r.statistic), float(r.pvalue)
    return (rho if math.isfinite(rho) else None), (p if math.isfinite(p) else None)


def linear_total_effect(
    graph: Graph, sources: np.ndarray, groups: list[np.ndarray] | None = None
) -> np.ndarray:
    """Signed change of the logit metric the graph predicts for removing each source feature
    when every downstream feature responds linearly (slope 1, staying active) and edges carry
    the change: x = relative activation change of each feature, x_s = -1, x_t = (sum_u A[t, u]
    x_u) / a_t; the metric changes by sum_k w_k sum_u A[k, u] x_u. [len(sources)].

    ``groups`` (node-index arrays) instead removes each group at once: its members are held at
    x = -1 (an ablated member does not respond to the others). [len(groups)]."""
    A = graph.adjacency().tocsc()
    feats = np.where(graph.kind == FEATURE)[0]
    logits = np.where(graph.kind == LOGIT)[0]
    pos = np.full(graph.n_nodes, -1)
    pos[feats] = np.arange(len(feats))
    act = graph.activation[feats].astype(np.float64)
    A_ff = A[feats][:, feats].astype(np.float64)
    N = sp.diags(1.0 / np.where(act != 0, act, np.inf)) @ A_ff  # per unit relative change
    w = graph.logit_weights[logits].astype(np.float64)
    wl = sp.csr_matrix(w[None]) @ A[logits][:, feats].astype(np.float64)  # [1, n_feat]
    groups = [np.array([s]) for s in np.asarray(sources)] if groups is None else groups
    seed = np.zeros((len(feats), len(groups)))
    for j, g in enumerate(groups):
        seed[pos[np.asarray(g, dtype=np.int64)], j] = -1.0
    held = seed != 0  # ablated members stay at -1
    x, total = seed, seed.copy()
    for _ in range(graph.n_layers + 2):  # DAG: paths are at most n_layers feature hops long
        x = np.where(held, 0.0, N @ x)
        if not np.abs(x).max(initial=0.0) > 0:
            break
        total += x
    return np.asarray(wl @ total).ravel()


def logit_metric(rm: ReplacementModel, graph: Graph):
    """The graph's logit metric m = sum_k w_k (de-meaned logit k at the last position), live
    final norm, as a function of a batch run: res -> [B] float64 (module doc)."""
    logit_nodes = np.where(graph.kind == LOGIT)[0]
    directions = logit_directions(rm, graph)  # [n_logit, d]
    w = torch.as_tensor(graph.logit_weights[logit_nodes], dtype=torch.float32)
    if len(directions) == 1:
        w = torch.ones(1)
    w = w.to(directions.device)
    final = rm.model.final_norm()

    def metric(res: BatchInterventionResult) -> np.ndarray:
        with torch.no_grad():
            normed = final(res.sites["resid_final"][:, -1:])[:, 0].float()
        return ((normed @ directions.T) @ w).double().cpu().numpy()

    return metric


@dataclass
class _Sample:
    """Which nodes a validation removes. Node indices into the graph: ``feats`` every feature,
    ``circuit_feats`` those the circuit keeps, ``sample`` the removed features (circuit ones
    first), ``extra_cols`` error and token nodes checked in constrained mode only."""

    circuit: Graph
    feats: np.ndarray
    circuit_feats: np.ndarray
    sample: np.ndarray
    sample_in_circuit: np.ndarray
    extra_cols: np.ndarray


class _Runs:
    """Interventions on one prompt's frozen state, read as the validation compares them."""

    def __init__(self, rm: ReplacementModel, graph: Graph, state: PromptState, feats):
        self.rm, self.graph, self.state = rm, graph, state
        self.watch = torch.as_tensor(
            np.stack([graph.layer[feats], graph.position[feats], graph.feature[feats]], 1)
            .astype(np.int64)
        )  # fmt: skip
        self.directions = logit_directions(rm, graph)  # [n_logit, d]
        self.metric = logit_metric(rm, graph)

    def run(self, batch, mode: str) -> BatchInterventionResult:
        return intervene_batch(
            self.rm, self.state, batch, mode, watch=self.watch, record_sites=("resid_final",)
        )

    def removals(self, nodes) -> list[list]:
        """One intervention per node: that node removed."""
        return [[removal(self.graph, self.state, int(s))] for s in nodes]

    def targets(self, res: BatchInterventionResult) -> np.ndarray:
        """[B, n_rows]: feature pre-activations, then de-meaned logits (frozen final norm)."""
        normed = _frozen_final(self.rm, self.state, res.sites["resid_final"][:, -1])
        normed = normed.to(self.directions.dtype)
        return torch.cat([res.watched_pre, normed @ self.directions.T], 1).double().cpu().numpy()


def _check_inputs(rm: ReplacementModel, graph: Graph) -> None:
    """One clear error for a graph this model and transcoder cannot validate."""
    if graph.params.get("pruned"):
        raise ValidationError(
            "this graph is pruned: its columns lack the edges the constrained check compares "
            "against. Validate the full graph (attribute's output); the circuit is pruned here"
        )
    L = rm.model.facts.n_layers
    if graph.n_layers != L:
        raise ValidationError(
            f"graph has {graph.n_layers} layers but the model has {L}: use the graph's model"
        )
    F = rm.transcoder.cfg.n_features
    feats = np.where(graph.kind == FEATURE)[0]
    if len(feats) and int(graph.feature[feats].max()) >= F:
        raise ValidationError(
            f"graph has feature index {int(graph.feature[feats].max())} but the transcoder has "
            f"{F} features per layer: use the transcoder the graph was built with"
        )
    if len(feats) == 0:
        raise ValidationError("graph has no feature nodes: nothing to validate")


def _draw_sample(graph: Graph, cfg: ValidationConfig, rng: np.random.Generator) -> _Sample:
    """The circuit (pruned at the config's thresholds) and the nodes to remove: up to
    ``max_circuit`` circuit features and ``n_random`` others (or ``cfg.nodes``), plus error and
    token columns for the constrained check."""
    feats = np.where(graph.kind == FEATURE)[0]
    circuit = prune(graph, cfg.node_threshold, cfg.edge_threshold)
    circuit_keys = set(_keys(circuit, np.where(circuit.kind == FEATURE)[0]))
    in_circuit = np.array([k in circuit_keys for k in _keys(graph, feats)])
    circuit_feats, other_feats = feats[in_circuit], feats[~in_circuit]
    if cfg.nodes is not None:
        sample = _resolve_nodes(graph, cfg.nodes)
    else:
        pick_c = rng.choice(circuit_feats, min(cfg.max_circuit, len(circuit_feats)), replace=False)
        pick_o = rng.choice(other_feats, min(cfg.n_random, len(other_feats)), replace=False)
        sample = np.r_[np.sort(pick_c), np.sort(pick_o)].astype(np.int64)
    errs = np.where(graph.kind == ERROR)[0]
    toks = np.where(graph.kind == TOKEN)[0]
    extra_cols = np.r_[
        rng.choice(errs, min(cfg.n_error, len(errs)), replace=False),
        rng.choice(toks, min(cfg.n_token, len(toks)), replace=False),
    ].astype(np.int64)
    return _Sample(
        circuit, feats, circuit_feats, sample, np.isin(sample, circuit_feats), extra_cols
    )


def _constrained_error(runs: _Runs, A, rows, columns, batch_size: int, bar) -> float:
    """(a) Constrained mode: removing a node moves every row target by exactly minus its
    column. Returns the largest absolute deviation over all checked columns."""
    base = runs.targets(runs.run([[]], "constrained"))[0]
    bar.update(1)
    max_abs = 0.0
    for chunk in _batches(columns.tolist(), batch_size):
        after = runs.targets(runs.run(runs.removals(chunk), "constrained"))
        predicted = -A[:, chunk][rows].toarray().T  # [B, n_rows]
        max_abs = max(max_abs, float(np.abs(after - base - predicted).max()))
        bar.update(1)
    return max_abs


def _free_effects(runs: _Runs, sample, n_feats: int, batch_size: int, bar):
    """(b) Free mode: each removal's effect on the logit metric [n_sample] and on every
    feature's pre-activation [n_sample, n_feats]; returns (base metric, effect, d_pre)."""
    base = runs.run([[]], "free")
    base_m, base_pre = runs.metric(base)[0], base.watched_pre[0].double().cpu().numpy()
    bar.update(1)
    effect = np.zeros(len(sample))
    d_pre = np.zeros((len(sample), n_feats))
    for j, chunk in enumerate(_batches(sample.tolist(), batch_size)):
        res = runs.run(runs.removals(chunk), "free")
        sl = slice(j * batch_size, j * batch_size + len(chunk))
        effect[sl] = runs.metric(res) - base_m
        d_pre[sl] = res.watched_pre.double().cpu().numpy() - base_pre
        bar.update(1)
    return base_m, effect, d_pre


def _edge_signs(A, sample, feats, d_pre) -> dict:
    """Sign agreement of the sampled nodes' direct edges into features with the observed
    changes of those features' pre-activations (plain and |edge|-weighted), and the rank
    correlation of |edge| with |change|."""
    A_fs = A[:, sample][feats].toarray().T  # [n_sample, n_feat] edges s -> t
    has = A_fs != 0
    agree = np.sign(-A_fs[has]) == np.sign(d_pre[has])
    mag = np.abs(A_fs[has])
    n_edges = int(has.sum())
    rho_edges, _ = _spearman(mag, np.abs(d_pre[has]))
    return {
        "spearman_edges": rho_edges,
        "sign_agreement": float(agree.mean()) if n_edges else None,
        "sign_agreement_weighted": _ratio(float(mag[agree].sum()), float(mag.sum())),
        "n_sign_edges": n_edges,
    }


def _circuit_metrics(runs: _Runs, graph: Graph, circuit_feats, bar) -> tuple[float, ...]:
    """Sufficiency and necessity runs in one batch: the logit metric with no features, with
    the circuit's features only, and with the circuit's features removed."""
    keep_nodes = torch.as_tensor(
        np.stack([graph.layer[circuit_feats], graph.position[circuit_feats],
                  graph.feature[circuit_feats]], 1).astype(np.int64).reshape(-1, 3)
    )  # fmt: skip
    none = KeepOnly(torch.zeros(0, 3, dtype=torch.long))
    ablate_circuit = [removal(graph, runs.state, i) for i in circuit_feats]
    m_none, m_circuit, m_ablated = runs.metric(
        runs.run([[none], [KeepOnly(keep_nodes)], ablate_circuit], "free")
    )
    bar.update(1)
    return float(m_none), float(m_circuit), float(m_ablated)


def validate(
    rm: ReplacementModel,
    graph: Graph,
    config: ValidationConfig | None = None,
    **overrides,
) -> ValidationReport:
    """Validate a full (unpruned) attribution graph by perturbation; see the module doc.

    Keyword overrides are fields of :class:`ValidationConfig`. The report is also stored in
    ``graph.extra['validation']``.
    """
    cfg = ValidationConfig(**{**asdict(config or ValidationConfig()), **overrides})
    _check_inputs(rm, graph)
    state = rm.record(torch.as_tensor(graph.tokens, dtype=torch.long))
    _check_graph(rm, graph, state)
    picked = _draw_sample(graph, cfg, np.random.default_rng(cfg.seed))
    feats, sample = picked.feats, picked.sample
    A = graph.adjacency().tocsc()
    rows = np.r_[feats, np.where(graph.kind == LOGIT)[0]]
    runs = _Runs(rm, graph, state, feats)
    columns = np.r_[sample, picked.extra_cols]
    n_batches = 2 * math.ceil(len(columns) / cfg.batch_size) + 2
    bar = tqdm(total=n_batches, desc="validation runs", unit="run", disable=not cfg.progress)

    max_abs = _constrained_error(runs, A, rows, columns, cfg.batch_size, bar)
    scale = float(np.abs(graph.weight).max()) if graph.n_edges else 1.0
    base_m, effect, d_pre = _free_effects(runs, sample, len(feats), cfg.batch_size, bar)
    influence = node_influence(graph)
    rho, pval = _spearman(influence[sample], np.abs(effect))
    linear = linear_total_effect(graph, sample)
    rho_lin, _ = _spearman(np.abs(linear), np.abs(effect))
    signs = _edge_signs(A, sample, feats, d_pre)
    m_none, m_circuit, m_ablated = _circuit_metrics(runs, graph, picked.circuit_feats, bar)
    bar.close()
    logit_std = float(state.logits[-1].double().std())
    ratios = circuit_ratios(
        float(base_m), m_none, m_circuit, m_ablated, cfg.ratio_floor_std * logit_std
    )

    table = [
        {
            "node": graph.node_id(int(s)),
            "in_circuit": bool(c),
            "influence": float(influence[s]),
            "linear": float(lin),
            "observed": float(e),
        }
        for s, c, lin, e in zip(sample, picked.sample_in_circuit, linear, effect, strict=True)
    ]
    report = ValidationReport(
        n_sampled=len(sample),
        n_circuit_sampled=int(picked.sample_in_circuit.sum()),
        n_random_sampled=int((~picked.sample_in_circuit).sum()),
        n_circuit_features=len(picked.circuit_feats),
        n_constrained_columns=len(columns),
        constrained_max_abs_error=max_abs,
        constrained_max_rel_error=max_abs / scale if scale > 0 else max_abs,
        spearman=rho,
        spearman_pvalue=pval,
        spearman_linear=rho_lin,
        **signs,
        logit_metric=float(base_m),
        logit_metric_no_features=m_none,
        sufficiency=ratios.sufficiency,
        necessity=ratios.necessity,
        node_threshold=cfg.node_threshold,
        edge_threshold=cfg.edge_threshold,
        seed=cfg.seed,
        logit_metric_circuit_only=m_circuit,
        logit_metric_circuit_ablated=m_ablated,
        features_effect=ratios.features_effect,
        circuit_effect=ratios.circuit_effect,
        circuit_ablation_effect=ratios.circuit_ablation_effect,
        logit_std=logit_std,
        ratio_floor_std=cfg.ratio_floor_std,
        ratio_floor=ratios.ratio_floor,
        ratios_undefined=ratios.undefined,
        convention=picked.circuit.params.get("convention"),
        nodes=table,
    )
    graph.extra["validation"] = report.to_dict()
    return report
