"""The explorer: ``circuit-atlas serve``, an offline interactive circuit explorer.

A Starlette app (:func:`create_app`) over graphs of the store and/or a Parquet folder
(:class:`GraphSource`), with live interventions run by the engine on a worker thread
(:class:`InterventionService`); its page is built from ``web/`` by ``scripts/setup`` (npm ci and
esbuild) and served from ``web/dist``: nothing is fetched from the internet at run time.

What it may import: everything (transcoders, tracer, graphstore): with the command line,
the only room that wires the three together."""

from tracer.explorer.app import ExplorerConfig, ExplorerSetupError, check_built, create_app
from tracer.explorer.intervention_jobs import InterventionRequestError, InterventionService
from tracer.explorer.payload import graph_payload
from tracer.explorer.server import ServerThread, access_token, is_loopback, serve
from tracer.explorer.sources import GraphSource

__all__ = [
    "ExplorerConfig",
    "ExplorerSetupError",
    "GraphSource",
    "InterventionRequestError",
    "InterventionService",
    "ServerThread",
    "access_token",
    "check_built",
    "create_app",
    "graph_payload",
    "is_loopback",
    "serve",
]
