"""The replacement model for one prompt, linearised, with a batched backward sweep.

Instead of autograd through the whole model once per batch of rows, :class:`FrozenLinearModel`
runs one hand-written backward sweep from the top layer down for a batch of rows: a row joins
the sweep at its own layer (so no work is spent above a target), the attention backward is a
few large matrix products, and the edges into the features and error nodes writing at each
layer are read off as the sweep passes. This is the transpose of the frozen forward that
perturbations run through the hooked model; the tests check that the two agree column by
column.

Everything the sweep reads comes from :func:`~tracer.attribution.frozen_view.gather_view` (model
weights and the prompt's frozen values) and :class:`~tracer.attribution.decoders.ActiveDecoders`
(only the active features' decoder rows), on the device, in the compute dtype.
"""

from __future__ import annotations

import torch

from tracer.attribution.decoders import ActiveDecoders
from tracer.attribution.frozen_view import gather_view
from tracer.attribution.rows import CausalColumns
from tracer.replacement import PromptState, ReplacementModel

# Writer vectors of one layer are formed in position chunks of at most this many bytes.
WRITER_CHUNK_BYTES = 64 * 2**20


class FrozenLinearModel:
    """The replacement model for one prompt, linearised, with a batched backward sweep.

    Columns (sources) are numbered: active features [n_feat] (state order), then error nodes
    (layer-major: ``n_feat + l * P + p``), then token nodes (``n_feat + L * P + p``). Inside a
    sweep (and in the attribution's row store) feature columns are in *position-major* order
    (``pm_order[c]`` is the feature of pm column c), so the features writing to one layer at
    one position are one contiguous slice.

    device: where the sweep runs (default: the model's device); dtype: the compute dtype
    (float32; float64 for exactness checks). ``cache_bytes``: keep each layer's written vectors
    between sweeps while they total less than this.
    """

    def __init__(
        self,
        rm: ReplacementModel,
        state: PromptState,
        *,
        device=None,
        dtype: torch.dtype = torch.float32,
        cache_bytes: float = 1e9,
    ):
        self.rm, self.state = rm, state
        self.view = v = gather_view(rm, state, device=device, dtype=dtype)
        self.device, self.dtype = v.device, dtype
        self.L, self.P, self.d = v.n_layers, state.n_pos, v.d_model
        self.H, self.kv, self.dh = v.n_heads, v.n_kv_heads, v.d_head
        self.n_feat = state.n_active
        self.n_cols = self.n_feat + self.L * self.P + self.P
        self.err_col0 = self.n_feat
        self.tok_col0 = self.n_feat + self.L * self.P
        dev = self.device
        self.feat_layer = state.feat_layer.to(dev)
        self.feat_pos = state.feat_pos.to(dev)
        self.feat_index = state.feat_index.to(dev)
        tc = rm.transcoder
        self.decoders = ActiveDecoders(
            tc, state.feat_layer, state.feat_index, state.feat_value, device=dev, dtype=dtype
        )
        key = (self.feat_pos * (self.L + 1) + self.feat_layer) * (tc.cfg.n_features + 1)
        self.pm_order = torch.argsort(key + self.feat_index, stable=True)  # pm column -> feature
        self.pm_of = torch.empty_like(self.pm_order)  # feature -> pm column
        self.pm_of[self.pm_order] = torch.arange(self.n_feat, device=dev)
        pm_pos, pm_layer = self.feat_pos[self.pm_order], self.feat_layer[self.pm_order]
        counts = torch.zeros(self.P, self.L, dtype=torch.long, device=dev)
        counts.index_put_((pm_pos, pm_layer), torch.ones_like(pm_pos), accumulate=True)
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        flat = torch.cat([zero, counts.reshape(-1).cumsum(0)]).cpu()
        self._start = flat[:-1].view(self.P, self.L)  # first pm column of (p, l)
        self._stop = flat[1:].view(self.P, self.L)
        n_targets = torch.tensor([tc.cfg.n_targets(i) for i in range(self.L)])
        writer_bytes = float(n_targets[state.feat_layer.cpu()].sum()) * self.d * 4
        self._cache_writers = writer_bytes < cache_bytes
        self._writer_cache: dict[tuple[int, int], list] = {}

    def causal_columns(self) -> CausalColumns:
        """Which pm feature columns can reach a target at (layer, position): those at its
        position or before and at layers below (see :class:`~tracer.attribution.rows.RowStore`)."""
        return CausalColumns(self.feat_pos[self.pm_order], self.feat_layer[self.pm_order],
                             self.L, self.P)  # fmt: skip

    def logit_rows(self, directions: torch.Tensor) -> torch.Tensor:
        """Gradient at the final residual (last position) of each de-meaned logit. [n, d]."""
        v = self.view
        s = v.scales["final_norm"][-1]
        return v.norm_T(v.g_final, s, directions.to(self.device, self.dtype))

    def feature_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Gradient at resid_mid of each feature's pre-activation. idx [n] -> [n, d]."""
        v, tc = self.view, self.rm.transcoder
        idx = idx.to(self.device)
        lay, pos = self.feat_layer[idx], self.feat_pos[idx]
        enc = tc.W_enc[lay.to(tc.W_enc.device), self.feat_index[idx].to(tc.W_enc.device)]
        enc = enc.to(self.device, self.dtype)  # [n, d]
        if self.rm.input_site == "resid_mid":
            return enc
        out = torch.empty_like(enc)
        for l in torch.unique(lay).tolist():
            sel = lay == l
            out[sel] = v.norm_T(v.g_mlp[l], v.scales["mlp_norm"][l, pos[sel]], enc[sel])
        return out

    def _writers(self, l: int, p0: int, p1: int) -> list:
        """Features writing to the MLP output of layer l at positions p0 .. p1-1, per position:
        (first, last) pm columns and the written vectors [n, d] = activation x decoder row."""
        src = self.decoders.sources(l)
        if not src:
            return [(0, 0, None)] * (p1 - p0)
        c0 = self._start[p0:p1, src[0]].tolist()  # first pm column of each position's writers
        c1 = self._stop[p0:p1, src[-1]].tolist()
        n = sum(b - a for a, b in zip(c0, c1, strict=True))
        if n == 0:
            return [(0, 0, None)] * (p1 - p0)
        cols = torch.cat([torch.arange(a, b) for a, b in zip(c0, c1, strict=True)])
        vecs = self.decoders.written(self.pm_order[cols.to(self.device)], l)
        out, off = [], 0
        for a, b in zip(c0, c1, strict=True):
            out.append((a, b, vecs[off : off + b - a] if b > a else None))
            off += b - a
        return out

    def _writer_chunks(self, l: int, P: int):
        """(p0, writers of positions p0 ..) for positions < P, in chunks of bounded memory."""
        if self._cache_writers:
            key = (l, self.P)
            if key not in self._writer_cache:
                self._writer_cache[key] = self._writers(l, 0, self.P)
            yield 0, self._writer_cache[key][:P]
            return
        n_src = len(self.decoders.sources(l))
        per_pos = max(1.0, self.n_feat / max(self.P * self.L, 1) * n_src) * self.d * 4
        step = max(1, int(WRITER_CHUNK_BYTES / per_pos))
        for p0 in range(0, P, step):
            yield p0, self._writers(l, p0, min(P, p0 + step))

    def _attn_T(self, l: int, g: torch.Tensor) -> torch.Tensor:
        """Transpose of frozen attention (with its input norm) at layer l, on the first
        ``n = g.shape[1]`` positions (causal: later positions never feed earlier ones)."""
        v = self.view
        R, P = g.shape[0], g.shape[1]
        if v.g_post[l] is not None:
            g = v.norm_T(v.g_post[l], v.scales["attn_out_norm"][l, :P], g)
        go = (g @ v.W_O[l]).view(R, P, self.H, self.dh)  # grad wrt z (pre-o_proj)
        go = go.permute(2, 1, 0, 3).reshape(self.H, P, R * self.dh)
        gv = v.pattern_T_times(l, go)  # [H, k, R*dh] = sum_q A[h,q,k] go[q]
        del go
        gv = gv.view(self.kv, self.H // self.kv, P, R, self.dh).sum(1)  # heads share kv
        gv = gv.permute(2, 1, 0, 3).reshape(R, P, self.kv * self.dh)
        gh = gv @ v.W_V[l]
        del gv
        return v.norm_T(v.g_attn[l], v.scales["attn_norm"][l, :P], gh)

    @staticmethod
    def sweep_bytes(R: int, P: int, d: int, itemsize: int = 4) -> int:
        """Working memory of one sweep of R rows over P positions (the gradient [R, P, d] and
        the attention backward's temporaries, about three more of the same size)."""
        return 4 * R * P * d * itemsize

    @torch.no_grad()
    def sweep_into(
        self,
        out: torch.Tensor,
        start_layer: torch.Tensor,
        start_pos: torch.Tensor,
        start_vec: torch.Tensor,
    ) -> None:
        """Edges into a batch of R rows, written into ``out`` [R, n_cols] (zero on entry;
        feature columns in position-major order, rows in the given order).

        Rows must come sorted by ``start_layer``, highest first. A row starts at layer
        ``start_layer`` (a feature target at that layer's resid_mid, or ``L`` for a logit at the
        final residual), position ``start_pos``, with gradient ``start_vec`` [R, d].
        """
        v = self.view
        R = len(start_layer)
        if R == 0:
            return
        s_layer = start_layer.to(self.device)
        s_pos = start_pos.to(self.device)
        s_vec = start_vec.to(self.device, self.dtype)
        if bool((s_layer[1:] > s_layer[:-1]).any()):
            raise ValueError("sweep_into: rows must be sorted by start layer, highest first")
        P = int(s_pos.max()) + 1  # positions after the last target never matter
        G = torch.zeros(R, P, self.d, device=self.device, dtype=self.dtype)
        feat = out[:, : self.n_feat]
        rest = out[:, self.n_feat :]
        layer_counts = torch.bincount(s_layer, minlength=self.L + 1).cpu().tolist()

        def inject(layer: int, live: int) -> int:
            hi = live + layer_counts[layer]
            if hi > live:
                rows = torch.arange(live, hi, device=self.device)
                G[rows, s_pos[live:hi]] += s_vec[live:hi]
            return hi

        live = inject(self.L, 0)
        for l in reversed(range(self.L)):
            g = G[:live]  # gradient wrt the residual after layer l (= wrt mlp_out of layer l)
            if live:
                for p0, writers in self._writer_chunks(l, P):
                    for p, (c0, c1, vecs) in enumerate(writers, start=p0):
                        if vecs is not None:
                            feat[:live, c0:c1].addmm_(g[:, p], vecs.T)
                e0 = l * self.P
                rest[:live, e0 : e0 + P] = torch.einsum("rpd,pd->rp", g, v.errors[l, :P])
                if v.W_skip is not None:
                    # skip: out += x_in @ W_skip.T, a live path in the linear model
                    g_in = g @ v.W_skip[l]
                    if self.rm.input_site == "mlp_in":
                        g_in = v.norm_T(v.g_mlp[l], v.scales["mlp_norm"][l, :P], g_in)
                    G[:live] += g_in
            live = inject(l, live)  # rows whose target reads layer l's MLP input start here
            if live:
                G[:live] += self._attn_T(l, G[:live])
        t0 = self.tok_col0 - self.n_feat
        rest[:, t0 : t0 + P] = torch.einsum("rpd,pd->rp", G, v.embed[:P])

    @torch.no_grad()
    def sweep(
        self, start_layer: torch.Tensor, start_pos: torch.Tensor, start_vec: torch.Tensor
    ) -> torch.Tensor:
        """Edges into a batch of rows (any order), as dense [R, n_cols] with feature columns in
        state order (see :meth:`sweep_into`)."""
        R = len(start_layer)
        order = torch.argsort(start_layer.to(self.device), descending=True, stable=True)
        buf = torch.zeros(R, self.n_cols, device=self.device, dtype=self.dtype)
        self.sweep_into(buf, start_layer.to(self.device)[order], start_pos.to(self.device)[order],
                        start_vec.to(self.device)[order])  # fmt: skip
        out = torch.empty_like(buf)
        out[order] = buf[:, torch.cat([self.pm_of, torch.arange(self.n_feat, self.n_cols,
                                                                device=self.device)])]  # fmt: skip
        return out
