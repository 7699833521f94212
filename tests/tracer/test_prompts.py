"""The shipped prompt set and prompt-file reading."""

from __future__ import annotations

from collections import Counter

import pytest

from tracer.prompts import Prompt, PromptFileError, load_prompts

CATEGORIES = {"fact", "two_hop", "antonym", "code", "arithmetic", "rhyme", "multilingual",
              "grammar"}  # fmt: skip


def test_shipped_set_is_large_varied_and_unique():
    prompts = load_prompts()
    assert len(prompts) >= 110
    counts = Counter(p.category for p in prompts)
    assert set(counts) == CATEGORIES
    assert min(counts.values()) >= 10
    assert len({p.prompt for p in prompts}) == len(prompts)
    assert all(p.answer for p in prompts)
    texts = {p.prompt for p in prompts}
    assert "The capital of the state containing Dallas is" in texts


def test_each_prompt_ends_at_a_token_boundary_before_a_real_token():
    """With SmolLM2's tokenizer, prompt + answer tokenizes as the prompt's tokens followed by
    the answer's first token, and that token is not bare whitespace (so the next token really
    is the answer: "2 + 2 =" would be followed by a lone space token, "2 + 2 = " by "4")."""
    from transformers import AutoTokenizer

    from tracer.fetch import fetch_smollm2

    tok = AutoTokenizer.from_pretrained(fetch_smollm2(verbose=False))
    bad = []
    for p in load_prompts():
        head = tok(p.prompt, add_special_tokens=False)["input_ids"]
        full = tok(p.prompt + p.answer, add_special_tokens=False)["input_ids"]
        nxt = full[len(head)] if len(full) > len(head) else None
        if full[: len(head)] != head or nxt is None or not tok.decode([nxt]).strip():
            bad.append(p.prompt)
    assert bad == []


def test_reading_files_and_errors(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\nThe opposite of hot is\n\ndef f():\\n    return\n")
    assert load_prompts(txt) == [Prompt("The opposite of hot is"), Prompt("def f():\n    return")]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "2 + 2 = ", "category": "arithmetic", "answer": "4"}\n\n')
    assert load_prompts(jl) == [Prompt("2 + 2 = ", "arithmetic", "4")]
    jl.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(PromptFileError, match="line 2: expected a JSON object with a 'prompt'"):
        load_prompts(jl)
    jl.write_text('{"prompt": ""}\n')
    with pytest.raises(PromptFileError, match="non-empty"):
        load_prompts(jl)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
