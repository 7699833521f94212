"""Automatic supernodes: group a graph's feature nodes by what they do.

Three similarities between feature nodes, each a matrix [n, n] with 1 on the diagonal:

- ``decoder``: cosine of the features' total decoder writes (each feature's decoder rows summed
  over the layers it writes to: the same direction its promoted tokens are read from);
- ``edges``: cosine of the nodes' edge profiles in the graph, the mean of the cosine of their
  outgoing edge weights (a column of A: whom they feed, with sign) and of their incoming ones
  (a row of A: who feeds them); a profile that is empty for either node is left out;
- ``coactivation``: cosine of the features' activation vectors over corpus tokens (activations
  are non-negative, so it is in [0, 1]; 0 for a feature that never fires there).

The combined similarity is their weighted mean (signals that are not given are left out, the
weights renormalised). Groups are the clusters of average-linkage agglomerative clustering on
``1 - similarity``, cut where the average similarity between two clusters falls below
``min_similarity``; clusters of at least ``min_size`` nodes become supernodes, numbered ``s0,
s1, ...`` by their total influence on the logits (largest first).

A supernode is named by the promoted tokens its members share (those in the top promoted
tokens of the most members) and by the tokens its members' top corpus contexts peak on, from a
:class:`tracer.reports.feature_book.FeatureBook`. Supernodes live in ``graph.extra['supernodes']``
(a list
of dicts; :func:`supernodes_of` reads them back), so they travel with the graph file and into
the store. Perturbation checks are in :mod:`tracer.analyses.supernode_check`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from tracer.graph import FEATURE, Graph
from tracer.prune import node_influence
from tracer.reports.feature_book import FeatureBook

SIGNALS = ("decoder", "edges", "coactivation")


class SupernodeError(ValueError):
    """A supernode that does not exist, or a grouping request that cannot be met."""


@dataclass
class SupernodeConfig:
    """Weights of the three similarities (see the module doc), the cut and the naming.

    ``min_similarity``: clusters merge while their average combined similarity is at least
    this. ``min_size``: smallest group reported. ``n_promoted``: top promoted tokens of each
    member compared for the name; ``n_name_tokens``: tokens in the name."""

    weight_decoder: float = 1.0
    weight_edges: float = 1.0
    weight_coactivation: float = 1.0
    min_similarity: float = 0.5
    min_size: int = 2
    n_promoted: int = 10
    n_name_tokens: int = 3


@dataclass
class Supernode:
    """One group of feature nodes of a graph.

    nodes: node indices in the graph; members: (layer, position, feature) of each node;
    promoted: (token, members promoting it) shared promoted tokens, most shared first;
    contexts: (token, members peaking on it) from the members' top contexts; influence: summed
    node influence on the logits; cohesion: mean pairwise combined similarity; similarity:
    mean pairwise similarity per signal; validation: perturbation results
    (:func:`tracer.analyses.supernode_check.validate_supernodes`), None until checked."""

    id: str
    name: str
    nodes: list[int]
    members: list[tuple[int, int, int]]
    promoted: list[tuple[str, int]] = field(default_factory=list)
    contexts: list[tuple[str, int]] = field(default_factory=list)
    influence: float = 0.0
    cohesion: float = 0.0
    similarity: dict = field(default_factory=dict)
    validation: dict | None = None

    @property
    def size(self) -> int:
        return len(self.nodes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Supernode:
        known = set(cls.__dataclass_fields__)
        s = cls(**{k: v for k, v in d.items() if k in known})
        s.nodes = [int(i) for i in s.nodes]
        s.members = [tuple(int(x) for x in m) for m in s.members]
        s.promoted = [(str(t), int(c)) for t, c in s.promoted]
        s.contexts = [(str(t), int(c)) for t, c in s.contexts]
        return s


# --- similarities -------------------------------------------------------------------------------


def _cosine(x: np.ndarray) -> np.ndarray:
    """Pairwise cosine of the rows of x [n, k] (a zero row has similarity 0 with all)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1)
    xn = np.divide(x, norm[:, None], out=np.zeros_like(x), where=norm[:, None] > 0)
    return xn @ xn.T


def decoder_directions(transcoder, members: list[tuple[int, int, int]]) -> np.ndarray:
    """Total decoder write of each member feature: its decoder rows summed over target layers.
    [n, d_model], float64. Reads only the members' rows (a lazy decoder loads no others)."""
    out = np.zeros((len(members), transcoder.cfg.d_model))
    layers = np.array([m[0] for m in members], dtype=np.int64)
    feats = np.array([m[2] for m in members], dtype=np.int64)
    for layer in np.unique(layers).tolist():
        sel = np.where(layers == layer)[0]
        rows = transcoder.decoder_rows(layer, torch.as_tensor(feats[sel]))  # [n, T, d]
        out[sel] = rows.sum(1).double().cpu().numpy()
    return out


def edge_similarity(graph: Graph, nodes: np.ndarray) -> np.ndarray:
    """Mean of the cosine of outgoing and of incoming edge profiles of ``nodes`` [n] in the
    graph; [n, n]. Where one node of a pair has no edges in a direction, that direction is
    left out; with neither, the pair's similarity is 0 (1 on the diagonal)."""
    A = graph.adjacency()
    out_prof = A[:, nodes].T.toarray()  # [n, n_nodes] whom each node feeds
    in_prof = A[nodes].toarray()  # [n, n_nodes] who feeds each node
    total = np.zeros((len(nodes), len(nodes)))
    count = np.zeros_like(total)
    for prof in (out_prof, in_prof):
        has = np.abs(prof).sum(1) > 0
        both = has[:, None] & has[None, :]
        total += np.where(both, _cosine(prof), 0.0)
        count += both
    sim = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    np.fill_diagonal(sim, 1.0)
    return sim


@torch.no_grad()
def corpus_activations(
    rm, tokens: torch.Tensor, features: list[tuple[int, int]], *, batch: int = 8,
    progress: bool = True,
) -> np.ndarray:  # fmt: skip
    """Activations of ``features`` ((layer, index) pairs) on corpus tokens [S, P] (start
    token excluded: position 0 of every sequence is skipped). [S * (P - 1), n], float32 on the
    host (the model and transcoder run on their device).

    Runs the real model (no interventions) and the transcoder's encoder at its input site."""
    tc, site = rm.transcoder, rm.input_site
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise SupernodeError("corpus tokens must be [n_sequences, seq_len] with seq_len >= 2")
    layers = np.array([f[0] for f in features], dtype=np.int64)
    index = torch.as_tensor([f[1] for f in features], dtype=torch.long)
    S, P = tokens.shape
    out = np.zeros((S * (P - 1), len(features)), dtype=np.float32)
    for b in tqdm(range(0, S, batch), desc="corpus activations", unit="batch",
                  disable=not progress):  # fmt: skip
        chunk = tokens[b : b + batch]
        x = rm.model.run(chunk, record_sites=(site,)).sites[site]  # [B, L, P, d]
        rows = slice(b * (P - 1), (b + len(chunk)) * (P - 1))
        for layer in np.unique(layers).tolist():
            sel = np.where(layers == layer)[0]
            acts = tc.activate(layer, tc.pre_activations(layer, x[:, layer].float()))
            out[rows, sel] = acts[:, 1:, index[sel]].reshape(-1, len(sel)).float().cpu().numpy()
    return out


def similarities(
    graph: Graph,
    nodes: np.ndarray,
    decoder: np.ndarray | None = None,
    activations: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The similarity matrices [n, n] of ``nodes`` (feature node indices): ``edges`` always,
    ``decoder`` from decoder directions [n, d], ``coactivation`` from corpus activations
    [n_tokens, n] (columns in the order of ``nodes``)."""
    out = {"edges": edge_similarity(graph, nodes)}
    if decoder is not None:
        out["decoder"] = _cosine(decoder)
    if activations is not None:
        out["coactivation"] = _cosine(np.asarray(activations).T)
    return out


def combine(sims: dict[str, np.ndarray], cfg: SupernodeConfig) -> np.ndarray:
    """Weighted mean of the given similarity matrices (weights of missing signals dropped)."""
    weights = {
        "decoder": cfg.weight_decoder,
        "edges": cfg.weight_edges,
        "coactivation": cfg.weight_coactivation,
    }
    used = {k: w for k, w in weights.items() if k in sims and w > 0}
    if not used:
        raise SupernodeError("no similarity to group by: give a positive weight to a signal")
    total = sum(used.values())
    return sum(w * sims[k] for k, w in used.items()) / total


# --- grouping -----------------------------------------------------------------------------------


def cluster(similarity: np.ndarray, min_similarity: float) -> np.ndarray:
    """Average-linkage clusters of a similarity matrix [n, n], cut at ``min_similarity``.
    Returns a cluster label per row [n] (labels 0..k-1)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = len(similarity)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    dist = 1.0 - (similarity + similarity.T) / 2
    np.fill_diagonal(dist, 0.0)
    dist = np.clip(dist, 0.0, None)
    Z = linkage(squareform(dist, checks=False), method="average")
    return fcluster(Z, t=1.0 - min_similarity, criterion="distance") - 1


def find_supernodes(
    graph: Graph,
    *,
    transcoder=None,
    decoder: np.ndarray | None = None,
    activations: np.ndarray | None = None,
    book: FeatureBook | None = None,
    config: SupernodeConfig | None = None,
    nodes: np.ndarray | None = None,
    **overrides,
) -> list[Supernode]:
    """Group the feature nodes of ``graph`` (or the given ``nodes``) into supernodes.

    transcoder: gives decoder directions (the ``decoder`` signal), or ``decoder`` gives them
    directly [n_nodes, d] (node order); activations: corpus
    activations [n_tokens, n_nodes] of the nodes' features in node order (``coactivation``;
    see :func:`corpus_activations`); book: feature information for the names. Keyword
    overrides are fields of :class:`SupernodeConfig`. Stores the result in
    ``graph.extra['supernodes']`` and returns it.
    """
    cfg = SupernodeConfig(**{**asdict(config or SupernodeConfig()), **overrides})
    if cfg.min_size < 1:
        raise SupernodeError(f"min_size must be >= 1, got {cfg.min_size}")
    feats = np.where(graph.kind == FEATURE)[0] if nodes is None else np.asarray(nodes, np.int64)
    if len(feats) and not (graph.kind[feats] == FEATURE).all():
        raise SupernodeError("supernodes group feature nodes only: a given node is not a feature")
    members = [(int(graph.layer[i]), int(graph.position[i]), int(graph.feature[i])) for i in feats]
    if activations is not None and np.asarray(activations).shape[1] != len(feats):
        raise SupernodeError(
            f"activations have {np.asarray(activations).shape[1]} columns for {len(feats)} "
            "feature nodes: give one column per node, in node order"
        )
    dec = decoder
    if dec is None and transcoder is not None:
        dec = decoder_directions(transcoder, members)
    sims = similarities(graph, feats, dec, activations)
    combined = combine(sims, cfg)
    labels = cluster(combined, cfg.min_similarity)
    influence = node_influence(graph)
    groups = []
    for lab in np.unique(labels):
        idx = np.where(labels == lab)[0]
        if len(idx) >= cfg.min_size:
            groups.append(idx)
    groups.sort(key=lambda idx: (-float(influence[feats[idx]].sum()), int(feats[idx[0]])))
    out = []
    for k, idx in enumerate(groups):
        mem = [members[j] for j in idx]
        promoted, contexts = _shared_tokens(mem, book, cfg.n_promoted)
        out.append(
            Supernode(
                id=f"s{k}",
                name=_name(mem, promoted, contexts, cfg.n_name_tokens),
                nodes=[int(feats[j]) for j in idx],
                members=mem,
                promoted=promoted,
                contexts=contexts,
                influence=float(influence[feats[idx]].sum()),
                cohesion=_mean_pair(combined, idx),
                similarity={s: _mean_pair(m, idx) for s, m in sims.items()},
            )
        )
    graph.extra["supernodes"] = [s.to_dict() for s in out]
    graph.extra["supernode_params"] = {
        **asdict(cfg),
        "signals": sorted(sims),
        "n_candidates": len(feats),
    }
    return out


def _mean_pair(sim: np.ndarray, idx: np.ndarray) -> float:
    """Mean similarity over the distinct pairs of ``idx`` (1 for a single node)."""
    if len(idx) < 2:
        return 1.0
    block = sim[np.ix_(idx, idx)]
    return float(block[~np.eye(len(idx), dtype=bool)].mean())


def _shared_tokens(members, book: FeatureBook | None, n_promoted: int):
    """(promoted, contexts): tokens among the members' top promoted tokens and their top
    contexts' peak tokens, with how many members have each, most shared first (ties by
    first appearance). Nothing without a book."""
    if book is None:
        return [], []
    promoted: Counter = Counter()
    contexts: Counter = Counter()
    seen: set[tuple[int, int]] = set()
    for layer, _pos, index in members:
        if (layer, index) in seen:  # a feature at several positions counts once
            continue
        seen.add((layer, index))
        info = book.get(layer, index)
        if info is None:
            continue
        # dict.fromkeys: each token once per member, in order (ties keep first appearance)
        promoted.update(list(dict.fromkeys(t for t, _ in info.promoted_tokens[:n_promoted])))
        peaks = (c.tokens[c.peak] for c in info.top_contexts if c.tokens)
        contexts.update(list(dict.fromkeys(peaks)))
    return promoted.most_common(), contexts.most_common()


def _name(members, promoted, contexts, n: int) -> str:
    """'→ tokA tokB | on tokC' from the most shared tokens; the members' ids without any."""

    def show(tokens):
        return " ".join(repr(t)[1:-1] if t.strip() == t else repr(t) for t, _ in tokens[:n])

    parts = []
    if promoted:
        parts.append("→ " + show(promoted))
    if contexts:
        parts.append("on " + show(contexts))
    if parts:
        return " | ".join(parts)
    feats = list(dict.fromkeys((l, f) for l, _, f in members))  # distinct, in order
    head = ", ".join(f"L{l}/F{f}" for l, f in feats[:n])
    return head + (f" +{len(feats) - n}" if len(feats) > n else "")


# --- reading back -------------------------------------------------------------------------------


def supernodes_of(graph: Graph) -> list[Supernode]:
    """The supernodes stored in ``graph.extra['supernodes']`` ([] when none)."""
    return [Supernode.from_dict(d) for d in graph.extra.get("supernodes") or []]


def get_supernode(graph: Graph, supernode_id: str) -> Supernode:
    """One stored supernode by id (``s0``, ``s1``, ...); a clear error when it does not exist."""
    found = supernodes_of(graph)
    for s in found:
        if s.id == supernode_id:
            return s
    if not found:
        raise SupernodeError(
            f"graph of {graph.prompt!r} has no supernodes: group it first "
            "(`circuit-atlas supernodes GRAPH` or tracer.analyses.supernodes.find_supernodes)"
        )
    ids = ", ".join(s.id for s in found)
    raise SupernodeError(
        f"graph of {graph.prompt!r} has no supernode {supernode_id!r}: its supernodes are {ids}"
    )
