"""The decoder rows of a prompt's active features, and nothing more.

Attribution needs, for every active feature (layer i, position p, index f, value a), the vectors
it writes to the MLP outputs of layers i .. i + T_i - 1: ``a * W_dec[i][f, t]``. A whole decoder
([F, T_i, d] per layer: about 53 GB for a 16k-feature CLT of Gemma-2-2B) is never read: the rows
of the features active somewhere in the prompt are gathered once per source layer through
:meth:`~transcoders.clt.CrossLayerTranscoder.decoder_rows` (a lazily loaded transcoder reads just
those rows from disk), moved to the device and kept in the compute dtype. The written vectors
(rows times activations) are formed per target layer when the sweep needs them.
"""

from __future__ import annotations

import torch


class ActiveDecoders:
    """Decoder rows of the distinct active features of each source layer, on ``device``.

    feat_layer, feat_index, feat_value: [n_active] (a PromptState's active features).
    ``rows[i]`` is [T_i, u_i, d] (target-major, so one target's rows are one contiguous block)
    for the u_i distinct features of layer i that are active at some position; ``slot[k]`` is
    feature k's row in ``rows[feat_layer[k]][t]``.
    """

    def __init__(
        self,
        transcoder,
        feat_layer: torch.Tensor,
        feat_index: torch.Tensor,
        feat_value: torch.Tensor,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ):
        self.cfg = transcoder.cfg
        self.device, self.dtype = device, dtype
        self.layer = feat_layer.to(device)
        self.value = feat_value.to(device=device, dtype=dtype)
        self.slot = torch.zeros(len(feat_layer), dtype=torch.long, device=device)
        self.rows: list[torch.Tensor | None] = [None] * self.cfg.n_layers
        self.n_rows_read = 0
        idx = feat_index.to(device)
        for i in torch.unique(self.layer).tolist():
            sel = (self.layer == i).nonzero().squeeze(1)
            uniq, inv = torch.unique(idx[sel], return_inverse=True)
            self.slot[sel] = inv
            rows = transcoder.decoder_rows(i, uniq).to(device=device, dtype=dtype)  # [u, T, d]
            self.rows[i] = rows.transpose(0, 1).contiguous()
            del rows
            self.n_rows_read += len(uniq)

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.rows if r is not None)

    def sources(self, target: int) -> list[int]:
        """Source layers whose features write to layer ``target`` (a contiguous range)."""
        return [i for i in range(target + 1) if target - i < self.cfg.n_targets(i)]

    def written(self, feats: torch.Tensor, target: int) -> torch.Tensor:
        """What features ``feats`` [n] (PromptState indices) write to layer ``target``:
        activation x decoder row for that target. [n, d] on the device, compute dtype."""
        d = self.cfg.d_model
        out = torch.empty(len(feats), d, device=self.device, dtype=self.dtype)
        lay = self.layer[feats]
        for i in self.sources(target):
            sel = (lay == i).nonzero().squeeze(1)
            if len(sel):
                f = feats[sel]
                block = self.rows[i][target - i].index_select(0, self.slot[f])
                out[sel] = block.mul_(self.value[f, None])
        return out
