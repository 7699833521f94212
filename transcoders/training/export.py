"""The trained transcoder as an ordinary :class:`CrossLayerTranscoder`: normalisation folded
in, frozen, float32 on the CPU; written with the project's weight formats."""

from __future__ import annotations

from pathlib import Path

from transcoders.clt import CrossLayerTranscoder
from transcoders.normalize import Normalizer, fold
from transcoders.training.trainable import TrainableTranscoder


def export(model: TrainableTranscoder, norm: Normalizer, extra: dict | None = None):
    """The trained transcoder as a CrossLayerTranscoder with normalisation folded in, frozen,
    on the CPU in float32 (whatever device it was trained on)."""
    out = fold(model.to_clt(), Normalizer(norm.in_scale.cpu(), norm.out_scale.cpu()))
    out.cfg.training = {**out.cfg.training, **(extra or {})}
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def save_export(clt: CrossLayerTranscoder, folder: Path) -> Path:
    """Write the exported weights with the project's format functions when present, else as a
    single safetensors file plus ``circuit_atlas.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from transcoders.formats import save_transcoder  # written by the formats module
    except ImportError:
        save_transcoder = None
    if save_transcoder is not None:
        save_transcoder(clt, folder, overwrite=True)
        return folder
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in clt.state_dict().items()}
    save_file(tensors, str(folder / "transcoder.safetensors"))
    (folder / "circuit_atlas.json").write_text(clt.cfg.to_json())
    return folder
