"""The model-facing glue of training: MLP activations for the harvest and the spliced model
(every MLP replaced by a transcoder)."""

from __future__ import annotations

import pytest
import torch

from tracer.spliced_metrics import mlp_activations, spliced_eval_fn, spliced_metrics


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tokens(B=2, P=9, seed=0):
    t = torch.randint(3, 101, (B, P), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = 1
    return t


@pytest.mark.parametrize("site", ["mlp_in", "resid_mid"])
def test_mlp_activations_match_recorded_sites(site):
    from model_fixtures import make_tiny_model

    model = make_tiny_model("llama")
    tokens = _tokens()
    x, y = mlp_activations(model, tokens, site)
    run = model.run(tokens)
    L, B, P = 3, 2, 9
    assert x.shape == y.shape == (L, B * P, 32)
    for b in range(B):
        for p in (0, 4, 8):
            torch.testing.assert_close(x[:, b * P + p], run.sites[site][b, :, p])
            torch.testing.assert_close(y[:, b * P + p], run.sites["mlp_out"][b, :, p])
    with pytest.raises(ValueError, match="input site"):
        mlp_activations(model, tokens, "attn_out")


def _linear_gpt2():
    """A tiny GPT-2 whose MLP is affine (linear activation), so a skip transcoder with no
    features can reproduce it exactly."""
    from model_fixtures import TINY_VOCAB, TinyTokenizer
    from transformers import AutoModelForCausalLM, GPT2Config

    from tracer.model import LanguageModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_embd=32,
        n_layer=3,
        n_head=4,
        vocab_size=TINY_VOCAB,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        activation_function="linear",
    )
    hf = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # large enough MLPs that removing them changes the loss
        for block in hf.transformer.h:
            block.mlp.c_proj.weight.mul_(20.0)
    return LanguageModel(hf, TinyTokenizer(), name="lin")


def _exact_skip_transcoder(model):
    from transcoders.clt import CrossLayerTranscoder, TranscoderConfig

    cfg = TranscoderConfig(
        n_layers=3,
        d_model=32,
        n_features=4,
        kind="plt",
        skip=True,
        activation="relu",
        input_site="mlp_in",
    )
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        for w in clt.W_dec:
            w.zero_()
        for l in range(3):
            mlp = model.layer_module(l, "mlp")
            w1, b1 = mlp.c_fc.weight, mlp.c_fc.bias  # Conv1D: x @ w1 + b1
            w2, b2 = mlp.c_proj.weight, mlp.c_proj.bias
            clt.W_skip[l] = (w1 @ w2).T
            clt.b_dec[l] = b1 @ w2 + b2
    return clt


def test_splicing_an_exact_replacement_changes_nothing():
    model = _linear_gpt2()
    clt = _exact_skip_transcoder(model)
    m = spliced_metrics(model, clt, _tokens(), keep_bos=False)
    assert m.kl == pytest.approx(0.0, abs=1e-6)
    assert m.top1 == 1.0
    assert m.ce_spliced == pytest.approx(m.ce_clean, abs=1e-5)
    assert abs(m.ce_ablated - m.ce_clean) > 0.01
    assert m.ce_recovered == pytest.approx(1.0, abs=1e-3)


def test_splicing_a_zero_transcoder_equals_ablating_the_mlps():
    from model_fixtures import make_random_clt, make_tiny_model

    model = make_tiny_model("llama")
    clt = make_random_clt(3, 32, n_features=8)
    with torch.no_grad():
        clt.b_dec.zero_()
        for w in clt.W_dec:
            w.zero_()
    m = spliced_metrics(model, clt, _tokens())
    assert m.ce_spliced == pytest.approx(m.ce_ablated, abs=1e-6)
    assert m.kl > 0


def test_spliced_eval_reuses_reference_and_checks_shapes():
    import numpy as np
    from model_fixtures import make_random_clt, make_tiny_model

    from tracer.spliced_metrics import splice_edits

    model = make_tiny_model("llama")
    tokens = _tokens()
    fn = spliced_eval_fn(model, tokens)
    clt = make_random_clt(3, 32)
    got = fn(clt)
    assert set(got) == {"kl", "top1", "ce_clean", "ce_spliced", "ce_ablated", "ce_recovered"}
    # The metrics written out again in numpy from the three runs' logits (positions 1..).
    clean_all = model.run(tokens).logits.double().numpy()
    spliced_all = model.run(tokens, edits=splice_edits(clt)).logits.double().numpy()
    clean, spliced = clean_all[:, 1:], spliced_all[:, 1:]  # KL and top-1 skip BOS

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lc, ls = log_softmax(clean), log_softmax(spliced)
    kl = (np.exp(lc) * (lc - ls)).sum(-1).mean()
    top1 = (clean.argmax(-1) == spliced.argmax(-1)).mean()
    nxt = tokens[:, 1:].numpy()[..., None]  # cross-entropy: every position predicts the next
    ce_spl = -np.take_along_axis(log_softmax(spliced_all)[:, :-1], nxt, -1).mean()
    ce_clean = -np.take_along_axis(log_softmax(clean_all)[:, :-1], nxt, -1).mean()
    assert got["kl"] == pytest.approx(kl, abs=2e-5) and got["kl"] > 1e-3
    assert got["top1"] == pytest.approx(top1, abs=1e-5)
    assert got["ce_spliced"] == pytest.approx(ce_spl, abs=2e-5)
    assert got["ce_clean"] == pytest.approx(ce_clean, abs=2e-5)
    rec = (got["ce_ablated"] - got["ce_spliced"]) / (got["ce_ablated"] - got["ce_clean"])
    assert got["ce_recovered"] == pytest.approx(rec, rel=1e-2)  # inputs rounded to 1e-5
    # Another transcoder through the same callback (reference reused) matches a fresh call.
    other = make_random_clt(3, 32, seed=7)
    assert fn(other) == spliced_metrics(model, other, tokens).as_dict()
    assert fn(other) != got
    with pytest.raises(ValueError, match="trained for another model"):
        fn(make_random_clt(3, 16))
