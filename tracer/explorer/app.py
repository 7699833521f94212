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

Each route is a module-level handler reading the app's :class:`Explorer` state
(``request.app.state.explorer``); :data:`API_ROUTES` lists them, :func:`create_app` adds the page
and its assets. Every error is JSON ``{"error": "one line naming the problem and the fix"}``
with a 4xx/5xx status; the server keeps serving. With a token (required off loopback) every
request must carry it (``?token=``, the ``X-Explorer-Token`` header or the cookie the page gets).
"""

from __future__ import annotations

import functools
import hmac
import inspect
import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
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
from tracer.neuronpedia import (
    NeuronpediaFormatError,
    np_node_id,
    read_subgraph,
    to_neuronpedia,
)
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


@dataclass
class Explorer:
    """What the handlers read (``request.app.state.explorer``): the graphs, the feature book,
    the intervention service, the settings, the page, and ``decode(token_id) -> text`` for logit
    tokens a graph's own token table lacks."""

    source: GraphSource
    features: FeatureBook | None
    interventions: InterventionService
    config: ExplorerConfig
    index: Path
    decode: Callable[[int], str] | None = None

    def payload(self, gid: str, full: bool) -> dict:
        """The graph view's JSON of graph ``gid`` (pruned, or the full archive)."""
        graph, where = self.source.load(gid, full)
        doc = graph_payload(graph, gid, where, self.features, self.decode)
        doc["full"] = full
        doc["can_save"] = self.source.has_store(gid)
        doc["supernodes"] = supernode_suggestions(graph, self.source.supernodes(gid, graph))
        return doc


def explorer(request: Request) -> Explorer:
    return request.app.state.explorer


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


# --- errors -----------------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _status_of(err: Exception) -> int:
    if isinstance(err, NeuronpediaFormatError | SubgraphError | InterventionRequestError):
        return 400
    if isinstance(err, GraphNotFoundError | SubgraphNotFoundError | FileNotFoundError):
        return 404
    if isinstance(err, ReadOnlyViolation):
        return 403
    if isinstance(err, StoreError):
        return 502
    if isinstance(err, ValueError | KeyError | TypeError):
        return 400
    return 500


def _failure(err: Exception) -> JSONResponse:
    status = _status_of(err)
    if status == 500:
        traceback.print_exc()
    return _error(status, str(err) or type(err).__name__)


def api(fn):
    """A route handler whose errors answer as one-line JSON messages (the server keeps
    serving); a plain function runs on the thread pool (it may block on the store)."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def handler(request):
            try:
                return await fn(request)
            except Exception as err:
                return _failure(err)
    else:

        @functools.wraps(fn)
        async def handler(request):
            try:
                return await run_in_threadpool(fn, request)
            except Exception as err:
                return _failure(err)

    return handler


async def json_body(request: Request):
    """The request's JSON body (ValueError names what is wrong with it)."""
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ValueError(f"request body of {len(raw)} bytes: at most {MAX_BODY}")
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"the request body is not JSON: {err}") from None


# --- the handlers -----------------------------------------------------------------------------


@api
def info(request: Request):
    ex = explorer(request)
    return JSONResponse({
        "store": ex.source.store is not None,
        "store_uri": getattr(ex.source.store, "uri", None),
        "folder": str(ex.source.folder) if ex.source.folder else None,
        "interventions": ex.interventions.available,
        "features": ex.features is not None and len(ex.features) > 0,
        "max_rows": ex.config.max_rows,
    })  # fmt: skip


@api
def graphs(request: Request):
    q, feat = request.query_params.get("q"), request.query_params.get("feature")
    return JSONResponse({"graphs": explorer(request).source.list(q=q, feature=feat)})


@api
def graph(request: Request):
    gid = request.path_params["gid"]
    full = request.query_params.get("full") in ("1", "true")
    return JSONResponse(explorer(request).payload(gid, full))


@api
def subgraph_list(request: Request):
    source = explorer(request).source
    gid = request.path_params["gid"]
    if not source.has_store(gid):
        return JSONResponse({"subgraphs": [], "can_save": False})
    return JSONResponse({"subgraphs": source.store.subgraphs(gid), "can_save": True})


@api
def subgraph_get(request: Request):
    source = explorer(request).source
    gid, name = request.path_params["gid"], request.path_params["name"]
    if not source.has_store(gid):
        raise SubgraphNotFoundError(f"graph {gid} is not in the store: it has no subgraphs")
    return JSONResponse(source.store.load_subgraph(gid, name).to_dict())


@api
async def subgraph_save(request: Request):
    source = explorer(request).source
    gid = request.path_params["gid"]
    sub = Subgraph.from_dict(await json_body(request))

    def save():
        source.load(gid)  # an unknown id is a 404 before anything else
        if not source.has_store(gid):
            raise SubgraphError(
                f"graph {gid} is not in the graph store, so its subgraphs cannot be saved: "
                "store it with `circuit-atlas store add FILE` and open it from the store"
            )
        source.store.save_subgraph(gid, sub)
        return source.store.subgraphs(gid)

    saved = await run_in_threadpool(save)
    return JSONResponse({"saved": sub.name, "subgraphs": saved})


@api
def neuronpedia(request: Request):
    ex = explorer(request)
    gid = request.path_params["gid"]
    graph, _ = ex.source.load(gid)
    name = request.query_params.get("subgraph")
    has = name and ex.source.has_store(gid)
    sub = ex.source.store.load_subgraph(gid, name) if has else None
    doc = to_neuronpedia(graph, features=ex.features, subgraph=sub, decode=ex.decode)
    return Response(
        json.dumps(doc, ensure_ascii=False),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{gid}.json"'},
    )


@api
async def qparams(request: Request):
    gid = request.path_params["gid"]
    body = await json_body(request)
    graph, _ = await run_in_threadpool(explorer(request).source.load, gid)
    ids = [np_node_id(graph, i) for i in range(graph.n_nodes)]
    if isinstance(body, dict) and "qParams" in body:
        sub = read_subgraph(body, name=body.get("name") or None)
    else:
        sub = Subgraph.from_qparams(body if isinstance(body, dict) else {}, "imported")
    return JSONResponse(sub.check(ids).to_dict())


@api
def feature(request: Request):
    ex = explorer(request)
    layer, index = int(request.path_params["layer"]), int(request.path_params["index"])
    tc = request.query_params.get("transcoder")
    if not tc:
        raise ValueError("name the feature's transcoder: ?transcoder=NAME")
    return JSONResponse(feature_panel(ex.features, ex.source, tc, layer, index))


@api
async def intervention(request: Request):
    ex = explorer(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("graph"), str):
        raise InterventionRequestError("the request needs 'graph': a graph id")
    graph, _ = await run_in_threadpool(ex.source.load, body["graph"])
    job = ex.interventions.submit(graph, body["graph"], body)
    return JSONResponse(job.to_dict(), status_code=202)


@api
def job(request: Request):
    j = explorer(request).interventions.job(request.path_params["jid"])
    if j is None:
        return _error(404, f"no intervention job {request.path_params['jid']!r}")
    return JSONResponse(j.to_dict())


@api
async def cypher(request: Request):
    ex = explorer(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("query"), str):
        raise ValueError('send {"query": "MATCH ... RETURN ..."}')
    store = ex.source.store
    if store is None:
        raise ValueError("the Cypher console needs a graph store: restart with --store")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError("'params' must be an object")
    max_rows = ex.config.max_rows
    res = await run_in_threadpool(lambda: store.cypher(body["query"], params, max_rows=max_rows))
    return JSONResponse(cypher_result(res, max_rows))


def page(request: Request):
    return FileResponse(explorer(request).index)


async def not_found(request: Request, exc):
    return _error(exc.status_code, f"{request.url.path}: {exc.detail}")


API_ROUTES = [
    Route("/api/info", info),
    Route("/api/graphs", graphs),
    Route("/api/graphs/{gid}", graph),
    Route("/api/graphs/{gid}/subgraphs", subgraph_list),
    Route("/api/graphs/{gid}/subgraphs", subgraph_save, methods=["POST"]),
    Route("/api/graphs/{gid}/subgraphs/{name}", subgraph_get),
    Route("/api/graphs/{gid}/neuronpedia", neuronpedia),
    Route("/api/graphs/{gid}/qparams", qparams, methods=["POST"]),
    Route("/api/features/{layer:int}/{index:int}", feature),
    Route("/api/interventions", intervention, methods=["POST"]),
    Route("/api/jobs/{jid}", job),
    Route("/api/cypher", cypher, methods=["POST"]),
]


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
    state = Explorer(
        source=source,
        features=features,
        interventions=interventions or InterventionService(),
        config=config,
        index=check_built(config.dist),
        decode=decode,
    )
    routes = [
        Route("/", page),
        *API_ROUTES,
        Mount("/assets", StaticFiles(directory=Path(config.dist) / "assets"), name="assets"),
    ]
    middleware = [Middleware(_Headers)]
    if config.token:
        middleware.append(Middleware(_Token, token=config.token))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={404: not_found, 405: not_found},
    )
    app.state.explorer = state
    app.state.interventions = state.interventions
    return app
