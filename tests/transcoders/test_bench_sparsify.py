"""The sparsify side-by-side's token plan (scripts/bench_sparsify.py): our trainer, run for the
planned steps on the planned sequences, harvests exactly those sequences (the ones sparsify is
given) and trains on steps x batch = passes x tokens."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_script

from transcoders.training.run import TrainConfig, train

bench = load_script("bench_sparsify")
P, D = 5, 4  # sequence length (4 tokens after BOS), d_model


def recording_activations(seen: list):
    """A one-layer stand-in model: fixed functions of the token ids; records the rows asked."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1000, D, generator=g)
    w = torch.randn(D, D, generator=g)

    def fn(tokens):
        seen.extend(tuple(r) for r in tokens.tolist())
        x = emb[tokens].reshape(1, -1, D)
        return x, torch.tanh(x @ w)

    return fn


@pytest.mark.parametrize(
    "tokens,buffer,batch,passes,exact",
    [(20, 8, 4, 1, True), (20, 8, 8, 2, True), (9, 12, 8, 1, False)],
)
def test_our_trainer_sees_exactly_the_planned_sequences(
    tmp_path, tokens, buffer, batch, passes, exact
):
    plan = bench.plan_tokens(tokens, P, buffer, batch, passes)
    assert plan.tokens >= tokens and plan.n_seqs * (P - 1) == plan.tokens
    assert plan.exact == exact
    corpus = torch.arange(40 * P).reshape(40, P) % 1000  # every row distinct
    held = 600 + torch.arange(2 * P).reshape(2, P)
    seen: list = []
    cfg = TrainConfig(
        kind="plt", n_features=8, topk=2, skip=True, steps=plan.steps, batch_tokens=batch,
        buffer_tokens=buffer, passes=passes, eval_every=10**6, harvest_batch=2,
    )  # fmt: skip
    res = train(
        cfg,
        activations=recording_activations(seen),
        train_tokens=corpus[: plan.n_seqs],
        heldout_tokens=held,
        n_layers=1,
        d_model=D,
        out_dir=tmp_path,
        progress=False,
        plot=False,
    )
    assert res.steps == plan.steps
    trained = [r for r in seen if r not in {tuple(h) for h in held.tolist()}]
    # Each planned sequence harvested once: no extra round wrapping around the corpus.
    assert sorted(trained) == sorted(tuple(r) for r in corpus[: plan.n_seqs].tolist())
