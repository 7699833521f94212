"""The training layout of a transcoder: decoders stored per *target* layer.

:class:`~transcoders.clt.CrossLayerTranscoder` stores decoders per source layer
(``W_dec[i]`` [F, T_i, d]); decoding a batch that way materialises every (source, target) pair,
[N, L(L+1)/2, d] for a CLT, which on SmolLM2 is 465 d-vectors per token. Here target layer l
owns one matrix ``D[l]`` [(n_sources(l) * F), d] stacking the rows of every source layer that
writes to it, so a reconstruction is one matmul (dense) or one ``embedding_bag`` over the k
active rows (TopK) per target: [N, L, d] and nothing bigger.

``to_clt`` / ``from_clt`` convert exactly (a pure re-arrangement of the same numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

from transcoders.activations import jumprelu
from transcoders.clt import CrossLayerTranscoder, TranscoderConfig
from transcoders.training.sparse_adam import SparseEncoderGrad, group_by_row, row_sparse


class TrainableTranscoder(nn.Module):
    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        self.cfg = cfg
        L, F, d = cfg.n_layers, cfg.n_features, cfg.d_model
        self.W_enc = nn.Parameter(torch.zeros(L, F, d))
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.threshold = nn.Parameter(torch.zeros(L, F))
        self.b_dec = nn.Parameter(torch.zeros(L, d))
        self.D = nn.ParameterList(
            [nn.Parameter(torch.zeros(len(self.sources(l)) * F, d)) for l in range(L)]
        )
        self.W_skip = nn.Parameter(torch.zeros(L, d, d)) if cfg.skip else None

    def sources(self, target: int) -> range:
        """Source layers whose features write to ``target``."""
        return _sources(self.cfg.kind, target)

    # --- conversion ------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_clt(cls, clt: CrossLayerTranscoder) -> TrainableTranscoder:
        m = cls(clt.cfg)
        for name in ("W_enc", "b_enc", "threshold", "b_dec"):
            getattr(m, name).copy_(getattr(clt, name))
        if m.W_skip is not None:
            m.W_skip.copy_(clt.W_skip)
        F = clt.cfg.n_features
        for l in range(clt.cfg.n_layers):
            for j, i in enumerate(m.sources(l)):
                m.D[l][j * F : (j + 1) * F] = clt.decoder(i)[:, l - i]
        return m

    @torch.no_grad()
    def to_clt(self) -> CrossLayerTranscoder:
        clt = CrossLayerTranscoder(self.cfg, init=False)
        for name in ("W_enc", "b_enc", "threshold", "b_dec"):
            getattr(clt, name).copy_(getattr(self, name))
        if clt.W_skip is not None:
            clt.W_skip.copy_(self.W_skip)
        F = self.cfg.n_features
        for l in range(self.cfg.n_layers):
            for j, i in enumerate(self.sources(l)):
                clt.W_dec[i][:, l - i] = self.D[l][j * F : (j + 1) * F]
        return clt

    # --- forward pieces --------------------------------------------------------------------

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, N, d] -> [L, N, F] (one batched matmul)."""
        return torch.baddbmm(self.b_enc[:, None, :], x, self.W_enc.transpose(1, 2))

    def activate(self, pre: torch.Tensor, bandwidth: float = 0.1) -> torch.Tensor:
        """JumpReLU or ReLU activations [L, N, F] (TopK goes through :meth:`topk`)."""
        if self.cfg.activation == "jumprelu":
            return torch.stack(
                [jumprelu(pre[l], self.threshold[l], bandwidth) for l in range(len(pre))]
            )
        if self.cfg.activation == "relu":
            return torch.relu(pre)
        raise ValueError(f"activate() covers jumprelu/relu, not {self.cfg.activation!r}")

    def topk(self, pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) [L, N, k] of the k largest pre-activations, values through ReLU."""
        vals, idx = pre.topk(min(k, pre.shape[-1]), dim=-1)
        return idx, torch.relu(vals)

    def selected_pre(self, pre: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """pre [L, N, F] (computed without autograd), inputs x [L, N, d], idx [L, N, k] ->
        pre.gather(-1, idx) whose gradient reaches the encoder as row-sparse COO tensors (only
        the (layer, feature) rows in idx;
        :class:`transcoders.training.sparse_adam.SparseEncoderGrad`)."""
        return SparseEncoderGrad.apply(pre, x, self.W_enc, self.b_enc, idx)

    def _skip(self, x: torch.Tensor | None) -> torch.Tensor | int:
        if self.W_skip is None:
            return 0
        if x is None:
            raise ValueError("a skip transcoder's decode needs the inputs x")
        return torch.einsum("lnd,led->lne", x, self.W_skip)

    def decode_dense(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """acts [L, N, F] -> reconstruction [L, N, d] (bias and skip included)."""
        L, N, F = acts.shape
        outs = []
        for l in range(L):
            src = self.sources(l)
            a = acts[src.start : src.stop].transpose(0, 1).reshape(N, len(src) * F)
            outs.append(a @ self.D[l])
        return torch.stack(outs) + self.b_dec[:, None, :] + self._skip(x)

    def decode_sparse(
        self,
        idx: torch.Tensor,
        vals: torch.Tensor,
        x: torch.Tensor | None = None,
        bias: bool = True,
        sparse_grad: bool = False,
    ) -> torch.Tensor:
        """idx, vals [L, N, k] (active features per layer) -> [L, N, d]; reads only the active
        decoder rows, one (source, target) block at a time (see :class:`BlockSparseDecode`).
        ``bias=False`` gives the features' part alone (no output bias, no skip term).
        ``sparse_grad``: the decoders' gradients are row-sparse COO tensors naming only the rows
        of features in ``idx`` (for :class:`transcoders.training.sparse_adam.SparseRowAdam`)."""
        rec = BlockSparseDecode.apply(idx, vals, self.cfg.kind, sparse_grad, *self.D)
        if not bias:
            return rec
        return rec + self.b_dec[:, None, :] + self._skip(x)

    def decoder_norms(self) -> torch.Tensor:
        """Norm of each feature's decoder concatenated over all its targets: [L, F]."""
        L, F = self.cfg.n_layers, self.cfg.n_features
        parts: list[list[torch.Tensor]] = [[] for _ in range(L)]
        for l in range(L):
            sq = self.D[l].pow(2).sum(-1).view(-1, F)
            for j, i in enumerate(self.sources(l)):
                parts[i].append(sq[j])
        return torch.stack([torch.stack(p).sum(0) for p in parts]).sqrt()


class BlockSparseDecode(torch.autograd.Function):
    """rec[l, n] = sum over sources i of sum_j vals[i, n, j] * W_il[idx[i, n, j]], where the
    block W_il [F, d] is rows ``(i - first_source(l)) * F ...`` of ``D[l]``.

    Why by hand: autograd's ``embedding_bag`` backward builds the decoder gradient by scattering
    N*k rows, the slowest part of a CLT step on a CPU. Here every block's gradient is itself an
    ``embedding_bag`` over the output gradient with tokens grouped by feature (one sort per
    source layer), and the gradient of ``vals`` is a gathered row-dot per block; each block
    [F, d] is small enough to stay in cache, which is why blocks beat one bag per target.
    Forward, decoder gradient and value gradient each cost N*k*d per block.

    Inputs: idx (long) and vals [L, N, k]; kind "clt" (sources 0..l) or "plt" (source l);
    sparse (bool: decoder gradients as row-sparse COO tensors over the rows of the features in
    idx, else dense); D[l] [(n_sources(l) * F), d]. Output [L, N, d] (no bias, no skip).
    """

    @staticmethod
    def forward(ctx, idx, vals, kind, sparse, *D):
        L, N, _ = idx.shape
        F = D[0].shape[0]  # target 0 has exactly one source
        rec = vals.new_zeros(L, N, D[0].shape[1])
        for l in range(L):
            for j, i in enumerate(_sources(kind, l)):
                w = D[l][j * F : (j + 1) * F]
                rec[l] += Fn.embedding_bag(idx[i], w, per_sample_weights=vals[i], mode="sum")
        ctx.save_for_backward(idx, vals, *D)
        ctx.kind, ctx.sparse = kind, sparse
        return rec

    @staticmethod
    def backward(ctx, grad):
        idx, vals, *D = ctx.saved_tensors
        kind = ctx.kind
        L, N, k = idx.shape
        F = D[0].shape[0]
        grad = grad.contiguous()
        want_vals, want_d = ctx.needs_input_grad[1], any(ctx.needs_input_grad[4:])
        sparse = want_d and ctx.sparse
        g_vals = torch.zeros_like(vals) if want_vals else None
        g_d = [torch.zeros_like(w) for w in D] if want_d and not sparse else None
        bag_starts = torch.arange(0, N * k, k, device=idx.device)
        bag_of_row = torch.arange(N, device=idx.device).repeat_interleave(k)
        if sparse:
            g_d = _sparse_decoder_grads(idx, vals, grad, kind, F, D, bag_of_row)
        for i in range(L):
            flat = idx[i].reshape(-1)
            if want_d and not sparse:
                # Group the N*k (token, value) pairs by feature: feature f's gradient row is
                # the vals-weighted sum of grad rows of the tokens it fired on.
                order = torch.argsort(flat, stable=True)
                counts = torch.bincount(flat, minlength=F)
                starts = counts.cumsum(0) - counts
                tokens, weights = order // k, vals[i].reshape(-1)[order]
            for l in _targets(kind, i, L):
                j = i - _sources(kind, l).start
                rows = slice(j * F, (j + 1) * F)
                if want_d and not sparse:
                    g_d[l][rows] = Fn.embedding_bag(
                        tokens, grad[l], starts, per_sample_weights=weights, mode="sum"
                    )
                if want_vals:
                    g_vals[i] += _row_dots(grad[l], D[l][rows], flat, bag_starts, bag_of_row)
        return None, g_vals, None, None, *(g_d if want_d else [None] * len(D))


def _sparse_decoder_grads(idx, vals, grad, kind, F, D, bag_of_row) -> list[torch.Tensor]:
    """Row-sparse gradients of every D[l]: one bag per (source, feature) in idx, the
    vals-weighted sum of grad[l] over the tokens it was selected at.

    The bags of all sources are laid end to end in source order; target l's sources are a
    contiguous run of them (a CLT: sources 0..l, a prefix; a PLT: source l alone), so each
    target's gradient is one ``embedding_bag`` over that run, its rows already sorted."""
    L = idx.shape[0]
    toks, wts, starts, rows = [], [], [], []
    n_tok = n_bag = 0
    tok_end, bag_end = [], []
    for i in range(L):
        feats, t, w, st = group_by_row(idx[i].reshape(-1), vals[i].reshape(-1), bag_of_row)
        toks.append(t)
        wts.append(w)
        starts.append(st + n_tok)
        rows.append(feats + (i * F if kind == "clt" else 0))  # its row in every target's D
        n_tok += len(t)
        n_bag += len(feats)
        tok_end.append(n_tok)
        bag_end.append(n_bag)
    toks_a, wts_a, starts_a, rows_a = (torch.cat(a) for a in (toks, wts, starts, rows))
    out = []
    for l in range(L):
        s0 = _sources(kind, l).start
        t0, b0 = (tok_end[s0 - 1], bag_end[s0 - 1]) if s0 > 0 else (0, 0)
        t1, b1 = tok_end[l], bag_end[l]
        g = Fn.embedding_bag(
            toks_a[t0:t1],
            grad[l],
            starts_a[b0:b1] - t0,
            per_sample_weights=wts_a[t0:t1],
            mode="sum",
        )
        out.append(row_sparse(rows_a[b0:b1][None], g, D[l].shape))
    return out


def _sources(kind: str, target: int) -> range:
    """Source layers whose features write to ``target`` (a CLT: all earlier layers)."""
    return range(0, target + 1) if kind == "clt" else range(target, target + 1)


def _targets(kind: str, source: int, n_layers: int) -> range:
    return range(source, n_layers) if kind == "clt" else range(source, source + 1)


def _row_dots(grad, weight, flat_idx, bag_starts, bag_of_row) -> torch.Tensor:
    """[N, k]: grad[n] . weight[idx[n, j]] (the gradient of embedding_bag's per-sample weights).

    Uses the kernel autograd itself runs for ``embedding_bag`` (no [N, k, d] gather); the
    dense product is the fallback should a torch build lack it."""
    N = grad.shape[0]
    try:
        out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad, weight, flat_idx, bag_starts, bag_of_row, 0, -1
        )
    except (AttributeError, RuntimeError):
        return (grad @ weight.T).gather(1, flat_idx.view(N, -1))
    return out.view(N, -1)
