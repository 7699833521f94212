"""Persistence: pruned circuits in a Bolt graph database (Neo4j 5, or a managed local ArcadeDB
server), full graphs in a Parquet archive, canned cross-prompt queries, read-only Cypher.

What it may import: the torch-free graph core of tracer (``tracer.graph``,
``tracer.subgraph``) and ``transcoders.names``; never torch, the engine or transcoders' models."""

from graphstore.archive import Archive
from graphstore.errors import (
    ArchiveWriteError,
    GraphNotFoundError,
    IdentityError,
    LegacyStoreError,
    ModelMismatchError,
    QueryTimeoutError,
    ReadOnlyViolation,
    ResultTooLargeError,
    ServerStartError,
    StoreAuthError,
    StoreError,
    StoreUnavailableError,
    StoreWriteError,
    SubgraphNotFoundError,
)
from graphstore.ingest import WriteResult, content_hash, graph_id, prompt_id
from graphstore.queries import CANNED, CannedQuery
from graphstore.query_limits import QueryLimits
from graphstore.readonly import QueryResult
from graphstore.server import LocalServer, ServerInfo, default_home
from graphstore.store import GraphStore

__all__ = [
    "CANNED",
    "Archive",
    "ArchiveWriteError",
    "CannedQuery",
    "GraphNotFoundError",
    "GraphStore",
    "IdentityError",
    "LegacyStoreError",
    "LocalServer",
    "ModelMismatchError",
    "QueryLimits",
    "QueryResult",
    "QueryTimeoutError",
    "ReadOnlyViolation",
    "ResultTooLargeError",
    "ServerInfo",
    "ServerStartError",
    "StoreAuthError",
    "StoreError",
    "StoreUnavailableError",
    "StoreWriteError",
    "SubgraphNotFoundError",
    "WriteResult",
    "content_hash",
    "default_home",
    "graph_id",
    "prompt_id",
]
