"""Global (prompt-independent) virtual weights between transcoder features.

Ameisen et al. (2025) define the virtual weight from a source feature s (layer l_s) to a target
feature t (layer l_t > l_s) along the *direct path*, the residual stream alone (attention
excluded):

    W[t, s] = sum_{l = l_s .. l_t - 1} dec_s[l] . enc_t

dec_s[l]: the source's decoder row for MLP output l (one row for a per-layer transcoder, at
l = l_s), enc_t: what the target's pre-activation reads from the residual stream at resid_mid
of l_t. A source at layer l_s never feeds a target of the same layer (its outputs enter the
residual after that layer's MLP input). The skip connection of a skip transcoder is a linear
MLP path, left out here like attention.

The MLP-input norm (``input_site = 'mlp_in'``). The encoder reads norm(resid_mid), so in a
prompt its effective read vector is center(g * enc_t) * s, with g the norm's gain, center the
mean removal of a LayerNorm (identity for RMS norms) and s = 1 / sqrt(var + eps) the prompt's
norm denominator at that token. A global weight cannot know s; the convention is recorded with
the weights (``GlobalWeights.norm``):

- ``"unit"`` (``norm_scales=None``): s = 1, i.e. W per unit of normalised input; a per-prompt
  same-position edge on the direct path is then activation x W x s(l_t, position);
- ``"corpus-mean"`` (``norm_scales`` [L], e.g. :func:`typical_norm_scales`: the mean of s over
  corpus tokens at each layer): W is the typical edge per unit of source activation.

For ``input_site = 'resid_mid'`` no norm is involved (``norm = "none"``). Hence: in a prompt
where attention adds nothing (its output projection zero, or attention excluded), the edge
between a source and a target at the same position is exactly activation x W (x s for mlp_in
with the unit convention); the tests check it.

:func:`global_weights` keeps, for every feature, its ``top_k`` strongest inputs and outputs by
|W| (their union, with the rank of each pair on each side).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tracer.architectures import norm_center, norm_gain


@dataclass
class GlobalWeights:
    """Top-k virtual weights of one transcoder. Arrays [n_pairs]: source_layer, source_index,
    target_layer, target_index, weight (float32), rank_in (the source's rank among the
    target's inputs by |W|, 0 = strongest; -1 outside the top k), rank_out (the target's rank
    among the source's outputs). ``norm``: the MLP-input convention (module doc)."""

    transcoder: str
    input_site: str
    norm: str
    top_k: int
    source_layer: np.ndarray
    source_index: np.ndarray
    target_layer: np.ndarray
    target_index: np.ndarray
    weight: np.ndarray
    rank_in: np.ndarray
    rank_out: np.ndarray
    norm_scales: list[float] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.weight)

    def to_table(self):
        """A pyarrow Table (one row per pair), the convention in the schema metadata."""
        import json

        import pyarrow as pa

        t = pa.table({
            "source_layer": self.source_layer.astype(np.int32),
            "source_index": self.source_index.astype(np.int64),
            "target_layer": self.target_layer.astype(np.int32),
            "target_index": self.target_index.astype(np.int64),
            "weight": self.weight.astype(np.float32),
            "rank_in": self.rank_in.astype(np.int32),
            "rank_out": self.rank_out.astype(np.int32),
        })  # fmt: skip
        head = {
            "transcoder": self.transcoder, "input_site": self.input_site, "norm": self.norm,
            "top_k": self.top_k, "norm_scales": self.norm_scales, "meta": self.meta,
        }  # fmt: skip
        return t.replace_schema_metadata({b"circuit_atlas_global_weights": json.dumps(head)})

    def save(self, path: str | Path) -> Path:
        import pyarrow.parquet as pq

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(self.to_table(), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> GlobalWeights:
        import json

        import pyarrow.parquet as pq

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"global-weights file {path} does not exist")
        t = pq.read_table(path)
        raw = (t.schema.metadata or {}).get(b"circuit_atlas_global_weights")
        if raw is None:
            raise ValueError(f"{path} is not a global-weights file (circuit-atlas weights)")
        h = json.loads(raw)
        cols = {c: t.column(c).to_numpy() for c in t.column_names}
        return cls(h["transcoder"], h["input_site"], h["norm"], h["top_k"], **cols,
                   norm_scales=h.get("norm_scales"), meta=h.get("meta", {}))  # fmt: skip


def effective_encoders(transcoder, model, norm_scales: torch.Tensor | None = None) -> torch.Tensor:
    """What each feature's pre-activation reads from resid_mid of its layer: [L, F, d].

    resid_mid: the encoder itself. mlp_in: center(g_l * W_enc[l]) * s_l with s_l = 1 (unit)
    or ``norm_scales[l]`` (see the module doc)."""
    enc = transcoder.W_enc.detach().float()
    if transcoder.cfg.input_site == "resid_mid":
        return enc.clone()
    kind = model.arch.norm_kind
    out = torch.empty_like(enc)
    for l in range(transcoder.cfg.n_layers):
        g = norm_gain(kind, model.layer_module(l, "mlp_norm"))
        out[l] = norm_center(kind, enc[l] * g)
        if norm_scales is not None:
            out[l] *= float(norm_scales[l])
    return out


def _norm_name(transcoder, norm_scales) -> str:
    if transcoder.cfg.input_site == "resid_mid":
        return "none"
    return "unit" if norm_scales is None else "corpus-mean"


@torch.no_grad()
def typical_norm_scales(
    rm, tokens: torch.Tensor, batch: int = 8, progress: bool = False
) -> torch.Tensor:
    """Mean MLP-input norm denominator s = 1/sqrt(var + eps) per layer over corpus tokens
    [S, P] (start-token position excluded). [L] float32."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    total, n = torch.zeros(rm.model.facts.n_layers), 0
    steps = range(0, len(tokens), batch)
    for b in tqdm(steps, desc="norm scales", unit="batch", disable=not progress):
        run = rm.model.run(tokens[b : b + batch], record_sites=())
        s = run.scales["mlp_norm"][:, :, 1:]  # [B, L, P-1], on the model's device
        total += s.float().sum((0, 2)).cpu()
        n += s.shape[0] * s.shape[2]
    return total / max(n, 1)


def cumulative_decoders(transcoder, target_layer: int) -> torch.Tensor:
    """Each source layer's decoder rows summed over the MLP outputs that reach the resid_mid of
    ``target_layer`` (l_s <= l < target_layer): [target_layer, F, d], float32 on the
    transcoder's device."""
    F, d = transcoder.cfg.n_features, transcoder.cfg.d_model
    out = torch.zeros(target_layer, F, d, device=transcoder.W_enc.device)
    for ls in range(target_layer):
        dec = transcoder.decoder(ls).detach().float()  # [F, T, d], T = outputs ls .. ls+T-1
        stop = min(dec.shape[1], target_layer - ls)
        out[ls] = dec[:, :stop].sum(1)
    return out


def global_weight_block(transcoder, encoders: torch.Tensor, target_layer: int) -> torch.Tensor:
    """W[t, s] for every target of ``target_layer`` and every source of the layers below:
    [target_layer, F_source, F_target]; ``encoders`` from :func:`effective_encoders`."""
    C = cumulative_decoders(transcoder, target_layer)  # [lt, F, d]
    return torch.einsum("lfd,gd->lfg", C, encoders[target_layer])


def global_weights(
    transcoder, model, *, top_k: int = 16, norm_scales: torch.Tensor | None = None,
    name: str = "", progress: bool = True,
) -> GlobalWeights:  # fmt: skip
    """The top ``top_k`` inputs and outputs of every feature by |W| (module doc). ``name``:
    the transcoder identity recorded with the weights (the graphs' ``transcoder_name``)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    L, F = transcoder.cfg.n_layers, transcoder.cfg.n_features
    enc = effective_encoders(transcoder, model, norm_scales)
    dev = enc.device  # the blocks are computed where the transcoder is; the pairs kept on the host
    # Outputs: a running top-k per source over all target layers (values, flat target ids).
    out_v = torch.full((L * F, top_k), -1.0, device=dev)
    out_w = torch.zeros(L * F, top_k, device=dev)
    out_t = torch.full((L * F, top_k), -1, dtype=torch.long, device=dev)
    pairs: dict[tuple[int, int], list] = {}  # (flat source, flat target) -> [w, rank_in, r_out]
    for lt in tqdm(range(1, L), desc="global weights", unit="layer", disable=not progress):
        W = global_weight_block(transcoder, enc, lt).reshape(lt * F, F)  # [sources, targets]
        k_in = min(top_k, lt * F)
        _, src = W.abs().topk(k_in, dim=0)  # [k, F] per target
        w_in = W.gather(0, src).cpu().tolist()  # [k][F]: one copy to the host per layer
        src_h = src.cpu().tolist()
        for t in range(F):
            for r in range(k_in):
                pairs[(src_h[r][t], lt * F + t)] = [w_in[r][t], r, -1]
        k_out = min(top_k, F)
        v, tgt = W.abs().topk(k_out, dim=1)  # [lt*F, k]
        cand_v = torch.cat([out_v[: lt * F], v], 1)
        cand_w = torch.cat([out_w[: lt * F], W.gather(1, tgt)], 1)
        cand_t = torch.cat([out_t[: lt * F], tgt + lt * F], 1)
        best_v, j = cand_v.topk(top_k, dim=1)
        out_v[: lt * F], out_w[: lt * F] = best_v, cand_w.gather(1, j)
        out_t[: lt * F] = cand_t.gather(1, j)
    out_t_h, out_w_h = out_t.cpu().tolist(), out_w.cpu().tolist()
    for s in range(L * F):
        for r in range(top_k):
            t = out_t_h[s][r]
            if t < 0:
                continue
            entry = pairs.setdefault((s, t), [out_w_h[s][r], -1, -1])
            entry[2] = r
    keys = sorted(pairs)
    src = np.array([k[0] for k in keys], dtype=np.int64)
    tgt = np.array([k[1] for k in keys], dtype=np.int64)
    vals = np.array([pairs[k] for k in keys], dtype=np.float64).reshape(-1, 3)
    return GlobalWeights(
        transcoder=name, input_site=transcoder.cfg.input_site,
        norm=_norm_name(transcoder, norm_scales), top_k=top_k,
        source_layer=src // F, source_index=src % F, target_layer=tgt // F, target_index=tgt % F,
        weight=vals[:, 0].astype(np.float32), rank_in=vals[:, 1].astype(np.int32),
        rank_out=vals[:, 2].astype(np.int32),
        norm_scales=None if norm_scales is None else [float(x) for x in norm_scales],
    )  # fmt: skip
