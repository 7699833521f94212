"""Streaming activations into the shuffling buffer: layout, BOS skipping, seeded order, the data
plan of rounds and shards, and bad shapes from the activation source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transcoders.stream import ShuffleBuffer, StreamPlan

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


def test_order_is_seeded_and_covers_every_row_per_pass():
    buf = ShuffleBuffer(torch.zeros(10, L, D), torch.zeros(10, L, D))
    a = buf.order(seed=1, round_=2, shard=0, passes=3)
    assert torch.equal(a, buf.order(seed=1, round_=2, shard=0, passes=3))
    assert not torch.equal(a, buf.order(seed=1, round_=2, shard=1, passes=3))
    assert not torch.equal(a, buf.order(seed=1, round_=3, shard=0, passes=3))
    for p in range(3):
        assert sorted(a[p * 10 : (p + 1) * 10].tolist()) == list(range(10))


def test_plan_partitions_sequences_over_shards_and_rounds():
    plan = StreamPlan(seqs_per_shard=3, n_shards=2)
    seen = [plan.shard_sequences(100, r, s).tolist() for r in range(2) for s in range(2)]
    assert seen == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert plan.shard_sequences(10, 1, 1).tolist() == [9, 0, 1]  # wraps into the next epoch
    assert plan.tokens_per_shard(seq_len=128) == 3 * 127


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
