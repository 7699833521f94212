"""The attribution graph type: nodes, sparse weighted edges, parameters, scores; Parquet I/O.

Node order is fixed: features, then error nodes, then token nodes, then logit nodes. Edges are
COO triples ``(target, source, weight)`` with ``weight = A[target, source]``: the direct effect
of the source on the target's pre-activation (feature) or de-meaned logit (logit node).

One graph is one Parquet file: rows of kind ``node`` and rows of kind ``edge`` in one table
(null where a column does not apply), graph-level fields as JSON in the schema metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
NODE_KINDS = ("feature", "error", "token", "logit")
FEATURE, ERROR, TOKEN, LOGIT = range(4)
# Lists in ``Graph.extra`` aligned with the nodes (written by pruning): subgraphs keep them so.
NODE_ALIGNED_EXTRA = ("influence", "cumulative_influence")


class GraphFormatError(ValueError):
    """A graph file that cannot be read (wrong kind of file, newer format, damaged)."""


@dataclass
class Graph:
    """An attribution graph for one prompt.

    Node arrays are all [n_nodes]:
      kind      int8   0 feature, 1 error, 2 token, 3 logit (see NODE_KINDS)
      layer     int32  feature/error: layer; token: -1; logit: n_layers
      position  int32  token position (logits: the last position)
      feature   int64  feature index (feature), vocabulary id (token, logit), -1 (error)
      activation float32  feature activation; error: norm of the error vector; token: norm of
                           the embedding; logit: the logit value
      probability float32 logit probability (0 for non-logit nodes)
    Edge arrays are all [n_edges]: target, source (node indices, int32), weight (float32).
    """

    prompt: str
    tokens: list[int]
    token_strings: list[str]
    model_name: str
    transcoder_name: str
    n_layers: int
    kind: np.ndarray
    layer: np.ndarray
    position: np.ndarray
    feature: np.ndarray
    activation: np.ndarray
    probability: np.ndarray
    target: np.ndarray
    source: np.ndarray
    weight: np.ndarray
    logit_weights: np.ndarray  # [n_nodes] weight of each logit node in influence (sums to 1)
    params: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. validation results

    @classmethod
    def from_coo(
        cls,
        *,
        kind: np.ndarray,
        layer: np.ndarray,
        position: np.ndarray,
        feature: np.ndarray,
        target: np.ndarray,
        source: np.ndarray,
        weight: np.ndarray,
        tokens: list[int],
        n_layers: int,
        probability: np.ndarray | None = None,
        activation: np.ndarray | None = None,
        logit_weights: np.ndarray | None = None,
        prompt: str = "",
        token_strings: list[str] | None = None,
        model_name: str = "",
        transcoder_name: str = "",
        params: dict | None = None,
    ) -> Graph:
        """A graph from node arrays [n_nodes] and COO edges [n_edges] (``weight[e]`` =
        A[target[e], source[e]]), cast to the stored dtypes. Defaults: activations 0,
        probabilities 0, logit weights = the logit nodes' probabilities normalised to sum to 1
        (uniform over logits when no probability is given), token strings the ids."""
        kind = np.asarray(kind, dtype=np.int8)
        n = len(kind)
        prob = np.zeros(n, np.float32) if probability is None else np.asarray(probability)
        if logit_weights is None:
            is_logit = kind == LOGIT
            w = prob.astype(np.float64) * is_logit
            if w.sum() <= 0:
                w = is_logit.astype(np.float64)
            logit_weights = w / max(w.sum(), 1e-300)
        return cls(
            prompt=prompt,
            tokens=[int(t) for t in tokens],
            token_strings=list(token_strings or [str(int(t)) for t in tokens]),
            model_name=model_name,
            transcoder_name=transcoder_name,
            n_layers=int(n_layers),
            kind=kind,
            layer=np.asarray(layer, dtype=np.int32),
            position=np.asarray(position, dtype=np.int32),
            feature=np.asarray(feature, dtype=np.int64),
            activation=np.zeros(n, np.float32)
            if activation is None
            else np.asarray(activation, dtype=np.float32),
            probability=prob.astype(np.float32),
            target=np.asarray(target, dtype=np.int32),
            source=np.asarray(source, dtype=np.int32),
            weight=np.asarray(weight, dtype=np.float32),
            logit_weights=np.asarray(logit_weights, dtype=np.float32),
            params=dict(params or {}),
        )

    # --- basic views ---------------------------------------------------------------------------

    @property
    def n_nodes(self) -> int:
        return len(self.kind)

    @property
    def n_edges(self) -> int:
        return len(self.weight)

    def count(self, kind: str) -> int:
        return int((self.kind == NODE_KINDS.index(kind)).sum())

    def node_id(self, i: int) -> str:
        """Stable readable id: ``F/L/P/F#``-style strings (feature ``f_{layer}_{pos}_{idx}``)."""
        k, l, p, f = (
            int(self.kind[i]),
            int(self.layer[i]),
            int(self.position[i]),
            int(self.feature[i]),
        )
        if k == FEATURE:
            return f"f_{l}_{p}_{f}"
        if k == ERROR:
            return f"e_{l}_{p}"
        if k == TOKEN:
            return f"t_{p}"
        return f"l_{f}"

    def node_label(self, i: int) -> str:
        k = int(self.kind[i])
        if k == TOKEN:
            return f"tok {self.token_strings[int(self.position[i])]!r}@{int(self.position[i])}"
        if k == LOGIT:
            return f"logit #{int(self.feature[i])} (p={float(self.probability[i]):.3f})"
        if k == ERROR:
            return f"err L{int(self.layer[i])}@{int(self.position[i])}"
        return f"L{int(self.layer[i])}/F{int(self.feature[i])}@{int(self.position[i])}"

    def adjacency(self):
        """scipy.sparse CSR matrix [n_nodes, n_nodes]: rows targets, columns sources."""
        import scipy.sparse as sp

        n = self.n_nodes
        return sp.csr_matrix((self.weight, (self.target, self.source)), shape=(n, n))

    def subgraph(self, keep_nodes: np.ndarray, keep_edges: np.ndarray | None = None) -> Graph:
        """Graph restricted to nodes where ``keep_nodes`` [n_nodes] bool is true (and edges where
        ``keep_edges`` [n_edges] bool is true, if given); node indices are renumbered."""
        keep_nodes = np.asarray(keep_nodes, dtype=bool)
        new_index = np.full(self.n_nodes, -1, dtype=np.int64)
        new_index[keep_nodes] = np.arange(int(keep_nodes.sum()))
        emask = keep_nodes[self.target] & keep_nodes[self.source]
        if keep_edges is not None:
            emask &= keep_edges
        nodes = {k: getattr(self, k)[keep_nodes] for k in _NODE_FIELDS}
        extra = dict(self.extra)
        for key in NODE_ALIGNED_EXTRA:  # pruning's per-node values follow the nodes
            values = extra.get(key)
            if values is not None and len(values) == self.n_nodes:
                extra[key] = np.asarray(values)[keep_nodes].tolist()
        return Graph(
            prompt=self.prompt,
            tokens=list(self.tokens),
            token_strings=list(self.token_strings),
            model_name=self.model_name,
            transcoder_name=self.transcoder_name,
            n_layers=self.n_layers,
            **nodes,
            target=new_index[self.target[emask]].astype(np.int32),
            source=new_index[self.source[emask]].astype(np.int32),
            weight=self.weight[emask],
            params=dict(self.params),
            scores=dict(self.scores),
            extra=extra,
        )

    # --- Arrow / Parquet -------------------------------------------------------------------------

    def node_table(self) -> pa.Table:
        cols = {"node": np.arange(self.n_nodes, dtype=np.int32)}
        cols.update({k: getattr(self, k) for k in _NODE_FIELDS})
        table = pa.table(cols)
        kinds = pa.array([NODE_KINDS[k] for k in self.kind.tolist()], pa.string())
        return table.append_column("kind_name", kinds)

    def edge_table(self) -> pa.Table:
        return pa.table({"target": self.target, "source": self.source, "weight": self.weight})

    def header(self) -> dict:
        return {
            "format": "circuit-atlas-graph",
            "format_version": FORMAT_VERSION,
            "prompt": self.prompt,
            "tokens": list(map(int, self.tokens)),
            "token_strings": self.token_strings,
            "model_name": self.model_name,
            "transcoder_name": self.transcoder_name,
            "n_layers": self.n_layers,
            "params": self.params,
            "scores": self.scores,
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write one Parquet file (atomically: a temp file renamed into place)."""
        path = Path(path)
        n, e = self.n_nodes, self.n_edges

        def col(values, dtype, first):
            # Node columns hold values in the first n rows; edge columns in the last e rows.
            arr = np.asarray(values)
            mask = np.ones(n + e, dtype=bool)
            full = np.zeros(n + e, dtype=dtype)
            if first:
                full[:n] = arr
                mask[:n] = False
            else:
                full[n:] = arr
                mask[n:] = False
            return pa.array(full, mask=mask)

        row_kind = pa.DictionaryArray.from_arrays(
            pa.array(np.r_[np.zeros(n, np.int8), np.ones(e, np.int8)]), pa.array(["node", "edge"])
        )
        columns = {"row": row_kind}
        for name, dtype in _NODE_FIELDS.items():
            columns[name] = col(getattr(self, name), dtype, True)
        columns["target"] = col(self.target, np.int32, False)
        columns["source"] = col(self.source, np.int32, False)
        columns["weight"] = col(self.weight, np.float32, False)
        table = pa.table(columns)
        head = {**self.header(), "n_nodes": n, "n_edges": e}  # checked by load
        meta = {b"circuit_atlas": json.dumps(head, default=_json_default).encode()}
        table = table.replace_schema_metadata(meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            pq.write_table(table, tmp, compression="zstd")
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        """Read a graph file, validated: GraphFormatError (one line naming the file and what is
        wrong) for a file that is not a graph, lacks a column or metadata key, has an index out
        of range, a non-finite value, or node/edge counts that disagree with its metadata."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"graph file {path} does not exist")
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise GraphFormatError(f"{path} is not a readable Parquet graph file: {err}") from err
        return _from_table(table, path)

    # --- networkx ------------------------------------------------------------------------------

    def to_networkx(self):
        """A ``networkx.DiGraph`` with edges source -> target (attribute ``weight``); node ids as
        :meth:`node_id`, attributes from the node arrays."""
        import networkx as nx

        g = nx.DiGraph(prompt=self.prompt, **{f"score_{k}": v for k, v in self.scores.items()})
        ids = [self.node_id(i) for i in range(self.n_nodes)]
        for i, nid in enumerate(ids):
            g.add_node(
                nid,
                kind=NODE_KINDS[int(self.kind[i])],
                layer=int(self.layer[i]),
                position=int(self.position[i]),
                feature=int(self.feature[i]),
                activation=float(self.activation[i]),
                logit_weight=float(self.logit_weights[i]),
            )
        g.add_weighted_edges_from(
            (ids[s], ids[t], float(w))
            for t, s, w in zip(
                self.target.tolist(), self.source.tolist(), self.weight.tolist(), strict=True
            )
        )
        return g


_NODE_FIELDS = {
    "kind": np.int8,
    "layer": np.int32,
    "position": np.int32,
    "feature": np.int64,
    "activation": np.float32,
    "probability": np.float32,
    "logit_weights": np.float32,
}


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in graph metadata")


# --- reading and validating a graph file ---------------------------------------------------

# Metadata keys every graph file has (Graph.header); params, scores, extra default to {}.
REQUIRED_KEYS = ("prompt", "tokens", "token_strings", "model_name", "transcoder_name", "n_layers")
_EDGE_FIELDS = {"target": np.int32, "source": np.int32, "weight": np.float32}
_FLOAT_FIELDS = ("activation", "probability", "logit_weights", "weight")
_RESAVE = "re-create it (trace again, or Graph.save from the source)"


def _bad(path: Path, what: str) -> GraphFormatError:
    return GraphFormatError(f"{path}: {what}; the file is damaged or not written by circuit-atlas: "
                            f"{_RESAVE}")  # fmt: skip


def _header(table: pa.Table, path: Path) -> dict:
    raw = (table.schema.metadata or {}).get(b"circuit_atlas")
    if raw is None:
        raise GraphFormatError(f"{path} is Parquet but not a circuit-atlas graph file")
    try:
        head = json.loads(raw)
    except ValueError as err:
        raise _bad(path, f"its metadata is not valid JSON ({err})") from None
    if not isinstance(head, dict):
        raise _bad(path, "its metadata is not a JSON object")
    version = head.get("format_version", 0)
    if not isinstance(version, int):
        raise _bad(path, f"metadata format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise GraphFormatError(
            f"{path} uses graph format version {version}, newer than this circuit-atlas "
            f"reads ({FORMAT_VERSION}): upgrade circuit-atlas to read it"
        )
    missing = [k for k in REQUIRED_KEYS if k not in head]
    if missing:
        raise _bad(path, f"metadata lacks key(s) {', '.join(map(repr, missing))}")
    checks = (
        ("prompt", str, "a string"),
        ("model_name", str, "a string"),
        ("transcoder_name", str, "a string"),
        ("params", dict, "an object"),
        ("scores", dict, "an object"),
        ("extra", dict, "an object"),
    )
    for key, typ, what in checks:
        if key in head and not isinstance(head[key], typ):
            raise _bad(path, f"metadata {key!r} is not {what}")
    n_layers = head["n_layers"]
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 0:
        raise _bad(path, f"metadata n_layers {n_layers!r} is not an integer >= 0")
    tokens, strings = head["tokens"], head["token_strings"]
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise _bad(path, "metadata 'tokens' is not a list of integers")
    if not isinstance(strings, list) or not all(isinstance(t, str) for t in strings):
        raise _bad(path, "metadata 'token_strings' is not a list of strings")
    if len(tokens) != len(strings):
        raise _bad(path, f"metadata has {len(tokens)} tokens but {len(strings)} token strings")
    return head


def _column(table: pa.Table, name: str, dtype, rows: np.ndarray, what: str, path: Path):
    """Column ``name`` at ``rows`` as ``dtype``; GraphFormatError for a null or a value the dtype
    cannot hold exactly (integers) or at all."""
    col = table.column(name)
    typ = col.type
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    want_int = np.issubdtype(dtype, np.integer)
    if not (pa.types.is_integer(typ) or (not want_int and pa.types.is_floating(typ))):
        kind = "an integer" if want_int else "a number"
        raise _bad(path, f"column {name!r} has type {col.type}, not {kind}")
    picked = col.filter(pa.array(rows))
    if picked.null_count:
        raise _bad(path, f"column {name!r} has nulls in {what} rows")
    values = picked.to_numpy()
    if want_int and len(values):
        info = np.iinfo(dtype)
        lo, hi = values.min(), values.max()
        if lo < info.min or hi > info.max:
            raise _bad(
                path, f"column {name!r} holds {lo if lo < info.min else hi}, outside {dtype}"
            )
    return np.asarray(values, dtype=dtype)


def _from_table(table: pa.Table, path: Path) -> Graph:
    """A Graph from the table of a graph file, every part checked (see Graph.load)."""
    head = _header(table, path)
    names = set(table.column_names)
    needed = ["row", *_NODE_FIELDS, *_EDGE_FIELDS]
    missing = [c for c in needed if c not in names]
    if missing:
        raise _bad(path, f"the table lacks column(s) {', '.join(map(repr, missing))}")
    if table.column("row").null_count:
        raise _bad(path, "column 'row' has nulls")
    row = table.column("row").to_numpy(zero_copy_only=False).astype(str)
    unknown = sorted(set(np.unique(row).tolist()) - {"node", "edge"})
    if unknown:
        raise _bad(path, f"column 'row' holds {unknown[0]!r} (only 'node' and 'edge')")
    is_edge = row == "edge"
    nodes = {k: _column(table, k, dt, ~is_edge, "node", path) for k, dt in _NODE_FIELDS.items()}
    edges = {k: _column(table, k, dt, is_edge, "edge", path) for k, dt in _EDGE_FIELDS.items()}
    n, e = int((~is_edge).sum()), int(is_edge.sum())
    for key, got in (("n_nodes", n), ("n_edges", e)):
        want = head.get(key)
        if want is not None and want != got:
            raise _bad(path, f"metadata says {key} = {want} but the table holds {got}")
    kind = nodes["kind"]
    if n and (kind.min() < 0 or kind.max() >= len(NODE_KINDS)):
        bad = int(kind[(kind < 0) | (kind >= len(NODE_KINDS))][0])
        raise _bad(path, f"node kind {bad} is not one of 0..{len(NODE_KINDS) - 1}")
    for end in ("source", "target"):
        idx = edges[end]
        out = (idx < 0) | (idx >= n)
        if out.any():
            k = int(np.flatnonzero(out)[0])
            raise _bad(
                path, f"edge {k} has {end} {int(idx[k])}, outside the {n} nodes (0..{n - 1})"
            )
    for name in _FLOAT_FIELDS:
        values = edges[name] if name in edges else nodes[name]
        bad = ~np.isfinite(values)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            where = "edge" if name in edges else "node"
            raise _bad(path, f"{where} {k} has {name} {values[k]} (not finite)")
    positioned = np.isin(kind, (TOKEN, LOGIT))
    pos = nodes["position"][positioned]
    if len(pos) and (pos.min() < 0 or pos.max() >= len(head["tokens"])):
        bad = int(pos[(pos < 0) | (pos >= len(head["tokens"]))][0])
        raise _bad(path, f"a token or logit node has position {bad}, outside the "
                         f"{len(head['tokens'])} tokens")  # fmt: skip
    return Graph(
        prompt=head["prompt"],
        tokens=head["tokens"],
        token_strings=head["token_strings"],
        model_name=head["model_name"],
        transcoder_name=head["transcoder_name"],
        n_layers=head["n_layers"],
        **nodes,
        **edges,
        params=head.get("params", {}),
        scores=head.get("scores", {}),
        extra=head.get("extra", {}),
    )
