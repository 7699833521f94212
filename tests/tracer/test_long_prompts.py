"""Long prompts: the recorded state read one layer at a time (attention patterns in memory or
spilled to disk give the same graph), and the arithmetic memory plan."""

from __future__ import annotations

import torch
from model_fixtures import make_random_clt, make_tiny_model

from tracer.replacement import ReplacementModel

TOKENS = torch.tensor([1, 5, 9, 22, 40, 7, 13, 60, 3, 8])


def test_pattern_is_the_recorded_pattern_of_one_layer():
    """PromptState.pattern(l) is layer l's attention pattern [H, P, P] as the hooked run records
    it (an independent forward), in memory and spilled to disk alike."""
    model = make_tiny_model("llama")
    rm = ReplacementModel(model, make_random_clt(3, 32, 16))
    want = model.run(TOKENS).patterns[0]  # [L, H, P, P]
    for where in ("memory", "disk"):
        state = rm.record(TOKENS, patterns=where)
        assert state.pattern_store.placement == where
        for l in range(3):
            got = state.pattern(l)
            assert got.shape == (4, len(TOKENS), len(TOKENS)) and got.dtype == torch.float32
            torch.testing.assert_close(got, want[l], atol=0, rtol=0)
            torch.testing.assert_close(state.pattern(l, 4), want[l, :, :4, :4], atol=0, rtol=0)
