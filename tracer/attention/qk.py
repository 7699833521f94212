"""QK attributions: why a head attends from a query position to a key position.

For head h of layer l, query position q and key position k, the pre-softmax score is

    score = scaling * Q . K,   Q = RoPE_q(qnorm(W_Q,h n_q(r_l[q]) + b_Q)),
                               K = RoPE_k(knorm(W_K,h' n_k(r_l[k]) + b_K))

(h' the key/value head that h reads; scores are before any soft-cap and mask). With the norm
denominators frozen at the prompt's values (the attention input norm's, and Gemma-3's / Qwen3's
per-head q/k norms'), RoPE applied at each position's angle and the biases (Qwen2's q/k biases,
GPT-2's, a LayerNorm's) kept as constants, Q and K are affine in the residual stream:
``Q = M_q r_l[q] + c_q``. The residual stream of the frozen replacement model is the sum of its
nodes' contributions plus a constant (biases carried through the frozen model):
``r_l[q] = sum_n r_n + r_0``. So

    Q = sum_n a_n + a_0,   a_n = M_q r_n,   a_0 = M_q r_0 + c_q           (same for K: b_m, b_0)
    score = sum_{n, m} scaling a_n . b_m  +  sum_n scaling a_n . b_0
            + sum_m scaling a_0 . b_m  +  scaling a_0 . b_0                 (exact)

The nodes are the prompt's active features, error nodes and tokens (all of them, not only a
graph's kept features). ``a_n`` for every node at once is one backward sweep of d_head rows
through the frozen linear model (the rows of M_q, starting at the residual before layer l);
``r_0`` is one frozen forward with every node switched off. The pairs (n, m) with the largest
|value|, the marginals (a node's pairs summed over the other side) and the constant terms
are returned; ``unexplained`` (reconstruction minus the score at the recorded residual) is
float rounding.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from tracer.architectures import get_module, norm_center, norm_gain, norm_scale
from tracer.attention.frozen import HeadAnalysisError, pattern
from tracer.attribution.linear import FrozenLinearModel

BIAS = "bias"  # the name of the constant part on either side


@dataclass
class QKAttribution:
    """One head's score at (query, key), split into node pairs.

    ``score``: the sum of every pair and constant (pre-softmax, before any soft-cap);
    ``recorded_score``: the same chain applied to the recorded residual stream (equal up to
    rounding); ``capped``: tanh(score / c) * c for a soft-capped family (Gemma-2), else None.
    ``pairs``: [(query node, key node, value)], largest |value| first (node ids as the graph
    names them: ``f_{layer}_{pos}_{index}``, ``e_{layer}_{pos}``, ``t_{pos}``, or ``bias``);
    ``query_marginals`` / ``key_marginals``: [(node, value)], a node's pairs summed over the
    other side (the bias row included); ``constants``: ``bias_x_bias``, ``query_bias_x_keys``,
    ``queries_x_key_bias``.
    """

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float
    recorded_score: float
    capped: float | None
    pattern: float
    pairs: list[tuple[str, str, float]]
    query_marginals: list[tuple[str, float]]
    key_marginals: list[tuple[str, float]]
    constants: dict[str, float]
    unexplained: float
    n_query_nodes: int
    n_key_nodes: int
    tokens: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _attn(model, layer: int):
    return get_module(model.layers()[layer], model.arch.attn)


def check_head_request(model, state, layer: int, head: int, query: int, key: int) -> None:
    """One clear error for a head, layer or position the model cannot answer for."""
    f, P = model.facts, state.n_pos
    if not 0 <= layer < f.n_layers:
        raise HeadAnalysisError(f"layer {layer} is out of range: the model has layers "
                                f"0..{f.n_layers - 1}")  # fmt: skip
    if not 0 <= head < f.n_heads:
        raise HeadAnalysisError(f"head {head} is out of range: layer {layer} has heads "
                                f"0..{f.n_heads - 1}")  # fmt: skip
    for name, p in (("query", query), ("key", key)):
        if not 0 <= p < P:
            raise HeadAnalysisError(f"{name} position {p} is out of range: the prompt has "
                                    f"positions 0..{P - 1}")  # fmt: skip
    if key > query:
        raise HeadAnalysisError(
            f"key position {key} is after query position {query}: attention is causal, give "
            "a key at or before the query"
        )
    window = getattr(_attn(model, layer), "sliding_window", None)
    if window and query - key >= window:
        raise HeadAnalysisError(
            f"key position {key} is outside layer {layer}'s sliding window of {window} "
            f"positions seen from query {query}: give a key in {query - window + 1}..{query}"
        )


class _Side:
    """The affine map from the residual stream at one position to one head's query or key."""

    def __init__(self, model, state, layer: int, head: int, pos: int, side: str, rope, dtype):
        self.model, self.layer, self.pos, self.dtype = model, layer, pos, dtype
        arch, f = model.arch, model.facts
        self.kind = arch.norm_kind
        attn = _attn(model, layer)
        self.attn = attn
        self.norm = get_module(model.layers()[layer], arch.attn_norm)
        self.scale = state.scales["attn_norm"][layer, pos].to(dtype)
        dh = f.d_head
        h = head if side == "query" else head // (f.n_heads // f.n_kv_heads)
        if arch.attn_weights == "gpt2_fused":
            d = f.d_model
            qkv = get_module(attn, arch.fused_qkv)
            off = 0 if side == "query" else d
            W = qkv.weight.detach()[:, off + h * dh : off + (h + 1) * dh].T
            b = qkv.bias.detach()[off + h * dh : off + (h + 1) * dh]
        else:
            proj = attn.q_proj if side == "query" else attn.k_proj
            W = proj.weight.detach()[h * dh : (h + 1) * dh]
            b = None if proj.bias is None else proj.bias.detach()[h * dh : (h + 1) * dh]
        self.W = W.to(dtype)  # [dh, d]
        self.b = None if b is None else b.to(dtype)
        self.qk_norm = getattr(attn, "q_norm" if side == "query" else "k_norm", None)
        self.rope = None if rope is None else (rope[0][pos].to(dtype), rope[1][pos].to(dtype))
        self.qk_scale = None
        if self.qk_norm is not None:  # frozen at the value of the recorded residual
            y = self._project(state.sites["resid_pre"][layer, pos].to(dtype)[None])
            self.qk_scale = norm_scale(self.kind, self.qk_norm, y)[0].to(dtype)

    def _project(self, r: torch.Tensor) -> torch.Tensor:
        g = norm_gain(self.kind, self.norm).to(self.dtype)
        x = g * norm_center(self.kind, r) * self.scale
        nb = getattr(self.norm, "bias", None)
        if nb is not None:
            x = x + nb.detach().to(self.dtype)
        y = x @ self.W.T
        return y if self.b is None else y + self.b

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        """r [n, d] (residual before the layer, at this position) -> [n, d_head]."""
        y = self._project(r)
        if self.qk_norm is not None:
            g = norm_gain(self.kind, self.qk_norm).to(self.dtype)
            y = g * norm_center(self.kind, y) * self.qk_scale
        if self.rope is not None:
            rope_fn = sys.modules[type(self.attn).__module__].apply_rotary_pos_emb
            cos = self.rope[0].expand(1, len(y), -1)
            sin = self.rope[1].expand(1, len(y), -1)
            y, _ = rope_fn(y[None, None], y[None, None], cos, sin)
            y = y[0, 0]
        return y

    def affine(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(M [d_head, d], c [d_head]) with side(r) = M r + c."""
        basis = torch.cat([torch.eye(d, dtype=self.dtype), torch.zeros(1, d, dtype=self.dtype)])
        out = self(basis.to(self.W.device))
        c = out[-1]
        return (out[:-1] - c).T.contiguous(), c


def constant_residual(rm, state, rope_layer: int | None = None):
    """The residual stream before each layer with every node switched off: [L, P, d]. Token
    embeddings, feature writes and error nodes are zero; what remains is the biases carried
    through the frozen model (attention's, the norms', the transcoder's decoder bias, and the
    skip path acting on them). With ``rope_layer``: also the (cos, sin) [P, d_head] that
    layer's attention receives (None without RoPE), as a pair ``(residual, rope)``."""
    model, tc = rm.model, rm.transcoder
    L, site = model.facts.n_layers, rm.input_site
    live, got = {}, {}

    def keep(l):
        def fn(x):
            live[l] = x
            return x

        return fn

    def out(l):
        def fn(x):
            y = tc.b_dec[l].to(x.dtype).expand_as(x)
            if tc.W_skip is not None:
                y = y + live[l] @ tc.W_skip[l].to(x.dtype).T
            return y

        return fn

    def rope_hook(module, args, kwargs):
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            got["rope"] = tuple(t[0].detach() for t in pe)

    edits = {("resid_pre", 0): torch.zeros_like}
    for l in range(L):
        edits[(site, l)] = keep(l)
        edits[("mlp_out", l)] = out(l)
    handle = None
    if rope_layer is not None:
        handle = _attn(model, rope_layer).register_forward_pre_hook(rope_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run = model.run(state.tokens, edits=edits, freeze=state.freeze(),
                            record_sites=("resid_pre",))  # fmt: skip
    finally:
        if handle is not None:
            handle.remove()
    resid = run.sites["resid_pre"][0]
    return resid if rope_layer is None else (resid, got.get("rope"))


def node_contributions(lin: FrozenLinearModel, layer: int, pos: torch.Tensor, M: torch.Tensor):
    """Edges [n_rows, n_cols] (state order) of rows ``M`` [n_rows, d] read at the residual
    before ``layer``, row i at position ``pos[i]``: row i, column n is ``M[i] . r_n`` with r_n
    node n's contribution there. One backward sweep for all rows."""
    v, n, P = lin.view, len(M), lin.P
    M = M.to(lin.device, lin.dtype)
    pos = torch.as_tensor(pos, device=lin.device).long()
    rows_i = torch.arange(n, device=lin.device)
    if layer == 0:
        out = torch.zeros(n, lin.n_cols, device=lin.device, dtype=lin.dtype)
        out[rows_i, lin.tok_col0 + pos] = (M * v.embed[pos]).sum(-1)
        return out
    j = layer - 1  # r_layer = resid_mid_j + MLP output of layer j
    start = M.clone()
    if v.W_skip is not None:
        gi = M @ v.W_skip[j]
        if lin.rm.input_site != "resid_mid":
            gi = v.norm_T(v.g_mlp[j], v.scales["mlp_norm"][j, pos], gi)
        start = start + gi
    rows = lin.sweep(torch.full((n,), j), pos, start)
    tc = lin.rm.transcoder
    reach = torch.tensor([tc.cfg.n_targets(i) for i in range(lin.L)], device=lin.device)
    fl = lin.feat_layer
    for p in torch.unique(pos).tolist():
        r = (pos == p).nonzero().squeeze(1)
        writers = ((lin.feat_pos == p) & (fl <= j) & (j < fl + reach[fl])).nonzero().squeeze(1)
        if len(writers):  # features writing into layer j's MLP output at p: a direct edge
            rows[r[:, None], writers[None, :]] += M[r] @ lin.decoders.written(writers, j).T
        rows[r, lin.err_col0 + j * P + p] += M[r] @ v.errors[j, p]
    return rows


def _node_names(lin: FrozenLinearModel, state) -> list[str]:
    L, P = lin.L, lin.P
    names = [
        f"f_{l}_{p}_{f}"
        for l, p, f in zip(
            state.feat_layer.tolist(),
            state.feat_pos.tolist(),
            state.feat_index.tolist(),
            strict=True,
        )  # fmt: skip
    ]
    names += [f"e_{l}_{p}" for l in range(L) for p in range(P)]
    names += [f"t_{p}" for p in range(P)]
    return names


def _top_pairs(Q: torch.Tensor, K: torch.Tensor, scaling: float, top: int, chunk: int = 2048):
    """Indices and values of the ``top`` largest |scaling Q_i . K_j| without the whole matrix."""
    best_v = torch.zeros(0, dtype=Q.dtype)
    best_i = torch.zeros(0, dtype=torch.long)
    nk = len(K)
    for i0 in range(0, len(Q), chunk):
        S = (Q[i0 : i0 + chunk] @ K.T).mul_(scaling).reshape(-1).cpu()
        k = min(top, len(S))
        idx = S.abs().topk(k).indices
        best_v = torch.cat([best_v, S[idx]])
        best_i = torch.cat([best_i, idx + i0 * nk])
        keep = best_v.abs().topk(min(top, len(best_v))).indices
        best_v, best_i = best_v[keep], best_i[keep]
    return best_i // nk, best_i % nk, best_v


@torch.no_grad()
def qk_attribution(
    rm, prompt, layer: int, head: int, query_pos: int, key_pos: int, top: int = 20, *,
    state=None, lin: FrozenLinearModel | None = None, dtype: torch.dtype = torch.float64,
) -> QKAttribution:  # fmt: skip
    """Head ``head`` of ``layer``'s pre-softmax score from ``query_pos`` to ``key_pos`` on
    ``prompt`` (text or token ids), split into (query-side node, key-side node) pairs plus
    constant terms (module doc). ``top``: how many pairs and marginals to return. ``state``
    / ``lin``: a record of the prompt and its frozen linear model, to reuse across calls.
    Positions count tokens from 0 (the start token)."""
    model = rm.model
    if state is None:
        tokens = model.tokenize(prompt) if isinstance(prompt, str) else torch.as_tensor(prompt)
        state = rm.record(tokens.long())
    check_head_request(model, state, layer, head, query_pos, key_pos)
    if lin is None:
        lin = FrozenLinearModel(rm, state, dtype=dtype)
    dt = lin.dtype
    d = model.facts.d_model
    r0_all, rope = constant_residual(rm, state, rope_layer=layer)
    r0_all = r0_all[layer].to(lin.device, dt)  # [P, d]
    attn = _attn(model, layer)
    scaling = float(attn.scaling)
    maps, recorded = {}, {}
    for side, pos in (("query", query_pos), ("key", key_pos)):
        fn = _Side(model, state, layer, head, pos, side, rope, dt)
        maps[side] = fn.affine(d)
        recorded[side] = fn(state.sites["resid_pre"][layer, pos].to(lin.device, dt)[None])[0]
    dh = maps["query"][0].shape[0]
    both = torch.cat([maps["query"][0], maps["key"][0]])  # [2 dh, d]: one sweep for both
    where = torch.tensor([query_pos] * dh + [key_pos] * dh)
    rows = node_contributions(lin, layer, where, both)  # [2 dh, n_cols]
    sides = {}
    for i, side in enumerate(("query", "key")):
        M, c = maps[side]
        pos = query_pos if side == "query" else key_pos
        sides[side] = (rows[i * dh : (i + 1) * dh].T, M @ r0_all[pos] + c, recorded[side])
    names = _node_names(lin, state)
    qn, qb, q_rec = sides["query"]
    kn, kb, k_rec = sides["key"]
    q_live = (qn != 0).any(1).nonzero().squeeze(1)
    k_live = (kn != 0).any(1).nonzero().squeeze(1)
    Q = torch.cat([qn[q_live], qb[None]])  # the bias row last
    K = torch.cat([kn[k_live], kb[None]])
    q_names = [names[i] for i in q_live.tolist()] + [BIAS]
    k_names = [names[i] for i in k_live.tolist()] + [BIAS]
    q_tot, k_tot = Q.sum(0), K.sum(0)
    score = scaling * float(q_tot @ k_tot)
    recorded_score = scaling * float(q_rec @ k_rec)
    qi, ki, vals = _top_pairs(Q, K, scaling, top)
    pairs = [(q_names[i], k_names[j], float(v)) for i, j, v in
             zip(qi.tolist(), ki.tolist(), vals.tolist(), strict=True)]  # fmt: skip
    q_marg = scaling * (Q @ k_tot)
    k_marg = scaling * (K @ q_tot)

    def top_of(m, nm):
        idx = m.abs().topk(min(top, len(m))).indices.tolist()
        return [(nm[i], float(m[i])) for i in idx]

    softcap = getattr(attn, "attn_logit_softcapping", None)
    capped = None if not softcap else float(torch.tanh(torch.tensor(score / softcap)) * softcap)
    return QKAttribution(
        layer=layer, head=head, query_pos=query_pos, key_pos=key_pos, score=score,
        recorded_score=recorded_score, capped=capped,
        pattern=float(pattern(state, layer)[head, query_pos, key_pos]),
        pairs=pairs, query_marginals=top_of(q_marg, q_names), key_marginals=top_of(k_marg, k_names),
        constants={
            "bias_x_bias": scaling * float(qb @ kb),
            "query_bias_x_keys": scaling * float(qb @ (k_tot - kb)),
            "queries_x_key_bias": scaling * float((q_tot - qb) @ kb),
        },
        unexplained=score - recorded_score,
        n_query_nodes=len(q_live), n_key_nodes=len(k_live),
        tokens=model.token_strings(state.tokens),
    )  # fmt: skip
