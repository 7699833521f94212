"""Loss terms for training transcoders. All work in the normalised space (per-layer scalar
normalisation so that E||x||^2 = d_model, see :mod:`transcoders.normalize`).

Shapes: L layers, N tokens, F features per layer, d = d_model. Every term is a mean over
tokens and a sum over layers, so gradients of a global batch equal the average of the
gradients of equal-sized shards (what data-parallel training relies on).
"""

from __future__ import annotations

import torch

from transcoders.activations import step


def decoder_norms(w_dec: list[torch.Tensor]) -> torch.Tensor:
    """Norm of each feature's concatenated decoder over all its target layers: [L, F].

    ``w_dec[i]`` is [F, T_i, d]; a CLT feature's norm covers every layer it writes to."""
    return torch.stack([w.flatten(1).norm(dim=1) for w in w_dec])


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE summed over layers. pred, target [L, N, d] -> (total, per_layer [L]).

    per_layer[l] = mean over tokens of ||pred - target||^2 / d (about the layer's NMSE when the
    target is normalised to E||y||^2 = d). ``weight`` [L, N] (e.g. 0 at outlier positions,
    :mod:`transcoders.training.outliers`) multiplies each token's term; the mean still divides by N,
    so
    equal-sized shards still average to the global loss."""
    sq = (pred - target).pow(2).sum(-1)
    if weight is not None:
        sq = sq * weight
    per_layer = sq.mean(-1) / pred.shape[-1]
    return per_layer.sum(), per_layer


def tanh_sparsity_loss(acts: torch.Tensor, dec_norms: torch.Tensor, c: float) -> torch.Tensor:
    """sum_l mean_n sum_f tanh(c * a[l, n, f] * ||W_dec[l, f]||). acts [L, N, F], norms [L, F]."""
    return torch.tanh(c * acts * dec_norms[:, None, :]).sum(-1).mean(-1).sum()


def l0_step_loss(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """sum_l mean_n sum_f H(pre - theta) with the straight-through threshold gradient (an L0
    penalty; available as an alternative to the tanh penalty)."""
    return step(pre, threshold[:, None, :], bandwidth).sum(-1).mean(-1).sum()


def preact_loss(
    pre: torch.Tensor, threshold: torch.Tensor, dec_norms: torch.Tensor
) -> torch.Tensor:
    """Pushes features whose pre-activation sits below threshold back up (against dead
    features): sum_l mean_n sum_f relu(theta - pre) * ||W_dec||. pre [L, N, F]."""
    gap = torch.relu(threshold[:, None, :] - pre)
    return (gap * dec_norms[:, None, :]).sum(-1).mean(-1).sum()


def auxk_loss(residual: torch.Tensor, aux_pred: torch.Tensor) -> torch.Tensor:
    """TopK's auxiliary loss: how well the dead features' top-k_aux reconstruct what the live
    ones missed, relative to the size of the miss.

    residual = target - pred (detached) and aux_pred, both [L, N, d]:
    sum ||residual - aux_pred||^2 / sum ||residual||^2."""
    num = (residual - aux_pred).pow(2).sum()
    den = residual.pow(2).sum().clamp_min(1e-12)
    return num / den
