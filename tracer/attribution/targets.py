"""Logit targets of an attribution: which output directions the graph explains."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracer.attribution.config import AttributionConfig
from tracer.attribution.frozen_view import FrozenView
from tracer.model import PromptError
from tracer.replacement import PromptState, ReplacementModel


@dataclass
class LogitTargets:
    """token ids [n], de-meaned unembedding directions [n, d], probabilities [n], influence
    weights [n] (summing to 1), and a description for the graph's parameters. Tensors are on
    the compute device, float32."""

    tokens: list[int]
    directions: torch.Tensor
    probabilities: torch.Tensor
    weights: torch.Tensor
    kind: str


def select_logit_targets(
    rm: ReplacementModel, state: PromptState, cfg: AttributionConfig, view: FrozenView
) -> LogitTargets:
    """The logit targets ``cfg`` asks for, with directions from the view's unembedding."""
    model = rm.model
    W_U = view.W_U  # [V, d]
    probs = state.logits[-1].to(view.device, view.dtype).softmax(-1)
    if cfg.logit_diff is not None:
        a, b = (model.token_id(t) for t in cfg.logit_diff)
        if a == b:
            raise PromptError("logit difference needs two different tokens")
        one = torch.ones(1, device=view.device, dtype=view.dtype)
        return LogitTargets([a], (W_U[a] - W_U[b])[None], probs[[a]], one, f"difference {a}-{b}")
    if cfg.target_tokens:
        ids = [model.token_id(t) for t in cfg.target_tokens]
        p = probs[ids]
        w = p / p.sum() if float(p.sum()) > 0 else torch.full_like(p, 1 / len(ids))
        return LogitTargets(ids, view.logit_vectors(ids), p, w, "chosen")
    top_p, top_i = probs.sort(descending=True)
    n = int((top_p.cumsum(0) < cfg.desired_logit_prob).sum().item()) + 1
    n = max(1, min(n, cfg.max_n_logits))
    ids = top_i[:n].tolist()
    p = top_p[:n]
    return LogitTargets(ids, view.logit_vectors(ids), p, p / p.sum(), "top")
