"""A saved subgraph of an attribution graph: pinned nodes, supernodes and labels.

This is what a researcher keeps from a session in the explorer (``circuit-atlas serve``) and
what the Neuronpedia / circuit-tracer viewer keeps in its ``qParams``: node ids are Neuronpedia
node ids (:func:`tracer.reports.neuronpedia.np_node_id`, e.g. ``3_17_5`` for feature 17 of layer 3
at
position 5), so one subgraph reads the same in both.

qParams shape (the viewer's URL state): ``pinnedIds`` a list of node ids; ``supernodes`` a list
of ``[label, member id, member id, ...]``; ``clerps`` (node labels) a list of ``[node id,
label]``. Supernode members are pinned nodes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

MAX_NAME = 100
MAX_LABEL = 200
MAX_PINNED = 5000
_NAME = re.compile(r"^[\w][\w .\-]*$")


class SubgraphError(ValueError):
    """A subgraph that is malformed or names nodes the graph does not have."""


@dataclass
class Supernode:
    """A group of pinned nodes shown as one, with a label."""

    label: str
    members: list[str]


@dataclass
class Subgraph:
    """``name``: how it is saved (letters, digits, space, ``._-``; at most 100 characters);
    ``pinned``: node ids in pinning order; ``supernodes``: groups of pinned nodes; ``labels``:
    node id -> label (a label of a pinned node or of any node)."""

    name: str
    pinned: list[str] = field(default_factory=list)
    supernodes: list[Supernode] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    # --- checks --------------------------------------------------------------------------------

    def check(self, node_ids: Iterable[str] | None = None) -> Subgraph:
        """Raise SubgraphError naming the first problem; with ``node_ids`` (the graph's),
        every id must be one of them. Returns self."""
        if not isinstance(self.name, str) or not self.name.strip():
            raise SubgraphError("a subgraph needs a name (letters, digits, space, '._-')")
        if len(self.name) > MAX_NAME or not _NAME.match(self.name):
            raise SubgraphError(
                f"subgraph name {self.name[:40]!r} is not allowed: use at most {MAX_NAME} "
                "letters, digits, spaces and '._-', starting with a letter or digit"
            )
        if len(self.pinned) > MAX_PINNED:
            raise SubgraphError(f"{len(self.pinned)} pinned nodes: at most {MAX_PINNED}")
        if len(set(self.pinned)) != len(self.pinned):
            raise SubgraphError("a node is pinned twice: pin each node once")
        pinned = set(self.pinned)
        grouped: set[str] = set()
        for sn in self.supernodes:
            if not sn.members:
                raise SubgraphError(f"supernode {sn.label!r} has no members")
            if len(sn.label) > MAX_LABEL:
                raise SubgraphError(f"supernode label longer than {MAX_LABEL} characters")
            for m in sn.members:
                if m not in pinned:
                    raise SubgraphError(
                        f"supernode {sn.label!r} groups node {m!r}, which is not pinned: "
                        "pin a node before grouping it"
                    )
                if m in grouped:
                    raise SubgraphError(f"node {m!r} is in two supernodes: group it once")
                grouped.add(m)
        for nid, label in self.labels.items():
            if len(label) > MAX_LABEL:
                raise SubgraphError(f"label of {nid!r} is longer than {MAX_LABEL} characters")
        if node_ids is not None:
            known = set(node_ids)
            for nid in [*self.pinned, *self.labels]:
                if nid not in known:
                    raise SubgraphError(f"node {nid!r} is not a node of this graph")
        return self

    # --- dict / JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"name": self.name, **self.to_qparams()}

    def to_qparams(self) -> dict:
        """The Neuronpedia ``qParams`` fields this subgraph sets."""
        return {
            "pinnedIds": list(self.pinned),
            "supernodes": [[sn.label, *sn.members] for sn in self.supernodes],
            "clerps": [[nid, label] for nid, label in self.labels.items()],
        }

    @classmethod
    def from_dict(cls, data: Mapping, name: str | None = None) -> Subgraph:
        """Read ``{"name", "pinnedIds", "supernodes", "clerps"}`` (a qParams object plus a
        name); raise SubgraphError on any malformed field. The result is checked."""
        if not isinstance(data, Mapping):
            raise SubgraphError("a subgraph must be a JSON object with pinnedIds and supernodes")
        name = name if name is not None else data.get("name")
        if not isinstance(name, str):
            raise SubgraphError("a subgraph needs a 'name' string")
        pinned = data.get("pinnedIds", [])
        if isinstance(pinned, str):  # the viewer's URL form: comma-separated
            pinned = [p for p in pinned.split(",") if p]
        if not isinstance(pinned, list) or not all(isinstance(p, str) for p in pinned):
            raise SubgraphError("'pinnedIds' must be a list of node id strings")
        raw_sn = data.get("supernodes", [])
        if not isinstance(raw_sn, list):
            raise SubgraphError("'supernodes' must be a list of [label, node id, ...] lists")
        supernodes = []
        for j, sn in enumerate(raw_sn):
            if not (isinstance(sn, list) and len(sn) >= 2 and all(isinstance(x, str) for x in sn)):
                raise SubgraphError(
                    f"supernodes[{j}] must be [label, node id, ...] (strings, one member at least)"
                )
            supernodes.append(Supernode(sn[0], list(sn[1:])))
        raw_labels = data.get("clerps", [])
        if isinstance(raw_labels, Mapping):
            raw_labels = list(raw_labels.items())
        if not isinstance(raw_labels, list):
            raise SubgraphError("'clerps' must be a list of [node id, label] pairs")
        labels = {}
        for j, pair in enumerate(raw_labels):
            if not (isinstance(pair, list | tuple) and len(pair) == 2
                    and all(isinstance(x, str) for x in pair)):  # fmt: skip
                raise SubgraphError(f"clerps[{j}] must be a [node id, label] pair of strings")
            labels[pair[0]] = pair[1]
        return cls(name, list(pinned), supernodes, labels).check()

    @classmethod
    def from_qparams(cls, qparams: Mapping, name: str = "imported") -> Subgraph:
        """The subgraph held in a Neuronpedia document's ``qParams``."""
        return cls.from_dict(qparams, name=name)


# --- the diagram of a subgraph ------------------------------------------------------------------


def diagram(graph, subgraph: Subgraph, labels: Mapping[str, str] | None = None) -> dict:
    """The pinned nodes and supernodes of ``subgraph`` as a small graph to draw: ``units``, one
    per supernode and per pinned node outside every supernode (``id``: the node id, or
    ``"s{k}"`` for supernode k; ``members``: node ids; ``label``; ``layer`` and ``position``:
    the members' mean, tokens at layer -1 and logits at ``n_layers``; ``kind``), and ``edges``
    between units: ``{"source", "target", "weight", "n"}`` where ``weight`` is the sum of
    ``A[t, s]`` over the graph's edges from a member of the source unit to a member of the
    target unit (``n`` of them), edges inside one unit left out. ``labels``: node id -> label
    for single nodes (else the subgraph's labels, else the node's coordinates).
    ``graph``: a :class:`tracer.graph.Graph` holding every pinned node."""
    import numpy as np

    from tracer.graph import LOGIT, NODE_KINDS, TOKEN
    from tracer.reports.neuronpedia import np_node_id

    index = {np_node_id(graph, i): i for i in range(graph.n_nodes)}
    subgraph.check(index)
    unit_of: dict[str, str] = {}
    units = []
    for k, sn in enumerate(subgraph.supernodes):
        for m in sn.members:
            unit_of[m] = f"s{k}"
        units.append({"id": f"s{k}", "members": list(sn.members), "label": sn.label,
                      "kind": "supernode"})  # fmt: skip
    names = {**subgraph.labels, **(labels or {})}
    for nid in subgraph.pinned:
        if nid in unit_of:
            continue
        unit_of[nid] = nid
        i = index[nid]
        units.append({"id": nid, "members": [nid], "label": names.get(nid) or graph.node_label(i),
                      "kind": NODE_KINDS[int(graph.kind[i])]})  # fmt: skip
    for u in units:
        idx = [index[m] for m in u["members"]]
        rows = [-1 if graph.kind[i] == TOKEN else graph.n_layers if graph.kind[i] == LOGIT
                else int(graph.layer[i]) for i in idx]  # fmt: skip
        u["layer"] = float(np.mean(rows))
        u["position"] = float(np.mean([int(graph.position[i]) for i in idx]))
    code = np.full(graph.n_nodes, -1, dtype=np.int64)
    order = {u["id"]: j for j, u in enumerate(units)}
    for nid, uid in unit_of.items():
        code[index[nid]] = order[uid]
    su, tu = code[graph.source], code[graph.target]
    sel = (su >= 0) & (tu >= 0) & (su != tu)
    sums: dict[tuple[int, int], list] = {}
    for a, b, w in zip(su[sel].tolist(), tu[sel].tolist(), graph.weight[sel].tolist(),
                       strict=True):  # fmt: skip
        acc = sums.setdefault((a, b), [0.0, 0])
        acc[0] += float(w)
        acc[1] += 1
    edges = [{"source": units[a]["id"], "target": units[b]["id"], "weight": acc[0], "n": acc[1]}
             for (a, b), acc in sorted(sums.items())]  # fmt: skip
    return {"units": units, "edges": edges}


def subgraph_scores(graph, subgraph: Subgraph, convention: str | None = None) -> dict:
    """Replacement and completeness of the circuit a subgraph keeps, as circuit-tracer scores a
    subgraph: every feature node that is not pinned counts as an error node (its own inputs
    dropped, its outputs kept), then :func:`tracer.prune.graph_scores` under the graph's
    ``convention``. Pinning every feature gives the graph's own scores; pinning none leaves
    only the tokens' direct edges. Returns ``{"replacement", "completeness", "convention",
    "features"}`` (features: how many features were pinned)."""
    import numpy as np

    from tracer.graph import ERROR, FEATURE, Graph
    from tracer.prune import graph_scores, resolve_convention
    from tracer.reports.neuronpedia import np_node_id

    subgraph.check()
    pinned = set(subgraph.pinned)
    keep = np.array([np_node_id(graph, i) in pinned for i in range(graph.n_nodes)], dtype=bool)
    dropped = (graph.kind == FEATURE) & ~keep
    kind = graph.kind.copy()
    kind[dropped] = ERROR
    edges = ~dropped[graph.target]
    g = Graph(**{**graph.__dict__, "kind": kind, "target": graph.target[edges],
                 "source": graph.source[edges], "weight": graph.weight[edges]})  # fmt: skip
    conv = resolve_convention(graph, convention)
    return {**graph_scores(g, conv), "convention": conv,
            "features": int(((graph.kind == FEATURE) & keep).sum())}  # fmt: skip
