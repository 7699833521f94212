"""The activation cache: exact round trips against a fresh harvest of a tiny model, resumed
harvests, the data training reads, shared use by several recipes, and refusals (another
model, site or corpus; float16 overflow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_fixtures import make_tiny_model

from tests.transcoders import train_worker as tw
from tracer.spliced_metrics import activation_fn, mlp_activations
from transcoders.training.activation_cache import (
    ActivationCache,
    CacheMismatch,
    CacheOverflow,
    CacheSpec,
)
from transcoders.training.run import train
from transcoders.training.trainer import TRAIN_SET, Trainer, stream_rows

L, D = 3, 32


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", n_layers=L)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spec(**kw) -> CacheSpec:
    return CacheSpec(**{"model": "tiny-llama", "n_layers": L, "d_model": D, **kw})


def fresh(model, tokens: torch.Tensor, site: str = "mlp_in"):
    """Independent reference: the model's activations per (sequence, position >= 1), as
    [S, P - 1, L, d] float32, from one forward pass per sequence."""
    xs, ys = [], []
    for row in tokens:
        x, y = mlp_activations(model, row[None], site)  # [L, P, d]
        xs.append(x[:, 1:].transpose(0, 1))
        ys.append(y[:, 1:].transpose(0, 1))
    return torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_equals_a_fresh_harvest(tmp_path, model, dtype):
    tokens, _ = tw.tokens()
    cache = ActivationCache(tmp_path, spec(dtype=dtype))
    cache.harvest(TRAIN_SET, tokens, activation_fn(model), 10, chunk_sequences=4, batch=3)
    got = cache.read(TRAIN_SET, 10)
    x, y = got.get(slice(None))  # [L, 10 * 15, d]
    fx, fy = fresh(model, tokens[:10])  # [10, 15, L, d]
    cast = getattr(torch, dtype)
    want_x = fx.reshape(-1, L, D).to(cast).float().transpose(0, 1)
    want_y = fy.reshape(-1, L, D).to(cast).float().transpose(0, 1)
    # Batched forward passes agree with one-sequence passes to float32 rounding; compare the
    # cache exactly against its own dtype's rounding of a batched harvest, and closely here.
    torch.testing.assert_close(x, want_x, rtol=1e-5, atol=1e-5 if dtype == "float32" else 1e-2)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5 if dtype == "float32" else 1e-2)
    # Exactly what the same batched forward computes, rounded to the cache dtype.
    bx, by = mlp_activations(model, tokens[:10])  # [L, 10 * 16, d]
    bx = bx.view(L, 10, 16, D)[:, :, 1:].reshape(L, -1, D)
    by = by.view(L, 10, 16, D)[:, :, 1:].reshape(L, -1, D)
    assert torch.equal(x, bx.to(cast).float()) and torch.equal(y, by.to(cast).float())
    # Rows 15 * s + j are sequence s, position j + 1; a gather of rows matches too.
    rows = np.array([0, 14, 15, 149, 77])
    gx, _ = got.get(rows)
    assert torch.equal(gx, x[:, rows])
    mf = json.loads((tmp_path / "manifest.json").read_text())
    assert mf["spec"]["dtype"] == dtype and mf["spec"]["input_site"] == "mlp_in"
    assert [c["sequences"] for c in mf["sets"][TRAIN_SET]["chunks"].values()] == [
        [0, 4], [4, 8], [8, 12]
    ]  # fmt: skip


def test_what_training_reads_equals_a_fresh_harvest(tmp_path, model):
    """Batches the trainer draws (normalisation undone) are the activations of the token
    positions the stream names, computed afresh."""
    tokens, held = tw.tokens()
    cfg = tw.config()
    cfg.steps, cfg.cache_dtype = 2, "float32"
    trainer = Trainer(
        cfg,
        activations=activation_fn(model),
        train_tokens=tokens,
        heldout_tokens=held,
        n_layers=L,
        d_model=D,
        out_dir=tmp_path,
        progress=False,
        plot=False,
    )
    trainer.run()
    fx, fy = fresh(model, tokens[: trainer.n_seqs])
    for step in (0, 7, 9):  # 570 rows, batches of 60: step 9 spans epochs 0 and 1
        x, y = trainer.batch(step)
        x = x / trainer.norm.in_scale[:, None, None]
        y = y / trainer.norm.out_scale[:, None, None]
        rows = stream_rows(cfg.seed, trainer.n_seqs * 15, step * 60, (step + 1) * 60)
        seq, pos = rows // 15, rows % 15
        torch.testing.assert_close(x, fx[seq, pos].transpose(0, 1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y, fy[seq, pos].transpose(0, 1), rtol=1e-4, atol=1e-5)
    # Each epoch visits every row once.
    epoch = stream_rows(cfg.seed, 570, 570, 1140)
    assert sorted(epoch.tolist()) == list(range(570))
    assert not np.array_equal(epoch, stream_rows(cfg.seed, 570, 0, 570))


def test_killed_harvest_continues_from_its_last_complete_chunk(tmp_path, model):
    tokens, _ = tw.tokens()
    acts = activation_fn(model)
    calls: list[int] = []

    def dies_on_call(n):
        def fn(t):
            calls.append(len(t))
            if len(calls) == n:
                raise KeyboardInterrupt("killed")
            return acts(t)

        return fn

    cache = ActivationCache(tmp_path / "a", spec())
    with pytest.raises(KeyboardInterrupt):  # 4-sequence chunks of 2 batches: dies mid-chunk 2
        cache.harvest(TRAIN_SET, tokens, dies_on_call(6), 20, chunk_sequences=4, batch=2)
    assert cache.complete_sequences(TRAIN_SET, tokens) == 8
    kept = json.loads((tmp_path / "a" / "manifest.json").read_text())["sets"][TRAIN_SET]
    calls.clear()
    cache.harvest(TRAIN_SET, tokens, dies_on_call(0), 20, chunk_sequences=4, batch=2)
    assert calls == [2] * 6  # chunks 2, 3, 4 only (chunk 2 again: it was half-written)
    again = json.loads((tmp_path / "a" / "manifest.json").read_text())["sets"][TRAIN_SET]
    assert all(again["chunks"][k] == v for k, v in kept["chunks"].items())
    one = ActivationCache(tmp_path / "b", spec())
    one.harvest(TRAIN_SET, tokens, acts, 20, chunk_sequences=4, batch=2)
    for a, b in zip(cache.read(TRAIN_SET, 20).get(slice(None)), one.read(TRAIN_SET, 20).get(
        slice(None)
    ), strict=True):  # fmt: skip
        assert torch.equal(a, b)


def test_ranks_harvest_disjoint_chunks_of_one_cache(tmp_path, model):
    tokens, _ = tw.tokens()
    acts = activation_fn(model)
    for rank in (1, 0):
        ActivationCache(tmp_path / "dp", spec()).harvest(
            TRAIN_SET, tokens, acts, 12, chunk_sequences=4, rank=rank, world=2
        )
    dp = ActivationCache(tmp_path / "dp", spec())
    one = ActivationCache(tmp_path / "one", spec())
    one.harvest(TRAIN_SET, tokens, acts, 12, chunk_sequences=4)
    assert dp.complete_sequences(TRAIN_SET, tokens) == 12
    assert torch.equal(dp.read(TRAIN_SET, 12).get(slice(None))[1], one.read(TRAIN_SET, 12).get(
        slice(None)
    )[1])  # fmt: skip


def test_another_model_site_or_corpus_is_refused(tmp_path, model):
    tokens, _ = tw.tokens()
    cache = ActivationCache(tmp_path, spec(model_id="abc", corpus="public"))
    cache.harvest(TRAIN_SET, tokens, activation_fn(model), 8, chunk_sequences=4)
    for other, field in (
        (spec(model_id="xyz", corpus="public"), "model_id 'abc' (this run: 'xyz')"),
        (spec(model_id="abc", corpus="public", input_site="resid_mid"), "input_site 'mlp_in'"),
        (spec(model="gpt2", model_id="abc", corpus="public"), "model 'tiny-llama'"),
        (spec(model_id="abc", corpus="public", dtype="float32"), "dtype 'float16'"),
    ):
        with pytest.raises(CacheMismatch, match="holds other activations") as err:
            ActivationCache(tmp_path, other)
        assert field in str(err.value) and "\n" not in str(err.value)
    # The same spec, but other tokens in the cached sequences: refused, not silently reused.
    shuffled = tokens.flip(0)
    with pytest.raises(CacheMismatch, match="sequences 0-3 .* other tokens"):
        cache.complete_sequences(TRAIN_SET, shuffled)
    with pytest.raises(CacheMismatch, match="other tokens"):
        cache.harvest(TRAIN_SET, shuffled, activation_fn(model), 8, chunk_sequences=4)


def _train_kwargs(activations, tokens, held, tmp_path) -> dict:
    """train()'s arguments for the tiny model with one cache folder under ``tmp_path``."""
    return dict(
        activations=activations, train_tokens=tokens, heldout_tokens=held, n_layers=L,
        d_model=D, cache=tmp_path / "cache", progress=False, plot=False,
    )  # fmt: skip


def test_training_with_an_incompatible_cache_is_refused(tmp_path, model):
    tokens, held = tw.tokens()
    cfg = tw.config()
    cfg.steps = 2
    kw = _train_kwargs(activation_fn(model), tokens, held, tmp_path)
    train(cfg, out_dir=tmp_path / "a", model_name="tiny-llama", **kw)
    with pytest.raises(CacheMismatch, match="model 'tiny-llama' \\(this run: 'other'\\)"):
        train(cfg, out_dir=tmp_path / "b", model_name="other", **kw)
    cfg.input_site = "resid_mid"
    with pytest.raises(CacheMismatch, match="input_site 'mlp_in' \\(this run: 'resid_mid'\\)"):
        train(cfg, out_dir=tmp_path / "c", model_name="tiny-llama", **kw)


def test_two_recipes_share_one_harvest(tmp_path, model):
    """The second recipe (another width) harvests no training token: they all come from the
    first recipe's cache (only the held-out rows are harvested again)."""
    tokens, held = tw.tokens()
    acts = activation_fn(model)
    seen: list[int] = []

    def counting(t):
        seen.append(t.shape[0])
        return acts(t)

    cfg = tw.config()
    cfg.steps = 4
    kw = _train_kwargs(counting, tokens, held, tmp_path)
    a = train(cfg, out_dir=tmp_path / "a", **kw)
    assert sum(seen) == a.metrics["cache_tokens"] // 15 + len(held)  # 16 sequences + held-out
    seen.clear()
    cfg.n_features = 48
    b = train(cfg, out_dir=tmp_path / "b", **kw)
    # Training tokens all come from the cache; only the held-out rows are harvested again
    # (evaluation reads every position, the start token included, which the cache drops).
    assert sum(seen) == len(held)
    assert a.clt.cfg.n_features == 24 and b.clt.cfg.n_features == 48
    mf = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert set(mf["sets"]) == {TRAIN_SET}  # the held-out rows are not cached


def test_float16_overflow_is_a_clear_error_and_bfloat16_holds_it(tmp_path):
    tokens = torch.ones(2, 4, dtype=torch.long)

    def huge(t):
        x = torch.ones(L, t.numel(), D)
        x[1] *= 1e5
        return x, x.clone()

    with pytest.raises(CacheOverflow, match="inputs of layer 1 reach 1e\\+05.*bfloat16 or float32"):
        ActivationCache(tmp_path / "f16", spec()).harvest(TRAIN_SET, tokens, huge)
    bf = ActivationCache(tmp_path / "bf16", spec(dtype="bfloat16"))
    bf.harvest(TRAIN_SET, tokens, huge)
    x, _ = bf.read(TRAIN_SET, 2).get(slice(None))
    assert torch.equal(x, huge(tokens)[0][:, :6].bfloat16().float())
