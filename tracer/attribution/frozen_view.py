"""The frozen linear view of a model for one prompt, gathered once, on the device.

With attention patterns and norm denominators frozen, the residual stream of the replacement
model is a linear function of the node values. The backward sweep needs only these pieces:

- per layer: the attention's value and output projections ``W_V`` [n_kv * d_head, d] and
  ``W_O`` [d, n_heads * d_head], the gains of the norms in front of attention and the MLP
  (and after attention, for Gemma-2/3) [d];
- the final norm's gain [d] and the unembedding ``W_U`` [vocab, d];
- the transcoder's skip matrices ``W_skip`` [L, d, d] (skip transcoders only);
- the prompt's frozen values: attention patterns (one layer at a time, through
  :meth:`~tracer.replacement.PromptState.pattern`: they may live on disk), norm denominators
  [L, P], error vectors [L, P, d] and what the embedding writes [P, d].

:func:`gather_view` is the one place that reads them from the ``LanguageModel`` (through its
architecture row), the transcoder and the recorded :class:`~tracer.replacement.PromptState`.
Every tensor is moved to ``device`` and cast to the compute ``dtype`` (float32, or float64 for
exactness checks) whatever the weights' dtype; a float32 weight already on the device is used
as it is, not copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracer.architectures import NormKind, get_module, norm_center, norm_gain, value_output_weights


@dataclass
class FrozenView:
    """Everything the linear backward sweep reads, on one device in one compute dtype.

    Shapes (L layers, P positions, d = d_model, H heads, n_kv key/value heads, d_head):
    W_V[l] [n_kv * d_head, d]; W_O[l] [d, H * d_head]; g_attn[l], g_mlp[l], g_post[l] [d]
    (g_post[l] is None without a post-attention norm); g_final [d]; W_U [vocab, d];
    W_skip [L, d, d] or None; ``pattern_T(l, n)`` [H, k, q] (layer l's frozen pattern over the
    first n positions, transposed: pattern_T(l)[h, k, q] = pattern[l, h, q, k]; read through
    the prompt state, one layer at a time); scales: norm name -> [L, P] (final_norm: [P]);
    errors [L, P, d]; embed [P, d] (the residual stream before layer 0: what the token nodes
    write).
    """

    kind: NormKind
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    W_V: list[torch.Tensor]
    W_O: list[torch.Tensor]
    g_attn: list[torch.Tensor]
    g_mlp: list[torch.Tensor]
    g_post: list[torch.Tensor | None]
    g_final: torch.Tensor
    W_U: torch.Tensor
    W_skip: torch.Tensor | None
    state: object  # the PromptState whose patterns pattern_T reads
    scales: dict[str, torch.Tensor]
    errors: torch.Tensor
    embed: torch.Tensor
    device: torch.device
    dtype: torch.dtype

    def norm_T(self, gain: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Transpose of a norm with its denominator frozen: grad_x = C(g * grad_y) * s.
        gain [d], scale [...], grad [..., d] -> [..., d]."""
        return norm_center(self.kind, grad * gain) * scale[..., None]

    def pattern_T(self, layer: int, n_pos: int | None = None) -> torch.Tensor:
        """Layer ``layer``'s frozen pattern transposed, [H, k, q], over the first ``n_pos``
        positions (default all), on the view's device in its dtype (a transposed view: bmm
        reads it as a transposed operand; no copy when the pattern is already there)."""
        return _to(self.state.pattern(layer, n_pos), self.device, self.dtype).transpose(-1, -2)

    def pattern_T_times(self, layer: int, go: torch.Tensor) -> torch.Tensor:
        """sum_q pattern[l, h, q, k] go[h, q]: the frozen attention's transpose applied to
        ``go`` [H, n, m] over the first n positions -> [H, n, m]. One product when the layer's
        pattern is in memory or small; else in blocks of query rows (causal: the block of rows
        q0 .. q1-1 reaches keys below q1 only), so only a block of the pattern is ever held."""
        n = go.shape[1]
        store = self.state.pattern_store
        step = store.block_rows(n)
        if step >= n:
            return torch.bmm(self.pattern_T(layer, n), go)
        out = torch.zeros_like(go)
        for q0 in range(0, n, step):
            q1 = min(n, q0 + step)
            blk = _to(self.state.pattern_rows(layer, q0, q1, q1), self.device, self.dtype)
            out[:, :q1] += torch.bmm(blk.transpose(-1, -2), go[:, q0:q1])
            del blk
        return out

    def logit_vectors(self, tokens: list[int]) -> torch.Tensor:
        """De-meaned unembedding directions of ``tokens``: W_U[t] - mean_v W_U[v]. [n, d]."""
        return self.W_U[tokens] - self.W_U.mean(0)


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` detached on ``device`` in ``dtype`` (no copy when it already is)."""
    return t.detach().to(device=device, dtype=dtype)


def gather_view(rm, state, *, device=None, dtype: torch.dtype = torch.float32) -> FrozenView:
    """The frozen linear view of ``rm`` (a ReplacementModel) for one recorded prompt ``state``.

    device: where the sweep runs (default: the device of the model's parameters).
    dtype: the compute dtype (float32; float64 for exactness checks).
    """
    model, tc = rm.model, rm.transcoder
    dev = torch.device(device) if device is not None else model.device
    arch, f = model.arch, model.facts
    kind = arch.norm_kind
    layers = model.layers()
    W_V, W_O, g_attn, g_mlp, g_post = [], [], [], [], []
    for l in range(f.n_layers):
        w_v, w_o = value_output_weights(arch, get_module(layers[l], arch.attn), f.d_model)
        W_V.append(_to(w_v, dev, dtype))
        W_O.append(_to(w_o, dev, dtype))
        g_attn.append(_to(norm_gain(kind, get_module(layers[l], arch.attn_norm)), dev, dtype))
        g_mlp.append(_to(norm_gain(kind, get_module(layers[l], arch.mlp_norm)), dev, dtype))
        post = arch.attn_out_norm
        gp = norm_gain(kind, get_module(layers[l], post)) if post else None
        g_post.append(None if gp is None else _to(gp, dev, dtype))
    g_final = _to(norm_gain(kind, get_module(model.hf, arch.final_norm)), dev, dtype)
    W_U = _to(get_module(model.hf, arch.unembed).weight, dev, dtype)
    return FrozenView(
        kind=kind,
        n_layers=f.n_layers,
        n_heads=f.n_heads,
        n_kv_heads=f.n_kv_heads,
        d_head=f.d_head,
        d_model=f.d_model,
        W_V=W_V,
        W_O=W_O,
        g_attn=g_attn,
        g_mlp=g_mlp,
        g_post=g_post,
        g_final=g_final,
        W_U=W_U,
        W_skip=None if tc.W_skip is None else _to(tc.W_skip, dev, dtype),
        state=state,
        scales={k: _to(v, dev, dtype) for k, v in state.scales.items()},
        errors=_to(state.errors, dev, dtype),
        embed=_to(state.sites["resid_pre"][0], dev, dtype),
        device=dev,
        dtype=dtype,
    )
