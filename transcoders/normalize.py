"""Per-layer scalar normalisation of transcoder inputs and outputs, folded into the weights at
export.

Training sees x_n = x * s_in[l] and y_n = y * s_out[l], with s = sqrt(d / E||.||^2), so every
layer's activations have E||.||^2 = d whatever the model's scale (SmolLM2's late MLP outputs are
tens of times larger than its early ones). Folding rewrites the weights so the exported
transcoder takes raw activations and returns raw outputs with identical feature activations:

    W_enc' = W_enc * s_in[l]            (pre-activations unchanged, so thresholds unchanged)
    W_dec'[i][:, t] = W_dec[i][:, t] / s_out[i + t]
    b_dec'[l] = b_dec[l] / s_out[l]
    W_skip'[l] = W_skip[l] * s_in[l] / s_out[l]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from transcoders.clt import CrossLayerTranscoder


@dataclass
class Normalizer:
    """in_scale, out_scale: [L] multipliers applied to raw inputs/outputs."""

    in_scale: torch.Tensor
    out_scale: torch.Tensor

    @classmethod
    def estimate(cls, inputs: torch.Tensor, outputs: torch.Tensor) -> Normalizer:
        """From samples inputs, outputs [L, N, d] (raw)."""
        d = inputs.shape[-1]
        return cls(_scale(inputs.float(), d), _scale(outputs.float(), d))

    def to_dict(self) -> dict:
        return {"in_scale": self.in_scale.tolist(), "out_scale": self.out_scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(torch.tensor(d["in_scale"]), torch.tensor(d["out_scale"]))


def _scale(x: torch.Tensor, d: int) -> torch.Tensor:
    ms = x.pow(2).sum(-1).mean(-1)  # [L] mean squared norm
    return (d / ms.clamp_min(1e-12)).sqrt()


def mean_square_norms(x: torch.Tensor) -> torch.Tensor:
    """[L, N, d] -> [L] mean ||x||^2 (what data-parallel ranks average before taking scales)."""
    return x.float().pow(2).sum(-1).mean(-1)


def from_mean_squares(ms_in: torch.Tensor, ms_out: torch.Tensor, d: int) -> Normalizer:
    return Normalizer((d / ms_in.clamp_min(1e-12)).sqrt(), (d / ms_out.clamp_min(1e-12)).sqrt())


@torch.no_grad()
def fold(clt: CrossLayerTranscoder, norm: Normalizer) -> CrossLayerTranscoder:
    """A copy of ``clt`` (trained on normalised data) that works on raw activations."""
    out = copy.deepcopy(clt)
    s_in = norm.in_scale.to(clt.W_enc.dtype)
    s_out = norm.out_scale.to(clt.W_enc.dtype)
    out.W_enc.mul_(s_in[:, None, None])
    out.b_dec.div_(s_out[:, None])
    for i in range(clt.cfg.n_layers):
        w = out.decoder(i)
        w.div_(s_out[i : i + w.shape[1]][None, :, None])
    if out.W_skip is not None:
        out.W_skip.mul_((s_in / s_out)[:, None, None])
    out.cfg = copy.deepcopy(clt.cfg)
    out.cfg.normalization = {
        "folded": True,
        "kind": "per-layer scalar, E||x||^2 = d",
        **norm.to_dict(),
    }
    return out
