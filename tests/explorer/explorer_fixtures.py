"""Builders for the explorer tests and benchmark: demo-size graphs traced by the engine (the
real SmolLM2 truncated to 4 layers, a random CLT), the feature contexts of that CLT, and a
synthetic 2,000-node / 50,000-edge graph."""

from __future__ import annotations

import numpy as np
import torch
from model_fixtures import make_random_clt

PROMPTS = (
    "The capital of the state containing Dallas is",
    "The capital of France is",
)
TRANSCODER = "clt-explorer-test"
CONTEXT_TEXTS = (
    "The city of Austin is the capital of Texas, and Dallas is a large city there.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "The opposite of hot is cold, and the opposite of up is down.",
    "Twinkle, twinkle, little star, how I wonder what you are.",
)


def build_replacement(smollm2):
    """SmolLM2 (4 layers) with a random 64-feature CLT whose thresholds let many fire."""
    from tracer.replacement import ReplacementModel

    clt = make_random_clt(4, 576, 64, seed=1)
    with torch.no_grad():
        clt.threshold.fill_(0.05)
    clt.cfg.model_name = TRANSCODER
    return ReplacementModel(smollm2, clt)


def build_graphs(rm) -> list[tuple]:
    """(pruned, full) graphs of PROMPTS, traced and pruned by the engine."""
    from tracer.attribution import attribute
    from tracer.prune import prune

    out = []
    for prompt in PROMPTS:
        full = attribute(rm, prompt, progress=False)
        out.append((prune(full, convention="atlas"), full))  # keeps features of a random CLT
    return out


def build_feature_contexts(rm, folder):
    """The feature-contexts table of the CLT over CONTEXT_TEXTS, saved in ``folder`` as
    training saves it beside the weights; returns the FeatureBook the explorer reads."""
    from tracer.cli.train_cmd import unembed_for_contexts
    from tracer.reports.feature_book import FeatureBook
    from tracer.spliced_metrics import activation_fn
    from transcoders.contexts import ContextConfig, feature_contexts, save_contexts

    model = rm.model
    seqs = [model.tokenize(t) for t in CONTEXT_TEXTS]
    P = min(len(s) for s in seqs)
    tokens = torch.stack([s[:P] for s in seqs])
    table = feature_contexts(
        rm.transcoder,
        activation_fn(model, rm.transcoder.cfg.input_site),
        tokens,
        model.token_strings,
        unembed=unembed_for_contexts(model),
        cfg=ContextConfig(top_k=4, n_promoted=5, before=24, after=8),  # ~30-token contexts
    )
    save_contexts(table, folder)
    return FeatureBook.load(folder)


def big_graph(n_nodes: int = 2000, n_edges: int = 50_000, seed: int = 0):
    """A synthetic graph of ``n_nodes`` nodes and ``n_edges`` edges in the causal order of a
    30-layer model (graphstore.synthetic's shape, grown to the size the explorer must handle)."""
    from graphstore.synthetic import SyntheticConfig, synthetic_graph
    from tracer.graph import Graph

    cfg = SyntheticConfig(features=(n_nodes - 60, n_nodes - 60), errors=(40, 40), logits=(8, 8),
                          vocab_per_layer=20_000, zipf_a=0.0,
                          prompt_tokens=(12, 12), in_degree=(40, 40))  # fmt: skip
    g = synthetic_graph(seed, cfg)
    rng = np.random.default_rng(seed)
    if g.n_edges > n_edges:
        keep = np.sort(rng.choice(g.n_edges, n_edges, replace=False))
        g = Graph(**{**g.__dict__, "target": g.target[keep], "source": g.source[keep],
                     "weight": g.weight[keep]})  # fmt: skip
    return g
