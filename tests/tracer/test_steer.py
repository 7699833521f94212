"""Steered generation: the unsteered path is the model's own greedy decoding, a zero clamp on a
feature that never fires changes nothing, strong clamps change the continuation."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import make_random_clt, make_tiny_model

from tracer.interventions import FeatureEdit, InterventionError, intervene_batch
from tracer.replacement import ReplacementModel
from tracer.steer import generate, generate_batch

PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def rm():
    model = make_tiny_model("llama")
    clt = make_random_clt(3, 32, 16)
    with torch.no_grad():
        clt.threshold[1, 7] = 1e9  # feature 7 of layer 1 never fires
    return ReplacementModel(model, clt)


def greedy_reference(model, tokens, n):
    """Greedy decoding with the plain Hugging Face forward (no hooks)."""
    ids = tokens[None]
    with torch.no_grad():
        for _ in range(n):
            nxt = model.hf(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return ids[0, len(tokens) :].tolist()


def test_unsteered_is_plain_greedy(rm):
    tokens = rm.model.tokenize(PROMPT)
    out = generate(rm, PROMPT, max_new_tokens=8, stop_at_eos=False)
    assert out.prompt_tokens == tokens.tolist()
    assert out.new_tokens == greedy_reference(rm.model, tokens, 8)
    assert out.text == rm.model.decode(out.new_tokens)
    assert rm.generate(PROMPT, max_new_tokens=8, stop_at_eos=False) == out


def test_zero_clamp_on_inactive_feature_changes_nothing(rm):
    clamp0 = FeatureEdit(1, 7, None, "clamp", 0.0)
    base, steered = generate_batch(rm, PROMPT, [[], [clamp0]], max_new_tokens=8)
    assert steered.new_tokens == base.new_tokens
    seq = torch.tensor(base.tokens)
    logits = intervene_batch(rm, seq, [[], [clamp0]], "live").logits
    assert torch.equal(logits[0], logits[1])


def test_strong_clamp_changes_continuation(rm):
    base = generate(rm, PROMPT, max_new_tokens=8, stop_at_eos=False)
    steered = generate(
        rm, PROMPT, [FeatureEdit(0, 3, None, "clamp", 200.0)], max_new_tokens=8,
        stop_at_eos=False,
    )  # fmt: skip
    assert steered.new_tokens != base.new_tokens
    # Scaling a feature by one is no change at all.
    same = generate(rm, PROMPT, [FeatureEdit(0, 3, None, "scale", 1.0)], max_new_tokens=8,
                    stop_at_eos=False)  # fmt: skip
    assert same.new_tokens == base.new_tokens


def test_clamp_at_one_position_is_causal(rm):
    tokens = rm.model.tokenize(PROMPT)
    out = intervene_batch(rm, tokens, [[], [FeatureEdit(0, 3, 4, "clamp", 50.0)]], "live")
    assert torch.equal(out.logits[0, :4], out.logits[1, :4])  # earlier positions untouched
    assert (out.logits[0, 4:] - out.logits[1, 4:]).abs().amax(-1).min() > 1e-3


def test_sampling_is_seeded_and_shared(rm):
    a = generate(rm, PROMPT, max_new_tokens=4, temperature=1.5, seed=3, stop_at_eos=False)
    b = generate(rm, PROMPT, max_new_tokens=4, temperature=1.5, seed=3, stop_at_eos=False)
    c = generate(rm, PROMPT, max_new_tokens=4, temperature=1.5, seed=4, stop_at_eos=False)
    assert a == b and a.new_tokens != c.new_tokens
    # Rows of one batch share their random draws: identical interventions, identical text.
    x, y = generate_batch(rm, PROMPT, [[], []], max_new_tokens=4, temperature=1.5, seed=3,
                          stop_at_eos=False)  # fmt: skip
    assert x.new_tokens == y.new_tokens == a.new_tokens
    top1 = generate(rm, PROMPT, max_new_tokens=6, temperature=2.0, top_k=1, stop_at_eos=False)
    assert top1.new_tokens == generate(rm, PROMPT, max_new_tokens=6, stop_at_eos=False).new_tokens


def test_stops_at_eos_and_context():
    model = make_tiny_model("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    base = generate(rm, PROMPT, max_new_tokens=5, stop_at_eos=False)
    model.tokenizer.eos_token_id = base.new_tokens[1]  # the second token now ends the text
    assert generate(rm, PROMPT, max_new_tokens=5).new_tokens == base.new_tokens[:2]
    long = generate(rm, "x" * 60, max_new_tokens=50, stop_at_eos=False)
    assert len(long.tokens) == model.facts.max_positions  # 64: stops at the context length


def test_bad_inputs(rm):
    n = len(rm.model.tokenize(PROMPT))
    with pytest.raises(InterventionError, match="past the prompt"):
        generate(rm, PROMPT, [FeatureEdit(0, 3, n, "clamp", 1.0)])
    with pytest.raises(InterventionError, match="out of range 0..15"):
        generate(rm, PROMPT, [FeatureEdit(0, 16, None, "clamp", 1.0)])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(rm, PROMPT, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        generate(rm, PROMPT, temperature=-1.0)
