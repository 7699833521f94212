"""An independent reference for the hook tests: plain PyTorch module hooks and a hand-written
layer loop, written from the transformers modeling files and NOT from tracer/architectures.py or
tracer/hooks.py, so a wrong table row or a misplaced hook cannot agree with itself."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """Module names of one family, restated by hand (decoder-layer relative unless noted)."""

    body: str  # the *Model inside *ForCausalLM
    layers: str  # in body
    final: str  # in body
    attn: str
    attn_norm: str
    mlp_norm: str
    mlp: str
    post_attn: str | None = None  # Gemma's norm on attention's output
    post_mlp: str | None = None  # Gemma's norm on the MLP's output
    norm: str = "rms"  # rms: x*w; rms1: x*(1+w); layernorm: centred, x*w+b
    eps: str = "rms_norm_eps"


LLAMA = Layout("model", "layers", "norm", "self_attn", "input_layernorm",
               "post_attention_layernorm", "mlp")  # fmt: skip
GEMMA = Layout("model", "layers", "norm", "self_attn", "input_layernorm",
               "pre_feedforward_layernorm", "mlp", post_attn="post_attention_layernorm",
               post_mlp="post_feedforward_layernorm", norm="rms1")  # fmt: skip
GPT2 = Layout("transformer", "h", "ln_f", "attn", "ln_1", "ln_2", "mlp", norm="layernorm",
              eps="layer_norm_epsilon")  # fmt: skip

LAYOUTS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
           "gemma2": GEMMA, "gemma3_text": GEMMA, "gpt2": GPT2}  # fmt: skip


def layout(hf) -> Layout:
    return LAYOUTS[hf.config.model_type]


def body(hf):
    return getattr(hf, layout(hf).body)


def decoder_layers(hf):
    return getattr(body(hf), layout(hf).layers)


def eager_copy(hf):
    """A separate copy of the model running transformers' own eager attention."""
    twin = copy.deepcopy(hf)
    twin.set_attn_implementation("eager")
    return twin.eval()


def hand_norm(
    hf, x: torch.Tensor, module, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm computed by hand: (output [..., d], denominator 1/sqrt(var + eps) [...]).

    With ``scale`` given, that denominator is used instead of the one ``x`` implies."""
    lay = layout(hf)
    eps = getattr(hf.config, lay.eps)
    x = x.float()
    w = module.weight.float()
    if lay.norm == "layernorm":
        xc = x - x.mean(-1, keepdim=True)
        live = 1.0 / torch.sqrt((xc * xc).mean(-1) + eps)
        s = live if scale is None else scale
        return xc * s[..., None] * w + module.bias.float(), live
    live = 1.0 / torch.sqrt((x * x).mean(-1) + eps)
    s = live if scale is None else scale
    gain = 1.0 + w if lay.norm == "rms1" else w
    return x * s[..., None] * gain, live


def _input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def independent_record(hf, ids: torch.Tensor) -> dict:
    """Run ``hf`` (eager attention) with plain forward hooks placed by hand.

    Returns: logits, hidden_states (HF's own output_hidden_states), attentions (HF's
    output_attentions, [B, L, H, P, P]), and per layer ``io[(name, l)] = (input, output)`` of
    the norms, attention and MLP, plus ``io[("final", 0)]``.
    """
    lay = layout(hf)
    io: dict = {}
    handles = []

    def keep(key):
        def hook(module, args, kwargs, out):
            o = out[0] if isinstance(out, tuple) else out
            io[key] = (_input(args, kwargs).detach(), o.detach())

        return hook

    for l, layer in enumerate(decoder_layers(hf)):
        for name in ("attn", "attn_norm", "mlp_norm", "mlp", "post_attn", "post_mlp"):
            path = getattr(lay, name)
            if path:
                mod = getattr(layer, path)
                handles.append(mod.register_forward_hook(keep((name, l)), with_kwargs=True))
    final = getattr(body(hf), lay.final)
    handles.append(final.register_forward_hook(keep(("final", 0)), with_kwargs=True))
    try:
        with torch.no_grad():
            out = hf(input_ids=ids, output_hidden_states=True, output_attentions=True,
                     use_cache=False)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return {
        "logits": out.logits,
        "hidden_states": out.hidden_states,
        "attentions": torch.stack(out.attentions, dim=1),
        "io": io,
    }


def expected_sites(hf, ref: dict) -> dict[str, torch.Tensor]:
    """The six sites as the independent record sees them ([B, L, P, d]; resid_final [B, P, d])."""
    lay = layout(hf)
    io = ref["io"]
    n = len(decoder_layers(hf))
    attn_key = "post_attn" if lay.post_attn else "attn"
    mlp_key = "post_mlp" if lay.post_mlp else "mlp"
    per_layer = {
        "resid_pre": [ref["hidden_states"][l] for l in range(n)],
        "attn_out": [io[(attn_key, l)][1] for l in range(n)],
        "resid_mid": [io[("mlp_norm", l)][0] for l in range(n)],
        "mlp_in": [io[("mlp", l)][0] for l in range(n)],
        "mlp_out": [io[(mlp_key, l)][1] for l in range(n)],
    }
    sites = {k: torch.stack(v, dim=1) for k, v in per_layer.items()}
    sites["resid_final"] = io[("final", 0)][0]
    return sites


def causal_mask(n_pos: int, window: int | None, dtype=torch.float32) -> torch.Tensor:
    """Additive mask [1, 1, P, P]: key k visible from query q when k <= q (and q - k < window)."""
    q = torch.arange(n_pos)[:, None]
    k = torch.arange(n_pos)[None, :]
    ok = k <= q
    if window is not None:
        ok &= k > q - window
    mask = torch.zeros(n_pos, n_pos, dtype=dtype)
    mask[~ok] = torch.finfo(dtype).min
    return mask[None, None]


def forward_from(hf, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Logits [B, P, vocab] from the residual stream ``hidden`` [B, P, d] entering layer
    ``start``: a hand-written loop over the decoder layers with hand-built masks and positions,
    then the final norm, the unembedding and (Gemma) the final logit soft-cap."""
    cfg = hf.config
    lay = layout(hf)
    n_pos = hidden.shape[1]
    pos = torch.arange(n_pos)[None]
    h = hidden
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(hf)):
            if i < start:
                continue
            types = getattr(cfg, "layer_types", None)
            ltype = types[i] if types else "full_attention"
            window = cfg.sliding_window if ltype == "sliding_attention" else None
            if cfg.model_type == "mistral":
                window = cfg.sliding_window
            mask = causal_mask(n_pos, window)
            if cfg.model_type == "gpt2":
                out = layer(h, attention_mask=mask)
            else:
                rotary = body(hf).rotary_emb
                rot = rotary(h, pos, ltype) if cfg.model_type == "gemma3_text" else rotary(h, pos)
                out = layer(h, attention_mask=mask, position_embeddings=rot, position_ids=pos)
            h = out[0] if isinstance(out, tuple) else out
        logits = hf.lm_head(getattr(body(hf), lay.final)(h))
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    return logits
