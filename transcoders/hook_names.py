"""TransformerLens hook names (used by circuit-tracer and SAELens configs) <-> our input sites.

``resid_mid`` is the residual stream between attention and the MLP's norm
(TransformerLens ``hook_resid_mid``); ``mlp_in`` is the MLP's actual input, after that norm
(``ln2.hook_normalized``, or ``mlp.hook_in`` for models with a separate pre-MLP norm). A
transcoder always writes what the MLP adds to the residual stream (``hook_mlp_out``).
"""

from __future__ import annotations

import re

from transcoders.clt import InputSite
from transcoders.io_files import TranscoderFormatError

# Hook suffix -> input site. The first entry for each site is the one we write: ``mlp.hook_in``
# is the MLP's input in TransformerLens whether or not it folds the norm's gain (circuit-tracer
# loads models unfolded, where ``ln2.hook_normalized`` is the input before the gain).
INPUT_HOOKS: dict[str, InputSite] = {
    "hook_resid_mid": "resid_mid",
    "mlp.hook_in": "mlp_in",
    "ln2.hook_normalized": "mlp_in",
}
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
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
