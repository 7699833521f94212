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
    POST /api/interventions                 queue an intervention (429 when the queue is full)
    GET  /api/jobs/{id}                     poll a job (a finished one is kept until read)
    POST /api/jobs/{id}/cancel              cancel a queued or running job
    POST /api/cypher                        read-only Cypher (GraphStore.cypher)

Each route is a module-level handler reading the app's :class:`Explorer` state
(``request.app.state.explorer``); :data:`API_ROUTES` lists them, :func:`create_app` adds the page
and its assets. Every error is JSON ``{"error": "one line naming the problem and the fix"}``
with a 4xx status (503 when the store is down); the server keeps serving. What a request must
be to reach a handler (Host, access token, Origin, CSRF token, bounded JSON body) is
:mod:`tracer.explorer.security`'s to check.
"""

from __future__ import annotations

import functools
import inspect
import json
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from graphstore.errors import (
    GraphNotFoundError,
    QueryTimeoutError,
    ReadOnlyViolation,
    ResultTooLargeError,
    StoreError,
    StoreUnavailableError,
    SubgraphNotFoundError,
)
from tracer.explorer.cypher import cypher_result
from tracer.explorer.feature_panel import feature_panel
from tracer.explorer.intervention_jobs import (
    InterventionRequestError,
    InterventionService,
    JobNotFoundError,
    QueueFullError,
)
from tracer.explorer.payload import graph_payload, supernode_suggestions
from tracer.explorer.security import BODY_KEY, MAX_BODY, MAX_DEPTH, Door, DoorPolicy, parse_json
from tracer.explorer.sources import GraphSource
from tracer.reports.feature_book import FeatureBook
from tracer.reports.neuronpedia import (
    NeuronpediaFormatError,
    np_node_id,
    read_subgraph,
    to_neuronpedia,
)
from tracer.subgraph import Subgraph, SubgraphError

WEB_DIR = Path(__file__).parent / "web"
DIST_DIR = WEB_DIR / "dist"
MAX_FEATURE_INDEX = 2**31 - 1  # graphs store feature indices as int32


class ExplorerSetupError(RuntimeError):
    """The explorer cannot start (its page is not built, no graphs to show)."""


@dataclass
class ExplorerConfig:
    """Server settings. ``token``: the access token every request must carry (None: none;
    ``circuit-atlas serve`` always sets one unless --no-token on loopback); ``host``: the
    address the server listens on and ``allow_hosts`` more Host names it answers to (see
    :mod:`tracer.explorer.security`); ``max_body``: bytes of a request body; ``max_depth``:
    JSON nesting; ``max_rows``: rows the Cypher console returns at most; ``dist``: the built
    page (default web/dist)."""

    token: str | None = None
    host: str = "127.0.0.1"
    allow_hosts: tuple[str, ...] = ()
    max_body: int = MAX_BODY
    max_depth: int = MAX_DEPTH
    max_rows: int = 1000
    dist: Path = DIST_DIR

    def policy(self) -> DoorPolicy:
        return DoorPolicy(
            token=self.token,
            host=self.host,
            allow_hosts=tuple(self.allow_hosts),
            max_body=self.max_body,
            max_depth=self.max_depth,
        )


class StoreDown(StoreUnavailableError):
    """The store does not answer (found by a quick probe, before a request waits on it)."""


class StoreProbe:
    """Whether the store's Bolt port accepts a connection, asked at most every ``every``
    seconds while it does: a request finds a stopped store in about ``timeout`` seconds (503)
    instead of waiting out the driver's retries."""

    def __init__(self, store, timeout: float = 0.5, every: float = 2.0):
        self.store, self.timeout, self.every = store, timeout, every
        self._ok_at = -1e9
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise StoreDown naming ``circuit-atlas store start`` when the store is down."""
        from urllib.parse import urlsplit

        uri = getattr(self.store, "uri", None)
        if self.store is None or not uri or time.monotonic() - self._ok_at < self.every:
            return
        with self._lock:
            parts = urlsplit(uri)
            try:
                with socket.create_connection(
                    (parts.hostname or "127.0.0.1", parts.port or 7687), timeout=self.timeout
                ):
                    pass
            except OSError as err:
                raise StoreDown(
                    f"the graph store at {uri} is not answering ({err.strerror or err}): start "
                    "it with `circuit-atlas store start` (or check --store URI), then retry"
                ) from None
            self._ok_at = time.monotonic()


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
    probe: StoreProbe | None = None

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


# --- errors -----------------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _status_of(err: Exception) -> int:
    import neo4j.exceptions as nx

    if isinstance(err, QueueFullError):
        return 429
    if isinstance(err, NeuronpediaFormatError | SubgraphError | InterventionRequestError):
        return 400
    if isinstance(
        err, GraphNotFoundError | SubgraphNotFoundError | JobNotFoundError | FileNotFoundError
    ):
        return 404
    if isinstance(err, ReadOnlyViolation):
        return 403
    if isinstance(err, StoreUnavailableError | nx.ServiceUnavailable | nx.SessionExpired):
        return 503
    if isinstance(err, QueryTimeoutError | ResultTooLargeError):
        return 400  # the user's query: its message names the fix
    if isinstance(err, StoreError) and isinstance(err.__cause__, nx.ClientError):
        return 400  # the server refused the user's Cypher (a syntax error, an unknown function)
    if isinstance(err, StoreError):
        return 502
    if isinstance(err, nx.ClientError | ValueError | KeyError | TypeError):
        return 400
    return 500


def one_line(text: str, limit: int = 400) -> str:
    """A message on one line (a driver's multi-line message joined), at most ``limit`` chars."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _failure(err: Exception) -> JSONResponse:
    import neo4j.exceptions as nx

    status = _status_of(err)
    if status == 500:
        traceback.print_exc()
        message = f"internal error ({type(err).__name__}: {err}); the server keeps serving"
    elif status == 503 and not isinstance(err, StoreUnavailableError):
        message = (
            f"the graph store stopped answering ({type(err).__name__}): start it with "
            "`circuit-atlas store start` (or check --store URI), then retry"
        )
    elif isinstance(err, StoreError) and isinstance(err.__cause__, nx.ClientError):
        message = f"Cypher error: {err.__cause__.message or err}"
    elif isinstance(err, nx.Neo4jError):
        message = f"Cypher error: {err.message or err}"
    else:
        message = str(err) or type(err).__name__
    return _error(status, one_line(message))


def api(fn=None, *, store: bool = True):
    """A route handler whose errors answer as one-line JSON messages (the server keeps
    serving); a plain function runs on the thread pool (it may block on the store). With
    ``store`` (the default) a stopped store answers 503 at once (:class:`StoreProbe`)."""
    if fn is None:
        return functools.partial(api, store=store)
    is_async = inspect.iscoroutinefunction(fn)

    @functools.wraps(fn)
    async def handler(request):
        try:
            probe = explorer(request).probe
            if store and probe is not None:
                await run_in_threadpool(probe.check)
            if is_async:
                return await fn(request)
            return await run_in_threadpool(fn, request)
        except Exception as err:
            return _failure(err)

    return handler


async def json_body(request: Request):
    """The request's JSON body, as the door parsed it (ValueError names what is wrong)."""
    state = request.scope.get("state") or {}
    if BODY_KEY in state:
        return state[BODY_KEY]
    return parse_json(await request.body(), explorer(request).config.max_depth)


# --- the handlers -----------------------------------------------------------------------------


@api(store=False)
def info(request: Request):
    ex = explorer(request)
    return JSONResponse({
        "store": ex.source.store is not None,
        "store_uri": getattr(ex.source.store, "uri", None),
        "folder": str(ex.source.folder) if ex.source.folder else None,
        "interventions": ex.interventions.available,
        "queue": ex.interventions.queue(),
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
    from tracer.explorer.reading_routes import stored_feature_labels

    doc = to_neuronpedia(graph, features=ex.features, subgraph=sub, decode=ex.decode,
                         feature_labels=stored_feature_labels(ex, graph))  # fmt: skip
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


def feature_address(request: Request) -> tuple[int, int]:
    """(layer, index) of a feature route; ValueError (400) for what is not a feature index."""
    out = []
    for what in ("layer", "index"):
        raw = request.path_params[what]
        try:
            v = int(raw)
        except ValueError:
            raise ValueError(f"feature {what} {raw!r} is not an integer") from None
        if not 0 <= v <= MAX_FEATURE_INDEX:
            raise ValueError(
                f"feature {what} {v} is out of range: layers and indices run from 0 to at most "
                f"{MAX_FEATURE_INDEX} (the graph view names each feature as layer/index)"
            )
        out.append(v)
    return out[0], out[1]


@api
def feature(request: Request):
    ex = explorer(request)
    layer, index = feature_address(request)
    tc = request.query_params.get("transcoder")
    if not tc:
        raise ValueError("name the feature's transcoder: ?transcoder=NAME")
    panel = feature_panel(ex.features, ex.source, tc, layer, index)
    known = ex.features is not None and ex.features.get(layer, index) is not None
    if not known and not panel["graphs"]:
        raise GraphNotFoundError(
            f"feature {layer}/{index} of {tc}: no feature contexts and no graph has it; check "
            "the layer and index (the graph view names each feature as layer/index)"
        )
    return JSONResponse(panel)


@api
async def intervention(request: Request):
    ex = explorer(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("graph"), str):
        raise InterventionRequestError("the request needs 'graph': a graph id")
    graph, _ = await run_in_threadpool(ex.source.load, body["graph"])
    job = ex.interventions.submit(graph, body["graph"], body)
    return JSONResponse(job.to_dict(), status_code=202)


@api(store=False)
def job(request: Request):
    jid = request.path_params["jid"]
    return JSONResponse(explorer(request).interventions.read(jid))


@api(store=False)
async def job_cancel(request: Request):
    await json_body(request)  # the door checked it; nothing in it is needed
    jid = request.path_params["jid"]
    return JSONResponse(explorer(request).interventions.cancel(jid))


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
    Route("/api/features/{layer}/{index}", feature),
    Route("/api/interventions", intervention, methods=["POST"]),
    Route("/api/jobs/{jid}", job),
    Route("/api/jobs/{jid}/cancel", job_cancel, methods=["POST"]),
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
        probe=StoreProbe(source.store) if source.store is not None else None,
    )
    from tracer.explorer.reading_routes import READING_ROUTES  # paths, diagram, labels

    routes = [
        Route("/", page),
        *API_ROUTES,
        *READING_ROUTES,
        Mount("/assets", StaticFiles(directory=Path(config.dist) / "assets"), name="assets"),
    ]
    middleware = [Middleware(Door, policy=config.policy())]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={404: not_found, 405: not_found},
    )
    app.state.explorer = state
    app.state.interventions = state.interventions
    return app
