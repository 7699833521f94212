"""The benchmarks' random CLT: random weights (``transcoders.random_init``) whose thresholds
are calibrated on a real model so that about ``active`` features fire per layer and token,
written in circuit-tracer's layout so both engines load the same files.

One recipe for every benchmark (attribution, conventions, memory, ranks, validation): a CLT
made with the same settings is the same CLT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tracer.model import LanguageModel, truncate_layers
from transcoders.clt import CrossLayerTranscoder, TranscoderConfig
from transcoders.formats import save_transcoder
from transcoders.random_init import RandomInit, random_transcoder

CALIBRATION_TEXT = (
    "The capital of the state containing Dallas is, in a quiet voice, the thing we know."
)


def calibrated_random_clt(
    model: LanguageModel,
    n_features: int,
    active: float,
    *,
    seed: int = 0,
    text: str = CALIBRATION_TEXT,
) -> CrossLayerTranscoder:
    """A random CLT for ``model`` (all its layers, MLP-input site): encoder rows of norm about
    1, decoders of std 0.02, no biases, and per layer the threshold at which ``active`` of the
    ``n_features`` features fire on average over ``text`` (start token left out)."""
    f = model.facts
    cfg = TranscoderConfig(
        n_layers=f.n_layers,
        d_model=f.d_model,
        n_features=n_features,
        input_site="mlp_in",
        model_name=f"{f.name}-random",
    )
    init = RandomInit(
        enc_std=1.0 / f.d_model**0.5, b_enc_std=0.0, threshold=(0.0, 0.0), b_dec_std=0.0,
        dec_std=0.02,
    )  # fmt: skip
    clt = random_transcoder(cfg, seed=seed, init=init)
    with torch.no_grad():
        x = model.run(model.tokenize(text)).sites["mlp_in"][0]  # [L, P, d]
        for l in range(f.n_layers):
            pre = x[l, 1:].float() @ clt.W_enc[l].T  # [P-1, F]
            clt.threshold[l] = torch.quantile(pre, 1 - active / n_features, dim=1).mean()
    return clt


def write_random_clt(
    out: Path,
    n_layers: int | None,
    seed: int,
    n_features: int,
    active: float,
    model: str = "smollm2",
) -> Path:
    """:func:`calibrated_random_clt` for the built-in ``model`` (cut to ``n_layers`` when
    given), written once to ``out`` in circuit-tracer's layout; returns ``out``."""
    out = Path(out)
    if (out / "config.yaml").exists():
        return out
    m = LanguageModel.load(model)
    if n_layers:
        m = truncate_layers(m, n_layers)
    clt = calibrated_random_clt(m, n_features, active, seed=seed)
    clt.cfg.model_name = f"{model}-random"
    save_transcoder(clt, out, format="circuit-tracer")
    # Our writer names the MLP input 'ln2.hook_normalized'. In TransformerLens (fold_ln=False,
    # as circuit-tracer loads models) that hook is x / rms(x) BEFORE the norm's gain, not the
    # MLP's input; 'mlp.hook_in' (circuit-tracer's MLP wrapper) is the MLP's actual input, the
    # same quantity as our site 'mlp_in'. Both loaders accept that name.
    yaml_path = out / "config.yaml"
    text = yaml_path.read_text().replace(
        "feature_input_hook: ln2.hook_normalized", "feature_input_hook: mlp.hook_in"
    )
    yaml_path.write_text(text)
    return out
