"""Feature activation functions: JumpReLU (with a straight-through threshold gradient), TopK, ReLU.

All take pre-activations ``[..., n_features]`` and return activations of the same shape.
"""

from __future__ import annotations

from typing import Literal

import torch

ActivationKind = Literal["jumprelu", "topk", "relu"]


def _rect(x: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel: 1 on (-1/2, 1/2), else 0."""
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    """y = z * H(z - theta). Gradient w.r.t. z is H(z - theta) (exact almost everywhere); w.r.t.
    theta it is the straight-through estimate -(theta / eps) * K((z - theta) / eps), with K the
    rectangle kernel of bandwidth ``eps`` (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_out * (z > theta).to(z.dtype)
        grad_theta = -(theta / eps) * _rect((z - theta) / eps) * grad_out
        grad_theta = grad_theta.reshape(-1, theta.shape[-1]).sum(0).reshape(theta.shape)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    """H(z - theta) with the same straight-through gradient for theta (used by the L0 penalty);
    no gradient to z."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * _rect((z - theta) / eps) * grad_out
        grad_theta = grad_theta.reshape(-1, theta.shape[-1]).sum(0).reshape(theta.shape)
        return None, grad_theta, None


def jumprelu(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float = 0.1) -> torch.Tensor:
    """JumpReLU with threshold [n_features] (broadcast over leading dims)."""
    return _JumpReLU.apply(z, threshold, bandwidth)


def step(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float = 0.1) -> torch.Tensor:
    """Heaviside step H(z - threshold) with a straight-through threshold gradient."""
    return _Step.apply(z, threshold, bandwidth)


def topk(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest positive pre-activations of each row, zero the rest."""
    vals, idx = torch.topk(z, k=min(k, z.shape[-1]), dim=-1)
    return torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))


def apply_activation(
    kind: ActivationKind,
    z: torch.Tensor,
    *,
    threshold: torch.Tensor | None = None,
    k: int | None = None,
    bandwidth: float = 0.1,
) -> torch.Tensor:
    if kind == "jumprelu":
        if threshold is None:
            raise ValueError("jumprelu needs a threshold")
        return jumprelu(z, threshold, bandwidth)
    if kind == "topk":
        if not k:
            raise ValueError("topk needs k")
        return topk(z, k)
    if kind == "relu":
        return torch.relu(z)
    raise ValueError(f"unknown activation {kind!r}: use jumprelu, topk or relu")
