"""Row-sparse training: gradients that name the rows they touch, and a lazy Adam that updates
only those rows.

Why: a TopK transcoder's step touches, per layer, only the features among the batch's top-k
(at most ``batch_tokens * k`` of them), but a dense optimiser reads and writes every encoder and
decoder weight and both Adam moments each step (a 30-layer CLT at 2,048 features per layer holds
0.55 G decoder weights: ~15 GB of memory traffic per step). Here

- :class:`SparseEncoderGrad` hands the encoder's gradient back as a sparse COO tensor over
  (layer, feature) rows: the pre-activations are computed densely without autograd (the top-k
  needs them all), and only the selected ones carry a gradient;
- :class:`transcoders.training.trainable.BlockSparseDecode` does the same for the decoders (rows of
the
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

# Rows are updated in chunks of about this many elements: the temporaries stay in cache and
# no large buffer is allocated (fresh multi-100 MB buffers cost page faults on every step).
CHUNK_ELEMENTS = 1 << 18


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
        F = w_shape[1]
        # (layer, feature) rows as one flat id l*F + f, tokens as rows l*N + n of x [L*N, d]:
        # one embedding_bag over every layer, rows come out sorted.
        layer = torch.arange(L, device=idx.device)[:, None, None]
        tokens = (layer * N + torch.arange(N, device=idx.device)[None, :, None]).expand(L, N, k)
        rows, tok, wts, starts = group_by_row(
            (idx + layer * F).reshape(-1), grad.reshape(-1), tokens.reshape(-1)
        )
        w_vals = Fn.embedding_bag(
            tok, x.reshape(L * N, -1), starts, per_sample_weights=wts, mode="sum"
        )
        index_t = torch.stack([rows // F, rows % F])
        g_w = row_sparse(index_t, w_vals.to(grad.dtype), w_shape)
        g_b = row_sparse(index_t, _segment_sums(wts, starts).to(grad.dtype), b_shape)
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
                    _sparse_update(p, _coalesced(g), st, lr, b1, b2, eps)
                else:
                    _dense_update(p, g, st, lr, b1, b2, eps)
        return loss


def _coalesced(g: torch.Tensor) -> torch.Tensor:
    """``g`` with unique sorted indices. Autograd drops the coalesced flag of the gradients it
    stores, so first check whether the row ids already increase (the usual case: one decode);
    else sum duplicate rows (two decodes of the same rows, e.g. AuxK's)."""
    if g.is_coalesced():
        return g
    sd = g.sparse_dim()
    dims = g.shape[:sd]
    rows = _flat_rows(g._indices(), dims)
    vals = g._values()
    if len(rows) < 2 or bool((rows[1:] > rows[:-1]).all()):
        return row_sparse(g._indices(), vals, g.shape)
    uniq, inv = torch.unique(rows, return_inverse=True)
    summed = vals.new_zeros((len(uniq), *vals.shape[1:])).index_add_(0, inv, vals)
    index = torch.stack(_unflatten(uniq, dims))
    return row_sparse(index, summed, g.shape)


def _unflatten(rows: torch.Tensor, dims) -> list[torch.Tensor]:
    out = []
    for size in reversed(dims[1:]):
        out.append(rows % size)
        rows = rows // size
    return [rows, *reversed(out)]


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
    st["step"] += 1
    t = st["step"]
    if t.dim() == 0:  # one count for the whole tensor: torch.optim.Adam's update, by chunks
        bc1, bc2 = 1 - b1 ** float(t), 1 - b2 ** float(t)
        flat = (p.view(-1), g.reshape(-1), st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1))
        for s in range(0, p.numel(), CHUNK_ELEMENTS):
            w, gg, m, v = (a[s : s + CHUNK_ELEMENTS] for a in flat)
            m.lerp_(gg, 1 - b1)
            v.mul_(b2).addcmul_(gg, gg, value=1 - b2)
            denom = (v.sqrt() / bc2**0.5).add_(eps)
            w.addcdiv_(m, denom, value=-lr / bc1)
        return
    n_rows = t.numel()  # per-row counts (the parameter had sparse gradients before)
    flat = (p.view(n_rows, -1), st["exp_avg"].view(n_rows, -1), st["exp_avg_sq"].view(n_rows, -1))
    gv, steps = g.reshape(n_rows, -1), t.view(-1)
    c = max(1, CHUNK_ELEMENTS // max(1, gv.shape[1]))
    for s in range(0, n_rows, c):
        sl = slice(s, s + c)
        _rows_update(*(a[sl] for a in flat), gv[sl], steps[sl], lr, b1, b2, eps)


def _sparse_update(p, g, st, lr, b1, b2, eps) -> None:
    """Adam on the rows named by the coalesced sparse gradient ``g``: rows are flattened to one
    index into [R, rest] views and updated chunk by chunk: in place where a chunk's rows are a
    contiguous run (most chunks when most rows fire), else gathered with ``index_select`` and
    written back with ``index_copy_``."""
    sd = g.sparse_dim()
    step = _row_shape(st, p.shape, sd, p.device)
    n_rows = step.numel()
    rows = _flat_rows(g.indices(), p.shape[:sd])
    vals = g.values().reshape(len(rows), -1)
    flat = (p.view(n_rows, -1), st["exp_avg"].view(n_rows, -1), st["exp_avg_sq"].view(n_rows, -1))
    steps = step.view(-1)
    c = max(1, CHUNK_ELEMENTS // max(1, vals.shape[1]))
    for s in range(0, len(rows), c):
        r, gv = rows[s : s + c], vals[s : s + c]
        lo, hi = int(r[0]), int(r[-1])
        if hi - lo == len(r) - 1:  # sorted and unique: a contiguous run of rows, in place
            sl = slice(lo, hi + 1)
            steps[sl] += 1
            _rows_update(*(a[sl] for a in flat), gv, steps[sl], lr, b1, b2, eps)
            continue
        t = steps.index_select(0, r) + 1
        steps.index_copy_(0, r, t)
        w, m, v = (a.index_select(0, r) for a in flat)
        _rows_update(w, m, v, gv, t, lr, b1, b2, eps)
        for a, b in zip(flat, (w, m, v), strict=True):
            a.index_copy_(0, r, b)


def _rows_update(w, m, v, g, t, lr, b1, b2, eps) -> None:
    """In place on rows w, m, v [n, c] with gradient g [n, c] and step counts t [n] (already
    incremented): torch.optim.Adam's arithmetic with a bias correction per row."""
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1 = (1 - b1**t).to(w.dtype)[:, None]
    bc2_sqrt = (1 - b2**t).sqrt().to(w.dtype)[:, None]
    denom = v.sqrt().div_(bc2_sqrt).add_(eps)
    w.addcdiv_(m / bc1, denom, value=-lr)


def _flat_rows(index: torch.Tensor, dims: torch.Size) -> torch.Tensor:
    """[sparse_dim, n] indices -> [n] row-major flat row numbers."""
    rows = index[0]
    for i in range(1, len(dims)):
        rows = rows * dims[i] + index[i]
    return rows


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
