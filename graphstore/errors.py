"""Errors of the graph store. Each message names the problem and the fix."""

from __future__ import annotations


class StoreError(RuntimeError):
    """Base class of graph-store errors."""


class StoreUnavailableError(StoreError):
    """The Bolt server cannot be reached (not running, wrong host or port)."""


class StoreAuthError(StoreError):
    """The server refused the user name or password."""


class ServerStartError(StoreError):
    """The managed local ArcadeDB server did not start."""


class ModelMismatchError(StoreError):
    """A graph traced with another model than the one its transcoder belongs to in the store."""


class StoreWriteError(StoreError):
    """Writing a graph to the database failed (the graph is still archived in Parquet)."""


class ArchiveWriteError(StoreError):
    """The Parquet archive file of a graph could not be written (full disk, read-only folder);
    the message names the file and its folder. Nothing was stored in the database."""


class GraphNotFoundError(StoreError, KeyError):
    """No complete graph with the given id is stored."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ReadOnlyViolation(StoreError):
    """User Cypher that would write (CREATE, MERGE, DELETE, SET, ...) was refused."""


class LegacyStoreError(StoreError):
    """The store holds graphs keyed by bare transcoder names (written before transcoder
    identities); it must be migrated (``circuit-atlas store migrate``) before use."""


class IdentityError(StoreError, ValueError):
    """A graph whose transcoder is named without a content fingerprint (``name@fingerprint``)."""


class QueryTimeoutError(StoreError):
    """A user query ran past its timeout; it was stopped on the server as well."""


class ResultTooLargeError(StoreError):
    """A user query returned more rows than the row cap allows."""


class SubgraphNotFoundError(StoreError, KeyError):
    """No saved subgraph of that name for that graph."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
