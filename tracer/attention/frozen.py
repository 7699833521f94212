"""The pieces of the frozen linear model that the attention analyses share.

- :func:`pattern`: one layer's frozen attention pattern, read through the prompt state's
  accessor (``PromptState.pattern(layer)`` where it exists, else ``state.patterns[layer]``);
- :func:`norm_linear`: the linear part of a norm with its denominator frozen (forward);
- :func:`target_gradients`: where each graph target reads the residual stream, and its gradient
  there (a feature's encoder row through its input norm, a logit's de-meaned unembedding
  through the final norm);
- :class:`SourceForward`: what a batch of graph sources (features, error nodes, tokens) adds to
  every layer's residual stream and to every head's output in the frozen model, forward.

Shapes: L layers, P positions, d = d_model, H heads, kv key/value heads, dh = d_head. Every
tensor is on the view's device in its compute dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from tracer.architectures import NormKind, norm_center
from tracer.attribution.decoders import ActiveDecoders
from tracer.attribution.frozen_view import FrozenView
from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph


def pattern(state, layer: int) -> torch.Tensor:
    """Frozen attention pattern of ``layer``: [H, P, P] (query, key)."""
    get = getattr(state, "pattern", None)
    return get(layer) if callable(get) else state.patterns[layer]


def norm_linear(kind: NormKind, gain: torch.Tensor, scale: torch.Tensor, x: torch.Tensor):
    """Linear part of a frozen norm: gain * centre(x) * scale. gain [d], scale [...], x [..., d]."""
    return gain * norm_center(kind, x) * scale[..., None]


class HeadAnalysisError(ValueError):
    """A request the attention analyses cannot answer (bad head, layer, position, graph)."""


@dataclass
class Targets:
    """Graph targets (feature and logit nodes): read layer [T] (a feature's layer, where it
    reads resid_mid or its MLP input; ``L`` for a logit, reading the final residual), position
    [T] and the gradient there [T, d] (w.r.t. resid_mid of that layer; the final residual for a
    logit)."""

    layer: torch.Tensor
    pos: torch.Tensor
    grad: torch.Tensor


def state_feature_index(state, graph: Graph, nodes: np.ndarray) -> torch.Tensor:
    """Index in the state's active-feature arrays of each graph feature node in ``nodes``."""
    width = int(state.feat_index.max()) + 2 if state.n_active else 1
    rows = state.n_pos + 1

    def key(lay, pos, fea):
        return (lay.long() * rows + pos.long()) * width + fea.long()

    have = key(state.feat_layer.cpu(), state.feat_pos.cpu(), state.feat_index.cpu())
    fea = torch.as_tensor(graph.feature[nodes]).long()
    want = key(torch.as_tensor(graph.layer[nodes]), torch.as_tensor(graph.position[nodes]), fea)
    order = torch.argsort(have)
    at = torch.searchsorted(have[order], want).clamp(max=max(len(order) - 1, 0))
    idx = order[at] if len(order) else at
    if len(want) and (
        len(order) == 0 or bool((have[idx] != want).any() | (fea >= width - 1).any())
    ):
        raise HeadAnalysisError(
            "the graph has features this prompt's record does not activate: trace the graph "
            "again with this model and transcoder"
        )
    return idx


def logit_directions(rm, state, graph: Graph, view: FrozenView, nodes: np.ndarray):
    """De-meaned unembedding directions [n, d] of the graph's logit nodes ``nodes``, chosen the
    way the attribution chose them (from the graph's parameters)."""
    from dataclasses import fields

    from tracer.attribution.config import AttributionConfig
    from tracer.attribution.targets import select_logit_targets

    names = {f.name for f in fields(AttributionConfig)}
    cfg = AttributionConfig(**{k: v for k, v in graph.params.items() if k in names})
    chosen = select_logit_targets(rm, state, cfg, view)
    where = {t: i for i, t in enumerate(chosen.tokens)}
    toks = [int(graph.feature[i]) for i in nodes]
    if any(t not in where for t in toks):
        raise HeadAnalysisError(
            "the graph's logit targets are not the ones its parameters select for this record: "
            "trace the graph again with this model"
        )
    return chosen.directions[[where[t] for t in toks]].to(view.device, view.dtype)


def target_gradients(rm, state, graph: Graph, view: FrozenView, nodes: np.ndarray) -> Targets:
    """Read sites and gradients of graph target nodes ``nodes`` (features or logits)."""
    tc = rm.transcoder
    kinds = graph.kind[nodes]
    if np.isin(kinds, (ERROR, TOKEN)).any():
        raise HeadAnalysisError("error and token nodes are never edge targets")
    L, P = view.n_layers, state.n_pos
    layer = torch.as_tensor(np.where(kinds == LOGIT, L, graph.layer[nodes])).long()
    pos = torch.as_tensor(np.where(kinds == LOGIT, P - 1, graph.position[nodes])).long()
    grad = torch.zeros(len(nodes), view.d_model, device=view.device, dtype=view.dtype)
    feat = np.nonzero(kinds == FEATURE)[0]
    if len(feat):
        lay = torch.as_tensor(graph.layer[nodes[feat]]).long()
        idx = torch.as_tensor(graph.feature[nodes[feat]]).long()
        enc = tc.W_enc[lay.to(tc.W_enc.device), idx.to(tc.W_enc.device)]
        enc = enc.to(view.device, view.dtype)
        if rm.input_site != "resid_mid":
            p = pos[feat].to(view.device)
            gm = torch.stack(view.g_mlp)[lay.to(view.device)]
            s = view.scales["mlp_norm"][lay.to(view.device), p]
            enc = norm_center(view.kind, enc * gm) * s[:, None]
        grad[torch.as_tensor(feat, device=view.device)] = enc
    logit = np.nonzero(kinds == LOGIT)[0]
    if len(logit):
        dirs = logit_directions(rm, state, graph, view, nodes[logit])
        s = view.scales["final_norm"][P - 1]
        grad[torch.as_tensor(logit, device=view.device)] = view.norm_T(view.g_final, s, dirs)
    return Targets(layer=layer, pos=pos, grad=grad)


class SourceForward:
    """Forward contributions of graph sources through the frozen linear model.

    A source adds what it writes (a token node: its embedding into the residual before layer 0;
    an error node (l, p): its error vector into layer l's MLP output; a feature: activation x
    decoder row into the MLP output of every layer it writes to) and nothing else: no biases,
    other nodes fixed. Everything downstream is linear: frozen norms, frozen attention, and the
    skip path of a skip transcoder (live, as in the attribution).

    ``features``: the state indices of the feature sources that will be asked for (their
    decoder rows are read once).
    """

    def __init__(self, rm, state, view: FrozenView, features: torch.Tensor):
        self.rm, self.state, self.view = rm, state, view
        self.features = features.long().cpu()
        self.local = {int(k): i for i, k in enumerate(self.features.tolist())}
        self.dec = ActiveDecoders(
            rm.transcoder,
            state.feat_layer[self.features.to(state.feat_layer.device)],
            state.feat_index[self.features.to(state.feat_index.device)],
            state.feat_value[self.features.to(state.feat_value.device)],
            device=view.device,
            dtype=view.dtype,
        )
        self.n_targets = [rm.transcoder.cfg.n_targets(i) for i in range(view.n_layers)]

    def head_outputs(
        self, kind: np.ndarray, layer: np.ndarray, pos: np.ndarray, feat: np.ndarray,
        n_layers: int, n_pos: int,
    ) -> Iterator[tuple[int, torch.Tensor]]:  # fmt: skip
        """For each layer l < ``n_layers``: (l, z [B, H, n_pos, dh]), what each of the B sources
        adds to head h's output (the attention-weighted values, before the output projection)
        at each query position. kind/layer/pos [B] (graph node fields); feat [B] the state index
        of feature sources (ignored for others)."""
        v, dev, dt = self.view, self.view.device, self.view.dtype
        B, d, P = len(kind), v.d_model, n_pos
        H, kv, dh = v.n_heads, v.n_kv_heads, v.d_head
        groups = H // kv
        b = torch.arange(B, device=dev)
        pos_t = torch.as_tensor(pos, device=dev).long()
        lay_t = torch.as_tensor(layer, device=dev).long()
        kind_t = torch.as_tensor(kind, device=dev)
        R = torch.zeros(B, P, d, device=dev, dtype=dt)
        tok = kind_t == TOKEN
        R[b[tok], pos_t[tok]] = v.embed[pos_t[tok]]
        is_feat = kind_t == FEATURE
        loc = torch.full((B,), -1, dtype=torch.long, device=dev)
        if bool(is_feat.any()):
            fl = [self.local[int(f)] for f in np.asarray(feat)[is_feat.cpu().numpy()]]
            loc[is_feat] = torch.as_tensor(fl, device=dev)
        reach = torch.as_tensor(self.n_targets, device=dev)[lay_t.clamp(min=0)]
        err = kind_t == ERROR
        site_resid = self.rm.input_site == "resid_mid"
        # A source's stream is zero until it writes (a token before layer 0; a feature or an
        # error node at its own layer's MLP output): each layer runs only the live ones.
        start = torch.where(tok, -1, lay_t)
        for l in range(n_layers):
            A = pattern(self.state, l)[:, :P, :P].to(dev, dt).view(kv, groups, P, P)
            live = (start < l).nonzero().squeeze(1)
            Rl = R[live]
            x = norm_linear(v.kind, v.g_attn[l], v.scales["attn_norm"][l, :P], Rl)
            val = (x @ v.W_V[l].T).view(len(live), P, kv, dh)
            # head h = kv head h // groups: z[b, (k, g), q] = sum_k' A[(k, g), q, k'] val[b, k', k]
            zl = torch.einsum("kgqs,bskd->bkgqd", A, val).reshape(len(live), H, P, dh)
            z = torch.zeros(B, H, P, dh, device=dev, dtype=dt)
            z[live] = zl
            yield l, z
            if l == n_layers - 1:
                return
            out = zl.transpose(1, 2).reshape(len(live), P, H * dh) @ v.W_O[l].T
            if v.g_post[l] is not None:
                out = norm_linear(v.kind, v.g_post[l], v.scales["attn_out_norm"][l, :P], out)
            R[live] += out  # resid_mid of layer l
            skip = None
            if v.W_skip is not None:
                x_in = R if site_resid else norm_linear(
                    v.kind, v.g_mlp[l], v.scales["mlp_norm"][l, :P], R
                )  # fmt: skip
                skip = x_in @ v.W_skip[l].T
            here = err & (lay_t == l)
            if bool(here.any()):
                R[b[here], pos_t[here]] += v.errors[l, pos_t[here]]
            writes = is_feat & (lay_t <= l) & (l < lay_t + reach)
            if bool(writes.any()):
                R[b[writes], pos_t[writes]] += self.dec.written(loc[writes], l)
            if skip is not None:
                R = R + skip
