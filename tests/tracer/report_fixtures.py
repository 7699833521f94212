"""Realistic synthetic attribution graphs and feature information for the report tests.

The graphs follow the Graph conventions exactly (node order features, errors, tokens, logits;
edges target <- source only where the model allows an effect: from earlier layers and not
from later positions), with signed weights, logit probabilities and logit weights.
"""

from __future__ import annotations

import numpy as np

from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph

PROMPT_TOKENS = ["<|im_start|>", "The", " capital", " of", " the", " state", " containing",
                 " Dallas", " is"]  # fmt: skip
LOGITS = [(" Austin", 14_000, 0.41), (" Texas", 14_001, 0.22), (" the", 260, 0.09)]


def make_graph(
    n_layers: int = 4,
    seed: int = 0,
    n_features: int = 24,
    influence: bool = True,
    validation: bool = True,
) -> Graph:
    """A graph for "The capital of the state containing Dallas is" with features spread over
    ``n_layers`` layers and several positions, error nodes, all token nodes, three logits."""
    rng = np.random.default_rng(seed)
    n_pos = len(PROMPT_TOKENS)
    feats = set()
    while len(feats) < n_features:
        layer = int(rng.integers(0, n_layers))
        pos = int(rng.choice([1, 2, 5, 6, 7, 8, 8, 8]))  # most at the last position
        feats.add((layer, pos, int(rng.integers(0, 512))))
    feats = sorted(feats)
    errors = sorted({(layer, pos) for layer, pos, _ in feats})
    kind, layer, position, feature, act, prob = [], [], [], [], [], []
    for lay, pos, idx in feats:
        kind.append(FEATURE), layer.append(lay), position.append(pos), feature.append(idx)
        act.append(float(rng.uniform(0.5, 8.0))), prob.append(0.0)
    for lay, pos in errors:
        kind.append(ERROR), layer.append(lay), position.append(pos), feature.append(-1)
        act.append(float(rng.uniform(0.1, 2.0))), prob.append(0.0)
    tokens = [1] + [100 + j for j in range(1, n_pos)]
    tokens[7] = 14_002  # " Dallas"
    for pos in range(n_pos):
        kind.append(TOKEN), layer.append(-1), position.append(pos), feature.append(tokens[pos])
        act.append(float(rng.uniform(0.5, 1.5))), prob.append(0.0)
    for _, vid, p in LOGITS:
        kind.append(LOGIT), layer.append(n_layers), position.append(n_pos - 1)
        feature.append(vid), act.append(float(10 + 5 * p)), prob.append(p)
    n = len(kind)
    kind_a = np.array(kind, np.int8)
    layer_a = np.array(layer, np.int32)
    pos_a = np.array(position, np.int32)
    logit_w = np.zeros(n, np.float32)
    lidx = np.flatnonzero(kind_a == LOGIT)
    probs = np.array([p for *_, p in LOGITS], np.float32)
    logit_w[lidx] = probs / probs.sum()

    def eff_layer(i):  # the layer at which node i's target reads the residual stream
        return {FEATURE: layer_a[i], ERROR: layer_a[i], TOKEN: -1, LOGIT: n_layers}[kind_a[i]]

    target, source, weight = [], [], []
    for t in range(n):
        if kind_a[t] not in (FEATURE, LOGIT):
            continue
        for s in range(n):
            if kind_a[s] == LOGIT or s == t:
                continue
            # sources write at their layer's MLP output; a target at layer l reads before MLP l
            if kind_a[s] in (FEATURE, ERROR) and not eff_layer(s) < eff_layer(t):
                continue
            if pos_a[s] > pos_a[t] or rng.random() > 0.45:
                continue
            target.append(t), source.append(s)
            weight.append(float(rng.normal(0, 1.0) * (2.0 if kind_a[s] == TOKEN else 1.0)))
    infl = rng.uniform(0.0, 1.0, n)
    infl[lidx] = logit_w[lidx]
    extra = {}
    if influence:
        extra["influence"] = [float(x) for x in infl]
    extra["token_text"] = {str(vid): text for text, vid, _ in LOGITS} | {"14002": " Dallas"}
    if validation:
        extra["validation"] = {
            "spearman": 0.81,
            "sign_agreement": 0.93,
            "sufficiency": 0.64,
            "necessity": 0.71,
            "nodes": [
                {"node": "f_{}_{}_{}".format(*feats[0]), "predicted": 0.12, "observed": 0.10},
                {"node": "f_{}_{}_{}".format(*feats[1]), "predicted": -0.05, "observed": -0.02},
            ],
        }
    return Graph(
        prompt="The capital of the state containing Dallas is",
        tokens=tokens,
        token_strings=list(PROMPT_TOKENS),
        model_name="smollm2-135m-instruct",
        transcoder_name="clt-test@00000000c1700001",
        n_layers=n_layers,
        kind=kind_a,
        layer=layer_a,
        position=pos_a,
        feature=np.array(feature, np.int64),
        activation=np.array(act, np.float32),
        probability=np.array(prob, np.float32),
        target=np.array(target, np.int32),
        source=np.array(source, np.int32),
        weight=np.array(weight, np.float32),
        logit_weights=logit_w,
        params={"node_threshold": 0.8, "edge_threshold": 0.98, "max_n_logits": 3},
        scores={"replacement": 0.72, "completeness": 0.88},
        extra=extra,
    )


def make_feature_dict(graph: Graph, every: int = 2) -> dict:
    """Feature information (documented dict shape) for every ``every``-th feature node."""
    rng = np.random.default_rng(1)
    recs = []
    fidx = np.flatnonzero(graph.kind == FEATURE)[::every]
    for i in fidx.tolist():
        edges = np.linspace(0, 10, 11).tolist()
        recs.append(
            {
                "layer": int(graph.layer[i]),
                "index": int(graph.feature[i]),
                "top_contexts": [
                    {
                        "tokens": ["Houston", " is", " in", " Texas", "."],
                        "activations": [0.0, 0.2, 0.1, float(rng.uniform(3, 9)), 0.0],
                    },
                    {"tokens": ["<b>", "Austin", " &", "\n"], "activations": [0.0, 2.5, 0.3, 0]},
                ],
                "histogram": {"edges": edges, "counts": rng.integers(0, 500, 10).tolist()},
                "promoted_tokens": [[" Austin", 0.31], [" Texas", 0.27], [" capital", 0.1]],
            }
        )
    return {"features": recs}
