"""The one mechanism for reading and overriding a model's internals.

Every read, freeze and override the engine does (attribution, perturbation, steering, the
replacement model, tests) goes through :func:`run_hooked`: PyTorch module hooks placed where
the architecture table says, plus an attention function registered with ``transformers`` that
records attention patterns or replaces them by frozen ones.

Sites (``(site, layer)`` keys of ``edits``; every tensor is ``[batch, n_pos, d_model]``):

- ``resid_pre``  the residual stream entering layer ``l``
- ``attn_out``   what attention adds to the residual (after Gemma's post-attention norm)
- ``resid_mid``  the residual between attention and MLP (input of the MLP's norm)
- ``mlp_in``     the MLP's input (output of its norm)
- ``mlp_out``    what the MLP adds to the residual (after Gemma's post-feedforward norm)
- ``resid_final`` (layer ``n_layers``) the residual entering the final norm
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from tracer.architectures import Architecture, frozen_norm, get_module, norm_scale

ATTN_IMPLEMENTATION = "circuit_atlas"
SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_final")
NORMS = ("attn_norm", "attn_out_norm", "mlp_norm", "mlp_out_norm", "final_norm")

Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _AttnState:
    frozen: torch.Tensor | None = None  # [H, q, k] or [B, H, q, k]
    # Or a frozen pattern fetched when the layer runs (one layer's pattern held at a time).
    frozen_at: Callable[[], torch.Tensor] | None = None
    pattern: torch.Tensor | None = None  # recorded [B, H, q, k]
    sink: Callable[[torch.Tensor], None] | None = None  # takes the recorded pattern instead
    # Takes what recomputes the pattern instead (a QKRecord); attention then runs in blocks
    # of query rows and no layer's whole pattern is ever formed.
    qk_sink: Callable[[QKRecord], None] | None = None
    block_bytes: int = 0
    masks: dict = field(default_factory=dict)  # shared by the layers of one run


# Attention computed in blocks of query rows (QKRecord, qk_sink): about this many bytes of
# scores per block (the eager function holds about three tensors of that size at once).
ATTENTION_BLOCK_BYTES = 64 * 2**20


def _eager(module):
    return sys.modules[type(module).__module__].eager_attention_forward


@dataclass
class QKRecord:
    """What recomputes one layer's attention pattern exactly: the layer's attention module and
    the inputs ``transformers``' eager attention received (queries [B, H, P, dh] after rotary
    embedding, keys [B, n_kv, P, dh], the additive mask [B, 1, P, P] kept as booleans, and the
    other arguments: scaling, softcap, sliding window...). Linear in P but for the mask, which
    is shared by the layers that share it."""

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    allowed: torch.Tensor | None  # [B, 1, P, P] bool: where the additive mask is 0
    mask_fill: float  # the additive mask's value elsewhere (the dtype's minimum)
    mask_dtype: torch.dtype | None
    args: tuple
    kwargs: dict

    @property
    def n_pos(self) -> int:
        return int(self.query.shape[2])

    def rows(self, q0: int, q1: int, n_keys: int | None = None) -> torch.Tensor:
        """The pattern's query rows q0 .. q1-1 over the first ``n_keys`` keys (default all):
        [B, H, q1 - q0, n_keys], as the eager function computes it (the softmax of a row
        never sees the keys a causal mask hides, so a prefix of the keys gives the same
        rows)."""
        n = self.n_pos if n_keys is None else int(n_keys)
        key = self.key[:, :, :n]
        mask = None
        if self.allowed is not None:
            ok = self.allowed[..., q0:q1, :n] if self.allowed.shape[-2] > 1 else (
                self.allowed[..., :n])  # fmt: skip
            mask = torch.zeros(ok.shape, dtype=self.mask_dtype, device=ok.device)
            mask.masked_fill_(~ok, self.mask_fill)
        _, weights = _eager(self.module)(
            self.module, self.query[:, :, q0:q1], key, key[..., :0], mask, *self.args,
            **self.kwargs,
        )  # fmt: skip
        return weights


def _qk_record(module, query, key, mask, args, kwargs, masks: dict) -> QKRecord:
    """A QKRecord of one layer's attention inputs; ``masks`` shares one boolean copy of each
    additive mask between the layers that use it (keyed by the mask's storage)."""
    allowed, fill, mdtype = None, 0.0, None
    if mask is not None:
        key_ = (mask.data_ptr(), tuple(mask.shape))
        if key_ not in masks:
            fill = torch.finfo(mask.dtype).min if mask.dtype.is_floating_point else 0.0
            if mask.dtype == torch.bool:
                raise ValueError("a boolean attention mask cannot be replayed additively")
            ok = mask == 0
            if not bool(((mask == fill) | ok).all()):
                raise ValueError(
                    "the attention mask has values other than 0 and the dtype's minimum: its "
                    "patterns cannot be recomputed; record them in memory or on disk"
                )
            masks[key_] = (ok, fill, mask.dtype)
        allowed, fill, mdtype = masks[key_]
    return QKRecord(module, query.detach(), key.detach(), allowed, fill, mdtype, args, kwargs)


def _blocked_eager(module, query, key, value, mask, block_bytes, *args, **kwargs):
    """Eager attention in blocks of query rows: each block's scores [B, H, rows, k] within
    about ``block_bytes``; returns the attention output only (as the eager function: [B, q, H,
    dh]). Each row is computed exactly as the whole-matrix call computes it."""
    B, H, q_len = query.shape[:3]
    k_len = key.shape[2]
    step = max(1, int(block_bytes // max(1, B * H * k_len * 4)))
    if step >= q_len:
        return _eager(module)(module, query, key, value, mask, *args, **kwargs)[0]
    outs = []
    for a in range(0, q_len, step):
        m = mask if mask is None or mask.shape[-2] == 1 else mask[..., a : a + step, :]
        out, w = _eager(module)(module, query[:, :, a : a + step], key, value, m, *args, **kwargs)
        outs.append(out)
        del w
    return torch.cat(outs, dim=1)


class PatternSource(Protocol):
    """Frozen attention patterns of one prompt, read one layer at a time: ``shape`` is
    (n_layers, n_heads, n_pos, n_pos) and ``pattern(l)`` is layer l's [n_heads, n_pos, n_pos]
    (e.g. :class:`tracer.replacement.PatternStore`, which may keep them on disk)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def pattern(self, layer: int) -> torch.Tensor: ...


def _atlas_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """Eager attention that records its pattern, or applies a frozen one."""
    state: _AttnState | None = getattr(module, "_atlas_state", None)
    frozen = None
    if state is not None:
        frozen = state.frozen if state.frozen_at is None else state.frozen_at()
    if frozen is not None:
        groups = query.shape[1] // value.shape[1]
        v = value.repeat_interleave(groups, dim=1) if groups > 1 else value  # [B, H, k, dh]
        pattern = frozen.to(device=value.device, dtype=value.dtype)
        del frozen
        if pattern.shape[-2:] != (query.shape[2], value.shape[2]):
            raise ValueError(
                f"frozen attention pattern covers {tuple(pattern.shape[-2:])} positions but the "
                f"run has {(query.shape[2], value.shape[2])}: freeze with a record of this prompt"
            )
        if pattern.shape[-3] != query.shape[1]:
            raise ValueError(
                f"frozen attention pattern has {pattern.shape[-3]} heads but the model has "
                f"{query.shape[1]}: freeze with a record from this model"
            )
        out = torch.matmul(pattern, v).transpose(1, 2).contiguous()
        weights = pattern.expand(query.shape[0], *pattern.shape[-3:])
    elif state is not None and state.qk_sink is not None:
        state.qk_sink(_qk_record(module, query, key, attention_mask, args, kwargs, state.masks))
        out = _blocked_eager(
            module, query, key, value, attention_mask, state.block_bytes, *args, **kwargs
        )
        return out, None
    else:
        out, weights = _eager(module)(module, query, key, value, attention_mask, *args, **kwargs)
    if state is not None and state.sink is not None:
        state.sink(weights.detach())
    elif state is not None:
        state.pattern = weights.detach()
    return out, weights


AttentionInterface.register(ATTN_IMPLEMENTATION, _atlas_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


@dataclass
class Freeze:
    """Quantities held fixed during a hooked run (from an earlier record of the same prompt).

    patterns: [n_layers, n_heads, n_pos, n_pos], a tensor or a :class:`PatternSource` (read one
    layer at a time, as each layer runs); scales: norm name -> [n_layers(, +1), n_pos]
    (``final_norm`` is [n_pos]). Absent entries stay live.
    """

    patterns: torch.Tensor | PatternSource | None = None
    scales: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class HookedRun:
    """What one hooked forward pass recorded. Tensors keep the batch dimension first."""

    logits: torch.Tensor  # [B, n_pos, vocab]
    sites: dict[str, torch.Tensor]  # site -> [B, n_layers, n_pos, d] (resid_final: [B, n_pos, d])
    patterns: torch.Tensor | None  # [B, n_layers, n_heads, n_pos, n_pos]
    scales: dict[str, torch.Tensor]  # norm -> [B, n_layers, n_pos] (final_norm: [B, n_pos])


def _first_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _replace_first(args, kwargs, value):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _check_freeze(freeze: Freeze, n_layers: int, n_pos: int) -> None:
    """Shapes of frozen quantities, checked up front so a mismatch is a clear error rather than
    a broadcasting failure (or a silent broadcast) deep inside the forward pass."""
    pat = freeze.patterns
    if pat is not None and (len(pat.shape) not in (4, 5) or pat.shape[0] != n_layers):
        raise ValueError(
            f"frozen patterns have shape {tuple(pat.shape)}, expected [n_layers={n_layers}, "
            "n_heads, n_pos, n_pos]: pass one prompt's record, e.g. run.patterns[0]"
        )
    for name, s in freeze.scales.items():
        if name not in NORMS:
            raise ValueError(
                f"unknown norm {name!r} in frozen scales; norms are {', '.join(NORMS)}"
            )
        want = "[n_pos]" if name == "final_norm" else f"[n_layers={n_layers}, n_pos]"
        per_layer_ok = name == "final_norm" or (s.dim() >= 2 and s.shape[0] == n_layers)
        if not per_layer_ok or s.dim() == 0 or s.shape[-1] != n_pos:
            raise ValueError(
                f"frozen {name} scales have shape {tuple(s.shape)}, expected {want} with "
                f"n_pos={n_pos}: pass one prompt's record, e.g. {{k: v[0] for k, v in "
                "run.scales.items()}"
            )


def run_hooked(
    hf_model: torch.nn.Module,
    arch: Architecture,
    input_ids: torch.Tensor,
    *,
    edits: Mapping[tuple[str, int], Edit] | None = None,
    freeze: Freeze | None = None,
    record: bool = True,
    record_sites: tuple[str, ...] = SITES,
    pattern_sink: Callable[[int, torch.Tensor], None] | None = None,
    qk_sink: Callable[[int, QKRecord], None] | None = None,
    logits_to_keep: int = 0,
) -> HookedRun:
    """One forward pass of ``hf_model`` on ``input_ids`` [B, n_pos] with hooks in place.

    ``edits[(site, layer)]`` maps the tensor at that site to its replacement (called in forward
    order, so an edit may read what earlier sites recorded; what it returns is cast to the site's
    dtype, so a float32 edit fits a bfloat16 model). ``freeze`` holds attention patterns and norm
    denominators fixed. Gradients flow unless the caller disables them. ``input_ids`` must be on
    the model's device (:meth:`LanguageModel.run` moves them).

    ``pattern_sink(layer, pattern [B, H, q, k])``: recorded attention patterns go here as each
    layer computes them, instead of being stacked into ``HookedRun.patterns`` (None then), so a
    long prompt never holds every layer's pattern at once. ``qk_sink(layer, QKRecord)``: what
    recomputes each layer's pattern goes there instead, and attention runs in blocks of query
    rows (``ATTENTION_BLOCK_BYTES``): no layer's whole pattern is formed (a no-op sink makes a
    forward whose memory grows linearly with the prompt). ``logits_to_keep``: compute logits
    for only the last that many positions (0: all; ``transformers``' argument).
    """
    edits = dict(edits or {})
    freeze = freeze or Freeze()
    for site in [s for s, _ in edits] + list(record_sites):
        if site not in SITES:
            raise ValueError(f"unknown hook site {site!r}; sites are {', '.join(SITES)}")
    layers = get_module(hf_model, arch.layers)
    n_layers = len(layers)
    for site, layer in edits:
        top = n_layers if site == "resid_final" else n_layers - 1
        if not 0 <= layer <= top:
            raise ValueError(f"layer {layer} out of range for site {site!r} (0..{top})")

    _check_freeze(freeze, n_layers, input_ids.shape[-1])

    got: dict[str, list] = {s: [None] * n_layers for s in SITES if s != "resid_final"}
    got["resid_final"] = [None]
    scales: dict[str, list] = {n: [None] * n_layers for n in NORMS if n != "final_norm"}
    scales["final_norm"] = [None]
    attn_states = []
    shared_masks: dict = {}

    def at_site(site: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        fn = edits.get((site, layer))
        if fn is not None:
            y = fn(x)
            # A wrong shape would fail deep in the layer (or broadcast silently): say so here.
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                what = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(
                    f"edit at ({site!r}, {layer}) returned {what}; it must return a tensor shaped "
                    f"like its input {tuple(x.shape)} [batch, n_pos, d_model] (use expand_as)"
                )
            # Edits may compute in float32 (transcoder reconstructions, frozen quantities): the
            # model continues in its own dtype.
            x = y if y.dtype == x.dtype else y.to(x.dtype)
        if record and site in record_sites:
            got[site][0 if site == "resid_final" else layer] = x.detach()
        return x

    def pre_hook(site, layer):
        def hook(module, args, kwargs):
            x = _first_arg(args, kwargs)
            y = at_site(site, layer, x)
            return None if y is x else _replace_first(args, kwargs, y)

        return hook

    def out_hook(site, layer):
        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            y = at_site(site, layer, x)
            if y is x:
                return None
            return (y, *output[1:]) if isinstance(output, tuple) else y

        return hook

    def norm_hook(name, layer):
        frozen = freeze.scales.get(name)
        idx = 0 if name == "final_norm" else layer

        def hook(module, args, output):
            x = args[0]
            if record:
                scales[name][idx] = norm_scale(arch.norm_kind, module, x.detach())
            if frozen is None:
                return None
            s = frozen if name == "final_norm" else frozen[layer]
            return frozen_norm(arch.norm_kind, module, x, s.to(x.device))

        return hook

    with ExitStack() as stack:

        def add(handle):
            stack.callback(handle.remove)

        for l, layer in enumerate(layers):
            add(layer.register_forward_pre_hook(pre_hook("resid_pre", l), with_kwargs=True))
            # Norm hooks first: Gemma's attn_out/mlp_out sites are the outputs of its post-norms,
            # so a frozen-scale norm must produce its output before the site hook reads or edits
            # it (forward hooks on one module run in registration order).
            for name in ("attn_norm", "attn_out_norm", "mlp_norm", "mlp_out_norm"):
                path = getattr(arch, name)
                if path:
                    add(get_module(layer, path).register_forward_hook(norm_hook(name, l)))
            attn = get_module(layer, arch.attn)
            state = _AttnState()
            if isinstance(freeze.patterns, torch.Tensor):
                state.frozen = freeze.patterns[l]
            elif freeze.patterns is not None:
                state.frozen_at = lambda src=freeze.patterns, l=l: src.pattern(l)
            if record and qk_sink is not None:
                state.qk_sink = lambda r, l=l: qk_sink(l, r)
                state.block_bytes = ATTENTION_BLOCK_BYTES
                state.masks = shared_masks
            elif record and pattern_sink is not None:
                state.sink = lambda p, l=l: pattern_sink(l, p)
            attn._atlas_state = state
            attn_states.append(state)
            stack.callback(setattr, attn, "_atlas_state", None)
            out_mod = get_module(layer, arch.attn_out_norm) if arch.attn_out_norm else attn
            add(out_mod.register_forward_hook(out_hook("attn_out", l)))
            mlp_norm = get_module(layer, arch.mlp_norm)
            add(mlp_norm.register_forward_pre_hook(pre_hook("resid_mid", l), with_kwargs=True))
            mlp = get_module(layer, arch.mlp)
            add(mlp.register_forward_pre_hook(pre_hook("mlp_in", l), with_kwargs=True))
            mlp_out_mod = get_module(layer, arch.mlp_out_norm) if arch.mlp_out_norm else mlp
            add(mlp_out_mod.register_forward_hook(out_hook("mlp_out", l)))
        final = get_module(hf_model, arch.final_norm)
        add(final.register_forward_pre_hook(pre_hook("resid_final", n_layers), with_kwargs=True))
        add(final.register_forward_hook(norm_hook("final_norm", n_layers)))
        kw = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        logits = hf_model(input_ids=input_ids, use_cache=False, **kw).logits

    sites = {}
    for s in list(got):
        vals = got.pop(s)  # one site's per-layer records at a time beside the stacked ones
        if all(v is not None for v in vals):
            sites[s] = vals[0] if s == "resid_final" else torch.stack(vals, dim=1)
        del vals
    out_scales = {}
    for n, vals in scales.items():
        if all(v is not None for v in vals):
            out_scales[n] = vals[0] if n == "final_norm" else torch.stack(vals, dim=1)
    patterns = None
    if record and all(s.pattern is not None for s in attn_states):
        patterns = torch.stack([s.pattern for s in attn_states], dim=1)
    return HookedRun(logits=logits, sites=sites, patterns=patterns, scales=out_scales)
