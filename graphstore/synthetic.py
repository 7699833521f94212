"""Realistic synthetic pruned graphs, for the store's tests and benchmark.

Shaped like pruned SmolLM2 circuits (30 layers): a few hundred nodes and a few thousand edges
each; features drawn from a shared, Zipf-skewed vocabulary per layer so features recur across
prompts; edges respect the model's causal order (a source is at an earlier layer and at the
same or an earlier position than its target), so every graph is a DAG like a real one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph


@dataclass
class SyntheticConfig:
    """Size distribution of synthetic graphs (defaults: pruned SmolLM2-135M circuits)."""

    n_layers: int = 30
    vocab_per_layer: int = 3000  # feature indices drawn from [0, vocab_per_layer)
    zipf_a: float = 1.15  # skew of feature popularity (higher: more recurrence)
    prompt_tokens: tuple[int, int] = (5, 14)  # prompt length range (inclusive)
    features: tuple[int, int] = (150, 400)  # feature nodes per graph
    errors: tuple[int, int] = (10, 40)
    logits: tuple[int, int] = (3, 10)
    in_degree: tuple[int, int] = (4, 22)  # incoming edges per feature/logit node
    vocab_size: int = 49152
    model_name: str = "smollm2-135m-instruct"
    transcoder_name: str = "clt-smollm2-synthetic@5e17e71c00000000"


def _zipf_index(rng: np.random.Generator, n: int, vocab: int, a: float) -> np.ndarray:
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = ranks**-a
    p /= p.sum()
    return rng.choice(vocab, size=n, p=p)


WORDS = (
    "the cat dog capital of France is Paris city a an river big small red blue old new "
    "Berlin Germany language spoken in Rome Italy opposite hot cold up down"
).split()


def synthetic_graph(seed: int, cfg: SyntheticConfig | None = None, **overrides) -> Graph:
    """One random but consistent pruned graph; the same seed gives the same graph."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(seed)
    L = cfg.n_layers
    P = int(rng.integers(cfg.prompt_tokens[0], cfg.prompt_tokens[1] + 1))
    words = [str(w) for w in rng.choice(WORDS, size=P - 1)]
    token_strings = ["<|im_start|>"] + [" " + w for w in words]
    tokens = [1] + [100 + WORDS.index(w) for w in words]

    # Features: unique (layer, position, index).
    nf = int(rng.integers(cfg.features[0], cfg.features[1] + 1))
    f_layer = rng.integers(0, L, size=nf)
    f_pos = np.minimum(rng.geometric(0.35, size=nf) - 1, P - 1)
    f_pos = (P - 1 - f_pos).astype(np.int64)  # most features at the last positions
    f_idx = _zipf_index(rng, nf, cfg.vocab_per_layer, cfg.zipf_a)
    _, keep = np.unique(np.stack([f_layer, f_pos, f_idx]), axis=1, return_index=True)
    keep = np.sort(keep)
    f_layer, f_pos, f_idx = f_layer[keep], f_pos[keep], f_idx[keep]
    nf = len(keep)
    ne = int(rng.integers(cfg.errors[0], cfg.errors[1] + 1))
    e_lp = rng.choice(L * P, size=min(ne, L * P), replace=False)
    ne = len(e_lp)
    nl = int(rng.integers(cfg.logits[0], cfg.logits[1] + 1))
    logit_ids = rng.choice(np.arange(100, 400), size=nl, replace=False)
    probs = np.sort(rng.dirichlet(np.ones(nl)))[::-1].astype(np.float32)

    kind = np.r_[
        np.full(nf, FEATURE), np.full(ne, ERROR), np.full(P, TOKEN), np.full(nl, LOGIT)
    ].astype(np.int8)
    layer = np.r_[f_layer, e_lp // P, np.full(P, -1), np.full(nl, L)].astype(np.int32)
    position = np.r_[f_pos, e_lp % P, np.arange(P), np.full(nl, P - 1)].astype(np.int32)
    feature = np.r_[f_idx, np.full(ne, -1), tokens, logit_ids].astype(np.int64)
    n = len(kind)
    activation = np.r_[
        rng.gamma(2.0, 1.5, size=nf),
        rng.gamma(2.0, 3.0, size=ne),
        rng.gamma(5.0, 2.0, size=P),
        rng.normal(10, 3, size=nl),
    ].astype(np.float32)
    probability = np.zeros(n, np.float32)
    probability[kind == LOGIT] = probs
    logit_weights = probability / probability.sum()

    # Edges: each feature/logit target takes sources at an earlier layer, same or earlier
    # position (logits read the last position's residual stream: any earlier node).
    targets, sources = [], []
    is_source = kind != LOGIT
    for t in np.flatnonzero((kind == FEATURE) | (kind == LOGIT)):
        ok = is_source & (layer < layer[t]) & (position <= position[t])
        cand = np.flatnonzero(ok)
        if len(cand) == 0:
            continue
        k = min(len(cand), int(rng.integers(cfg.in_degree[0], cfg.in_degree[1] + 1)))
        chosen = rng.choice(cand, size=k, replace=False)
        sources.append(chosen)
        targets.append(np.full(k, t))
    source = np.concatenate(sources).astype(np.int32)
    target = np.concatenate(targets).astype(np.int32)
    weight = rng.normal(0, 1, size=len(source)) * rng.gamma(1.0, 0.5, size=len(source))
    g = Graph(
        prompt="".join(token_strings[1:]).strip(),
        tokens=tokens,
        token_strings=token_strings,
        model_name=cfg.model_name,
        transcoder_name=cfg.transcoder_name,
        n_layers=L,
        kind=kind,
        layer=layer,
        position=position,
        feature=feature,
        activation=activation,
        probability=probability,
        target=target,
        source=source,
        weight=weight.astype(np.float32),
        logit_weights=logit_weights.astype(np.float32),
        params={"node_threshold": 0.8, "edge_threshold": 0.98, "max_logits": 10, "seed": seed},
        scores={
            "replacement": float(rng.uniform(0.5, 0.9)),
            "completeness": float(rng.uniform(0.7, 0.95)),
        },
        extra={
            "validation": {
                "rank_correlation": float(rng.uniform(-0.2, 0.9)),
                "sign_agreement": float(rng.uniform(0.5, 1.0)),
                "n_ablated": int(rng.integers(10, 50)),
            }
        },
    )
    for k, v in overrides.items():
        setattr(g, k, v)
    return g
