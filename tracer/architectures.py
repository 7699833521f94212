"""The one table of architecture facts.

Each row says, as data, where a Hugging Face causal LM keeps the pieces the engine reads and
overrides: the decoder layers, the norms in front of attention and the MLP (and the extra
post-norms some families add), the value/output projections of attention, the MLP, the final
norm and the unembedding. Adding an architecture means adding a row here plus its exactness
test in ``tests/tracer/test_architectures.py``.

Module paths are dotted attribute paths: model-level ones from the ``*ForCausalLM`` root,
layer-level ones from one decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

NormKind = Literal["rms", "rms_offset", "layernorm"]


@dataclass(frozen=True)
class Architecture:
    """Where one family keeps its parts. ``None`` means the family has no such module."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    final_norm: str
    unembed: str
    attn: str
    attn_norm: str
    mlp_norm: str
    mlp: str
    # How the value and output projections are stored (see ``value_output_weights``).
    attn_weights: Literal["separate", "gpt2_fused"] = "separate"
    norm_kind: NormKind = "rms"
    attn_out_norm: str | None = None  # Gemma-2/3: norm applied to attention's output
    mlp_out_norm: str | None = None  # Gemma-2/3: norm applied to the MLP's output
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    fused_qkv: str = "c_attn"
    fused_o: str = "c_proj"


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers="model.layers",
        final_norm="model.norm",
        unembed="lm_head",
        attn="self_attn",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        mlp="mlp",
    ),
    Architecture(
        name="gemma",
        model_types=("gemma2", "gemma3_text"),
        layers="model.layers",
        final_norm="model.norm",
        unembed="lm_head",
        attn="self_attn",
        attn_norm="input_layernorm",
        attn_out_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        mlp="mlp",
        mlp_out_norm="post_feedforward_layernorm",
        norm_kind="rms_offset",
    ),
    Architecture(
        name="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        mlp="mlp",
        attn_weights="gpt2_fused",
        norm_kind="layernorm",
    ),
)


class UnsupportedArchitectureError(ValueError):
    """The model's ``config.model_type`` has no row in :data:`ARCHITECTURES`."""


def architecture_for(model_type: str) -> Architecture:
    """Row of the table for a ``config.model_type``; a clear error names the supported ones."""
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    supported = sorted(t for a in ARCHITECTURES for t in a.model_types)
    raise UnsupportedArchitectureError(
        f"unknown architecture {model_type!r}: circuit-atlas supports {', '.join(supported)}. "
        "Add a row to tracer/architectures.py (plus its exactness test) to support another."
    )


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Follow a dotted attribute path from ``root``."""
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


# --- norms -------------------------------------------------------------------------------------


def norm_eps(norm: torch.nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise AttributeError(f"cannot find the epsilon of norm module {type(norm).__name__}")


def norm_gain(kind: NormKind, norm: torch.nn.Module) -> torch.Tensor:
    """Effective elementwise gain ``g`` of a norm: y = g * (centred x) * scale + bias. [d]."""
    w = norm.weight.detach().float()
    return 1.0 + w if kind == "rms_offset" else w


def norm_scale(kind: NormKind, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The data-dependent denominator the engine freezes: 1/sqrt(var + eps). x [..., d] -> [...]."""
    xf = x.float()
    if kind == "layernorm":
        var = xf.var(dim=-1, unbiased=False)
    else:
        var = xf.pow(2).mean(dim=-1)
    return torch.rsqrt(var + norm_eps(norm))


def norm_center(kind: NormKind, x: torch.Tensor) -> torch.Tensor:
    """The linear part of a norm before scaling: mean removal for LayerNorm, identity for RMS."""
    return x - x.mean(dim=-1, keepdim=True) if kind == "layernorm" else x


def frozen_norm(
    kind: NormKind, norm: torch.nn.Module, x: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Apply a norm with its denominator frozen to ``scale`` [...]: affine in x [..., d]."""
    # Scale before gain: the order HF's RMS norms use, so a frozen-at-recorded norm is bit-exact.
    y = norm_gain(kind, norm) * (norm_center(kind, x.float()) * scale.unsqueeze(-1))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        y = y + bias.detach().float()
    return y.to(x.dtype)


# --- attention weights ------------------------------------------------------------------------


def value_output_weights(arch: Architecture, attn: torch.nn.Module, d_model: int):
    """Value and output projections of one attention module, as plain matrices.

    Returns ``(W_V [n_kv_heads * d_head, d_model], W_O [d_model, n_heads * d_head])`` such that
    v = h @ W_V.T (+ bias) and out = z @ W_O.T (+ bias). Biases only add constants, which no
    attribution edge carries, so they are not returned.
    """
    if arch.attn_weights == "gpt2_fused":
        # GPT-2's Conv1D stores weights as [in, out]; the fused projection is [q | k | v].
        qkv = get_module(attn, arch.fused_qkv).weight.detach()
        w_v = qkv[:, 2 * d_model : 3 * d_model].T
        w_o = get_module(attn, arch.fused_o).weight.detach().T
    else:
        w_v = get_module(attn, arch.v_proj).weight.detach()
        w_o = get_module(attn, arch.o_proj).weight.detach()
    return w_v.float().contiguous(), w_o.float().contiguous()
