"""The training objective of a trainable transcoder, on normalised
activations x, y [L, N, d] (per-token means, summed over layers; see :mod:`.losses`).

- JumpReLU: MSE + lambda(t) * tanh sparsity weighted by decoder norms + pre-activation loss.
  Dense decode (the threshold's straight-through gradient needs the decoder's gradient at
  inactive features too).
- TopK: MSE + AuxK on dead features. Decoding uses only the k active rows of each layer
  (``embedding_bag``), which is what makes a 30-layer CLT trainable on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transcoders import losses
from transcoders.metrics import fired_topk, l0_per_layer
from transcoders.train_config import TrainConfig
from transcoders.trainable import TrainableTranscoder


@dataclass
class StepOut:
    loss: torch.Tensor
    parts: dict[str, float]
    mse_per_layer: torch.Tensor  # [L]
    l0: torch.Tensor  # [L]
    fired: torch.Tensor  # [L, F] bool
    recon: torch.Tensor  # [L, N, d]


def objective(
    model: TrainableTranscoder,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    sparsity_coef: float,
    dead: torch.Tensor | None,
    weight: torch.Tensor | None = None,
) -> StepOut:
    """The training loss on one normalised batch x, y [L, N, d]; ``weight`` [L, N] weights each
    position's reconstruction (and AuxK) term (0 at outliers, :mod:`transcoders.outliers`)."""
    pre = model.pre_activations(x)
    L, N, F = pre.shape
    parts: dict[str, torch.Tensor] = {}
    if cfg.activation == "topk":
        idx, vals = model.topk(pre, cfg.topk)
        recon = model.decode_sparse(idx, vals, x)
        mse, per_layer = losses.reconstruction_loss(recon, y, weight)
        parts["mse"] = mse
        fired = fired_topk(idx, vals, F)
        l0 = (vals > 0).float().sum(-1).mean(-1)
        if dead is not None and dead.any() and cfg.auxk_coef > 0:
            # AuxK: the dead features' largest pre-activations try to explain the residual.
            k_aux = min(cfg.auxk, int(dead.sum(-1).max()))
            a_idx, a_vals = model.topk(pre.masked_fill(~dead[:, None, :], -1e30), k_aux)
            a_vals = a_vals * dead.gather(1, a_idx.reshape(L, -1)).view_as(a_vals)
            aux = model.decode_sparse(a_idx, a_vals, bias=False)
            resid = (y - recon).detach()
            if weight is not None:
                sw = weight.sqrt()[..., None]
                resid, aux = resid * sw, aux * sw
            parts["auxk"] = cfg.auxk_coef * losses.auxk_loss(resid, aux)
    else:
        acts = model.activate(pre, cfg.bandwidth)
        recon = model.decode_dense(acts, x)
        mse, per_layer = losses.reconstruction_loss(recon, y, weight)
        norms = model.decoder_norms()
        parts["mse"] = mse
        parts["sparsity"] = sparsity_coef * losses.tanh_sparsity_loss(acts, norms, cfg.sparsity_c)
        parts["preact"] = cfg.preact_coef * losses.preact_loss(pre, model.threshold, norms)
        fired = (acts > 0).any(1)
        l0 = l0_per_layer(acts)
    loss = sum(parts.values())
    return StepOut(
        loss,
        {k: float(v.detach()) for k, v in parts.items()},
        per_layer.detach(),
        l0.detach(),
        fired,
        recon.detach(),
    )
