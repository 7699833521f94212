"""Export to the Neuronpedia / circuit-tracer attribution-graph JSON, so their viewers open our
graphs.

The format (Neuronpedia's ``graph-schema.json``, "Anthropic Attribution Graph" v1, and what
circuit-tracer writes): a top-level object with ``metadata``, ``qParams``, ``nodes`` and
``links``.

Node conventions (circuit-tracer's, which the viewer parses back out of the ids):
  feature  node_id ``{layer}_{index}_{pos}``, feature = Cantor pairing of (layer, index),
           feature_type "cross layer transcoder" (also used for per-layer transcoders),
           jsNodeId ``{layer}_{index}-0``
  error    node_id ``{layer}_-1_{pos}``, feature -1, "mlp reconstruction error",
           jsNodeId ``{layer}_-1-{pos}``
  token    node_id ``E_{vocab}_{pos}``, feature = pos, layer "E", "embedding",
           jsNodeId ``E_{vocab}-{pos}``
  logit    node_id ``{n_layers + 1}_{vocab}_{pos}``, feature = vocab id, layer n_layers + 1,
           "logit", jsNodeId ``L_{vocab}-{pos}``, clerp ``Output "tok" (p=0.123)``, token_prob,
           is_target_logit true for the most probable logit
``layer`` is always a string. ``influence`` is the node's *cumulative* influence share (nodes
sorted by influence, running sum over the total): the viewer hides nodes whose value exceeds the
chosen ``node_threshold``; logits carry null. ``activation`` is null except for features.
Links carry ``source``, ``target`` (node ids) and ``weight`` = A[target, source].
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from tracer.graph import ERROR, FEATURE, LOGIT, TOKEN, Graph
from tracer.reports.annotate import display_influence, visible, vocab_text
from tracer.reports.feature_book import FeatureBook
from tracer.subgraph import Subgraph

SCHEMA_VERSION = 1

# The documented fields: name -> allowed JSON types (Neuronpedia graph-schema.json), and which
# are required. check_document() tests an export against exactly these.
METADATA_FIELDS = {
    "slug": (str,),
    "scan": (str,),
    "transcoder_list": (list,),
    "prompt_tokens": (list,),
    "prompt": (str,),
    "node_threshold": (int, float),
    "schema_version": (int,),
    "info": (dict,),
    "generation_settings": (dict,),
    "pruning_settings": (dict,),
    "feature_details": (dict,),
}
METADATA_REQUIRED = ("slug", "scan", "prompt_tokens", "prompt")
QPARAMS_FIELDS = {
    "pinnedIds": (list,),
    "supernodes": (list,),
    "linkType": (str,),
    "clickedId": (str,),
    "sg_pos": (str,),
}
NODE_FIELDS = {
    "node_id": (str,),
    "feature": (int, type(None)),
    "layer": (str, int),
    "ctx_idx": (int,),
    "feature_type": (str,),
    "token_prob": (int, float),
    "is_target_logit": (bool,),
    "run_idx": (int,),
    "reverse_ctx_idx": (int,),
    "jsNodeId": (str,),
    "clerp": (str,),
    "influence": (int, float, type(None)),
    "activation": (int, float, type(None)),
}
NODE_REQUIRED = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp")
LINK_FIELDS = {"source": (str,), "target": (str,), "weight": (int, float)}
FEATURE_TYPES = {
    FEATURE: "cross layer transcoder",
    ERROR: "mlp reconstruction error",
    TOKEN: "embedding",
    LOGIT: "logit",
}


class NeuronpediaFormatError(ValueError):
    """A document that does not follow the Neuronpedia graph JSON fields."""


def cantor_pair(x: int, y: int) -> int:
    """The Cantor pairing of two non-negative integers (the viewer's feature number)."""
    return (x + y) * (x + y + 1) // 2 + y


def np_node_id(graph: Graph, i: int) -> str:
    """Neuronpedia ``node_id`` of node ``i`` (see the module docstring)."""
    k, layer, pos, f = (int(graph.kind[i]), int(graph.layer[i]), int(graph.position[i]),
                        int(graph.feature[i]))  # fmt: skip
    if k == FEATURE:
        return f"{layer}_{f}_{pos}"
    if k == ERROR:
        return f"{layer}_-1_{pos}"
    if k == TOKEN:
        return f"E_{f}_{pos}"
    return f"{graph.n_layers + 1}_{f}_{pos}"


def cumulative_influence(graph: Graph) -> np.ndarray:
    """[n_nodes] running share of total influence with nodes sorted by influence, largest
    first (NaN for logits): the ``influence`` value the viewer prunes by. A circuit pruned in
    circuit-tracer's convention carries circuit-tracer's own values (the share within the full
    graph, ``extra['cumulative_influence']``); otherwise the share within this graph, influence
    as in :func:`tracer.reports.annotate.display_influence` (recorded by pruning, else computed)."""
    out = np.full(graph.n_nodes, np.nan)
    recorded = graph.extra.get("cumulative_influence")
    if graph.params.get("convention") == "circuit-tracer" and recorded is not None:
        if len(recorded) == graph.n_nodes:
            keep = graph.kind != LOGIT
            out[keep] = np.asarray(recorded, dtype=np.float64)[keep]
            return out
    infl = display_influence(graph)
    inner = np.flatnonzero(graph.kind != LOGIT)
    total = float(infl[inner].sum())
    if total <= 0:
        out[inner] = 0.0
        return out
    order = inner[np.argsort(-infl[inner], kind="stable")]
    out[order] = np.cumsum(infl[order]) / total
    return out


def to_neuronpedia(
    graph: Graph,
    slug: str | None = None,
    scan: str | None = None,
    features: FeatureBook | None = None,
    decode: Callable[[int], str] | None = None,
    node_threshold: float | None = None,
    subgraph: Subgraph | None = None,
    feature_labels: Mapping[tuple[int, int], str] | None = None,
) -> dict:
    """The graph as a Neuronpedia graph document (a JSON-ready dict).

    A feature node's ``clerp`` is its edited label (``feature_labels``: ``{(layer, index):
    label}``, the labels people wrote in the explorer, ``GraphStore.feature_labels``) where it
    has one, else the automatic label of ``features`` (``FeatureInfo.short_label``), else "".

    ``subgraph`` (pinned nodes, supernodes, labels; checked against the graph's node ids) goes
    into ``qParams`` (``pinnedIds``, ``supernodes``, and the labels as an extra ``clerps``
    field), so the viewer opens with it and :func:`read_subgraph` reads it back.

    ``scan`` names the model on Neuronpedia (default: the graph's model name); ``slug`` the
    graph (default: derived from the prompt). ``node_threshold`` is the viewer's default pruning
    of the cumulative influence; the default 1.0 shows every exported node.
    """
    slug = slug or slugify(graph.prompt)
    cum = cumulative_influence(graph)
    logits = np.flatnonzero(graph.kind == LOGIT)
    target = int(logits[np.argmax(graph.probability[logits])]) if len(logits) else -1
    nodes = []
    for i in range(graph.n_nodes):
        k = int(graph.kind[i])
        layer, pos, f = int(graph.layer[i]), int(graph.position[i]), int(graph.feature[i])
        node = {
            "node_id": np_node_id(graph, i),
            "feature": f,
            "layer": str(layer),
            "ctx_idx": pos,
            "feature_type": FEATURE_TYPES[k],
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "jsNodeId": "",
            "clerp": "",
            "influence": None if np.isnan(cum[i]) else float(cum[i]),
            "activation": None,
        }
        if k == FEATURE:
            node["feature"] = cantor_pair(layer, f)
            node["jsNodeId"] = f"{layer}_{f}-0"
            node["activation"] = float(graph.activation[i])
            edited = (feature_labels or {}).get((layer, f))
            info = features.get(layer, f) if features and not edited else None
            node["clerp"] = edited or (info.short_label() if info else "")
        elif k == ERROR:
            node["feature"] = -1
            node["jsNodeId"] = f"{layer}_-1-{pos}"
        elif k == TOKEN:
            node["feature"] = pos
            node["layer"] = "E"
            node["jsNodeId"] = f"E_{f}-{pos}"
        else:
            p = float(graph.probability[i])
            node["layer"] = str(graph.n_layers + 1)
            node["token_prob"] = p
            node["is_target_logit"] = i == target
            node["jsNodeId"] = f"L_{f}-{pos}"
            node["clerp"] = f'Output "{visible(vocab_text(graph, f, decode))}" (p={p:.3f})'
        nodes.append(node)
    ids = [n["node_id"] for n in nodes]
    links = [
        {"source": ids[s], "target": ids[t], "weight": float(w)}
        for t, s, w in zip(
            graph.target.tolist(), graph.source.tolist(), graph.weight.tolist(), strict=True
        )
    ]
    params = graph.params
    metadata = {
        "slug": slug,
        "scan": scan or graph.model_name,
        "transcoder_list": [graph.transcoder_name] if graph.transcoder_name else [],
        "prompt_tokens": [visible(t) for t in graph.token_strings],
        "prompt": graph.prompt,
        "node_threshold": 1.0 if node_threshold is None else float(node_threshold),
        "schema_version": SCHEMA_VERSION,
        "info": {
            "generator": {"name": "circuit-atlas", "version": _version()},
            "source_urls": [],
            "create_time_ms": int(time.time() * 1000),
        },
        "generation_settings": {
            k: params[k]
            for k in ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes")
            if k in params and params[k] is not None
        },
        "pruning_settings": {
            k: params[k] for k in ("node_threshold", "edge_threshold", "convention") if k in params
        },
    }
    if graph.scores:  # scores under the convention they were computed in
        metadata["info"]["scores"] = {
            **{k: float(v) for k, v in graph.scores.items() if isinstance(v, int | float)},
            "convention": params.get("convention"),
        }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
               "sg_pos": ""}  # fmt: skip
    if subgraph is not None:
        qparams.update(subgraph.check(ids).to_qparams())
    doc = {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}
    check_document(doc)
    return doc


def read_subgraph(doc: Mapping, name: str | None = None) -> Subgraph:
    """The subgraph (pinned nodes, supernodes, labels) a Neuronpedia document keeps in its
    ``qParams``; its ids are checked against the document's nodes. ``name`` defaults to the
    document's slug."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("qParams"), Mapping):
        raise NeuronpediaFormatError("the document has no 'qParams' object")
    name = name or str((doc.get("metadata") or {}).get("slug") or "imported")
    sub = Subgraph.from_qparams(doc["qParams"], name=name)
    return sub.check(n.get("node_id") for n in doc.get("nodes", []) if isinstance(n, Mapping))


def write_neuronpedia(graph: Graph, path: str | Path, **kwargs) -> Path:
    """Write :func:`to_neuronpedia` as JSON to ``path`` (atomically)."""
    path = Path(path)
    doc = to_neuronpedia(graph, **kwargs)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(doc, ensure_ascii=False, allow_nan=False), encoding="utf-8")
        tmp.replace(path)
    except OSError as err:
        raise OSError(
            f"cannot write {path}: {err.strerror or err}; choose a writable output folder"
        ) from err
    return path


def check_document(doc: Mapping) -> None:
    """Raise :class:`NeuronpediaFormatError` listing every way ``doc`` departs from the
    documented fields: required keys, JSON types, node ids unique, links between known ids."""
    problems: list[str] = []
    for key in ("metadata", "qParams", "nodes", "links"):
        if key not in doc:
            problems.append(f"missing top-level '{key}'")
    if problems:
        raise NeuronpediaFormatError("; ".join(problems))
    _check_fields(doc["metadata"], METADATA_FIELDS, METADATA_REQUIRED, "metadata", problems)
    _check_fields(doc["qParams"], QPARAMS_FIELDS, (), "qParams", problems)
    seen: set[str] = set()
    for j, node in enumerate(doc["nodes"]):
        _check_fields(node, NODE_FIELDS, NODE_REQUIRED, f"nodes[{j}]", problems)
        nid = node.get("node_id")
        if nid in seen:
            problems.append(f"nodes[{j}]: duplicate node_id {nid!r}")
        seen.add(nid)
    for j, link in enumerate(doc["links"]):
        _check_fields(link, LINK_FIELDS, tuple(LINK_FIELDS), f"links[{j}]", problems)
        for end in ("source", "target"):
            if link.get(end) not in seen:
                problems.append(f"links[{j}]: {end} {link.get(end)!r} is not a node_id")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise NeuronpediaFormatError("; ".join(problems[:10]) + more)


def slugify(text: str, max_len: int = 60) -> str:
    """Lower-case ASCII letters, digits and dashes (a Neuronpedia slug / file name)."""
    out, dash = [], False
    for ch in text.lower():
        if ch.isascii() and ch.isalnum():
            out.append(ch)
            dash = False
        elif not dash and out:
            out.append("-")
            dash = True
    slug = "".join(out).strip("-")[:max_len].strip("-")
    return slug or "graph"


def _check_fields(obj, fields, required, where, problems) -> None:
    if not isinstance(obj, Mapping):
        problems.append(f"{where} is not an object")
        return
    for key in required:
        if key not in obj:
            problems.append(f"{where}: missing required '{key}'")
    for key, value in obj.items():
        types = fields.get(key)
        if types is None:
            continue  # extra keys are allowed by the schema
        # bool is an int in Python but not a JSON number.
        if isinstance(value, bool) and bool not in types:
            problems.append(f"{where}.{key}: boolean where {_names(types)} expected")
        elif not isinstance(value, types):
            problems.append(f"{where}.{key}: {type(value).__name__} where {_names(types)} expected")


def _names(types) -> str:
    return "/".join("null" if t is type(None) else t.__name__ for t in types)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("circuit-atlas")
    except Exception:  # not installed as a distribution (running from a checkout)
        return "0"
