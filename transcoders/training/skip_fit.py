"""The starting point of a skip transcoder: per-layer ridge regression of MLP outputs on MLP
inputs (the best linear map), so features only have to learn what a linear map cannot."""

from __future__ import annotations

import torch

from transcoders.training.distributed import Dist


@torch.no_grad()
def fit_skip(
    x: torch.Tensor,
    y: torch.Tensor,
    ridge: float,
    dist: Dist | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer ridge regression y ~ W x + b on x, y [L, N, d] (moments averaged over ranks),
    each position weighted by ``weight`` [L, N] (0 leaves an outlier out, see
    :mod:`transcoders.training.outliers`; None: all 1).

    Returns W [L, d_out, d_in] (the W_skip layout) and b [L, d]. The ridge is ``ridge`` times
    the mean input variance, which keeps near-constant input directions from blowing up W."""
    dist = dist or Dist()
    x64, y64 = x.double(), y.double()
    n = x.shape[1]
    if weight is None:
        mw, xw = torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device), x64
        mx, my = dist.mean(x64.mean(1)), dist.mean(y64.mean(1))  # [L, d]
    else:
        w64 = weight.to(device=x.device, dtype=torch.float64)  # [L, N]
        mw = dist.mean(w64.mean(1))[:, None]  # [L, 1]
        mx = dist.mean(torch.einsum("ln,lnd->ld", w64, x64) / n) / mw
        my = dist.mean(torch.einsum("ln,lnd->ld", w64, y64) / n) / mw
        xw = x64 * w64[..., None]
    sxx = dist.mean(xw.transpose(1, 2) @ x64 / n) / mw[..., None]  # [L, d, d]
    sxy = dist.mean(xw.transpose(1, 2) @ y64 / n) / mw[..., None]
    del xw
    cxx = sxx - mx[:, :, None] * mx[:, None, :]
    cxy = sxy - mx[:, :, None] * my[:, None, :]
    d = x.shape[-1]
    lam = ridge * torch.diagonal(cxx, dim1=1, dim2=2).mean(-1)  # [L]
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    # Cholesky, not linalg.solve: the system is symmetric positive definite, and MKL's batched
    # LU in torch 2.13 fails on [30, 576, 576] float64 with 2 threads ("Pivots given to lu_solve
    # must all be greater or equal to 1").
    chol, info = torch.linalg.cholesky_ex(cxx + lam[:, None, None] * eye)
    if bool((info != 0).any()):
        bad = [i for i, v in enumerate(info.tolist()) if v]
        raise ValueError(
            f"skip fit: the input covariance of layer(s) {bad} is singular; harvest more tokens "
            "(--buffer-tokens) or raise TrainConfig.skip_ridge"
        )
    w = torch.cholesky_solve(cxy, chol)  # [L, d_in, d_out]
    b = my - (mx[:, None, :] @ w)[:, 0]
    return w.transpose(1, 2).float().contiguous(), b.float()
