"""The one random-transcoder recipe: the tests' small transcoders and the benchmarks' CLT whose
thresholds are calibrated on a model."""

from __future__ import annotations

import torch
from model_fixtures import make_tiny_model

from tracer.random_clt import calibrated_random_clt
from transcoders.clt import TranscoderConfig
from transcoders.random_init import RandomInit, random_transcoder


def test_a_seed_gives_the_same_transcoder_and_a_generator_is_used_as_it_stands():
    cfg = TranscoderConfig(n_layers=3, d_model=16, n_features=8, skip=True)
    a = random_transcoder(cfg, seed=4).state_dict()
    b = random_transcoder(cfg, seed=4).state_dict()
    c = random_transcoder(cfg, generator=torch.Generator().manual_seed(4)).state_dict()
    d = random_transcoder(cfg, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["W_enc"], d["W_enc"])


def test_the_weights_follow_the_stated_distributions():
    cfg = TranscoderConfig(n_layers=2, d_model=400, n_features=300, kind="plt")
    init = RandomInit(b_enc_std=0.0, threshold=(0.2, 0.3), b_dec_std=0.0)
    clt = random_transcoder(cfg, seed=0, init=init)
    assert abs(float(clt.W_enc.std()) - 1 / 400**0.5) < 0.02 / 400**0.5
    assert abs(float(clt.W_dec[0].std()) - 0.2 / 400**0.5) < 0.02 / 400**0.5
    assert clt.W_dec[0].shape == (300, 1, 400)  # per-layer: one target
    assert float(clt.b_enc.abs().max()) == 0.0 and float(clt.b_dec.abs().max()) == 0.0
    assert 0.2 <= float(clt.threshold.min()) and float(clt.threshold.max()) <= 0.3
    assert not any(p.requires_grad for p in clt.parameters())


def test_calibrated_thresholds_give_the_asked_number_of_active_features():
    model = make_tiny_model("llama", n_layers=3, seed=1)
    active, n_features = 6.0, 48
    text = "the quiet river ran past the mill"  # tiny models: 64 positions
    clt = calibrated_random_clt(model, n_features, active, seed=0, text=text)
    with torch.no_grad():
        x = model.run(model.tokenize(text)).sites["mlp_in"][0]  # [L, P, d]
        for l in range(3):
            pre = x[l, 1:] @ clt.W_enc[l].T  # [P-1, F]
            per_token = (pre > clt.threshold[l]).sum(-1).float()
            # the threshold is the mean over tokens of each token's quantile: about `active`
            assert abs(float(per_token.mean()) - active) < 2.0, (l, float(per_token.mean()))
