"""Does the model answer a prompt? Per prompt of a prompt set: the rank and probability of the
expected answer's first token at the last position, the model's own top token; per category
how many the model gets right (top-1) and how many pass the bar (top-1 with probability at least
``min_prob``); and a choice of demo prompts among those that pass.

Used by ``scripts/check_prompts.py`` (benchmarks/prompts.{json,md}); the demo's prompt list
(:data:`tracer.prompts.DEMO_PROMPTS`) was chosen from its table.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from tracer.prompts import Prompt

MIN_PROB = 0.3  # the bar a demo prompt must pass (issue 26)


@dataclass
class PromptResult:
    """One prompt: its expected answer's first token (``answer_token``, id ``answer_id``), that
    token's rank among all tokens (0 = the model's top-1) and probability, the top token and
    its probability. ``passes``: top-1 with probability at least the bar."""

    prompt: str
    category: str
    answer: str
    answer_token: str
    answer_id: int
    answer_rank: int
    answer_prob: float
    top_token: str
    top_prob: float
    passes: bool


@torch.no_grad()
def check_prompts(
    model, prompts: list[Prompt], *, min_prob: float = MIN_PROB, progress: bool = False
) -> list[PromptResult]:
    """Run each prompt (BOS prepended as the model's tokenizer does) and score its expected
    answer. ``model`` is a :class:`tracer.model.LanguageModel`. Prompts without an answer are
    refused (ValueError naming the first)."""
    missing = [p.prompt for p in prompts if not p.answer]
    if missing:
        raise ValueError(
            f"prompt {missing[0]!r} has no expected answer: give each prompt an 'answer' field"
        )
    it = prompts
    if progress:
        import sys

        from tqdm import tqdm

        it = tqdm(prompts, desc="prompts", unit="prompt", file=sys.stderr)
    out = []
    for p in it:
        logits = model.run(model.tokenize(p.prompt), record=False).logits[0, -1]
        probs = logits.float().softmax(-1)
        ids = model.tokenizer(p.answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the answer {p.answer!r} of {p.prompt!r} encodes to no token")
        a = int(ids[0])
        top = int(probs.argmax())
        rank = int((probs > probs[a]).sum())
        out.append(
            PromptResult(
                prompt=p.prompt, category=p.category, answer=p.answer,
                answer_token=model.decode([a]), answer_id=a, answer_rank=rank,
                answer_prob=round(float(probs[a]), 4), top_token=model.decode([top]),
                top_prob=round(float(probs[top]), 4),
                passes=rank == 0 and float(probs[a]) >= min_prob,
            )
        )  # fmt: skip
    return out


def summary(rows: list[PromptResult]) -> dict[str, dict]:
    """Per category (and 'all'): prompts, top-1, top-5 and passing counts."""
    by: dict[str, list[PromptResult]] = defaultdict(list)
    for r in rows:
        by[r.category].append(r)
    by["all"] = list(rows)
    return {
        c: {
            "n": len(v),
            "top1": sum(r.answer_rank == 0 for r in v),
            "top5": sum(r.answer_rank < 5 for r in v),
            "passes": sum(r.passes for r in v),
        }
        for c, v in by.items()
    }


def choose_demo(
    rows: list[PromptResult],
    n: int = 5,
    *,
    required: tuple[str, ...] = ("two_hop",),
    prefer: tuple[str, ...] = (
        "two_hop",
        "fact",
        "antonym",
        "code",
        "rhyme",
        "multilingual",
        "arithmetic",
        "grammar",
    ),
    preferred_prompts: tuple[str, ...] = (),
) -> list[PromptResult]:
    """``n`` passing prompts, one per category in the order of ``prefer``, every category of
    ``required`` included: in each category a passing prompt of ``preferred_prompts`` if there
    is one, else the most probable answer. ValueError when a required category has no passing
    prompt or fewer than ``n`` categories pass."""
    passing: dict[str, list[PromptResult]] = defaultdict(list)
    for r in rows:
        if r.passes:
            passing[r.category].append(r)
    for c in required:
        if not passing.get(c):
            raise ValueError(f"no {c} prompt passes the bar (top-1, p >= {MIN_PROB})")
    order = [c for c in prefer if passing.get(c)] + sorted(c for c in passing if c not in prefer)
    if len(order) < n:
        raise ValueError(f"only {len(order)} categories have a passing prompt; {n} are needed")
    pref = set(preferred_prompts)
    return [max(passing[c], key=lambda r: (r.prompt in pref, r.answer_prob)) for c in order[:n]]


def to_json(rows: list[PromptResult]) -> list[dict]:
    return [asdict(r) for r in rows]


def markdown(rows: list[PromptResult], min_prob: float = MIN_PROB) -> list[str]:
    """The table: a summary per category, then every prompt."""
    s = summary(rows)
    lines = [
        f"| category | prompts | top-1 | top-5 | top-1 with p >= {min_prob} |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {c} | {v['n']} | {v['top1']} | {v['top5']} | {v['passes']} |" for c, v in s.items()
    ]
    lines += [
        "",
        "| category | prompt | expected | p(expected) | rank | top token | p(top) | passes |",
        "|---|---|---|---:|---:|---|---:|---|",
    ]

    def cell(t: str) -> str:
        return "`" + t.replace("\n", "\\n").replace("|", "\\|").replace("`", "'") + "`"

    lines += [
        f"| {r.category} | {cell(r.prompt)} | {cell(r.answer_token)} | {r.answer_prob:.3f} | "
        f"{r.answer_rank} | {cell(r.top_token)} | {r.top_prob:.3f} | "
        f"{'yes' if r.passes else ''} |"
        for r in rows
    ]
    return lines
