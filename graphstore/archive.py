"""The Parquet archive of full (unpruned) graphs: one file per graph, named by graph id.

The database holds pruned circuits; the archive holds every node and edge the attribution
computed, in the format of :meth:`tracer.graph.Graph.save`.
"""

from __future__ import annotations

import os
from pathlib import Path

from graphstore.errors import ArchiveWriteError
from tracer.graph import Graph


def default_archive_dir() -> Path:
    """``$CIRCUIT_ATLAS_HOME/graphs`` or ``~/.cache/circuit-atlas/graphs``."""
    base = os.environ.get("CIRCUIT_ATLAS_HOME")
    root = Path(base) if base else Path.home() / ".cache" / "circuit-atlas"
    return root / "graphs"


class Archive:
    """A folder of ``<graph id>.parquet`` files."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_archive_dir()

    def path_for(self, graph_id: str) -> Path:
        return self.root / f"{graph_id}.parquet"

    def save(self, graph: Graph, graph_id: str) -> Path:
        """Write ``graph`` (atomically) as the archive file of ``graph_id``; returns its path.
        ArchiveWriteError, naming the file and folder, when it cannot be written (a full disk,
        a read-only folder); no partial file is left."""
        path = self.path_for(graph_id)
        try:
            return graph.save(path).resolve()
        except OSError as err:
            reason = err.strerror or str(err)
            raise ArchiveWriteError(
                f"cannot write the graph archive file {path} in folder {self.root} ({reason}): "
                "free space there or make it writable, or choose another archive folder "
                "(GraphStore(archive_dir=...), or $CIRCUIT_ATLAS_HOME); nothing was stored"
            ) from err

    def load(self, graph_id: str) -> Graph:
        path = self.path_for(graph_id)
        if not path.exists():
            raise FileNotFoundError(
                f"no archived graph {graph_id} in {self.root}: it was stored with another "
                "archive folder (see the parquet_path property of its (:Graph) node)"
            )
        return Graph.load(path)
