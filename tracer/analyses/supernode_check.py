"""Check supernodes by perturbation: does ablating a group move the logits as the graph says,
and do its members matter together more than a random group of the same size?

For each supernode G and for ``n_random`` random groups of |G| feature nodes of the same graph
(drawn from its feature nodes outside G, seeded), all members are ablated at once in the free
mode of :mod:`tracer.interventions` (attention patterns frozen, norms, features and everything
downstream live) and the change of the graph's logit metric is observed (``observed``; the
metric of :func:`tracer.analyses.validate.logit_metric`). The graph predicts the change by
:func:`tracer.analyses.validate.linear_total_effect` with the group held ablated (``predicted``:
downstream features respond linearly along the graph's edges). Reported per group:

    agreement = 1 - |observed - predicted| / (|observed| + |predicted|)

(1: equal; 0.5: one is three times the other; 0: opposite signs of equal size, or one of
them zero), the same for the random groups (mean), and ``effect_rank``: the fraction of the
random groups whose |observed| is below the supernode's (1: the group matters more than every
random group of its size).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tracer.analyses.supernodes import Supernode
from tracer.analyses.validate import _check_graph, linear_total_effect, logit_metric, removal
from tracer.graph import FEATURE, Graph
from tracer.interventions import intervene_batch
from tracer.replacement import ReplacementModel


def agreement(observed: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """1 - |o - p| / (|o| + |p|), elementwise (1 where both are zero)."""
    o, p = np.asarray(observed, np.float64), np.asarray(predicted, np.float64)
    den = np.abs(o) + np.abs(p)
    return np.where(den > 0, 1.0 - np.abs(o - p) / np.where(den > 0, den, 1.0), 1.0)


def group_effects(
    rm: ReplacementModel, graph: Graph, groups: Sequence[np.ndarray], *, batch_size: int = 16,
    progress: bool = False, state=None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(observed, predicted) change of the logit metric for ablating each group of feature
    nodes (node-index arrays) at once, free mode. Both [len(groups)]."""
    if state is None:
        state = rm.record(torch.as_tensor(graph.tokens, dtype=torch.long))
        _check_graph(rm, graph, state)
    metric = logit_metric(rm, graph)

    def run(batch):
        return intervene_batch(rm, state, batch, "free", record_sites=("resid_final",))

    base = metric(run([[]]))[0]
    observed = np.zeros(len(groups))
    steps = range(0, len(groups), batch_size)
    for start in tqdm(steps, desc="group ablations", unit="run", disable=not progress):
        chunk = groups[start : start + batch_size]
        batch = [[removal(graph, state, int(i)) for i in g] for g in chunk]
        observed[start : start + len(chunk)] = metric(run(batch)) - base
    predicted = linear_total_effect(graph, np.zeros(0, np.int64), groups=list(groups))
    return observed, predicted


def validate_supernodes(
    rm: ReplacementModel, graph: Graph, supernodes: Sequence[Supernode], *, n_random: int = 16,
    seed: int = 0, batch_size: int = 16, progress: bool = True,
) -> list[dict]:  # fmt: skip
    """Perturbation check of each supernode against random groups of its size (module doc).

    Sets each supernode's ``validation`` (and the copies in ``graph.extra['supernodes']``) and
    returns the per-supernode results."""
    feats = np.where(graph.kind == FEATURE)[0]
    rng = np.random.default_rng(seed)
    groups: list[np.ndarray] = []
    owner: list[tuple[int, bool]] = []  # (supernode number, is random)
    for k, s in enumerate(supernodes):
        nodes = np.asarray(s.nodes, dtype=np.int64)
        bad = [int(i) for i in nodes if i >= graph.n_nodes or graph.kind[i] != FEATURE]
        if bad:
            raise ValueError(
                f"supernode {s.id} names node {bad[0]}, not a feature node of this graph: "
                "check it against the graph it was found in"
            )
        groups.append(nodes)
        owner.append((k, False))
        others = np.setdiff1d(feats, nodes)
        size = min(len(nodes), len(others))
        for _ in range(n_random if size else 0):
            groups.append(np.sort(rng.choice(others, size, replace=False)))
            owner.append((k, True))
    observed, predicted = group_effects(rm, graph, groups, batch_size=batch_size, progress=progress)
    agree = agreement(observed, predicted)
    results = []
    for k, s in enumerate(supernodes):
        own = [j for j, (o, r) in enumerate(owner) if o == k and not r][0]
        rand = np.array([j for j, (o, r) in enumerate(owner) if o == k and r], dtype=np.int64)
        res = {
            "observed": float(observed[own]),
            "predicted": float(predicted[own]),
            "agreement": float(agree[own]),
            "n_random": len(rand),
            "random_mean_abs_observed": float(np.abs(observed[rand]).mean()) if len(rand) else None,
            "random_mean_agreement": float(agree[rand].mean()) if len(rand) else None,
            "effect_rank": float((np.abs(observed[rand]) < abs(observed[own])).mean())
            if len(rand)
            else None,
            "seed": seed,
        }
        s.validation = res
        results.append(res)
    stored = graph.extra.get("supernodes") or []
    by_id = {s.id: s for s in supernodes}
    for d in stored:
        if d.get("id") in by_id:
            d["validation"] = by_id[d["id"]].validation
    return results
