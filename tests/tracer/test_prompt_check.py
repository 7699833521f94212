"""The prompt check on a tiny model: ranks and probabilities against a direct forward pass,
the pass bar, the per-category summary and the choice of demo prompts."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import make_tiny_model

from tracer.analyses import prompt_check as pc
from tracer.prompts import Prompt


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_model("llama", n_layers=2, seed=0)


def direct(tiny, text: str) -> torch.Tensor:
    ids = [tiny.bos_id, *tiny.tokenizer(text)["input_ids"]]
    with torch.no_grad():
        return tiny.hf(torch.tensor([ids])).logits[0, -1].softmax(-1)


def test_ranks_and_probabilities_match_a_direct_forward_pass(tiny):
    texts = ["abc", "hello there", "xyz q"]
    prompts = []
    for i, t in enumerate(texts):
        probs = direct(tiny, t)
        order = probs.argsort(descending=True).tolist()
        want = order[i]  # expect the i-th most probable token: rank i
        # TinyTokenizer: id = 3 + ord(c) % 98, so this character encodes to token `want`.
        ch = next(chr(c) for c in range(32, 20000) if 3 + c % 98 == want)
        prompts.append(Prompt(t, category=["fact", "two_hop", "code"][i], answer=ch))
    rows = pc.check_prompts(tiny, prompts, min_prob=0.0)
    for i, (r, t) in enumerate(zip(rows, texts, strict=True)):
        probs = direct(tiny, t)
        assert r.answer_rank == i and r.answer_id == int(probs.argsort(descending=True)[i])
        assert r.answer_prob == pytest.approx(float(probs[r.answer_id]), abs=1e-4)
        assert r.top_prob == pytest.approx(float(probs.max()), abs=1e-4)
        assert r.passes == (i == 0)  # only top-1 passes, even with a bar of 0
    s = pc.summary(rows)
    assert s["all"] == {"n": 3, "top1": 1, "top5": 3, "passes": 1}
    assert s["two_hop"] == {"n": 1, "top1": 0, "top5": 1, "passes": 0}
    # A bar above the top token's probability fails it too.
    high = pc.check_prompts(tiny, prompts[:1], min_prob=rows[0].answer_prob + 1e-3)
    assert not high[0].passes and high[0].answer_rank == 0
    assert any("| fact |" in line for line in pc.markdown(rows))


def _row(prompt, cat, p, passes=True):
    return pc.PromptResult(prompt, cat, " x", " x", 5, 0 if passes else 3, p, " x", p, passes)


def test_choose_demo_one_per_category_with_the_two_hop_prompt():
    rows = [
        _row("f1", "fact", 0.5), _row("f2", "fact", 0.9), _row("a", "antonym", 0.4),
        _row("c", "code", 0.6), _row("r", "rhyme", 0.7), _row("t", "two_hop", 0.35),
        _row("m", "multilingual", 0.8), _row("t2", "two_hop", 0.2, passes=False),
    ]  # fmt: skip
    assert [r.prompt for r in pc.choose_demo(rows)] == ["t", "f2", "a", "c", "r"]
    got = pc.choose_demo(rows, preferred_prompts=("f1", "t2"))  # t2 does not pass
    assert [r.prompt for r in got] == ["t", "f1", "a", "c", "r"]
    with pytest.raises(ValueError, match="no two_hop prompt passes"):
        pc.choose_demo([r for r in rows if r.category != "two_hop"])
    with pytest.raises(ValueError, match="only 2 categories"):
        pc.choose_demo(rows[:2] + rows[5:6])


def test_prompt_without_answer_is_refused(tiny):
    with pytest.raises(ValueError, match="has no expected answer"):
        pc.check_prompts(tiny, [Prompt("abc", "fact", "")])
