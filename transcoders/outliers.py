"""Massive MLP outputs: which positions they are, and how training handles them.

What SmolLM2-135M-Instruct does (``scripts/measure_outliers.py``: 192 training and 32 held-out
sequences of the public corpus, 128 tokens, each row starting with the start token; norms are
``||mlp_out||`` per (layer, position), as a ratio to the layer's median over non-start positions):

- **The start token** (position 0): 813x the median at layer 11, 74x at layer 28, 17-28x at
  layers 1, 2 and 9. The trainer already drops it (``TrainConfig.skip_bos``); the spliced model
  keeps the model's own MLP there.
- **The first real token** (position 1), sometimes: in 7 of 192 training rows its layer-11
  output is 146-585x the median (' solemn', ' hath', ' rod', ...), and those rows' first tokens
  are 40-70x at layer 28 too; in the 32 held-out rows one is 445x (' speak', 67x at layer 28).
  Such a position is a second attention sink. One of them holds 97% of layer 11's held-out
  squared norm (the top 1% of positions by norm: 97.8% of the squared norm, 89% of a ridge fit's
  squared error), which is why layer 11's NMSE was 4.4 when other layers were 0.1-0.6.
- **Specific frequent tokens**: ' the' and ' ' at layers 1, 2, 9, 10 (up to 50x at layer 2, where
  about 1.4% of positions are 20-50x). These are systematic, learnable outputs (layer 2's NMSE
  is 0.10) and must stay in the loss.

The rule (``TrainConfig.outlier_rule = "ratio"``, ``outlier_factor = 50``): a position is an
outlier at layer l when its MLP-output norm exceeds ``factor`` x the layer's median norm. It
catches the start token at layers 11 and 28 and the massive first tokens, and keeps ' the'
(at most 49.9x in 24,384 non-start training positions; factor 20 would drop 346 of them and
raise layer 2's held-out ridge NMSE from 0.225 to 0.528). ``"mad"`` (median + factor x median
absolute deviation) is the alternative; ``"none"`` turns the handling off. The first-token
outliers are rare (7 of 24,384 non-start training positions, at layers 11 and 28 only), so
the loss loses almost nothing else.

What can be done with outliers (the thresholds are fixed from the first harvested buffer, in
raw units, saved in the checkpoint); ``TrainConfig.outlier_uses`` names which, the loss alone by
default. Measured on SmolLM2 (``scripts/bench_training.py --variant``, README "Training
transcoders", ``benchmarks/training_outlier_parts.md``: one 109k-token cache, 600 steps each),
the robust skip fit costs the demo graphs' replacement score 0.13-0.15 (0.454 with it alone,
0.600 with the loss alone, 0.588 with no handling), while the loss weight and the scales cost
nothing there:

- ``loss``: excluded from the reconstruction loss (weight ``outlier_weight``, default 0) and from
  the AuxK residual: one 500x position has the squared-error weight of 250,000 ordinary tokens;
- ``skip``: excluded from the ridge fit that starts the skip connection (a weighted fit): on
  layers 11 and 28 the held-out NMSE over inlier positions of the fit from all 24,384 non-start
  training positions was 4.29 and 0.68, of the fit without the 7 and 6 outlier positions 0.48
  and 0.41. The price: over all non-start held-out positions (the one 445x position included)
  the robust fit scores 0.97 and 0.70 against 0.67 and 0.52, since it no longer chases that one
  position; no other layer has an outlier at factor 50, so no other layer changes;
- ``scales``: excluded from the per-layer normalisation scales: the outliers among the first
  8,192 training positions inflate layer 11's mean squared output norm 13-fold (layer 28:
  1.7-fold), so that layer's ordinary positions count 1/13 as much as other layers' in the
  summed loss.

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
    :class:`~transcoders.stream.ShuffleBuffer` stores them): each shard's thresholds, averaged
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
