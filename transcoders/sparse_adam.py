"""Row-sparse training: gradients that name the rows they touch, and a lazy Adam that updates
only those rows.

Why: a TopK transcoder's step touches, per layer, only the features among the batch's top-k
(at most ``batch_tokens * k`` of them), but a dense optimiser reads and writes every encoder and
decoder weight and both Adam moments each step (a 30-layer CLT at 2,048 features per layer holds
0.55 G decoder weights: ~15 GB of memory traffic per step). Here

- :class:`SparseEncoderGrad` hands the encoder's gradient back as a sparse COO tensor over
  (layer, feature) rows: the pre-activations are computed densely without autograd (the top-k
  needs them all), and only the selected ones carry a gradient;
- :class:`transcoders.trainable.BlockSparseDecode` does the same for the decoders (rows of the
  features that fired);
- :class:`SparseRowAdam` is Adam (torch.optim.Adam's arithmetic) with one step count per row:
  a sparse gradient updates the moments and weights of its rows only, each with its own bias
  correction ``1 - beta ** t_row``; untouched rows, their moments and step counts stay as they
  are (lazy Adam). A dense gradient updates every row. When every row is touched every step the
  result equals ``torch.optim.Adam`` to float rounding (tested).

Sparse gradients here are coalesced COO tensors with ``sparse_dim`` leading dimensions (1 for a
decoder [R, d], 2 for the encoder [L, F, d] and its bias [L, F]) and dense values per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn


def row_sparse(
    index: torch.Tensor, values: torch.Tensor, shape: torch.Size | tuple[int, ...]
) -> torch.Tensor:
    """A coalesced COO gradient: ``index`` [sparse_dim, n] (unique, lexicographically sorted),
    ``values`` [n, *shape[sparse_dim:]]."""
    return torch.sparse_coo_tensor(
        index, values, tuple(shape), is_coalesced=True, check_invariants=False
    )


class SparseEncoderGrad(torch.autograd.Function):
    """sel[l, n, j] = pre[l, n, idx[l, n, j]], with pre = x W_enc^T + b_enc computed outside
    autograd; the gradient of sel reaches ``W_enc`` [L, F, d] and ``b_enc`` [L, F] as row-sparse
    COO tensors (rows: the (layer, feature) pairs in ``idx``).

    Inputs: pre [L, N, F] (detached, the dense pre-activations), x [L, N, d] (data: no gradient
    to it), W_enc, b_enc (parameters; only their shapes are read), idx [L, N, k] long.
    Output [L, N, k], the same numbers as ``pre.gather(-1, idx)``. Backward costs N*k*d per
    layer (one ``embedding_bag`` over tokens grouped by feature), not N*F*d.
    """

    @staticmethod
    def forward(ctx, pre, x, w_enc, b_enc, idx):
        ctx.save_for_backward(x, idx)
        ctx.shapes = (w_enc.shape, b_enc.shape)
        return pre.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad):
        x, idx = ctx.saved_tensors
        w_shape, b_shape = ctx.shapes
        L, N, k = idx.shape
        tokens_all = torch.arange(N, device=idx.device).repeat_interleave(k)
        index, w_vals, b_vals = [], [], []
        for l in range(L):
            flat = idx[l].reshape(-1)
            feats, tok, wts, starts = group_by_row(flat, grad[l].reshape(-1), tokens_all)
            w_vals.append(Fn.embedding_bag(tok, x[l], starts, per_sample_weights=wts, mode="sum"))
            b_vals.append(_segment_sums(wts, starts))
            index.append(torch.stack([torch.full_like(feats, l), feats]))
        index_t = torch.cat(index, 1)
        g_w = row_sparse(index_t, torch.cat(w_vals).to(grad.dtype), w_shape)
        g_b = row_sparse(index_t, torch.cat(b_vals).to(grad.dtype), b_shape)
        want_w, want_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        return None, None, g_w if want_w else None, g_b if want_b else None, None


def group_by_row(
    flat_idx: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group (row, token, weight) triples by row: returns (rows [n] sorted unique, tokens and
    weights in row order [M], bag starts [n]) for an ``embedding_bag`` with one bag per row."""
    order = torch.argsort(flat_idx, stable=True)
    rows, counts = torch.unique_consecutive(flat_idx[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    return rows, tokens[order], weights[order], starts


def _segment_sums(w: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive segments of ``w`` [M] beginning at ``starts`` [n]."""
    seg = torch.zeros(len(w), dtype=torch.long, device=w.device)
    seg[starts[1:]] = 1
    return torch.zeros(len(starts), dtype=w.dtype, device=w.device).index_add_(0, seg.cumsum(0), w)


class SparseRowAdam(torch.optim.Optimizer):
    """Adam with a step count per row (lazy Adam; see the module doc).

    A parameter's "rows" are its leading ``sparse_dim`` dimensions, fixed by the first sparse
    gradient it receives (a dense gradient counts as touching every row). State per parameter:
    ``exp_avg``, ``exp_avg_sq`` (the parameter's shape) and ``step`` (float64, the shape of the
    row dimensions; a parameter only ever given dense gradients keeps one scalar count).
    Uncoalesced sparse gradients (e.g. two decodes summed by autograd) are coalesced first.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch.optim's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
                if g.is_sparse:
                    _sparse_update(p, g.coalesce(), st, lr, b1, b2, eps)
                else:
                    _dense_update(p, g, st, lr, b1, b2, eps)
        return loss


def _row_shape(st: dict, shape: torch.Size, sparse_dim: int, device) -> torch.Tensor:
    """The per-row step counts, widened from a scalar on the first sparse gradient."""
    step = st["step"]
    if step.dim() == 0:
        step = torch.full(
            tuple(shape[:sparse_dim]), float(step), dtype=torch.float64, device=device
        )
        st["step"] = step
    return step


def _dense_update(p, g, st, lr, b1, b2, eps) -> None:
    m, v = st["exp_avg"], st["exp_avg_sq"]
    st["step"] += 1
    t = st["step"]
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    if t.dim() == 0:
        bc1, bc2 = 1 - b1 ** float(t), 1 - b2 ** float(t)
        denom = (v.sqrt() / bc2**0.5).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)
        return
    shape = t.shape + (1,) * (p.dim() - t.dim())
    bc1 = (1 - b1**t).view(shape).to(p.dtype)
    bc2 = (1 - b2**t).view(shape).to(p.dtype)
    p.sub_(lr * (m / bc1) / (v.sqrt() / bc2.sqrt() + eps))


def _sparse_update(p, g, st, lr, b1, b2, eps) -> None:
    sd = g.sparse_dim()
    step = _row_shape(st, p.shape, sd, p.device)
    ind = g.indices()
    rows = tuple(ind[i] for i in range(sd))
    vals = g.values()
    m, v = st["exp_avg"], st["exp_avg_sq"]
    t = step[rows] + 1
    step[rows] = t
    m_r = m[rows].lerp_(vals, 1 - b1)
    v_r = v[rows].mul_(b2).addcmul_(vals, vals, value=1 - b2)
    m[rows], v[rows] = m_r, v_r
    shape = t.shape + (1,) * (vals.dim() - 1)
    bc1 = (1 - b1**t).view(shape).to(p.dtype)
    bc2 = (1 - b2**t).view(shape).to(p.dtype)
    denom = (v_r.sqrt() / bc2.sqrt()).add_(eps)
    p[rows] = p[rows] - lr * (m_r / bc1) / denom


def densify_mean(dist, g: torch.Tensor) -> torch.Tensor:
    """Data parallel: the mean over ranks of a gradient (dense or sparse). A sparse one comes
    back sparse over the union of the rows any rank touched, so W ranks give the rows and
    values one process gets on the global batch."""
    if dist.world == 1:
        return g
    if not g.is_sparse:
        return dist.mean(g)
    g = g.coalesce()
    sd = g.sparse_dim()
    dense = g.to_dense()
    touched = torch.zeros(g.shape[:sd], dtype=torch.bool, device=g.device)
    touched[tuple(g.indices())] = True
    touched = dist.any(touched)
    dist.mean(dense)
    index = touched.nonzero().T
    return row_sparse(index, dense[tuple(index)], g.shape)
