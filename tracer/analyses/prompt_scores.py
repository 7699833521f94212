"""A transcoder's training metric from attribution: replacement and completeness scores of the
graphs of a fixed prompt set (by default the demo's five prompts), under one scoring convention
(default circuit-tracer's, see :mod:`tracer.prune`).

Expensive: one attribution per prompt (on a 2-core CPU with SmolLM2 and the demo's budget of
2,048 feature nodes, about a minute each), so it is optional: ``circuit-atlas transcoders train
--graph-scores`` runs it once on the exported transcoder after training, and
``scripts/bench_training.py`` runs it by default. The graphs are attributed exactly as the demo
traces them (its feature budget, logit targets and convention), so the scores are the ones the
demo's graphs will show.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from tracer.prompts import DEMO_PROMPTS


@dataclass
class PromptScoreConfig:
    """Which graphs are scored: prompts, the feature budget of each attribution, the scoring
    convention and the logit targets (the demo's ``trace`` defaults)."""

    prompts: tuple[str, ...] = DEMO_PROMPTS
    max_feature_nodes: int | None = 2048
    convention: str = "circuit-tracer"
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95


def prompt_graph_scores(model, clt, cfg: PromptScoreConfig | None = None, progress=False) -> dict:
    """Attribute each prompt with ``clt`` standing in for ``model``'s MLPs and score its graph.

    ``model``: a :class:`~tracer.model.LanguageModel`; ``clt``: a transcoder on the model's
    device. Returns {``convention``, ``max_feature_nodes``, ``replacement`` and ``completeness``
    (means over prompts), ``prompts``: [{``prompt``, ``replacement``, ``completeness``,
    ``n_features``, ``error_shares``: where the unexplained part sits, see
    :func:`tracer.prune.error_influence_shares`}], ``seconds``}."""
    from tracer.attribution import attribute
    from tracer.graph import FEATURE
    from tracer.prune import error_influence_shares, graph_scores
    from tracer.replacement import ReplacementModel

    cfg = cfg or PromptScoreConfig()
    rm = ReplacementModel(model, clt)
    t0 = time.perf_counter()
    rows = []
    for prompt in cfg.prompts:
        graph = attribute(
            rm,
            prompt,
            max_feature_nodes=cfg.max_feature_nodes,
            max_n_logits=cfg.max_n_logits,
            desired_logit_prob=cfg.desired_logit_prob,
            convention=cfg.convention,
            progress=progress,
        )
        s = graph_scores(graph, cfg.convention)
        rows.append({"prompt": prompt, **s, "n_features": int((graph.kind == FEATURE).sum()),
                     "error_shares": error_influence_shares(graph, cfg.convention)})  # fmt: skip
    n = max(1, len(rows))
    return {
        **{k: v for k, v in asdict(cfg).items() if k != "prompts"},
        "replacement": sum(r["replacement"] for r in rows) / n,
        "completeness": sum(r["completeness"] for r in rows) / n,
        "prompts": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
