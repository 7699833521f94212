"""Streaming activations into the shuffling buffer: layout, BOS skipping, seeded order, the data
plan of rounds and shards, and bad shapes from the activation source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transcoders.training.harvest import ShuffleBuffer

L, D = 2, 3


def fake_activations(tokens: torch.Tensor):
    """inputs[l, b*P + p] = (token, l, 0..), outputs = -inputs: every row says where it came
    from."""
    B, P = tokens.shape
    x = torch.zeros(L, B * P, D)
    for l in range(L):
        x[l, :, 0] = tokens.reshape(-1).float()
        x[l, :, 1] = l
        x[l, :, 2] = torch.arange(P).repeat(B).float()  # position
    return x, -x


def test_harvest_layout_and_bos_skipping():
    tokens = torch.arange(1, 13).view(3, 4)  # 3 sequences of 4 tokens
    buf = ShuffleBuffer.harvest(fake_activations, tokens, batch=2, skip_bos=True)
    assert len(buf) == 3 * 3
    x, y = buf.get(torch.arange(len(buf)))
    assert x.shape == (L, 9, D)
    # Rows in sequence order, position 0 dropped.
    assert x[0, :, 0].tolist() == [2, 3, 4, 6, 7, 8, 10, 11, 12]
    assert x[1, :, 1].tolist() == [1.0] * 9
    assert (x[:, :, 2] > 0).all()
    assert torch.equal(y, -x)
    full = ShuffleBuffer.harvest(fake_activations, tokens, batch=3, skip_bos=False)
    assert len(full) == 12 and full.get(torch.tensor([0]))[0][0, 0, 0].item() == 1


def test_buffer_dtype_float16():
    tokens = torch.arange(1, 9).view(2, 4)
    buf = ShuffleBuffer.harvest(fake_activations, tokens, dtype=torch.float16)
    assert buf.inputs.dtype == torch.float16
    assert buf.get(torch.arange(2))[0].dtype == torch.float32


def test_activation_source_with_wrong_shape_is_named():
    def bad(tokens):
        return torch.zeros(L, 1, D), torch.zeros(L, 1, D)

    with pytest.raises(ValueError, match=r"expected two \[n_layers, 8, d\]"):
        ShuffleBuffer.harvest(bad, torch.ones(2, 4, dtype=torch.long))


def test_on_batch_reports_tokens():
    got = []
    ShuffleBuffer.harvest(
        fake_activations,
        torch.ones(5, 4, dtype=torch.long),
        batch=2,
        on_batch=lambda n, s: got.append(n),
    )
    assert got == [6, 6, 3]
    assert np.sum(got) == 15
