"""Exact attribution graphs: direct effects through the frozen, linear replacement model.

With attention patterns and norm denominators frozen and the MLPs replaced by (decoded features
+ error), the residual stream is a linear function of the node values. The edge

    A[t, s] = direct effect of source s on target t

is the gradient of target t (a feature's pre-activation or a de-meaned logit) with respect to
the place where s writes, dotted with what s writes (activation x decoder vectors for a feature,
the error vector for an error node, the embedding for a token node).

Instead of autograd through the whole model once per batch of rows, :class:`FrozenLinearModel`
runs one hand-written backward sweep from the top layer down for a batch of rows: a row joins
the sweep at its own layer (so no work is spent above a target), the attention backward is a
few large matrix products, and the edges into the features and error nodes writing at each
layer are read off as the sweep passes. This is the transpose of the frozen forward that
:mod:`tracer.interventions`-style perturbations run through the hooked model; the tests check
that the two agree column by column.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from tracer.architectures import get_module, norm_center, norm_gain
from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from tracer.model import PromptError
from tracer.prune import DEFAULT_CONVENTION, graph_scores, resolve_convention
from tracer.replacement import PromptState, ReplacementModel


@dataclass
class AttributionConfig:
    """Parameters of one attribution run (saved with the graph).

    Logit targets: by default the most probable next tokens until their cumulative probability
    reaches ``desired_logit_prob``, at most ``max_n_logits``; or ``target_tokens`` (tokens as
    text or ids); or ``logit_diff`` = (token a, token b) for the direction logit(a) - logit(b).
    ``max_feature_nodes`` caps the features (highest estimated influence first); ``None`` keeps
    all. ``batch_size`` rows per backward sweep. ``edge_tolerance`` drops edges with
    |A[t, s]| < tolerance x max_s |A[t, s]| (0 keeps every nonzero edge: exact graphs).
    ``convention`` names the scoring rules of the graph's scores and of its pruning
    (:mod:`tracer.prune`: "circuit-tracer" or "atlas"); the edges are the same in both.
    """

    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    target_tokens: list[str | int] | None = None
    logit_diff: tuple[str | int, str | int] | None = None
    max_feature_nodes: int | None = None
    batch_size: int = 1024
    edge_tolerance: float = 0.0
    convention: str = DEFAULT_CONVENTION
    progress: bool = True


# --- logit targets ---------------------------------------------------------------------------


@dataclass
class LogitTargets:
    """token ids [n], de-meaned unembedding directions [n, d], probabilities [n], influence
    weights [n] (summing to 1), and a description for the graph's parameters."""

    tokens: list[int]
    directions: torch.Tensor
    probabilities: torch.Tensor
    weights: torch.Tensor
    kind: str


def select_logit_targets(rm: ReplacementModel, state: PromptState, cfg: AttributionConfig):
    model = rm.model
    W_U = model.unembed_matrix()  # [V, d]
    mean = W_U.mean(0)
    probs = state.logits[-1].softmax(-1)
    if cfg.logit_diff is not None:
        a, b = (model.token_id(t) for t in cfg.logit_diff)
        if a == b:
            raise PromptError("logit difference needs two different tokens")
        return LogitTargets(
            [a], (W_U[a] - W_U[b])[None], probs[[a]], torch.ones(1), f"difference {a}-{b}"
        )
    if cfg.target_tokens:
        ids = [model.token_id(t) for t in cfg.target_tokens]
        p = probs[ids]
        w = p / p.sum() if float(p.sum()) > 0 else torch.full_like(p, 1 / len(ids))
        return LogitTargets(ids, W_U[ids] - mean, p, w, "chosen")
    top_p, top_i = probs.sort(descending=True)
    n = int((top_p.cumsum(0) < cfg.desired_logit_prob).sum().item()) + 1
    n = max(1, min(n, cfg.max_n_logits))
    ids = top_i[:n].tolist()
    p = top_p[:n]
    return LogitTargets(ids, W_U[ids] - mean, p, p / p.sum(), "top")


# --- the frozen linear model -----------------------------------------------------------------


class FrozenLinearModel:
    """The replacement model for one prompt, linearised, with a batched backward sweep.

    Columns (sources) are numbered: active features [n_feat] (state order), then error nodes
    (layer-major: ``n_feat + l * P + p``), then token nodes (``n_feat + L * P + p``).
    """

    def __init__(self, rm: ReplacementModel, state: PromptState, cache_bytes: float = 2e9):
        m = rm.model
        f = m.facts
        self.rm, self.state = rm, state
        self.L, self.P, self.d = f.n_layers, state.n_pos, f.d_model
        self.H, self.kv, self.dh = f.n_heads, f.n_kv_heads, f.d_head
        self.kind = m.arch.norm_kind
        self.n_feat = state.n_active
        self.n_cols = self.n_feat + self.L * self.P + self.P
        self.err_col0 = self.n_feat
        self.tok_col0 = self.n_feat + self.L * self.P
        layers = m.layers()
        arch = m.arch
        self.W_V, self.W_O, self.g_attn, self.g_post, self.g_mlp = [], [], [], [], []
        for l in range(self.L):
            w_v, w_o = m.value_output(l)
            self.W_V.append(w_v)
            self.W_O.append(w_o)
            self.g_attn.append(norm_gain(self.kind, get_module(layers[l], arch.attn_norm)))
            self.g_mlp.append(norm_gain(self.kind, get_module(layers[l], arch.mlp_norm)))
            post = arch.attn_out_norm
            self.g_post.append(norm_gain(self.kind, get_module(layers[l], post)) if post else None)
        self.g_final = norm_gain(self.kind, m.final_norm())
        self.patterns_T = state.patterns.transpose(-1, -2).contiguous()  # [L, H, k, q]
        skip = rm.transcoder.W_skip  # weights may be bfloat16: sums are float32
        self.skip = None if skip is None else skip.to(state.errors.dtype)
        # Feature columns in position-major order inside a sweep: the features writing to one
        # layer at one position are then one contiguous slice (no scatter per layer).
        st = state
        key = (st.feat_pos * (self.L + 1) + st.feat_layer) * (rm.transcoder.cfg.n_features + 1)
        self.pm_order = torch.argsort(key + st.feat_index, stable=True)  # pm column -> feature
        pm_pos, pm_layer = st.feat_pos[self.pm_order], st.feat_layer[self.pm_order]
        # counts[p, l] = number of features at position p and layer l
        counts = torch.zeros(self.P, self.L, dtype=torch.long)
        counts.index_put_((pm_pos, pm_layer), torch.ones_like(pm_pos), accumulate=True)
        flat = torch.cat([torch.zeros(1, dtype=torch.long), counts.reshape(-1).cumsum(0)])
        self._start = flat[:-1].view(self.P, self.L)  # first pm column of (p, l)
        self._stop = flat[1:].view(self.P, self.L)
        n_targets = torch.tensor([rm.transcoder.cfg.n_targets(i) for i in range(self.L)])
        writer_bytes = float(n_targets[st.feat_layer].sum()) * self.d * 4
        self._cache_writers = writer_bytes < cache_bytes
        self._writer_cache: dict[int, list] = {}

    # norms with frozen denominators, transposed: grad_x = C(g * grad_y) * s
    def _norm_T(self, gain: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return norm_center(self.kind, grad * gain) * scale[..., None]

    def logit_rows(self, directions: torch.Tensor) -> torch.Tensor:
        """Gradient at the final residual (last position) of each de-meaned logit. [n, d]."""
        s = self.state.scales["final_norm"][-1]
        return self._norm_T(self.g_final, s, directions)

    def feature_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Gradient at resid_mid of each feature's pre-activation. idx [n] -> [n, d]."""
        st, tc = self.state, self.rm.transcoder
        lay, pos = st.feat_layer[idx], st.feat_pos[idx]
        enc = tc.W_enc[lay, st.feat_index[idx]].to(st.errors.dtype)  # [n, d] in float32
        if self.rm.input_site == "resid_mid":
            return enc.clone()
        out = torch.empty_like(enc)
        for l in torch.unique(lay).tolist():
            sel = lay == l
            s = st.scales["mlp_norm"][l, pos[sel]]
            out[sel] = self._norm_T(self.g_mlp[l], s, enc[sel])
        return out

    def _writers(self, l: int) -> list:
        """Features writing to the MLP output of layer l, per position p: (first, last) pm
        columns and the written vectors [n, d] = activation x decoder row for target l."""
        if l in self._writer_cache:
            return self._writer_cache[l]
        st, tc = self.state, self.rm.transcoder
        src = [i for i in range(l + 1) if l - i < tc.cfg.n_targets(i)]  # a contiguous range
        if not src:
            return [(0, 0, None)] * self.P
        c0 = self._start[:, src[0]]  # [P] first pm column of each position's writers
        c1 = self._stop[:, src[-1]]
        cols = torch.cat(
            [torch.arange(a, b) for a, b in zip(c0.tolist(), c1.tolist(), strict=True)]
        )
        feats = self.pm_order[cols]
        lay = st.feat_layer[feats]
        vecs = torch.empty(len(cols), self.d)
        for i in src:  # one gather per source layer
            sel = (lay == i).nonzero().squeeze(1)
            if len(sel):
                rows = tc.decoder(i)[st.feat_index[feats[sel]], l - i]
                vecs[sel] = rows * st.feat_value[feats[sel], None]
        out, off = [], 0
        for a, b in zip(c0.tolist(), c1.tolist(), strict=True):
            out.append((a, b, vecs[off : off + b - a] if b > a else None))
            off += b - a
        if self._cache_writers:
            self._writer_cache[l] = out
        return out

    def _attn_T(self, l: int, g: torch.Tensor) -> torch.Tensor:
        """Transpose of frozen attention (with its input norm) at layer l, on the first
        ``n = g.shape[1]`` positions (causal: later positions never feed earlier ones)."""
        R, P = g.shape[0], g.shape[1]
        st = self.state
        if self.g_post[l] is not None:
            g = self._norm_T(self.g_post[l], st.scales["attn_out_norm"][l, :P], g)
        go = (g @ self.W_O[l]).view(R, P, self.H, self.dh)  # grad wrt z (pre-o_proj)
        go = go.permute(2, 1, 0, 3).reshape(self.H, P, R * self.dh)
        gv = torch.bmm(self.patterns_T[l, :, :P, :P], go)  # [H, k, R*dh] = sum_q A[h,q,k] go[q]
        gv = gv.view(self.kv, self.H // self.kv, P, R, self.dh).sum(1)  # heads share kv
        gv = gv.permute(2, 1, 0, 3).reshape(R, P, self.kv * self.dh)
        gh = gv @ self.W_V[l]
        return self._norm_T(self.g_attn[l], st.scales["attn_norm"][l, :P], gh)

    @torch.no_grad()
    def sweep(
        self, start_layer: torch.Tensor, start_pos: torch.Tensor, start_vec: torch.Tensor
    ) -> torch.Tensor:
        """Edges into a batch of rows. A row starts at layer ``start_layer`` (a feature target
        at that layer's resid_mid, or ``L`` for a logit at the final residual), position
        ``start_pos``, with gradient ``start_vec`` [R, d]. Returns dense [R, n_cols]."""
        R = len(start_layer)
        order = torch.argsort(start_layer, descending=True, stable=True)
        s_layer, s_pos, s_vec = start_layer[order], start_pos[order], start_vec[order]
        P = int(s_pos.max()) + 1 if R else 0  # positions after the last target never matter
        G = torch.zeros(R, P, self.d)
        feat = torch.zeros(R, self.n_feat)  # feature columns, position-major
        rest = torch.zeros(R, self.n_cols - self.n_feat)  # error and token columns
        st = self.state

        def inject(layer: int, live: int) -> int:
            hi = live + int((s_layer[live:] == layer).sum())
            G[torch.arange(live, hi), s_pos[live:hi]] += s_vec[live:hi]
            return hi

        live = inject(self.L, 0)
        for l in reversed(range(self.L)):
            g = G[:live]  # gradient wrt the residual after layer l (= wrt mlp_out of layer l)
            if live:
                for p, (c0, c1, vecs) in enumerate(self._writers(l)[:P]):
                    if vecs is not None:
                        feat[:live, c0:c1].addmm_(g[:, p], vecs.T)
                e0 = l * self.P
                rest[:live, e0 : e0 + P] = torch.einsum("rpd,pd->rp", g, st.errors[l, :P])
                if self.skip is not None:
                    # skip: out += x_in @ W_skip.T, a live path in the linear model
                    g_in = g @ self.skip[l]
                    if self.rm.input_site == "mlp_in":
                        g_in = self._norm_T(self.g_mlp[l], st.scales["mlp_norm"][l, :P], g_in)
                    G[:live] += g_in
            live = inject(l, live)  # rows whose target reads layer l's MLP input start here
            if live:
                G[:live] += self._attn_T(l, G[:live])
        emb = st.sites["resid_pre"][0, :P]  # [P, d] what the embedding writes (with positions)
        t0 = self.tok_col0 - self.n_feat
        rest[:, t0 : t0 + P] = torch.einsum("rpd,pd->rp", G, emb)
        out = torch.empty(R, self.n_cols)
        out[order[:, None], self.pm_order[None, :]] = feat  # back to state order, rows too
        out[order, self.n_feat :] = rest
        return out


# --- attribute -------------------------------------------------------------------------------


def _apply_tolerance(block: torch.Tensor, tol: float) -> np.ndarray:
    """A block of rows as dense float32 numpy, with edges below ``tol`` x the row's largest
    |edge| set to zero. Rows are nearly dense (every earlier source reaches a target), so dense
    float32 is the compact form: 4 bytes an edge against 8 or more in a sparse matrix."""
    if tol > 0:
        cut = tol * block.abs().amax(dim=1, keepdim=True)
        block = torch.where(block.abs() >= cut, block, torch.zeros((), dtype=block.dtype))
    return block.numpy()


def _influence_on_columns(
    rows: np.ndarray, row_nodes: np.ndarray, n_cols: int, logit_w: np.ndarray
) -> np.ndarray:
    """Estimated influence of every column node on the logits through the rows known so far.

    rows [R, n_cols] (targets = ``row_nodes``; logit rows have row_nodes = -1 - logit index).
    Influence uses |A| row-normalised, summed over paths of every length.
    """
    norm = np.abs(rows)
    sums = norm.sum(axis=1, dtype=np.float64)
    sums[sums == 0] = 1.0
    norm /= sums[:, None].astype(np.float32)
    weight_of_row = np.zeros(rows.shape[0])
    is_logit = row_nodes < 0
    weight_of_row[is_logit] = logit_w[-1 - row_nodes[is_logit]]
    feat_rows = np.where(~is_logit)[0]
    total = np.zeros(n_cols)
    x = weight_of_row
    for _ in range(10_000):  # a DAG: paths are at most 2 x n_layers + 2 long
        y = norm.T @ x  # influence arriving at each column this step
        total += y
        x = np.zeros(rows.shape[0])
        x[feat_rows] = y[row_nodes[feat_rows]]  # a feature's influence flows on through its row
        if x.sum() < 1e-12:
            break
    return total


def attribute(
    rm: ReplacementModel, prompt: str | torch.Tensor, config: AttributionConfig | None = None,
    **overrides,
) -> Graph:  # fmt: skip
    """Attribution graph of ``prompt`` (text, or token ids [P] with the start token).

    Keyword overrides are fields of :class:`AttributionConfig`.
    """
    cfg = AttributionConfig(**{**asdict(config or AttributionConfig()), **overrides})
    resolve_convention(None, cfg.convention)  # an unknown convention fails before the work
    t0 = time.perf_counter()
    model = rm.model
    tokens = model.tokenize(prompt) if isinstance(prompt, str) else prompt.long()
    if tokens.dim() != 1 or len(tokens) == 0:
        raise PromptError("token ids must be a non-empty 1-D tensor [n_pos]")
    if len(tokens) > model.facts.max_positions:
        raise PromptError(
            f"prompt is {len(tokens)} tokens, longer than the model's context "
            f"({model.facts.max_positions}): shorten it"
        )
    state = rm.record(tokens)
    targets = select_logit_targets(rm, state, cfg)
    lin = FrozenLinearModel(rm, state)
    P, L, n_feat = lin.P, lin.L, lin.n_feat
    n_logit = len(targets.tokens)
    t_record = time.perf_counter() - t0

    # Logit rows first: they rank the features when there is a budget.
    logit_block = lin.sweep(
        torch.full((n_logit,), L), torch.full((n_logit,), P - 1), lin.logit_rows(targets.directions)
    )
    blocks = [_apply_tolerance(logit_block, cfg.edge_tolerance)]
    row_nodes = [-1 - np.arange(n_logit)]
    logit_w = targets.weights.numpy().astype(np.float64)

    budget = n_feat if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, n_feat)
    visited = np.zeros(n_feat, dtype=bool)
    pos_major = np.lexsort((state.feat_layer.numpy(), state.feat_pos.numpy()))
    bar = tqdm(total=budget, desc="attribution rows", unit="row", disable=not cfg.progress)
    while visited.sum() < budget:
        n_next = min(cfg.batch_size, budget - int(visited.sum()))
        if budget == n_feat:
            # No budget: every feature gets a row. Position-major batches keep each sweep to
            # the first few positions (causality), so they cost least.
            pick = pos_major[~visited[pos_major]][:n_next]
        else:
            rows = np.concatenate(blocks)
            infl = _influence_on_columns(rows, np.concatenate(row_nodes), lin.n_cols, logit_w)
            del rows
            score = np.where(visited, -np.inf, infl[:n_feat])
            pick = np.argsort(-score, kind="stable")[:n_next]
        idx = torch.as_tensor(pick, dtype=torch.long)
        block = lin.sweep(state.feat_layer[idx], state.feat_pos[idx], lin.feature_rows(idx))
        blocks.append(_apply_tolerance(block, cfg.edge_tolerance))
        row_nodes.append(pick)
        visited[pick] = True
        bar.update(len(pick))
    bar.close()

    # Assemble: kept features, all error nodes, all tokens, logits.
    keep_feat = np.where(visited)[0]
    n_keep = len(keep_feat)
    col_to_node = np.full(lin.n_cols, -1, dtype=np.int64)
    col_to_node[keep_feat] = np.arange(n_keep)
    col_to_node[n_feat:] = n_keep + np.arange(lin.n_cols - n_feat)
    n_nodes = n_keep + L * P + P + n_logit
    logit_node0 = n_keep + L * P + P
    feat_row_node = np.full(n_feat, -1, dtype=np.int64)
    feat_row_node[keep_feat] = np.arange(n_keep)

    targets_all, sources_all, weights_all = [], [], []
    kept_cols = np.where(col_to_node >= 0)[0]  # columns of nodes in the graph
    for block, rn in zip(blocks, row_nodes, strict=True):
        tnode = np.where(rn < 0, logit_node0 + (-1 - rn), feat_row_node[np.maximum(rn, 0)])
        sub = block[:, kept_cols]
        r, c = np.nonzero(sub)
        targets_all.append(tnode[r])
        sources_all.append(col_to_node[kept_cols[c]])
        weights_all.append(sub[r, c])
    target = np.concatenate(targets_all).astype(np.int32)
    source = np.concatenate(sources_all).astype(np.int32)
    weight = np.concatenate(weights_all).astype(np.float32)

    kf = torch.as_tensor(keep_feat, dtype=torch.long)
    err_norm = state.errors.norm(dim=-1).reshape(-1)  # [L*P] layer-major
    emb_norm = state.sites["resid_pre"][0].norm(dim=-1)
    final = get_module(model.hf, model.arch.final_norm)
    with torch.no_grad():
        normed = final(state.sites["resid_final"][-1:].clone())[0]
    logit_vals = targets.directions @ normed.float()
    kind = np.r_[
        np.full(n_keep, FEATURE), np.full(L * P, ERROR), np.full(P, TOKEN), np.full(n_logit, LOGIT)
    ].astype(np.int8)
    graph = Graph(
        prompt=prompt if isinstance(prompt, str) else model.decode(tokens.tolist()),
        tokens=tokens.tolist(),
        token_strings=model.token_strings(tokens),
        model_name=model.facts.name,
        transcoder_name=rm.transcoder.identity.id,  # name@fingerprint (transcoders.identity)
        n_layers=L,
        kind=kind,
        layer=np.r_[
            state.feat_layer[kf].numpy(),
            np.repeat(np.arange(L), P),
            np.full(P, -1),
            np.full(n_logit, L),
        ].astype(np.int32),  # fmt: skip
        position=np.r_[
            state.feat_pos[kf].numpy(),
            np.tile(np.arange(P), L),
            np.arange(P),
            np.full(n_logit, P - 1),
        ].astype(np.int32),  # fmt: skip
        feature=np.r_[
            state.feat_index[kf].numpy(), np.full(L * P, -1), tokens.numpy(), targets.tokens
        ].astype(np.int64),
        activation=np.r_[
            state.feat_value[kf].numpy(), err_norm.numpy(), emb_norm.numpy(), logit_vals.numpy()
        ].astype(np.float32),
        probability=np.r_[np.zeros(n_nodes - n_logit), targets.probabilities.numpy()].astype(
            np.float32
        ),
        target=target,
        source=source,
        weight=weight,
        logit_weights=np.r_[np.zeros(n_nodes - n_logit), logit_w].astype(np.float32),
        params={
            **{k: v for k, v in asdict(cfg).items() if k != "progress"},
            "logit_target_kind": targets.kind,
            "exclude_bos": rm.exclude_bos,
            "input_site": rm.input_site,
            "n_active_features": n_feat,
        },
    )
    graph.scores = graph_scores(graph)
    # Text of the logit tokens, for summaries, reports and exports (graphs carry no tokenizer).
    graph.extra["token_text"] = {str(t): model.decode([t]) for t in targets.tokens}
    elapsed = time.perf_counter() - t0
    graph.extra["timing_s"] = {"record": round(t_record, 4), "total": round(elapsed, 4)}
    return graph
