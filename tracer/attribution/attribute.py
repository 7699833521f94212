"""Exact attribution graphs: direct effects through the frozen, linear replacement model.

With attention patterns and norm denominators frozen and the MLPs replaced by (decoded features
+ error), the residual stream is a linear function of the node values. The edge

    A[t, s] = direct effect of source s on target t

is the gradient of target t (a feature's pre-activation or a de-meaned logit) with respect to
the place where s writes, dotted with what s writes (activation x decoder vectors for a feature,
the error vector for an error node, the embedding for a token node).

:func:`attribute` records the prompt, plans its memory, computes rows with batched backward
sweeps of :class:`~tracer.attribution.linear.FrozenLinearModel` into one preallocated
:class:`~tracer.attribution.rows.RowStore` (logit rows first; with a feature budget, features
are re-ranked by estimated influence before each batch), all on the model's device, and turns
the rows into a :class:`~tracer.graph.Graph` (numpy) only at the end.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm.auto import tqdm

from tracer.attribution.config import AttributionConfig
from tracer.attribution.linear import FrozenLinearModel
from tracer.attribution.memory import (
    GB,
    AttributionMemoryError,
    MemoryEstimate,
    pattern_placement,
    plan_memory,
    process_rss_bytes,
    suggested_budget_line,
    workload_from_l0,
    workload_from_state,
)
from tracer.attribution.memory_phases import PhaseMemory
from tracer.attribution.rows import ADD_BYTES, RowStore
from tracer.attribution.targets import select_logit_targets
from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from tracer.model import PromptError
from tracer.prune import graph_scores, resolve_convention
from tracer.replacement import ATTRIBUTION_SITES, ReplacementModel


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def _position_batches(lin: FrozenLinearModel, pick: torch.Tensor, cap_bytes: float):
    """Split the picked features into sweeps over position ranges: sorted by position, each
    sweep's working memory (rows x positions x d) within ``cap_bytes``, and so are its rows
    while they are added to the store (rows x columns x ``ADD_BYTES``: at early positions the
    working memory allows many rows, but each is written full width first). Inside a sweep
    the rows are sorted by layer, highest first (as :meth:`FrozenLinearModel.sweep_into`
    needs)."""
    pos = lin.feat_pos[pick]
    order = torch.argsort(pos, stable=True)
    pick, pos = pick[order], pos[order].cpu().tolist()
    max_rows = max(1, int(cap_bytes // (lin.n_cols * ADD_BYTES)))
    i = 0
    while i < len(pick):
        j = i + 1
        while (
            j < len(pick)
            and j + 1 - i <= max_rows
            and lin.sweep_bytes(j + 1 - i, pos[j] + 1, lin.d) <= cap_bytes
        ):
            j += 1
        sub = pick[i:j]
        yield sub[torch.argsort(lin.feat_layer[sub], descending=True, stable=True)]
        i = j


def attribute(
    rm: ReplacementModel, prompt: str | torch.Tensor, config: AttributionConfig | None = None,
    *, head_loadings: bool = False, **overrides,
) -> Graph:  # fmt: skip
    """Attribution graph of ``prompt`` (text, or token ids [P] with the start token).

    Keyword overrides are fields of :class:`AttributionConfig`. Runs on the model's device;
    rows are float32 whatever the weights' dtype. A budget the memory plan says cannot fit
    raises :class:`~tracer.attribution.memory.AttributionMemoryError` before the rows are
    allocated (and an out-of-memory error during the run is re-raised as one, naming the
    estimate and the budget that fits).

    ``head_loadings``: also split each edge of the default circuit by the attention heads
    carrying it, into ``graph.extra["head_loadings"]`` (:func:`tracer.attention.add_head_loadings`).
    """
    cfg = AttributionConfig(**{**asdict(config or AttributionConfig()), **overrides})
    resolve_convention(None, cfg.convention)  # an unknown convention fails before the work
    t0 = time.perf_counter()
    rss0 = process_rss_bytes()
    model = rm.model
    tokens = model.tokenize(prompt) if isinstance(prompt, str) else prompt.long()
    if tokens.dim() != 1 or len(tokens) == 0:
        raise PromptError("token ids must be a non-empty 1-D tensor [n_pos]")
    if len(tokens) > model.facts.max_positions:
        raise PromptError(
            f"prompt is {len(tokens)} tokens, longer than the model's context "
            f"({model.facts.max_positions}): shorten it"
        )
    limit = None if cfg.memory_limit_gb is None else int(cfg.memory_limit_gb * GB)
    where_patterns = pattern_placement(model.facts, len(tokens), cfg.patterns)
    if cfg.check_memory:
        _refuse_before_recording(rm, tokens, cfg, limit, rss0, where_patterns)
    phases = PhaseMemory(model.device, enabled=cfg.profile_memory)
    state = rm.record(tokens, patterns=where_patterns, spill_dir=cfg.spill_dir, keep_pre=False,
                      all_logits=False, sites=ATTRIBUTION_SITES)  # fmt: skip
    phases.mark("record")
    n_feat = state.n_active
    budget = n_feat if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, n_feat)
    n_logit_max = 1 if cfg.logit_diff else len(cfg.target_tokens or []) or cfg.max_n_logits
    work = workload_from_state(rm, state)

    def plan(budget: int) -> MemoryEstimate:
        return plan_memory(
            work, budget, n_logits=n_logit_max, batch_size=cfg.batch_size,
            sweep_memory_mb=cfg.sweep_memory_mb, device=model.device, placement=cfg.row_store,
            baseline_host_bytes=rss0, available_host_bytes=limit,
            available_device_bytes=limit if model.device.type == "cuda" else None,
            patterns=where_patterns, spill_dir=cfg.spill_dir,
        )  # fmt: skip

    est = plan(budget)
    if cfg.check_memory and not est.fits:
        if not cfg.fit_budget or est.suggested_max_feature_nodes == 0:
            raise AttributionMemoryError(suggested_budget_line(est))
        budget = est.suggested_max_feature_nodes
        cfg.max_feature_nodes = budget
        est = plan(budget)
    try:
        graph = _attribute(rm, prompt, tokens, state, cfg, budget, est, t0, phases)
    except Exception as err:
        if _is_oom(err):
            raise AttributionMemoryError(
                f"out of memory during attribution ({type(err).__name__}); the plan was: "
                f"{est.summary()}. Use --max-feature-nodes {est.suggested_max_feature_nodes} "
                "or fewer (max_feature_nodes=...), or a shorter prompt"
            ) from err
        raise
    if head_loadings:  # which heads carry each edge of the default circuit (tracer.attention)
        from tracer.attention import add_head_loadings

        add_head_loadings(rm, graph, state=state, progress=cfg.progress)
    return graph


def _refuse_before_recording(rm, tokens, cfg, limit, rss0, where_patterns) -> None:
    """With an L0 known, the arithmetic plan refuses, before the record pass, a prompt whose
    smallest plan (no feature rows) does not fit: the record pass itself would not."""
    model = rm.model
    try:
        w = workload_from_l0(model, rm.transcoder, len(tokens), rm.exclude_bos)
    except ValueError:
        return  # no L0: the plan made after the record pass decides
    est = plan_memory(
        w, 0, n_logits=1, batch_size=cfg.batch_size, sweep_memory_mb=cfg.sweep_memory_mb,
        device=model.device, placement=cfg.row_store, baseline_host_bytes=rss0,
        available_host_bytes=limit,
        available_device_bytes=limit if model.device.type == "cuda" else None,
        patterns=where_patterns, spill_dir=cfg.spill_dir,
    )  # fmt: skip
    if not est.fits:
        raise AttributionMemoryError(suggested_budget_line(est))


def _attribute(rm, prompt, tokens, state, cfg, budget: int, est: MemoryEstimate, t0: float,
               phases: PhaseMemory):  # fmt: skip
    lin = FrozenLinearModel(rm, state)
    targets = select_logit_targets(rm, state, cfg, lin.view)
    phases.mark("view and targets")
    P, L, n_feat, dev = lin.P, lin.L, lin.n_feat, lin.device
    n_logit = len(targets.tokens)
    t_record = time.perf_counter() - t0
    where = est.row_store_placement  # device, host or disk
    store = RowStore(n_logit + budget, lin.n_cols, n_feat=n_feat, causal=lin.causal_columns(),
                     device=dev, placement=where, spill_dir=cfg.spill_dir)  # fmt: skip
    cap = cfg.sweep_memory_mb * 2**20
    tol = cfg.edge_tolerance

    # Logit rows first: they rank the features when there is a budget.
    dirs = lin.logit_rows(targets.directions)
    logit_nodes = -1 - torch.arange(n_logit, device=dev)
    logit_layer = torch.full((n_logit,), L, device=dev)
    logit_pos = torch.full((n_logit,), P - 1, device=dev)
    store.add(logit_nodes, lambda buf: lin.sweep_into(buf, logit_layer, logit_pos, dirs), tol,
              logit_layer, logit_pos)  # fmt: skip
    phases.mark("logit rows")

    visited = torch.zeros(n_feat, dtype=torch.bool, device=dev)
    n_done = 0
    bar = tqdm(total=budget, desc="attribution rows", unit="row", disable=not cfg.progress)
    while n_done < budget:
        n_next = min(cfg.batch_size, budget - n_done)
        if budget == n_feat:
            # No budget: every feature gets a row. Position-major batches keep each sweep to
            # the first few positions (causality), so they cost least.
            pick = lin.pm_order[~visited[lin.pm_order]][:n_next]
        else:
            score = store.influence(targets.weights, n_feat)[lin.pm_of]  # state order
            score[visited] = -torch.inf
            pick = torch.sort(score, descending=True, stable=True).indices[:n_next]
        for sub in _position_batches(lin, pick, cap):

            def fill(buf, sub=sub):
                lin.sweep_into(buf, lin.feat_layer[sub], lin.feat_pos[sub], lin.feature_rows(sub))

            store.add(lin.pm_of[sub], fill, tol, lin.feat_layer[sub], lin.feat_pos[sub])
            bar.update(len(sub))
        visited[pick] = True
        n_done += len(pick)
    bar.close()
    phases.mark("feature rows")
    graph = _assemble(rm, prompt, tokens, state, cfg, lin, store, visited, targets, phases)
    store.close()
    graph.extra["timing_s"] = {"record": round(t_record, 4),
                               "total": round(time.perf_counter() - t0, 4)}  # fmt: skip
    graph.extra["memory_plan"] = est.summary()
    # The plan this run followed, in numbers (an estimate made earlier, e.g. by
    # ``trace --estimate``, saw the memory available then and may have placed the rows elsewhere).
    graph.extra["memory_estimate"] = {
        "max_feature_nodes": est.max_feature_nodes,
        "peak_host_bytes": est.peak_host_bytes,
        "peak_device_bytes": est.peak_device_bytes,
        "baseline_host_bytes": est.baseline_host_bytes,
        "row_store_placement": store.placement,
        "row_store_bytes": est.row_store_bytes,
    }
    graph.extra["row_store_bytes"] = store.used_bytes  # the causal rows actually stored
    if phases.phases:
        graph.extra["memory_phases"] = phases.phases
    return graph


def _assemble(rm, prompt, tokens, state, cfg, lin, store, visited, targets, phases) -> Graph:
    """The graph of the stored rows: kept features, all error nodes, all tokens, logits. Edges
    sorted by (target, source); tensors become numpy here."""
    model = rm.model
    P, L, n_feat, dev = lin.P, lin.L, lin.n_feat, lin.device
    n_logit = len(targets.tokens)
    keep_feat = visited.nonzero().squeeze(1)  # state order
    n_keep = len(keep_feat)
    # Kept column j (pm numbering) is node j: kept features, then errors and tokens.
    kept = torch.cat([lin.pm_of[keep_feat], torch.arange(n_feat, lin.n_cols, device=dev)])
    node_of_pm = torch.full((n_feat,), -1, dtype=torch.long, device=dev)
    node_of_pm[lin.pm_of[keep_feat]] = torch.arange(n_keep, device=dev)
    n_nodes = n_keep + L * P + P + n_logit
    logit_node0 = n_keep + L * P + P
    rn = store.node[: store.n]
    row_node = torch.where(rn < 0, logit_node0 + (-1 - rn), node_of_pm[rn.clamp(min=0)])
    # Rows in target-node order; inside a row, kept columns are in node order: edges come out
    # sorted by (target, source).
    row_order = torch.argsort(row_node, stable=True)
    targets_all, sources_all, weights_all = [], [], []
    for idx, block in store.chunks(kept, order=row_order):
        r, c = block.nonzero(as_tuple=True)
        targets_all.append(row_node[idx[r]].to(torch.int32).cpu().numpy())
        sources_all.append(c.to(torch.int32).cpu().numpy())
        weights_all.append(block[r, c].float().cpu().numpy())
        del block, r, c
    target = np.concatenate(targets_all)
    source = np.concatenate(sources_all)
    weight = np.concatenate(weights_all)
    del targets_all, sources_all, weights_all

    cpu = lambda t: t.detach().cpu().numpy()  # noqa: E731
    kf = keep_feat.to(state.feat_layer.device)
    err_norm = state.errors.float().norm(dim=-1).reshape(-1)  # [L*P] layer-major
    emb_norm = state.sites["resid_pre"][0].float().norm(dim=-1)
    final = model.final_norm()
    with torch.no_grad():
        normed = final(state.sites["resid_final"][-1:].clone())[0]
    logit_vals = targets.directions @ normed.to(targets.directions)
    logit_w = cpu(targets.weights).astype(np.float64)
    kind = np.r_[
        np.full(n_keep, FEATURE), np.full(L * P, ERROR), np.full(P, TOKEN), np.full(n_logit, LOGIT)
    ].astype(np.int8)
    tok = tokens.cpu()
    graph = Graph(
        prompt=prompt if isinstance(prompt, str) else model.decode(tok.tolist()),
        tokens=tok.tolist(),
        token_strings=model.token_strings(tok),
        model_name=model.facts.name,
        transcoder_name=rm.transcoder.identity.id,  # name@fingerprint (transcoders.identity)
        n_layers=L,
        kind=kind,
        layer=np.r_[
            cpu(state.feat_layer[kf]),
            np.repeat(np.arange(L), P),
            np.full(P, -1),
            np.full(n_logit, L),
        ].astype(np.int32),  # fmt: skip
        position=np.r_[
            cpu(state.feat_pos[kf]),
            np.tile(np.arange(P), L),
            np.arange(P),
            np.full(n_logit, P - 1),
        ].astype(np.int32),  # fmt: skip
        feature=np.r_[
            cpu(state.feat_index[kf]), np.full(L * P, -1), tok.numpy(), targets.tokens
        ].astype(np.int64),
        activation=np.r_[
            cpu(state.feat_value[kf]), cpu(err_norm), cpu(emb_norm), cpu(logit_vals)
        ].astype(np.float32),
        probability=np.r_[np.zeros(n_nodes - n_logit), cpu(targets.probabilities)].astype(
            np.float32
        ),
        target=target,
        source=source,
        weight=weight,
        logit_weights=np.r_[np.zeros(n_nodes - n_logit), logit_w].astype(np.float32),
        params={
            **cfg.graph_params(),
            "logit_target_kind": targets.kind,
            "exclude_bos": rm.exclude_bos,
            "input_site": rm.input_site,
            "n_active_features": n_feat,
        },
    )
    phases.mark("edges")
    graph.scores = graph_scores(graph)
    phases.mark("scores")
    # Text of the logit tokens, for summaries, reports and exports (graphs carry no tokenizer).
    graph.extra["token_text"] = {str(t): model.decode([t]) for t in targets.tokens}
    return graph
