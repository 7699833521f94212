"""Feature contexts: what each transcoder feature responds to and what it promotes.

For every feature (layer, index), from a held-out slice of the corpus: its top-activating token
contexts, an activation histogram, how often it fires; and from its decoder, the output tokens it
promotes and suppresses through the unembedding. Saved beside the weights as
``feature_contexts.parquet`` (one row per feature) for reports and the graph store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transcoders.clt import CrossLayerTranscoder
from transcoders.training.harvest import ActivationFn

FILE_NAME = "feature_contexts.parquet"
SOURCE_KEY = "circuit_atlas.contexts_source"


@dataclass
class ContextConfig:
    top_k: int = 8  # contexts kept per feature
    before: int = 24  # tokens of context before the activating token (about 30 in all:
    after: int = 8  # 24 + the token + 8, as the explorer's Feature tab shows them)
    n_bins: int = 16  # histogram bins over (0, max activation]
    n_promoted: int = 10
    batch: int = 8  # sequences per forward pass
    skip_bos: bool = True


@torch.no_grad()
def collect_activations(
    clt: CrossLayerTranscoder, activations: ActivationFn, tokens: torch.Tensor, cfg: ContextConfig
) -> dict:
    """Stream tokens [S, P] through the model and the transcoder; keep per feature the top-k
    activations with their token positions, and every non-zero activation (for histograms).

    Computed on the transcoder's device (activations are moved there), in float32; the results
    are CPU tensors."""
    S, P = tokens.shape
    L, F = clt.cfg.n_layers, clt.cfg.n_features
    k = cfg.top_k
    dev = clt.device
    top_v = torch.zeros(L, F, k, device=dev)
    top_i = torch.full((L, F, k), -1, dtype=torch.long, device=dev)
    nz_feat, nz_val = [], []
    count = torch.zeros(L, F, device=dev)
    for b in range(0, S, cfg.batch):
        chunk = tokens[b : b + cfg.batch]
        x, _ = activations(chunk)  # [L, n, d]
        x = x.to(dev)
        acts = torch.stack([clt.activate(i, clt.pre_activations(i, x[i])) for i in range(L)])
        if cfg.skip_bos:
            acts.view(L, len(chunk), P, F)[:, :, 0] = 0
        pos = torch.arange(b * P, b * P + acts.shape[1], device=dev)  # global index s * P + p
        count += (acts > 0).sum(1)
        cand_v = torch.cat([top_v, acts.transpose(1, 2)], dim=2)
        cand_i = torch.cat([top_i, pos.expand(L, F, -1)], dim=2)
        top_v, j = cand_v.topk(k, dim=2)
        top_i = cand_i.gather(2, j)
        lf, n, f = (acts > 0).nonzero(as_tuple=True)
        nz_feat.append((lf * F + f).cpu())
        nz_val.append(acts[lf, n, f].float().cpu())
    return {
        "top_v": top_v.float().cpu(),
        "top_i": top_i.cpu(),
        "count": count.cpu(),
        "n_tokens": S * (P - int(cfg.skip_bos)),
        "nz_feat": torch.cat(nz_feat),
        "nz_val": torch.cat(nz_val),
    }


def histograms(nz_feat: torch.Tensor, nz_val: torch.Tensor, max_act: torch.Tensor, n_bins: int):
    """Per-feature histogram of non-zero activations over n_bins equal bins of (0, max]:
    counts [n_feat, n_bins]."""
    n_feat = max_act.numel()
    m = max_act.reshape(-1)[nz_feat].clamp_min(1e-12)
    b = (nz_val / m * n_bins).long().clamp(0, n_bins - 1)
    counts = torch.zeros(n_feat * n_bins, dtype=torch.long)
    counts.index_add_(0, nz_feat * n_bins + b, torch.ones_like(b))
    return counts.view(n_feat, n_bins)


@torch.no_grad()
def promoted_tokens(clt: CrossLayerTranscoder, unembed: torch.Tensor, n: int):
    """Top and bottom ``n`` tokens of each feature's total decoder write (summed over its target
    layers) through the unembedding [V, d]: (top_ids, top_vals, bot_ids, bot_vals), each
    [L, F, n], CPU (computed in float32 on the transcoder's device)."""
    outs = []
    W_U = unembed.to(device=clt.device, dtype=torch.float32)
    for i in range(clt.cfg.n_layers):
        direction = clt.decoder(i).float().sum(1)  # [F, d]
        logits = direction @ W_U.T  # [F, V]
        tv, ti = logits.topk(n, dim=1)
        bv, bi = (-logits).topk(n, dim=1)
        outs.append((ti.cpu(), tv.cpu(), bi.cpu(), -bv.cpu()))
    return tuple(torch.stack(z) for z in zip(*outs, strict=True))


def feature_contexts(
    clt: CrossLayerTranscoder,
    activations: ActivationFn,
    tokens: torch.Tensor,
    token_strings: Callable[[list[int]], list[str]],
    unembed: torch.Tensor | None = None,
    cfg: ContextConfig | None = None,
    source: dict | None = None,
):
    """The feature-context table (pyarrow) for transcoder ``clt`` (raw-space weights) over the
    held-out tokens [S, P]. ``token_strings(ids)`` decodes each id on its own. ``source``
    (e.g. the corpus and which of its rows) is kept in the table's schema metadata
    (:func:`contexts_source` reads it back)."""
    import pyarrow as pa

    cfg = cfg or ContextConfig()
    L, F = clt.cfg.n_layers, clt.cfg.n_features
    S, P = tokens.shape
    got = collect_activations(clt, activations, tokens, cfg)
    max_act = got["top_v"][:, :, 0]
    hist = histograms(got["nz_feat"], got["nz_val"], max_act, cfg.n_bins).view(L, F, -1)
    flat = tokens.reshape(-1)
    vocab = {
        int(t): s
        for t, s in zip(
            torch.unique(flat).tolist(), token_strings(torch.unique(flat).tolist()), strict=True
        )
    }

    def context(g: int) -> tuple[str, str]:
        s, p = divmod(g, P)
        row = tokens[s].tolist()
        left = "".join(vocab[t] for t in row[max(1, p - cfg.before) : p])
        right = "".join(vocab[t] for t in row[p + 1 : p + 1 + cfg.after])
        return f"{left}«{vocab[row[p]]}»{right}", vocab[row[p]]

    cols: dict[str, list] = {
        k: []
        for k in (
            "layer",
            "feature",
            "frequency",
            "max_activation",
            "mean_activation",
            "top_activations",
            "top_contexts",
            "top_tokens",
            "hist_edges",
            "hist_counts",
        )
    }
    sums = torch.zeros(L * F).index_add_(0, got["nz_feat"], got["nz_val"]).view(L, F)
    for l in range(L):
        for f in range(F):
            vals, idx = got["top_v"][l, f], got["top_i"][l, f]
            live = (vals > 0) & (idx >= 0)
            ctx = [context(int(g)) for g in idx[live].tolist()]
            c = float(got["count"][l, f])
            cols["layer"].append(l)
            cols["feature"].append(f)
            cols["frequency"].append(c / max(1, got["n_tokens"]))
            cols["max_activation"].append(float(vals[0]))
            cols["mean_activation"].append(float(sums[l, f]) / c if c else 0.0)
            cols["top_activations"].append([round(float(v), 5) for v in vals[live]])
            cols["top_contexts"].append([c_[0] for c_ in ctx])
            cols["top_tokens"].append([c_[1] for c_ in ctx])
            edges = np.linspace(0.0, float(vals[0]), cfg.n_bins + 1) if vals[0] > 0 else []
            cols["hist_edges"].append([round(float(e), 5) for e in edges])
            cols["hist_counts"].append(hist[l, f].tolist() if vals[0] > 0 else [])
    if unembed is not None:
        ti, tv, bi, bv = promoted_tokens(clt, unembed, cfg.n_promoted)
        ids = torch.unique(torch.cat([ti.reshape(-1), bi.reshape(-1)])).tolist()
        names = dict(zip(ids, token_strings(ids), strict=True))
        cols["promoted_tokens"] = [
            [names[int(t)] for t in r] for r in ti.reshape(L * F, -1).tolist()
        ]
        cols["promoted_logits"] = [[round(v, 4) for v in r] for r in tv.reshape(L * F, -1).tolist()]
        cols["suppressed_tokens"] = [
            [names[int(t)] for t in r] for r in bi.reshape(L * F, -1).tolist()
        ]
        cols["suppressed_logits"] = [
            [round(v, 4) for v in r] for r in bv.reshape(L * F, -1).tolist()
        ]
    table = pa.table(cols)
    if source is not None:
        table = table.replace_schema_metadata({SOURCE_KEY: json.dumps(source)})
    return table


def contexts_source(table) -> dict | None:
    """Where a context table's text came from (the ``source`` given to feature_contexts)."""
    meta = table.schema.metadata or {}
    raw = meta.get(SOURCE_KEY.encode())
    return json.loads(raw) if raw else None


def save_contexts(table, folder: str | os.PathLike) -> Path:
    import pyarrow.parquet as pq

    path = Path(folder) / FILE_NAME
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def load_contexts(folder: str | os.PathLike):
    import pyarrow.parquet as pq

    return pq.read_table(Path(folder) / FILE_NAME)
