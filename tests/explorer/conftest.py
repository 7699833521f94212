"""The explorer's test world: two demo-size graphs traced by the engine (SmolLM2 truncated to
4 layers, a random CLT) stored in the session's ArcadeDB server, the CLT's feature contexts,
and the explorer serving them on a free loopback port (in this process, on a thread)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
from explorer_fixtures import build_feature_contexts, build_graphs, build_replacement

from graphstore import GraphStore, graph_id

CHROMIUM = shutil.which("chromium")


@dataclass
class World:
    rm: object
    graphs: list  # [(pruned, full)]
    ids: list[str]
    store: GraphStore
    features: object
    url: str
    folder: object


@pytest.fixture(scope="session")
def explorer_engine(smollm2, tmp_path_factory):
    """(replacement model, [(pruned, full)], feature book, folder): built once a session."""
    tmp = tmp_path_factory.mktemp("explorer")
    rm = build_replacement(smollm2)
    graphs = build_graphs(rm)
    (tmp / "tc").mkdir()
    book = build_feature_contexts(rm, tmp / "tc")
    return rm, graphs, book, tmp


@pytest.fixture(scope="module")
def world(explorer_engine, server_auth):
    """The graphs stored and served (per module: the graphs and their subgraphs are removed
    afterwards, so the graph-store tests find the store as they left it)."""
    from tracer.explorer import GraphSource, InterventionService, ServerThread, create_app

    rm, graphs, book, tmp = explorer_engine
    store = GraphStore(**server_auth, archive_dir=tmp / "archive")
    ids = []
    for pruned, full in graphs:
        store.add(pruned, full)
        ids.append(graph_id(pruned))
    app = create_app(
        GraphSource(store),
        features=book,
        interventions=InterventionService(rm=rm, max_new_tokens=6),
        decode=lambda i: rm.model.decode([i]),
    )
    server = ServerThread(app).start()
    try:
        yield World(rm, graphs, ids, store, book, server.url, tmp)
    finally:
        server.stop()
        app.state.interventions.close()
        for gid in ids:
            store.delete(gid)
        with store._session() as s:
            s.run("MATCH (s:Subgraph) DETACH DELETE s").consume()
        store.close()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (scripts/setup installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # evil.example resolves to this machine: a DNS-rebinding attacker's name (the security
        # tests; no other test uses it, and nothing leaves the machine)
        args = ["--no-sandbox", "--host-resolver-rules=MAP evil.example 127.0.0.1"]
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()
