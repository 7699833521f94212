"""Random transcoders: the one recipe behind the tests' small transcoders and the benchmarks'
random CLTs (whose thresholds ``tracer.random_clt`` then calibrates on a real model).

Weights are drawn from normal distributions of the given standard deviations, in a fixed
order from one generator (so a seed gives the same transcoder on every machine): encoder
``W_enc`` [L, F, d], encoder bias, thresholds (uniform in ``threshold``), decoder bias, each
layer's decoder ``W_dec[l]`` [F, L - l, d] (CLT) or [F, 1, d] (per-layer), then the skip map.
float32, on the CPU, gradients off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transcoders.clt import CrossLayerTranscoder, TranscoderConfig


@dataclass(frozen=True)
class RandomInit:
    """Standard deviations of a random transcoder's weights. ``None`` for the encoder or
    decoder means the width-scaled defaults 1 / sqrt(d_model) and 0.2 / sqrt(d_model)."""

    enc_std: float | None = None
    b_enc_std: float = 0.1
    threshold: tuple[float, float] = (0.0, 0.3)
    b_dec_std: float = 0.05
    dec_std: float | None = None
    skip_std: float = 0.02


def random_transcoder(
    cfg: TranscoderConfig,
    *,
    seed: int = 0,
    init: RandomInit | None = None,
    generator: torch.Generator | None = None,
) -> CrossLayerTranscoder:
    """A transcoder of shape ``cfg`` with random weights (see the module docstring).

    ``generator``: draw from this generator as it stands (``seed`` is then not used); by
    default a fresh generator seeded with ``seed``.
    """
    init = init or RandomInit()
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    d = cfg.d_model
    enc_std = init.enc_std if init.enc_std is not None else 1.0 / d**0.5
    dec_std = init.dec_std if init.dec_std is not None else 0.2 / d**0.5
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        clt.W_enc.normal_(0, enc_std, generator=gen)
        _normal_or_zero(clt.b_enc, init.b_enc_std, gen)
        lo, hi = init.threshold
        clt.threshold.uniform_(lo, hi, generator=gen)
        _normal_or_zero(clt.b_dec, init.b_dec_std, gen)
        for w in clt.W_dec:
            w.normal_(0, dec_std, generator=gen)
        if cfg.skip:
            clt.W_skip.normal_(0, init.skip_std, generator=gen)
    for p in clt.parameters():
        p.requires_grad_(False)
    return clt


def _normal_or_zero(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    if std > 0:
        t.normal_(0, std, generator=gen)
    else:
        t.zero_()
