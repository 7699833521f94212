"""A graph writer for the crash test: writes one realistic graph in small batches, printing
``BATCH <edges written>`` after each committed batch and pausing, so the test can kill it
with SIGKILL part-way through. Usage: crash_writer.py URI USER PASSWORD DATABASE ARCHIVE SEED"""

from __future__ import annotations

import sys
import time

from graphstore import GraphStore, ingest
from graphstore.synthetic import synthetic_graph


def main() -> None:
    uri, user, password, database, archive, seed = sys.argv[1:7]
    ingest.EDGE_BATCH = 150  # many small transactions: a kill lands between them
    store = GraphStore(uri, user, password, database, archive_dir=archive)
    graph = synthetic_graph(int(seed))

    def progress(done: int, total: int) -> None:
        print(f"BATCH {done} {total}", flush=True)
        time.sleep(0.3)

    print("START", flush=True)
    with store._session() as s:
        rows = ingest.graph_rows(graph, ingest.graph_id(graph), None)
        ingest.write_rows(s, rows, progress=progress)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
