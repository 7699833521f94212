"""Training metrics for transcoders, per layer and overall: NMSE, L0, dead fraction.

NMSE is the fraction of variance unexplained: sum ||pred - y||^2 / sum ||y - mean(y)||^2 over
tokens, per layer (scale-free, so raw or normalised activations give the same value).
"""

from __future__ import annotations

import torch


def nmse_per_layer(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """pred, target [L, N, d] -> [L] fraction of variance unexplained; with ``mask`` [L, N]
    (or [N]) bool, over the selected positions only (their own mean in the denominator)."""
    if mask is None:
        err = (pred - target).pow(2).sum((1, 2))
        var = (target - target.mean(1, keepdim=True)).pow(2).sum((1, 2)).clamp_min(1e-12)
        return err / var
    m = (mask if mask.dim() == 2 else mask[None].expand(target.shape[0], -1)).to(target.dtype)
    n = m.sum(1).clamp_min(1)[:, None]
    mean = (target * m[..., None]).sum(1) / n  # [L, d]
    err = ((pred - target).pow(2).sum(-1) * m).sum(1)
    var = ((target - mean[:, None]).pow(2).sum(-1) * m).sum(1).clamp_min(1e-12)
    return err / var


def fired_topk(idx: torch.Tensor, vals: torch.Tensor, n_features: int) -> torch.Tensor:
    """[L, F] bool: features with a positive value among the top-k idx, vals [L, N, k]."""
    L = idx.shape[0]
    hits = torch.zeros(L, n_features, device=idx.device).scatter_add_(
        1, idx.reshape(L, -1), (vals > 0).float().reshape(L, -1)
    )
    return hits > 0


def l0_per_layer(acts: torch.Tensor) -> torch.Tensor:
    """acts [L, N, F] -> [L] mean number of active features per token."""
    return (acts != 0).float().sum(-1).mean(-1)


class FireTracker:
    """Counts, per feature, the tokens seen since it last fired; a feature is dead when that
    exceeds ``window`` tokens. State is two tensors (saved in checkpoints)."""

    def __init__(self, n_layers: int, n_features: int, window: int, device=None):
        self.window = window
        self.since = torch.zeros(n_layers, n_features, dtype=torch.long, device=device)
        self.seen = 0

    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        """fired [L, F] bool: fired at least once in the last ``n_tokens`` tokens."""
        self.since += n_tokens
        self.since[fired] = 0
        self.seen += n_tokens

    def dead_mask(self) -> torch.Tensor:
        """[L, F] bool (nothing is dead before a full window has been seen)."""
        if self.seen < self.window:
            return torch.zeros_like(self.since, dtype=torch.bool)
        return self.since >= self.window

    def dead_fraction(self) -> torch.Tensor:
        return self.dead_mask().float().mean(-1)

    def state_dict(self) -> dict:
        return {"since": self.since.clone(), "seen": self.seen, "window": self.window}

    def load_state_dict(self, s: dict) -> None:
        self.since = s["since"].to(self.since.device, copy=True)
        self.seen = int(s["seen"])
        self.window = int(s["window"])


def summarize(per_layer: dict[str, torch.Tensor]) -> dict:
    """{name: [L] tensor} -> JSON-ready {name: mean, name + '_per_layer': [...]}."""
    out = {}
    for k, v in per_layer.items():
        v = v.detach().float()
        out[k] = round(float(v.mean()), 6)
        out[k + "_per_layer"] = [round(float(x), 6) for x in v]
    return out
