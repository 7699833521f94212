"""Where the explorer's graphs come from: the graph store and/or a folder of Parquet graphs.

Store reads go through :meth:`graphstore.GraphStore.cypher` (read-only, bounded like every user
query) or the store's own loaders. A folder holds graph files as ``circuit-atlas trace`` writes
them: ``NAME.parquet`` (pruned) and ``NAME.full.parquet`` (full); each pruned file is one graph,
its id the store's graph id (so a graph in both places is listed once, from the store).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from graphstore import GraphNotFoundError, graph_id
from graphstore.schema import feature_key
from tracer.explorer.payload import scores_with_convention
from tracer.graph import FEATURE, Graph

LIST_STORE = """
MATCH (g:Graph) WHERE g.complete = true
  AND ($q IS NULL OR toLower(g.prompt) CONTAINS $q)
RETURN g.id AS id, g.prompt AS prompt, g.model AS model, g.transcoder AS transcoder,
       g.n_nodes AS n_nodes, g.n_edges AS n_edges, g.scores_json AS scores,
       g.extra_json AS extra, g.params_json AS params
ORDER BY prompt, id
LIMIT $limit
"""

FEATURE_GRAPHS = """
MATCH (f:Feature {key: $key})<-[:INSTANCE_OF]-(n:Node)
MATCH (g:Graph {id: n.graph}) WHERE g.complete = true
RETURN g.id AS graph, g.prompt AS prompt, collect(n.position) AS positions,
       max(n.activation) AS activation
ORDER BY activation DESC, graph
LIMIT $limit
"""

# Every (layer, index) key of the store's transcoders: feature search without a transcoder.
FEATURE_KEYS = "MATCH (t:Transcoder) RETURN t.name AS name ORDER BY name"


@dataclass
class _FolderEntry:
    mtime: float
    graph: Graph
    gid: str


def _summary(graph: Graph, gid: str, source: str) -> dict:
    v = graph.extra.get("validation")
    return {
        "id": gid,
        "prompt": graph.prompt,
        "source": source,
        "model": graph.model_name,
        "transcoder": graph.transcoder_name,
        "n_nodes": graph.n_nodes,
        "n_edges": graph.n_edges,
        "scores": scores_with_convention(graph.scores, graph.params),
        "validation": _flat(v) if isinstance(v, dict) else None,
    }


def _flat(v: dict) -> dict:
    return {k: x for k, x in v.items() if isinstance(x, int | float | str | bool) or x is None}


class GraphSource:
    """Graphs of a store (``store``: an open GraphStore or None) and a folder (or None).

    Loaded graphs are kept in a small LRU cache (``cache_size`` graphs)."""

    def __init__(self, store=None, folder: str | Path | None = None, cache_size: int = 8):
        if store is None and folder is None:
            raise ValueError("give the explorer a graph store (--store) or a folder (--graphs)")
        self.store = store
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and not self.folder.is_dir():
            raise FileNotFoundError(
                f"graph folder {self.folder} does not exist: give the folder that "
                "`circuit-atlas trace --out` wrote (default runs/graphs)"
            )
        self._folder: dict[Path, _FolderEntry] = {}
        self._cache: OrderedDict[tuple[str, bool], tuple[Graph, str]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # --- the folder ----------------------------------------------------------------------------

    def _scan_folder(self) -> dict[str, _FolderEntry]:
        if self.folder is None:
            return {}
        seen = {}
        for path in sorted(self.folder.glob("*.parquet")):
            if path.name.endswith(".full.parquet"):
                continue
            mtime = path.stat().st_mtime
            entry = self._folder.get(path)
            if entry is None or entry.mtime != mtime:
                try:
                    g = Graph.load(path)
                except (OSError, ValueError):
                    continue  # not a graph file: not listed
                entry = _FolderEntry(mtime, g, graph_id(g))
                self._folder[path] = entry
            seen[path] = entry
        return {e.gid: e for p, e in seen.items()}

    # --- listing -------------------------------------------------------------------------------

    def list(self, q: str | None = None, feature: str | None = None, limit: int = 500) -> list:
        """Graph summaries (id, prompt, source, sizes, scores, validation), filtered by prompt
        text ``q`` (case-insensitive substring) and ``feature`` ("layer/index": graphs that
        contain that feature)."""
        q = q.strip().lower() if q and q.strip() else None
        want = _parse_feature(feature) if feature else None
        out: dict[str, dict] = {}
        if self.store is not None:
            allowed = None
            if want is not None:
                allowed = {r["graph"] for r in self._store_feature_graphs(*want, limit=10_000)}
            res = self.store.cypher(LIST_STORE, {"q": q, "limit": int(limit)})
            for r in res.records():
                if allowed is not None and r["id"] not in allowed:
                    continue
                extra = json.loads(r["extra"] or "{}")
                v = extra.get("validation")
                out[r["id"]] = {
                    "id": r["id"], "prompt": r["prompt"], "source": "store",
                    "model": r["model"], "transcoder": r["transcoder"],
                    "n_nodes": r["n_nodes"], "n_edges": r["n_edges"],
                    "scores": scores_with_convention(
                        json.loads(r["scores"] or "{}"), json.loads(r["params"] or "{}")
                    ),
                    "validation": _flat(v) if isinstance(v, dict) else None,
                }  # fmt: skip
        with self._lock:
            folder = self._scan_folder()
        for gid, e in folder.items():
            if gid in out or (q and q not in e.graph.prompt.lower()):
                continue
            if want is not None and not _has_feature(e.graph, *want):
                continue
            out[gid] = _summary(e.graph, gid, "folder")
        return sorted(out.values(), key=lambda d: (d["prompt"], d["id"]))[:limit]

    # --- loading -------------------------------------------------------------------------------

    def load(self, gid: str, full: bool = False) -> tuple[Graph, str]:
        """(graph, where it came from: "store" or "folder"); ``full``: the unpruned graph
        (the store's Parquet archive, or the folder's ``.full.parquet`` beside the file)."""
        key = (gid, full)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        got = self._load(gid, full)
        with self._lock:
            self._cache[key] = got
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return got

    def _load(self, gid: str, full: bool) -> tuple[Graph, str]:
        if self.store is not None:
            try:
                g = self.store.load_full(gid) if full else self.store.load(gid)
                return g, "store"
            except (GraphNotFoundError, FileNotFoundError):
                pass
        with self._lock:
            folder = self._scan_folder()
        if gid in folder:
            if not full:
                return folder[gid].graph, "folder"
            path = next(p for p, e in self._folder.items() if e.gid == gid)
            full_path = path.with_name(path.name[: -len(".parquet")] + ".full.parquet")
            if full_path.exists():
                return Graph.load(full_path), "folder"
            raise GraphNotFoundError(f"graph {gid} has no full graph file {full_path.name}")
        where = " and ".join(
            w for w, on in (("the store", self.store), (str(self.folder), self.folder)) if on
        )
        raise GraphNotFoundError(
            f"no graph with id {gid!r} in {where}: pick one from the graph list"
        )

    def has_store(self, gid: str) -> bool:
        """Whether graph ``gid`` is a complete graph of the store (subgraphs can be saved)."""
        if self.store is None:
            return False
        res = self.store.cypher(
            "MATCH (g:Graph {id: $id}) WHERE g.complete = true RETURN count(g) AS c", {"id": gid}
        )
        return bool(res.rows[0][0])

    def supernodes(self, gid: str, graph: Graph) -> list[dict]:
        """The automatic supernodes of graph ``gid`` (``graph``, as loaded): those stored with
        it in the store, else those its file holds (``extra['supernodes']``)."""
        found = self.store.supernodes(gid) if self.store is not None else []
        return found or list(graph.extra.get("supernodes") or [])

    # --- features ------------------------------------------------------------------------------

    def feature_graphs(self, transcoder: str, layer: int, index: int, limit: int = 50) -> list:
        """Graphs where feature (layer, index) of ``transcoder`` is a node: ``{"graph",
        "prompt", "positions", "activation", "source"}``, strongest first."""
        out: dict[str, dict] = {}
        if self.store is not None:
            res = self.store.cypher(
                FEATURE_GRAPHS, {"key": feature_key(transcoder, layer, index), "limit": limit}
            )
            for r in res.records():
                out[r["graph"]] = {**r, "positions": sorted(r["positions"]), "source": "store"}
        with self._lock:
            folder = self._scan_folder()
        for gid, e in folder.items():
            g = e.graph
            if gid in out or g.transcoder_name != transcoder:
                continue
            sel = (g.kind == FEATURE) & (g.layer == layer) & (g.feature == index)
            if sel.any():
                out[gid] = {
                    "graph": gid, "prompt": g.prompt, "source": "folder",
                    "positions": sorted(int(p) for p in g.position[sel]),
                    "activation": float(g.activation[sel].max()),
                }  # fmt: skip
        rows = sorted(out.values(), key=lambda d: (-(d["activation"] or 0.0), d["graph"]))
        return rows[:limit]

    # --- feature labels (kept in the store per feature identity) --------------------------------

    def feature_labels(self, transcoder: str, features=None) -> dict[tuple[int, int], str]:
        """``{(layer, index): label}`` of the labels people gave ``transcoder``'s features
        (empty without a store)."""
        if self.store is None:
            return {}
        return self.store.feature_labels(transcoder, features)

    def set_feature_label(self, transcoder: str, layer: int, index: int, label: str) -> str:
        """Keep ``label`` for feature (layer, index) of ``transcoder`` in the store; ValueError
        when the explorer has no store."""
        if self.store is None:
            raise ValueError(
                "feature labels are kept in the graph store, and this explorer has none: "
                "restart it with --store (or without --graphs alone)"
            )
        return self.store.set_feature_label(transcoder, layer, index, label)

    def _store_feature_graphs(self, layer: int, index: int, limit: int) -> list:
        names = [r[0] for r in self.store.cypher(FEATURE_KEYS).rows]
        rows = []
        for name in names:
            rows += self.store.cypher(
                FEATURE_GRAPHS, {"key": feature_key(name, layer, index), "limit": limit}
            ).records()
        return rows


def _parse_feature(text: str) -> tuple[int, int]:
    """``"layer/index"`` (also ``L3/F17``, ``3 17``, ``3_17``) as integers."""
    import re

    m = re.fullmatch(r"\s*L?(\d+)\s*[/_ ,]\s*F?(\d+)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(
            f"feature {text!r} is not 'layer/index': write e.g. 3/17 (layer 3, feature 17)"
        )
    return int(m.group(1)), int(m.group(2))


def _has_feature(g: Graph, layer: int, index: int) -> bool:
    return bool(((g.kind == FEATURE) & (g.layer == layer) & (g.feature == index)).any())
