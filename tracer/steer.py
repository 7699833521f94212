"""Steered generation: continue a prompt with features clamped, scaled or ablated.

Each new token comes from one forward pass of the whole sequence in the ``live`` mode of
:mod:`tracer.interventions` (nothing frozen; the real MLPs run, and every feature edit adds
the decoded difference it makes). A :class:`~tracer.interventions.FeatureEdit` with
``position=None`` acts on every position whose features are nodes, the generated ones
included; one with a position acts on that prompt position only. Several sequences (e.g. an
unsteered baseline beside the steered one) run in lockstep as one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tracer.interventions import (
    Intervention,
    InterventionError,
    check_interventions,
    intervene_batch,
)
from tracer.model import PromptError
from tracer.replacement import ReplacementModel


@dataclass
class Generation:
    """One continuation: prompt token ids (start token included), the new token ids, and the
    continuation as text (without the prompt)."""

    prompt_tokens: list[int]
    new_tokens: list[int]
    text: str

    @property
    def tokens(self) -> list[int]:
        return self.prompt_tokens + self.new_tokens


def generate_batch(
    rm: ReplacementModel,
    prompt: str | torch.Tensor,
    batch: Sequence[Sequence[Intervention]],
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    progress: bool = False,
    on_token: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Continue ``prompt`` once per intervention list in ``batch`` (lockstep, one batch).

    temperature 0: greedy; otherwise sample from softmax(logits / temperature), restricted to
    the ``top_k`` most likely tokens when given, with a generator seeded by ``seed`` (the same
    seed gives the same draws to every sequence, so a steered and a baseline continuation
    differ only by the intervention). A sequence stops at the end-of-sequence token when
    ``stop_at_eos``; generation also stops at the model's context length. The forward passes
    run on the model's device in its dtype (see :attr:`ReplacementModel.setting`). ``on_token(step,
    steps)`` is called after each generated token (e.g. for a progress display).
    """
    model = rm.model
    tokens = model.tokenize(prompt) if isinstance(prompt, str) else torch.as_tensor(prompt).long()
    if tokens.dim() != 1 or len(tokens) == 0:
        raise PromptError("token ids must be a non-empty 1-D tensor [n_pos]")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if len(batch) == 0:
        raise InterventionError("empty batch: give at least one list of interventions")
    P0 = len(tokens)
    batch = [list(items) for items in batch]
    for items in batch:  # positions refer to the prompt
        check_interventions(rm, P0, items)
    gen = torch.Generator().manual_seed(seed)
    eos = model.tokenizer.eos_token_id
    B = len(batch)
    seqs = tokens.expand(B, P0).clone()
    done = torch.zeros(B, dtype=torch.bool)
    n_new = torch.zeros(B, dtype=torch.long)
    steps = min(max_new_tokens, model.facts.max_positions - P0)
    for step in tqdm(range(steps), desc="generating", unit="tok", disable=not progress):
        # Sampling happens on the CPU in float32, so a seed gives the same draws on any device.
        last = intervene_batch(rm, seqs, batch, "live", record_sites=()).logits[:, -1]
        last = last.float().cpu()
        if temperature == 0:
            nxt = last.argmax(-1)
        else:
            logits = last / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            # One uniform draw shared by every row (inverse CDF): rows differ only by their
            # interventions, not by their random numbers.
            cdf = logits.softmax(-1).cumsum(-1)
            u = torch.rand(1, generator=gen) * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u).squeeze(1).clamp_max(cdf.shape[-1] - 1)
        nxt = torch.where(done, torch.full_like(nxt, eos if eos is not None else 0), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        n_new += (~done).long()
        if stop_at_eos and eos is not None:
            done |= nxt == eos
        if on_token is not None:
            on_token(step + 1, steps)
        if bool(done.all()):
            break
    out = []
    for b in range(B):
        new = seqs[b, P0 : P0 + int(n_new[b])].tolist()
        out.append(Generation(tokens.tolist(), new, model.decode(new)))
    return out


def generate(
    rm: ReplacementModel,
    prompt: str | torch.Tensor,
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    progress: bool = False,
) -> Generation:
    """Continue ``prompt`` with ``interventions`` applied at every step; see
    :func:`generate_batch` for the sampling options."""
    return generate_batch(
        rm, prompt, [list(interventions)], max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, seed=seed, stop_at_eos=stop_at_eos,
        progress=progress,
    )[0]  # fmt: skip
