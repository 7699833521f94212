"""Contrastive graphs: what differs between the graphs of two prompts.

Nodes are matched by identity, not by index:

- a feature by (transcoder, layer, index), wherever it is active in the prompt (its nodes at
  several positions are one feature: activations and edges summed over them), so the two
  graphs must come from the same transcoder (``graph.transcoder_name``; different ones are an
  error, as their features share no identity);
- a logit by its vocabulary id; a token node by (position, token id); an error node by
  (layer, position).

An edge is a pair of identities, its weight the sum of the graph's edges between their nodes.
:func:`contrast` reports the features and edges found in only one graph, the shared edges
that change sign, and those whose weight changes most; :meth:`Contrast.difference_graph`
builds a :class:`~tracer.graph.Graph` over the union of the identities whose node
activations are ``a - b`` and edge weights ``w_a - w_b`` (renderable like any graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from tracer.prune import node_influence

Identity = tuple[int, int, int, int]  # (kind, layer, position-or--1, feature/token id)


class ContrastError(ValueError):
    """Graphs that cannot be contrasted."""


def node_identity(graph: Graph, i: int) -> Identity:
    """The identity of node i used to match graphs (module doc)."""
    k, l, p, f = (int(graph.kind[i]), int(graph.layer[i]), int(graph.position[i]),
                  int(graph.feature[i]))  # fmt: skip
    if k == FEATURE:
        return (k, l, -1, f)
    if k == LOGIT:
        return (k, -1, -1, f)
    if k == TOKEN:
        return (k, -1, p, f)
    return (ERROR, l, p, -1)


@dataclass
class _Side:
    """One graph reduced to identities: node values and edge weights summed per identity."""

    activation: dict[Identity, float]
    influence: dict[Identity, float]
    position: dict[Identity, int]  # the node position (a feature: its most influential node's)
    edges: dict[tuple[Identity, Identity], float]  # (source, target) -> weight


def _reduce(graph: Graph) -> _Side:
    ids = [node_identity(graph, i) for i in range(graph.n_nodes)]
    infl = node_influence(graph)
    act: dict[Identity, float] = {}
    inf: dict[Identity, float] = {}
    pos: dict[Identity, int] = {}
    best: dict[Identity, float] = {}
    for i, key in enumerate(ids):
        act[key] = act.get(key, 0.0) + float(graph.activation[i])
        inf[key] = inf.get(key, 0.0) + float(infl[i])
        if float(infl[i]) >= best.get(key, -1.0):
            best[key], pos[key] = float(infl[i]), int(graph.position[i])
    edges: dict[tuple[Identity, Identity], float] = {}
    for t, s, w in zip(graph.target.tolist(), graph.source.tolist(), graph.weight.tolist(),
                       strict=True):  # fmt: skip
        key = (ids[s], ids[t])
        edges[key] = edges.get(key, 0.0) + w
    return _Side(act, inf, pos, edges)


def describe(key: Identity) -> str:
    """A readable name for an identity: ``L3/F17``, ``logit #42``, ``tok 7@2``, ``err L1@2``."""
    k, l, p, f = key
    if k == FEATURE:
        return f"L{l}/F{f}"
    if k == LOGIT:
        return f"logit #{f}"
    if k == TOKEN:
        return f"tok {f}@{p}"
    return f"err L{l}@{p}"


@dataclass
class EdgeChange:
    source: Identity
    target: Identity
    weight_a: float
    weight_b: float

    @property
    def change(self) -> float:
        return self.weight_a - self.weight_b

    def to_dict(self) -> dict:
        return {
            "source": describe(self.source),
            "target": describe(self.target),
            "weight_a": self.weight_a,
            "weight_b": self.weight_b,
            "change": self.change,
        }


@dataclass
class Contrast:
    """The difference between graph a and graph b (module doc).

    only_in_a / only_in_b: feature identities (layer, index) found in one graph only, by
    influence in their graph (largest first), as (layer, index, activation, influence);
    shared: features in both, as (layer, index, activation a, activation b, influence a,
    influence b) by |influence a - influence b|; edges_only_in_a / _b, sign_flips and
    largest_changes: :class:`EdgeChange` lists (sign flips and changes by |change|)."""

    a: Graph
    b: Graph
    only_in_a: list[tuple]
    only_in_b: list[tuple]
    shared: list[tuple]
    edges_only_in_a: list[EdgeChange]
    edges_only_in_b: list[EdgeChange]
    sign_flips: list[EdgeChange]
    largest_changes: list[EdgeChange]
    sides: tuple = field(default=(), repr=False)

    def summary(self, n: int = 10) -> dict:
        """Counts and the top ``n`` of each list, JSON-able."""

        def feats(rows):
            return [{"feature": f"L{r[0]}/F{r[1]}", "activation": r[2], "influence": r[3]}
                    for r in rows[:n]]  # fmt: skip

        return {
            "prompt_a": self.a.prompt, "prompt_b": self.b.prompt,
            "transcoder": self.a.transcoder_name,
            "n_features_only_in_a": len(self.only_in_a),
            "n_features_only_in_b": len(self.only_in_b), "n_features_shared": len(self.shared),
            "n_edges_only_in_a": len(self.edges_only_in_a),
            "n_edges_only_in_b": len(self.edges_only_in_b), "n_sign_flips": len(self.sign_flips),
            "only_in_a": feats(self.only_in_a), "only_in_b": feats(self.only_in_b),
            "shared_most_changed": [
                {"feature": f"L{r[0]}/F{r[1]}", "influence_a": r[4], "influence_b": r[5]}
                for r in self.shared[:n]
            ],
            "sign_flips": [e.to_dict() for e in self.sign_flips[:n]],
            "largest_changes": [e.to_dict() for e in self.largest_changes[:n]],
        }  # fmt: skip

    def difference_graph(self) -> Graph:
        """A Graph over the union of identities: activation a - b per node, weight w_a - w_b
        per edge (absent = 0); positions from graph a where the node is in it, else b.
        ``logit_weights`` are a's and b's logit weights averaged (sum 1)."""
        sa, sb = self.sides
        keys = sorted(set(sa.activation) | set(sb.activation), key=_order)
        index = {k: i for i, k in enumerate(keys)}
        lw_a = _logit_weights(self.a)
        lw_b = _logit_weights(self.b)
        n_logit = sum(1 for k in keys if k[0] == LOGIT)
        lw = np.array([(lw_a.get(k, 0.0) + lw_b.get(k, 0.0)) / 2 for k in keys])
        if lw.sum() == 0 and n_logit:
            lw = np.array([1.0 / n_logit if k[0] == LOGIT else 0.0 for k in keys])
        last = max(len(self.a.tokens), len(self.b.tokens)) - 1
        pairs = sorted(set(sa.edges) | set(sb.edges), key=lambda e: (index[e[1]], index[e[0]]))
        diff = np.array([sa.edges.get(e, 0.0) - sb.edges.get(e, 0.0) for e in pairs])
        keep = diff != 0
        pairs = [e for e, k in zip(pairs, keep, strict=True) if k]

        def position(k: Identity) -> int:
            if k[0] == LOGIT:
                return last
            return sa.position.get(k, sb.position.get(k, 0))

        def layer(k: Identity) -> int:
            if k[0] == LOGIT:
                return self.a.n_layers
            return k[1]

        return Graph(
            prompt=f"{self.a.prompt} − {self.b.prompt}",
            tokens=list(self.a.tokens), token_strings=list(self.a.token_strings),
            model_name=self.a.model_name, transcoder_name=self.a.transcoder_name,
            n_layers=self.a.n_layers,
            kind=np.array([k[0] for k in keys], dtype=np.int8),
            layer=np.array([layer(k) for k in keys], dtype=np.int32),
            position=np.array([position(k) for k in keys], dtype=np.int32),
            feature=np.array([k[3] for k in keys], dtype=np.int64),
            activation=np.array([sa.activation.get(k, 0.0) - sb.activation.get(k, 0.0)
                                 for k in keys], dtype=np.float32),
            probability=np.zeros(len(keys), dtype=np.float32),
            target=np.array([index[e[1]] for e in pairs], dtype=np.int32),
            source=np.array([index[e[0]] for e in pairs], dtype=np.int32),
            weight=diff[keep].astype(np.float32),
            logit_weights=lw.astype(np.float32),
            params={"contrast": True, "prompt_a": self.a.prompt, "prompt_b": self.b.prompt},
            extra={"contrast": self.summary()},
        )  # fmt: skip


def _order(k: Identity):
    """Graph node order: features, errors, tokens, logits."""
    return ({FEATURE: 0, ERROR: 1, TOKEN: 2, LOGIT: 3}[k[0]], k[1], k[2], k[3])


def _logit_weights(graph: Graph) -> dict[Identity, float]:
    out: dict[Identity, float] = {}
    for i in np.where(graph.kind == LOGIT)[0]:
        key = node_identity(graph, int(i))
        out[key] = out.get(key, 0.0) + float(graph.logit_weights[i])
    return out


def contrast(graph_a: Graph, graph_b: Graph) -> Contrast:
    """Compare two graphs of the same model and transcoder (module doc)."""
    if graph_a.transcoder_name != graph_b.transcoder_name:
        raise ContrastError(
            f"the graphs come from different transcoders ({graph_a.transcoder_name!r} and "
            f"{graph_b.transcoder_name!r}), whose features share no identity: trace both "
            "prompts with the same transcoder"
        )
    if graph_a.model_name != graph_b.model_name:
        raise ContrastError(
            f"the graphs come from different models ({graph_a.model_name!r} and "
            f"{graph_b.model_name!r}): trace both prompts with the same model"
        )
    sa, sb = _reduce(graph_a), _reduce(graph_b)

    def feat_rows(side, keys):
        rows = [(k[1], k[3], side.activation[k], side.influence[k]) for k in keys]
        return sorted(rows, key=lambda r: (-r[3], r[0], r[1]))

    fa = {k for k in sa.activation if k[0] == FEATURE}
    fb = {k for k in sb.activation if k[0] == FEATURE}
    shared = sorted(
        ((k[1], k[3], sa.activation[k], sb.activation[k], sa.influence[k], sb.influence[k])
         for k in fa & fb),
        key=lambda r: (-abs(r[4] - r[5]), r[0], r[1]),
    )  # fmt: skip
    both = set(sa.edges) & set(sb.edges)

    def changes(keys):
        return [EdgeChange(s, t, sa.edges.get((s, t), 0.0), sb.edges.get((s, t), 0.0))
                for s, t in keys]  # fmt: skip

    def by_size(rows, side):
        return sorted(rows, key=lambda e: (-abs(getattr(e, side)), _order(e.source),
                                           _order(e.target)))  # fmt: skip

    shared_edges = changes(both)
    flips = [e for e in shared_edges if e.weight_a * e.weight_b < 0]
    return Contrast(
        a=graph_a,
        b=graph_b,
        only_in_a=feat_rows(sa, fa - fb),
        only_in_b=feat_rows(sb, fb - fa),
        shared=shared,
        edges_only_in_a=by_size(changes(set(sa.edges) - both), "weight_a"),
        edges_only_in_b=by_size(changes(set(sb.edges) - both), "weight_b"),
        sign_flips=by_size(flips, "change"),
        largest_changes=by_size(shared_edges, "change"),
        sides=(sa, sb),
    )
