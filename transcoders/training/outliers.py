"""Massive MLP outputs: which positions count as outliers, and where training leaves them out.

Some positions get MLP outputs hundreds of times the typical norm (on SmolLM2: the start token,
sometimes the first real token, a second attention sink). One such position outweighs
thousands of ordinary tokens in a squared-error loss, so the trainer can leave them out.

The rule (``TrainConfig.outlier_rule``): ``"ratio"`` (default, ``outlier_factor`` 50) marks a
(layer, position) whose MLP-output norm exceeds factor x the layer's median norm; ``"mad"``
uses median + factor x the median absolute deviation; ``"none"`` turns it off. Thresholds are
fixed from the first harvested buffer, in raw units, and saved in the checkpoint.

Where it acts (``TrainConfig.outlier_uses``, the loss alone by default):

- ``loss``: outliers weigh ``outlier_weight`` (default 0) in the reconstruction and AuxK losses;
- ``skip``: left out of the ridge fit that starts the skip connection;
- ``scales``: left out of the per-layer normalisation scales.

Why the factor is 50 and the default is the loss alone, with the measurements (which positions
SmolLM2's outliers are, what each use costs in NMSE and replacement score): docs/training.md
("Outliers and the start token") and benchmarks/outliers.md, training_outlier_parts.md.

Shapes: L layers, N positions, d = d_model. Everything runs on the tensors' device.
"""

from __future__ import annotations

from typing import Literal

import torch

OutlierRule = Literal["none", "ratio", "mad"]


def norm_thresholds(norms: torch.Tensor, rule: OutlierRule, factor: float) -> torch.Tensor:
    """Per-layer outlier thresholds [L] (units of ``norms``) from norms [L, N]: ``factor`` x the
    median (``ratio``), the median + ``factor`` x the median absolute deviation (``mad``), or
    +inf (``none``). Medians are torch's: the lower middle value of an even count."""
    if rule == "none":
        return torch.full(norms.shape[:1], float("inf"), dtype=torch.float32, device=norms.device)
    med = norms.float().median(dim=1).values
    if rule == "ratio":
        return factor * med
    if rule == "mad":
        mad = (norms.float() - med[:, None]).abs().median(dim=1).values
        return med + factor * mad
    raise ValueError(f"unknown outlier rule {rule!r}: use 'none', 'ratio' or 'mad'")


def output_norms(y: torch.Tensor) -> torch.Tensor:
    """[L, N, d] -> [L, N] Euclidean norms, float32."""
    return y.float().norm(dim=-1)


def outlier_mask(y: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """[L, N] bool: positions of y [L, N, d] whose norm exceeds the layer's threshold [L]."""
    return output_norms(y) > thresholds.to(y.device)[:, None]


def loss_weights(mask: torch.Tensor, outlier_weight: float = 0.0) -> torch.Tensor:
    """[L, N] float32 weights of the reconstruction loss: 1, or ``outlier_weight`` at outliers."""
    w = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
    return w.masked_fill(mask, outlier_weight)


def buffer_thresholds(
    outputs: list[torch.Tensor], rule: OutlierRule, factor: float, mean=None
) -> torch.Tensor:
    """Thresholds [L] from the first round's buffers, one per data shard (outputs [N, L, d] as a
    :class:`~transcoders.training.harvest.ShuffleBuffer` stores them): each shard's thresholds,
    averaged
    over the shards of this process and then by ``mean`` (the data-parallel all-reduce mean),
    so W ranks agree with one process holding all W shards."""
    per = torch.stack([norm_thresholds(output_norms(o.transpose(0, 1)), rule, factor)
                       for o in outputs])  # fmt: skip
    t = per.mean(0)
    if mean is not None and torch.isfinite(t).all():
        t = mean(t)
    return t


def position_stats(y: torch.Tensor, positions: torch.Tensor, factor: float = 50.0) -> dict:
    """Per-layer description of output norms (y [L, N, d] raw, positions [N] within each row):
    median over non-start positions, 99th percentile and max as ratios to it, the start
    token's and first token's median ratios, the share of the squared norm held by the top 1% of
    non-start positions, and the fraction of non-start positions above ``factor`` x median.
    Lists of length L (what ``scripts/measure_outliers.py`` prints)."""
    return norm_stats(output_norms(y), positions, factor)


def norm_stats(n: torch.Tensor, positions: torch.Tensor, factor: float = 50.0) -> dict:
    """:func:`position_stats` from output norms n [L, N]."""
    inner = positions > 0
    med = n[:, inner].median(dim=1).values
    r = n / med[:, None]
    ri = r[:, inner]
    sq = n[:, inner].pow(2)
    k = max(1, int(0.01 * sq.shape[1]))
    top = sq.topk(k, dim=1).values.sum(1) / sq.sum(1)

    def at(p):
        sel = positions == p
        return r[:, sel].median(dim=1).values if sel.any() else torch.full_like(med, float("nan"))

    out = {
        "median_norm": med,
        "p99_ratio": ri.quantile(0.99, dim=1),
        "max_ratio": ri.max(dim=1).values,
        "start_ratio": at(0),
        "first_ratio": at(1),
        "top1pct_sq_share": top,
        "frac_over_factor": (ri > factor).float().mean(1),
    }
    return {k: [round(float(v), 4) for v in t] for k, t in out.items()}


def batch_weights(
    y: torch.Tensor, thresholds: torch.Tensor, outlier_weight: float = 0.0
) -> torch.Tensor | None:
    """Loss weights [L, N] for a batch y [L, N, d] with thresholds [L] in y's units; None when
    no threshold is finite (rule ``none``: the plain loss)."""
    if not bool(torch.isfinite(thresholds).any()):
        return None
    return loss_weights(outlier_mask(y, thresholds), outlier_weight)
