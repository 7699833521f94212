"""TransformerLens hook names (used by circuit-tracer and SAELens configs) <-> our input sites.

``resid_mid`` is the residual stream between attention and the MLP's norm
(TransformerLens ``hook_resid_mid``); ``mlp_in`` is the MLP's actual input, after that norm
(``mlp.hook_in``). ``ln2.hook_normalized`` is that norm's output *before* its elementwise gain
g (TransformerLens's norms apply ``hook_normalized`` to x / rms(x), then multiply by g; and
circuit-tracer loads models unfolded): a transcoder reading it reads ``mlp_in / g``, which is an
``mlp_in`` transcoder once g is folded into its encoder (``W_enc / g``, see
``transcoders.formats.fold_input_gain``; the model supplies g). A transcoder always writes what
the MLP adds to the residual stream (``hook_mlp_out`` / ``mlp.hook_out``).

Where each hook sits in each architecture row (``tracer.architectures``), as circuit-tracer's
TransformerLens <-> Hugging Face mapping places them (``HOOKS_BY_ARCHITECTURE``):

- ``llama`` row (Llama, Qwen2, Qwen3, Mistral): ``hook_resid_mid`` = input of
  ``post_attention_layernorm``; ``mlp.hook_in`` = its output; ``hook_mlp_out`` = ``mlp.hook_out``
  = the output of ``mlp``.
- ``gemma`` row (Gemma-2, Gemma-3): ``hook_resid_mid`` = input of ``pre_feedforward_layernorm``;
  ``mlp.hook_in`` = its output; ``ln2.hook_normalized`` = its output before the (1 + w) gain;
  ``hook_mlp_out`` = the output of ``post_feedforward_layernorm`` (what the MLP block adds;
  ``mlp.hook_out``, before that norm, is not what a transcoder here writes).

Published sets: GemmaScope (Gemma-2) reads ``ln2.hook_normalized``; circuit-tracer's CLTs read
``hook_resid_mid`` by default; Qwen3 and Gemma Scope 2 sets read ``mlp.hook_in`` (each set's
config.yaml says which).
"""

from __future__ import annotations

import re

from transcoders.clt import InputSite
from transcoders.formats.files import TranscoderFormatError

# Hook suffix -> input site. The first entry for each site is the one we write: ``mlp.hook_in``
# is the MLP's input in TransformerLens whether or not it folds the norm's gain (circuit-tracer
# loads models unfolded, where ``ln2.hook_normalized`` is the input before the gain).
INPUT_HOOKS: dict[str, InputSite] = {
    "hook_resid_mid": "resid_mid",
    "mlp.hook_in": "mlp_in",
    "ln2.hook_normalized": "mlp_in",
}
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
# Hooks that read the MLP-input norm's output before its elementwise gain (see the module doc).
BEFORE_GAIN_HOOKS = ("ln2.hook_normalized",)
# Hook -> the module (of one decoder layer) and which side of it, per architecture row.
HOOKS_BY_ARCHITECTURE: dict[str, dict[str, str]] = {
    "llama": {
        "hook_resid_mid": "input of post_attention_layernorm",
        "mlp.hook_in": "output of post_attention_layernorm",
        "ln2.hook_normalized": "output of post_attention_layernorm before its gain",
        "hook_mlp_out": "output of mlp",
        "mlp.hook_out": "output of mlp",
    },
    "gemma": {
        "hook_resid_mid": "input of pre_feedforward_layernorm",
        "mlp.hook_in": "output of pre_feedforward_layernorm",
        "ln2.hook_normalized": "output of pre_feedforward_layernorm before its (1 + w) gain",
        "hook_mlp_out": "output of post_feedforward_layernorm",
        # mlp.hook_out is the MLP before post_feedforward_layernorm: no published set writes it.
    },
}
OUTPUT_HOOK = "hook_mlp_out"

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def input_hook(site: InputSite) -> str:
    """The hook name (without ``blocks.{layer}.``) that reads ``site``."""
    return next(h for h, s in INPUT_HOOKS.items() if s == site)


def split_hook(name: str) -> tuple[int | None, str]:
    """``blocks.3.hook_resid_mid`` -> (3, "hook_resid_mid"); ``hook_resid_mid`` -> (None, ...)."""
    m = _BLOCK.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def site_of_hook(name: str, where: str) -> InputSite:
    """Input site read by hook ``name`` (with or without ``blocks.{layer}.``)."""
    _, hook = split_hook(name)
    if hook not in INPUT_HOOKS:
        raise TranscoderFormatError(
            f"{where} reads hook {name!r}, which is not an MLP input; transcoders here read "
            f"one of {sorted(INPUT_HOOKS)} (pass input_site='resid_mid' or 'mlp_in' to load it "
            "anyway)"
        )
    return INPUT_HOOKS[hook]


def check_output_hook(name: str, where: str) -> None:
    _, hook = split_hook(name)
    if hook not in OUTPUT_HOOKS:
        raise TranscoderFormatError(
            f"{where} writes hook {name!r}, but a transcoder here must write the MLP output "
            f"({' or '.join(OUTPUT_HOOKS)}): it is not an MLP transcoder"
        )


def reads_before_gain(name: str | None) -> bool:
    """Whether hook ``name`` reads the MLP-input norm's output before its gain."""
    return name is not None and split_hook(str(name))[1] in BEFORE_GAIN_HOOKS
