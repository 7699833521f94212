"""The explorer's web application (Starlette): JSON routes under ``/api`` and the built page.

Routes::

    GET  /                                  the page (built by scripts/setup into web/dist)
    GET  /api/info                          what this server has (store, folder, engine)
    GET  /api/graphs?q=TEXT&feature=L/F     graph list, filtered by prompt text / feature
    GET  /api/graphs/{id}?full=1            one graph (pruned; full: the unpruned archive)
    GET  /api/graphs/{id}/subgraphs         saved subgraphs of a graph
    GET  /api/graphs/{id}/subgraphs/{name}  one saved subgraph
    POST /api/graphs/{id}/subgraphs         save a subgraph (the store's only write)
    GET  /api/graphs/{id}/neuronpedia?subgraph=NAME   Neuronpedia JSON with qParams
    POST /api/graphs/{id}/qparams           read a subgraph from a Neuronpedia JSON / qParams
    GET  /api/features/{layer}/{index}?transcoder=T   the feature panel
    POST /api/interventions                 queue an intervention; GET /api/jobs/{id} polls it
    POST /api/cypher                        read-only Cypher (GraphStore.cypher)

Every error is JSON ``{"error": "one line naming the problem and the fix"}`` with a 4xx/5xx
status; the server keeps serving. With a token (required off loopback) every request must
carry it (``?token=``, the ``X-Explorer-Token`` header or the cookie the page gets).
"""

from __future__ import annotations

import hmac
import json
import traceback
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from graphstore.errors import (
    GraphNotFoundError,
    ReadOnlyViolation,
    StoreError,
    SubgraphNotFoundError,
)
from tracer.explorer.cypher import cypher_result
from tracer.explorer.features import feature_panel
from tracer.explorer.intervene import InterventionRequestError, InterventionService
from tracer.explorer.payload import graph_payload, supernode_suggestions
from tracer.explorer.sources import GraphSource
from tracer.features import FeatureBook
from tracer.neuronpedia import NeuronpediaFormatError, read_subgraph, to_neuronpedia
from tracer.subgraph import Subgraph, SubgraphError

WEB_DIR = Path(__file__).parent / "web"
DIST_DIR = WEB_DIR / "dist"
TOKEN_COOKIE = "explorer_token"
# The page may load only what this server serves: a browser-enforced guard that nothing is
# fetched from the internet at run time.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
MAX_BODY = 2_000_000  # bytes of a JSON request body


class ExplorerSetupError(RuntimeError):
    """The explorer cannot start (its page is not built, no graphs to show)."""


@dataclass
class ExplorerConfig:
    """Server settings. ``token``: required on every request when set; ``max_rows``: rows the
    Cypher console returns at most; ``dist``: the built page (default web/dist)."""

    token: str | None = None
    max_rows: int = 1000
    dist: Path = DIST_DIR


def check_built(dist: Path = DIST_DIR) -> Path:
    index = Path(dist) / "index.html"
    if not index.exists():
        raise ExplorerSetupError(
            f"the explorer's page is not built ({index} is missing): run `bash scripts/setup` "
            "(it runs npm ci and the build in tracer/explorer/web)"
        )
    return index


class _Token(BaseHTTPMiddleware):
    def __init__(self, app, token: str):
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next):
        given = (
            request.headers.get("x-explorer-token")
            or request.query_params.get("token")
            or request.cookies.get(TOKEN_COOKIE)
            or ""
        )
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return JSONResponse(
                {"error": "this explorer needs its access token: open the URL that "
                          "`circuit-atlas serve` printed (it ends in ?token=...)"},
                status_code=401,
            )  # fmt: skip
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
        return response


class _Headers(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _status_of(err: Exception) -> int:
    if isinstance(err, GraphNotFoundError | SubgraphNotFoundError | FileNotFoundError):
        return 404
    if isinstance(err, ReadOnlyViolation):
        return 403
    if isinstance(err, StoreError):
        return 502
    if isinstance(err, ValueError | KeyError | TypeError):
        return 400
    return 500


async def _json_body(request: Request):
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ValueError(f"request body of {len(raw)} bytes: at most {MAX_BODY}")
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"the request body is not JSON: {err}") from None


def create_app(
    source: GraphSource,
    features: FeatureBook | None = None,
    interventions: InterventionService | None = None,
    config: ExplorerConfig | None = None,
    decode=None,
) -> Starlette:
    """The explorer as an ASGI app. ``decode(token_id) -> text`` names logit tokens that a
    graph's own token table lacks (the model's tokenizer when the engine is loaded)."""
    config = config or ExplorerConfig()
    index = check_built(config.dist)
    interventions = interventions or InterventionService()

    def payload(gid: str, full: bool) -> dict:
        graph, where = source.load(gid, full)
        doc = graph_payload(graph, gid, where, features, decode)
        doc["full"] = full
        doc["can_save"] = source.has_store(gid)
        doc["supernodes"] = supernode_suggestions(graph, source.supernodes(gid, graph))
        return doc

    def info(request: Request):
        return JSONResponse({
            "store": source.store is not None,
            "store_uri": getattr(source.store, "uri", None),
            "folder": str(source.folder) if source.folder else None,
            "interventions": interventions.available,
            "features": features is not None and len(features) > 0,
            "max_rows": config.max_rows,
        })  # fmt: skip

    def graphs(request: Request):
        q, feat = request.query_params.get("q"), request.query_params.get("feature")
        return JSONResponse({"graphs": source.list(q=q, feature=feat)})

    def graph(request: Request):
        gid = request.path_params["gid"]
        return JSONResponse(payload(gid, request.query_params.get("full") in ("1", "true")))

    def subgraph_list(request: Request):
        gid = request.path_params["gid"]
        if not source.has_store(gid):
            return JSONResponse({"subgraphs": [], "can_save": False})
        return JSONResponse({"subgraphs": source.store.subgraphs(gid), "can_save": True})

    def subgraph_get(request: Request):
        gid, name = request.path_params["gid"], request.path_params["name"]
        if not source.has_store(gid):
            raise SubgraphNotFoundError(f"graph {gid} is not in the store: it has no subgraphs")
        return JSONResponse(source.store.load_subgraph(gid, name).to_dict())

    async def subgraph_save(request: Request):
        gid = request.path_params["gid"]
        body = await _json_body(request)
        sub = Subgraph.from_dict(body)

        def save():
            source.load(gid)  # an unknown id is a 404 before anything else
            if not source.has_store(gid):
                raise SubgraphError(
                    f"graph {gid} is not in the graph store, so its subgraphs cannot be saved: "
                    "store it with `circuit-atlas store add FILE` and open it from the store"
                )
            source.store.save_subgraph(gid, sub)
            return source.store.subgraphs(gid)

        from starlette.concurrency import run_in_threadpool

        saved = await run_in_threadpool(save)
        return JSONResponse({"saved": sub.name, "subgraphs": saved})

    def neuronpedia(request: Request):
        gid = request.path_params["gid"]
        graph, _ = source.load(gid)
        name = request.query_params.get("subgraph")
        sub = source.store.load_subgraph(gid, name) if name and source.has_store(gid) else None
        doc = to_neuronpedia(graph, features=features, subgraph=sub, decode=decode)
        return Response(
            json.dumps(doc, ensure_ascii=False),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{gid}.json"'},
        )

    async def qparams(request: Request):
        gid = request.path_params["gid"]
        body = await _json_body(request)
        graph, _ = source.load(gid)
        from tracer.neuronpedia import np_node_id

        ids = [np_node_id(graph, i) for i in range(graph.n_nodes)]
        if isinstance(body, dict) and "qParams" in body:
            sub = read_subgraph(body, name=body.get("name") or None)
        else:
            sub = Subgraph.from_qparams(body if isinstance(body, dict) else {}, "imported")
        return JSONResponse(sub.check(ids).to_dict())

    def feature(request: Request):
        layer, index = int(request.path_params["layer"]), int(request.path_params["index"])
        tc = request.query_params.get("transcoder")
        if not tc:
            raise ValueError("name the feature's transcoder: ?transcoder=NAME")
        return JSONResponse(feature_panel(features, source, tc, layer, index))

    async def intervention(request: Request):
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("graph"), str):
            raise InterventionRequestError("the request needs 'graph': a graph id")
        from starlette.concurrency import run_in_threadpool

        graph, _ = await run_in_threadpool(source.load, body["graph"])
        job = interventions.submit(graph, body["graph"], body)
        return JSONResponse(job.to_dict(), status_code=202)

    def job(request: Request):
        j = interventions.job(request.path_params["jid"])
        if j is None:
            return _error(404, f"no intervention job {request.path_params['jid']!r}")
        return JSONResponse(j.to_dict())

    async def cypher(request: Request):
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            raise ValueError('send {"query": "MATCH ... RETURN ..."}')
        if source.store is None:
            raise ValueError("the Cypher console needs a graph store: restart with --store")
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError("'params' must be an object")
        from starlette.concurrency import run_in_threadpool

        res = await run_in_threadpool(
            lambda: source.store.cypher(body["query"], params, max_rows=config.max_rows)
        )
        return JSONResponse(cypher_result(res, config.max_rows))

    def page(request: Request):
        return FileResponse(index)

    def wrap(fn):
        """Errors as one-line JSON messages (the server keeps serving)."""
        import inspect

        if inspect.iscoroutinefunction(fn):

            async def handler(request):
                try:
                    return await fn(request)
                except Exception as err:
                    return _failure(err)
        else:
            from starlette.concurrency import run_in_threadpool

            async def handler(request):
                try:
                    return await run_in_threadpool(fn, request)
                except Exception as err:
                    return _failure(err)

        return handler

    routes = [
        Route("/", page),
        Route("/api/info", wrap(info)),
        Route("/api/graphs", wrap(graphs)),
        Route("/api/graphs/{gid}", wrap(graph)),
        Route("/api/graphs/{gid}/subgraphs", wrap(subgraph_list)),
        Route("/api/graphs/{gid}/subgraphs", wrap(subgraph_save), methods=["POST"]),
        Route("/api/graphs/{gid}/subgraphs/{name}", wrap(subgraph_get)),
        Route("/api/graphs/{gid}/neuronpedia", wrap(neuronpedia)),
        Route("/api/graphs/{gid}/qparams", wrap(qparams), methods=["POST"]),
        Route("/api/features/{layer:int}/{index:int}", wrap(feature)),
        Route("/api/interventions", wrap(intervention), methods=["POST"]),
        Route("/api/jobs/{jid}", wrap(job)),
        Route("/api/cypher", wrap(cypher), methods=["POST"]),
        Mount("/assets", StaticFiles(directory=Path(config.dist) / "assets"), name="assets"),
    ]
    middleware = [Middleware(_Headers)]
    if config.token:
        middleware.append(Middleware(_Token, token=config.token))
    app = Starlette(routes=routes, middleware=middleware)

    async def not_found(request, exc):
        return _error(exc.status_code, f"{request.url.path}: {exc.detail}")

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_found)
    app.state.interventions = interventions
    return app


def _failure(err: Exception) -> JSONResponse:
    status = _status_of(err)
    if status == 500:
        traceback.print_exc()
    if isinstance(err, NeuronpediaFormatError | SubgraphError | InterventionRequestError):
        status = 400
    return _error(status, str(err) or type(err).__name__)
