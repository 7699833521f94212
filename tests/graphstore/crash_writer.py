"""A graph writer for the fault tests: writes one realistic graph in small batches, printing
``BATCH <edges written> <edges>`` after each committed batch and pausing, so a test can kill it
(or the server) part-way through, or run two of them at once. Prints ``DONE written|skipped``.

Usage: crash_writer.py URI USER PASSWORD DATABASE ARCHIVE SEED [PAUSE_S [BATCH [TRANSCODER]]]
(defaults: 0.3 s after each batch, batches of 150 edges, the synthetic graphs' transcoder)."""

from __future__ import annotations

import sys
import time

from graphstore import GraphStore, ingest
from graphstore.synthetic import synthetic_graph


def main() -> None:
    uri, user, password, database, archive, seed = sys.argv[1:7]
    pause = float(sys.argv[7]) if len(sys.argv) > 7 else 0.3
    ingest.EDGE_BATCH = int(sys.argv[8]) if len(sys.argv) > 8 else 150  # a kill lands between
    overrides = {"transcoder_name": sys.argv[9]} if len(sys.argv) > 9 else {}
    store = GraphStore(uri, user, password, database, archive_dir=archive)
    graph = synthetic_graph(int(seed), **overrides)

    def progress(done: int, total: int) -> None:
        print(f"BATCH {done} {total}", flush=True)
        time.sleep(pause)

    def waiting(claim: dict) -> None:
        print(f"WAIT {claim['pid']}", flush=True)

    print("START", flush=True)
    with store._session() as s:
        rows = ingest.graph_rows(graph, ingest.graph_id(graph), None)
        res = ingest.write_rows(s, rows, progress=progress, on_wait=waiting)
    print(f"DONE {'written' if res.written else 'skipped'}", flush=True)


if __name__ == "__main__":
    main()
