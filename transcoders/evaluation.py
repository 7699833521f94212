"""Held-out evaluation of a transcoder during and after training: NMSE over three sets of
positions, L0 and dead features, per layer.

The held-out set is ``TrainConfig.n_heldout_seqs`` (default 32) corpus rows [S, P], each
starting with the start token, harvested with *every* position (p = 0 .. P-1).

**NMSE** of layer l over a set T of held-out positions (y: the model's MLP output at layer l,
yhat: the transcoder's reconstruction of it, mean_T(y): the mean of y over T):

    NMSE_l(T) = sum_{n in T} ||yhat_n - y_n||^2  /  sum_{n in T} ||y_n - mean_T(y)||^2

the fraction of the variance over T left unexplained (0 is perfect; 1 is no better than
predicting mean_T(y)). It is scale-free, so raw and normalised activations give the same value.
The mean NMSE is the unweighted mean over layers. Three sets T (per layer):

- ``nmse_all``: every held-out position, the start token included;
- ``nmse``: the start token excluded (p > 0). The headline figure: the trainer skips the start
  token (``skip_bos``), the spliced model keeps the model's own MLP there, and circuit-tracer's
  convention treats its error nodes as constants;
- ``nmse_inliers``: the start token and the layer's outliers excluded. Outliers are the
  positions whose ||y|| exceeds ``EVAL_OUTLIER_FACTOR`` x the layer's median ||y|| over the
  non-start held-out positions (the ``ratio`` rule of :mod:`transcoders.training.outliers`). The
  factor
  is fixed here, not taken from the training recipe, so runs with different recipes compare on
  the same positions. ``outlier_frac`` is the share of non-start positions left out per layer.

**L0**: mean number of active features per non-start held-out position. **dead_heldout**: the
share of features that fire at no non-start held-out position.

Shapes: L layers, N = S x P positions (row n is sequence n // P, position n % P), d = d_model,
F features per layer. Runs on the transcoder's device; sums are accumulated in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transcoders.metrics import fired_topk
from transcoders.training.harvest import ActivationFn, ShuffleBuffer
from transcoders.training.outliers import norm_thresholds, outlier_mask

EVAL_OUTLIER_FACTOR = 50.0
POSITION_SETS = ("nmse_all", "nmse", "nmse_inliers")


@dataclass
class Heldout:
    """Held-out activations with every position: raw inputs x, outputs y [L, N, d] (float32,
    on one device) and each row's position in its sequence, positions [N] (0: start token)."""

    x: torch.Tensor
    y: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def harvest(
        cls, activations: ActivationFn, tokens: torch.Tensor, batch: int = 8, device=None
    ) -> Heldout:
        """From ``activations(tokens [B, P]) -> (inputs, outputs)`` over tokens [S, P]."""
        buf = ShuffleBuffer.harvest(activations, tokens, batch=batch, skip_bos=False)
        x, y = buf.get(slice(None))
        positions = torch.arange(x.shape[1]) % tokens.shape[1]
        dev = x.device if device is None else device
        return cls(x.to(dev), y.to(dev), positions.to(dev))

    def masks(self, factor: float = EVAL_OUTLIER_FACTOR) -> dict[str, torch.Tensor]:
        """The positions of each NMSE variant, {name: [L, N] bool} (module doc)."""
        L, N = self.y.shape[:2]
        later = (self.positions > 0)[None].expand(L, N)
        thr = norm_thresholds(_norms_where(self.y, later), "ratio", factor)
        out = outlier_mask(self.y, thr)
        return {
            "nmse_all": torch.ones(L, N, dtype=torch.bool, device=self.y.device),
            "nmse": later,
            "nmse_inliers": later & ~out,
        }


def _norms_where(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Norms [L, n] of the kept positions (the same set in every layer)."""
    return y[:, keep[0]].float().norm(dim=-1)


class NMSESums:
    """Streaming NMSE over a position set per layer: sums of squared error, counts, sums of y
    and of ||y||^2 (float64), so chunks of any size give the two-pass value."""

    def __init__(self, n_layers: int, d: int, device=None):
        kw = {"dtype": torch.float64, "device": device}
        self.err = torch.zeros(n_layers, **kw)
        self.n = torch.zeros(n_layers, **kw)
        self.s1 = torch.zeros(n_layers, d, **kw)
        self.s2 = torch.zeros(n_layers, **kw)

    def add(self, pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
        """pred, y [L, n, d]; mask [L, n] bool."""
        m = mask.to(torch.float64)
        y64 = y.double()
        self.err += ((pred.double() - y64).pow(2).sum(-1) * m).sum(1)
        self.n += m.sum(1)
        self.s1 += (y64 * m[..., None]).sum(1)
        self.s2 += (y64.pow(2).sum(-1) * m).sum(1)

    def nmse(self) -> torch.Tensor:
        """[L] (NaN for a layer with no positions in the set)."""
        var = self.s2 - self.s1.pow(2).sum(-1) / self.n.clamp_min(1)
        out = self.err / var.clamp_min(1e-12)
        return out.masked_fill(self.n == 0, float("nan")).float()


@torch.no_grad()
def evaluate_heldout(
    model,
    held: Heldout,
    in_scale: torch.Tensor,
    out_scale: torch.Tensor,
    activation: str,
    topk: int | None = None,
    bandwidth: float = 0.1,
    chunk: int = 512,
) -> dict[str, torch.Tensor]:
    """Metrics of a :class:`~transcoders.training.trainable.TrainableTranscoder` (trained on
    activations
    scaled by in_scale, out_scale [L]) on ``held``: {``nmse_all``, ``nmse``, ``nmse_inliers``,
    ``outlier_frac``, ``l0``: [L] float; ``fired``: [L, F] bool} (module doc)."""
    L, N, d = held.y.shape
    dev = held.y.device
    masks = held.masks()
    sums = {k: NMSESums(L, d, dev) for k in POSITION_SETS}
    fired = torch.zeros(L, model.cfg.n_features, dtype=torch.bool, device=dev)
    l0_sum = torch.zeros(L, dtype=torch.float64, device=dev)
    si, so = in_scale.to(dev)[:, None, None], out_scale.to(dev)[:, None, None]
    for s in range(0, N, chunk):
        sl = slice(s, s + chunk)
        xc, yc = held.x[:, sl] * si, held.y[:, sl] * so
        later = held.positions[sl] > 0
        pre = model.pre_activations(xc)
        if activation == "topk":
            idx, vals = model.topk(pre, topk)
            recon = model.decode_sparse(idx, vals, xc)
            fired |= fired_topk(idx[:, later], vals[:, later], model.cfg.n_features)
            l0_sum += (vals[:, later] > 0).sum((1, 2)).double()
        else:
            acts = model.activate(pre, bandwidth)
            recon = model.decode_dense(acts, xc)
            fired |= (acts[:, later] > 0).any(1)
            l0_sum += (acts[:, later] > 0).sum((1, 2)).double()
        for k in POSITION_SETS:
            sums[k].add(recon, yc, masks[k][:, sl])
    n_later = masks["nmse"].sum(1).clamp_min(1)
    out = {k: sums[k].nmse() for k in POSITION_SETS}
    out["outlier_frac"] = (masks["nmse"] & ~masks["nmse_inliers"]).sum(1) / n_later
    out["l0"] = (l0_sum / n_later).float()
    out["fired"] = fired
    return out


@torch.no_grad()
def evaluate_transcoder(tc, held: Heldout, chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Held-out metrics of an exported :class:`~transcoders.clt.CrossLayerTranscoder` (any
    format loaded by ``load_transcoder``; its own ``encode``/``decode``, normalisation folded
    in) on ``held``: {``nmse_all``, ``nmse``, ``nmse_inliers``, ``outlier_frac``, ``l0``: [L];
    ``fired``: [L, F] bool} with the same position sets and sums as :func:`evaluate_heldout`,
    so a trained transcoder scores the same before and after export.

    ``chunk``: tokens per step (default: about 2^26 activation values at once). Runs on the
    transcoder's device; ``held`` is moved chunk by chunk.
    """
    L, N, d = held.y.shape
    F = tc.cfg.n_features
    dev = tc.device
    chunk = chunk or max(1, 2**26 // (L * F))
    masks = {k: v.cpu() for k, v in held.masks().items()}
    sums = {k: NMSESums(L, d, dev) for k in POSITION_SETS}
    fired = torch.zeros(L, F, dtype=torch.bool, device=dev)
    l0_sum = torch.zeros(L, dtype=torch.float64, device=dev)
    positions = held.positions.cpu()
    for s in range(0, N, chunk):
        sl = slice(s, s + chunk)
        xc = held.x[:, sl].to(dev, tc.dtype)
        yc = held.y[:, sl].to(dev)
        later = (positions[sl] > 0).to(dev)
        acts = tc.encode(xc)
        recon = tc.decode(acts, xc).float()
        fired |= (acts[:, later] > 0).any(1)
        l0_sum += (acts[:, later] > 0).sum((1, 2)).double()
        for k in POSITION_SETS:
            sums[k].add(recon, yc, masks[k][:, sl].to(dev))
    n_later = masks["nmse"].sum(1).clamp_min(1).to(dev)
    out = {k: sums[k].nmse() for k in POSITION_SETS}
    out["outlier_frac"] = (masks["nmse"] & ~masks["nmse_inliers"]).sum(1).to(dev) / n_later
    out["l0"] = (l0_sum / n_later).float()
    out["fired"] = fired
    return out
