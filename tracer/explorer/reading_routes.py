"""The explorer's reading routes: paths, the subgraph diagram and feature labels.

Routes (added to the app by :func:`tracer.explorer.app.create_app`)::

    GET  /api/graphs/{id}/paths?node=NODE_ID&k=5&full=1   the k strongest paths
    (tracer.analyses.paths):
                                 from the tokens to NODE_ID when it is a logit (default: the
                                 most probable logit), else from NODE_ID up to the logits
    POST /api/graphs/{id}/diagram?full=1   the subgraph diagram (tracer.subgraph.diagram) of
                                 the posted {"pinnedIds", "supernodes", "clerps"}, with its
                                 scores (tracer.subgraph.subgraph_scores)
    POST /api/graphs/{id}/neuronpedia?full=1   the Neuronpedia JSON of the graph with the
                                 posted subgraph in its qParams (what is pinned now, saved or not)
    GET  /api/graphs/{id}/labels?full=1    {"labels": {node id: label}}: the stored labels of
                                 the graph's feature nodes (per feature identity)
    POST /api/labels                       {"transcoder", "layer", "index", "label"}: keep a
                                 feature's label in the store (empty: remove it)
"""

from __future__ import annotations

import json

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tracer.analyses.paths import node_step, paths, resolve_target
from tracer.explorer.app import api, explorer, json_body
from tracer.graph import FEATURE, LOGIT
from tracer.reports.neuronpedia import np_node_id, to_neuronpedia
from tracer.subgraph import Subgraph, diagram, subgraph_scores

MAX_K = 50


def _full(request: Request) -> bool:
    return request.query_params.get("full") in ("1", "true")


@api
def graph_paths(request: Request):
    ex = explorer(request)
    gid = request.path_params["gid"]
    graph, _ = ex.source.load(gid, _full(request))
    try:
        k = int(request.query_params.get("k", "5"))
    except ValueError:
        raise ValueError("k must be a whole number of paths, e.g. k=5") from None
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k={k}: ask for 1 to {MAX_K} paths")
    node = request.query_params.get("node") or None
    target = resolve_target(graph, node, ex.decode)
    found = paths(graph, target, k, ex.decode)
    return JSONResponse({
        "graph": gid,
        "target": np_node_id(graph, target),
        "target_text": node_step(graph, target, ex.decode),
        "direction": "to" if int(graph.kind[target]) == LOGIT else "from",
        "paths": [p.to_dict(graph, ex.decode) for p in found],
    })  # fmt: skip


@api
async def subgraph_diagram(request: Request):
    ex = explorer(request)
    gid = request.path_params["gid"]
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ValueError('send {"pinnedIds": [...], "supernodes": [[label, id, ...]], ...}')
    sub = Subgraph.from_dict({**body, "name": body.get("name") or "diagram"})
    graph, _ = await run_in_threadpool(ex.source.load, gid, _full(request))

    def draw() -> dict:
        return {**diagram(graph, sub), "scores": subgraph_scores(graph, sub)}

    return JSONResponse(await run_in_threadpool(draw))


@api
async def neuronpedia_now(request: Request):
    ex = explorer(request)
    gid = request.path_params["gid"]
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ValueError('send {"name", "pinnedIds": [...], "supernodes": [...], "clerps": [...]}')
    sub = Subgraph.from_dict({**body, "name": body.get("name") or "subgraph"})
    graph, _ = await run_in_threadpool(ex.source.load, gid, _full(request))
    labels = await run_in_threadpool(stored_feature_labels, ex, graph)
    doc = await run_in_threadpool(
        lambda: to_neuronpedia(
            graph, features=ex.features, subgraph=sub, decode=ex.decode, feature_labels=labels
        )
    )
    return Response(
        json.dumps(doc, ensure_ascii=False),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{gid}.json"'},
    )


def stored_feature_labels(ex, graph) -> dict[tuple[int, int], str]:
    """``{(layer, index): label}``: the edited labels the store keeps for the graph's features
    (empty without a store)."""
    feats = np.flatnonzero(graph.kind == FEATURE)
    pairs = {(int(graph.layer[i]), int(graph.feature[i])) for i in feats}
    return ex.source.feature_labels(graph.transcoder_name, pairs) if pairs else {}


@api
def graph_labels(request: Request):
    ex = explorer(request)
    gid = request.path_params["gid"]
    graph, _ = ex.source.load(gid, _full(request))
    feats = np.flatnonzero(graph.kind == FEATURE)
    stored = stored_feature_labels(ex, graph)
    out = {}
    for i in feats:
        label = stored.get((int(graph.layer[i]), int(graph.feature[i])))
        if label:
            out[np_node_id(graph, int(i))] = label
    return JSONResponse({"labels": out, "can_edit": ex.source.store is not None})


@api
async def save_label(request: Request):
    ex = explorer(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("transcoder"), str):
        raise ValueError('send {"transcoder": NAME, "layer": L, "index": I, "label": TEXT}')
    try:
        layer, index = int(body["layer"]), int(body["index"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("a label needs the feature's integer 'layer' and 'index'") from None
    label = body.get("label", "")
    stored = await run_in_threadpool(
        ex.source.set_feature_label, body["transcoder"], layer, index, label
    )
    return JSONResponse({"transcoder": body["transcoder"], "layer": layer, "index": index,
                         "label": stored})  # fmt: skip


READING_ROUTES = [
    Route("/api/graphs/{gid}/paths", graph_paths),
    Route("/api/graphs/{gid}/diagram", subgraph_diagram, methods=["POST"]),
    Route("/api/graphs/{gid}/neuronpedia", neuronpedia_now, methods=["POST"]),
    Route("/api/graphs/{gid}/labels", graph_labels),
    Route("/api/labels", save_label, methods=["POST"]),
]
