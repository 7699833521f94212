"""The training objective of a trainable transcoder, on normalised
activations x, y [L, N, d] (per-token means, summed over layers; see :mod:`.losses`).

- JumpReLU: MSE + lambda(t) * tanh sparsity weighted by decoder norms + pre-activation loss.
  Dense decode (the threshold's straight-through gradient needs the decoder's gradient at
  inactive features too).
- TopK: MSE + AuxK on dead features. Decoding uses only the k active rows of each layer
  (``embedding_bag``), which is what makes a 30-layer CLT trainable on a 2-core CPU. With
  ``TrainConfig.sparse_updates`` (the default) the encoder's and decoders' gradients are
  row-sparse, naming only the features selected in the batch (the top-k and AuxK's picks), for
  :class:`transcoders.training.sparse_adam.SparseRowAdam`: a step then costs the dense encoder
  forward
  plus work proportional to the selected features, not to the width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transcoders.metrics import fired_topk, l0_per_layer
from transcoders.training import losses
from transcoders.training.config import TrainConfig
from transcoders.training.trainable import TrainableTranscoder


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
    position's reconstruction (and AuxK) term (0 at outliers,
    :mod:`transcoders.training.outliers`)."""
    sparse = cfg.activation == "topk" and cfg.sparse_updates
    with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse):
        pre = model.pre_activations(x)
    L, N, F = pre.shape
    parts: dict[str, torch.Tensor] = {}
    if cfg.activation == "topk":
        use_aux = dead is not None and bool(dead.any()) and cfg.auxk_coef > 0
        if sparse:
            # Indices from the dense pre-activations (no autograd); the values are gathered
            # again through SparseEncoderGrad so the encoder's gradient names only their rows.
            k = min(cfg.topk, F)
            idx = pre.topk(k, dim=-1).indices
            if use_aux:
                k_aux = min(cfg.auxk, int(dead.sum(-1).max()))
                masked = pre.masked_fill(~dead[:, None, :], -1e30)
                a_idx = masked.topk(k_aux, dim=-1).indices
                sel = torch.relu(model.selected_pre(pre, x, torch.cat([idx, a_idx], -1)))
                vals, a_vals = sel[..., :k], sel[..., k:]
            else:
                vals = torch.relu(model.selected_pre(pre, x, idx))
        else:
            idx, vals = model.topk(pre, cfg.topk)
        recon = model.decode_sparse(idx, vals, x, sparse_grad=sparse)
        mse, per_layer = losses.reconstruction_loss(recon, y, weight)
        parts["mse"] = mse
        fired = fired_topk(idx, vals, F)
        l0 = (vals > 0).float().sum(-1).mean(-1)
        if use_aux:
            # AuxK: the dead features' largest pre-activations try to explain the residual.
            if not sparse:
                k_aux = min(cfg.auxk, int(dead.sum(-1).max()))
                a_idx, a_vals = model.topk(pre.masked_fill(~dead[:, None, :], -1e30), k_aux)
            a_vals = a_vals * dead.gather(1, a_idx.reshape(L, -1)).view_as(a_vals)
            aux = model.decode_sparse(a_idx, a_vals, bias=False, sparse_grad=sparse)
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
