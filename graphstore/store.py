"""GraphStore: pruned attribution graphs in a Bolt graph database (Neo4j 5 or the managed
ArcadeDB server), full graphs in a Parquet archive, canned and read-only user Cypher."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import neo4j

from graphstore import crossprompt, export, heads, ingest, migrate, queries, readonly, subgraphs
from graphstore.archive import Archive
from graphstore.errors import (
    IdentityError,
    LegacyStoreError,
    ModelMismatchError,
    StoreAuthError,
    StoreError,
    StoreUnavailableError,
    StoreWriteError,
)
from graphstore.query_limits import QueryLimits, run_bounded
from graphstore.schema import detect_dialect, ensure_schema
from graphstore.server import ROOT_USER, LocalServer
from tracer.graph import Graph


class GraphStore:
    """A graph database of pruned circuits plus a Parquet archive of full graphs.

    ``uri=None`` uses the managed local ArcadeDB server under ``home`` (default
    ``$CIRCUIT_ATLAS_HOME/store``), starting it when it is not running (it keeps running after
    this process exits; ``circuit-atlas store stop`` stops it). Any ``bolt://`` or
    ``neo4j://`` URI with ``user``/``password`` connects to that server instead (Neo4j 5, or
    ArcadeDB with its Bolt plugin); ``database`` defaults to the server's default database.

    ``model`` / ``transcoder``, when given, bind the store: graphs of another model or
    transcoder are refused (they are still archived). Independently, a transcoder already in
    the store belongs to one model; a graph that pairs it with another model is refused.

    User Cypher (``cypher``) is bounded: ``query_timeout`` seconds (default
    ``$CIRCUIT_ATLAS_QUERY_TIMEOUT``, else 30; 0: none), after which the query is stopped on the
    server too, and ``max_rows`` rows (default ``$CIRCUIT_ATLAS_MAX_ROWS``, else 10,000; 0:
    none); both can be changed per call.
    """

    def __init__(
        self,
        uri: str | None = None,
        user: str | None = None,
        password: str | None = None,
        database: str | None = None,
        *,
        home: str | Path | None = None,
        archive_dir: str | Path | None = None,
        model: str | None = None,
        transcoder: str | None = None,
        connect_timeout: float = 10.0,
        query_timeout: float | None = None,
        max_rows: int | None = None,
    ):
        self.server: LocalServer | None = None
        self.limits = QueryLimits.resolve(query_timeout, max_rows)
        if uri is None:
            self.server = LocalServer(home)
            info = self.server.start()
            uri, user, password = info.uri, ROOT_USER, self.server.password()
            database = database or info.database
            if archive_dir is None:
                archive_dir = self.server.home.parent / "graphs"
        self.uri = uri
        self.archive = Archive(archive_dir)
        self.model = model
        self.transcoder = transcoder
        auth = (user or "neo4j", password or "")
        self._driver = neo4j.GraphDatabase.driver(
            uri, auth=auth, connection_timeout=connect_timeout, max_transaction_retry_time=5.0
        )
        try:
            self._driver.verify_connectivity()
            agent = self._driver.get_server_info().agent
        except neo4j.exceptions.AuthError as err:
            self._driver.close()
            where = (
                f"; the managed server's password is in {self.server.password_file}"
                if self.server
                else ""
            )
            raise StoreAuthError(
                f"the graph server at {uri} refused user {auth[0]!r}: wrong user or password "
                f"({err.message}){where}"
            ) from None
        except (neo4j.exceptions.ServiceUnavailable, OSError, ValueError) as err:
            self._driver.close()
            raise StoreUnavailableError(
                f"cannot reach a graph server at {uri} ({err}): start the local one with "
                "`circuit-atlas store start`, or check the URI, host and port"
            ) from None
        self.dialect = detect_dialect(agent)
        self.agent = agent
        self.database = database or self.dialect.default_database
        self._explain_ok: bool | None = None
        with self._session() as s:
            try:
                ensure_schema(s, self.dialect)
            except neo4j.exceptions.Neo4jError as err:
                self._driver.close()
                raise StoreError(
                    f"cannot create the schema in database {self.database!r} at {uri}: "
                    f"{err.message}"
                ) from None
            self._legacy = migrate.legacy_transcoders(s)

    # --- plumbing ------------------------------------------------------------------------------

    def _session(self, **kw):
        return self._driver.session(database=self.database, **kw)

    def close(self) -> None:
        self._driver.close()

    def __enter__(self) -> GraphStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- writing -------------------------------------------------------------------------------

    def add(self, graph: Graph, full: Graph | None = None, progress=None) -> ingest.WriteResult:
        """Store the pruned ``graph``; archive ``full`` (the unpruned graph; ``graph`` itself
        when None) to Parquet first, so a failed database write loses nothing.

        Idempotent: storing the same graph again leaves one copy; a graph whose earlier write
        was interrupted is repaired. Raises ModelMismatchError or StoreWriteError, both naming
        the Parquet file that holds the graph. ``progress(edges_written, n_edges)`` is called
        after each committed edge batch.
        """
        result = self._write(*self._prepare(graph, full), progress=progress)
        if graph.extra.get(heads.HEAD_LOADINGS):  # each circuit edge's top heads (:Head)
            self.add_heads(ingest.graph_id(graph), graph)
        return result

    def add_heads(self, graph_id: str, graph: Graph) -> int:
        """Replace the (:Head)-[:CARRIES]-> relationships of a stored graph from ``graph``'s
        head loadings (graphstore.heads); returns how many were written."""
        with self._session() as s:
            return heads.write_heads(s, graph_id, graph)

    def _prepare(self, graph: Graph, full: Graph | None) -> tuple[Graph, Path, ingest.GraphRows]:
        """The client-side half of ``add``: archive, binding check, parameter rows."""
        self._check_usable()
        if not migrate.is_identity(graph.transcoder_name):
            raise IdentityError(
                f"the graph of {graph.prompt!r} names its transcoder "
                f"{graph.transcoder_name!r} without a content fingerprint (traced before "
                "transcoder identities): re-trace it with this version of circuit-atlas"
            )
        gid = ingest.graph_id(graph)
        path = self.archive.save(full if full is not None else graph, gid)
        self._check_binding(graph, path)
        return graph, path, ingest.graph_rows(graph, gid, str(path))

    def _write(
        self, graph: Graph, path: Path, rows: ingest.GraphRows, progress=None, session=None
    ) -> ingest.WriteResult:
        """The database half of ``add``."""

        def on_state(state: dict) -> None:
            stored_model = state["transcoder_model"]
            if stored_model is not None and stored_model != graph.model_name:
                raise ModelMismatchError(
                    f"graph of model {graph.model_name!r} uses transcoder "
                    f"{graph.transcoder_name!r}, which this store holds for model "
                    f"{stored_model!r}: its features would mix with another model's. Trace it "
                    f"with the matching transcoder or use another store. The graph is saved "
                    f"at {path}"
                )

        try:
            return self._write_with_retry(rows, on_state, progress, session=session)
        except ModelMismatchError:
            raise
        except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError, OSError) as err:
            raise StoreWriteError(
                f"writing graph {rows.header['id']} to {self.uri} failed ({err}); the graph is "
                f"saved at {path}: add it again with `circuit-atlas store add {path}` once the "
                "server is back"
            ) from err

    def _write_with_retry(self, rows, on_state, progress, attempts: int = 8, session=None):
        """write_rows, retried when a concurrent writer created the same new feature first
        (a uniqueness conflict) or the server reports a transient conflict: each attempt
        starts from the stored state, so a retry repairs what a failed one left. ``session``:
        an open session to use (else a new one)."""
        for attempt in range(attempts):
            try:
                if session is not None:
                    return ingest.write_rows(session, rows, on_state, progress)
                with self._session() as s:
                    return ingest.write_rows(s, rows, on_state, progress)
            except (neo4j.exceptions.TransientError, neo4j.exceptions.ConstraintError):
                if attempt == attempts - 1:
                    raise
            except neo4j.exceptions.ClientError as err:
                conflict = "duplicat" in str(err).lower() or "concurrent" in str(err).lower()
                if not conflict or attempt == attempts - 1:
                    raise
            # The other writer's transaction may still be open: back off, with jitter.
            time.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")  # pragma: no cover

    def add_many(self, graphs, show_progress: bool = True) -> list[ingest.WriteResult]:
        """Store many pruned graphs (an iterable of Graph), one after another, with a progress
        bar. A helper thread archives and flattens the next graphs while one is being written
        (client and server work overlap); one session serves all writes.

        One writer: concurrent writers conflict on ArcadeDB's hot Feature vertices (their edge
        lists and counters), and a second writer measured slower on the 2-core benchmark host.
        """
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        graphs = list(graphs)
        results = []
        with ThreadPoolExecutor(max_workers=1) as pool, self._session() as session:
            ahead = 4  # graphs prepared ahead of the writer (bounds memory)
            pending = [pool.submit(self._prepare, g, None) for g in graphs[:ahead]]
            for k in tqdm(range(len(graphs)), unit="graph", disable=not show_progress):
                prepared = pending.pop(0).result()
                if k + ahead < len(graphs):
                    pending.append(pool.submit(self._prepare, graphs[k + ahead], None))
                results.append(self._write(*prepared, session=session))
                if prepared[0].extra.get(heads.HEAD_LOADINGS):  # (:Head) of the circuit edges
                    heads.write_heads(session, prepared[2].header["id"], prepared[0])
        return results

    def _check_binding(self, graph: Graph, path: Path) -> None:
        for what, want, got in (
            ("model", self.model, graph.model_name),
            ("transcoder", self.transcoder, graph.transcoder_name),
        ):
            if want is not None and want != got:
                raise ModelMismatchError(
                    f"this store holds graphs of {what} {want!r}, but the graph was traced with "
                    f"{got!r}: open a store for {got!r} (GraphStore({what}=...)) or retrace. "
                    f"The graph is saved at {path}"
                )

    # --- transcoder identities -----------------------------------------------------------------

    def legacy_transcoders(self) -> dict[str, str | None]:
        """Transcoders stored under bare names (before identities) -> their model; empty for
        a store that needs no migration."""
        return dict(self._legacy)

    def _check_usable(self) -> None:
        if self._legacy:
            raise LegacyStoreError(
                f"this store was written before transcoder identities: transcoder(s) "
                f"{', '.join(repr(n) for n in sorted(self._legacy))} have no content "
                f"fingerprint, so features of different transcoders may be merged. Migrate it "
                f"first: {migrate.migrate_command(self._legacy)}"
            )

    def migrate_identities(self, mapping: dict[str, str]) -> list[migrate.MigrationResult]:
        """Rename legacy transcoders (bare name -> ``name@fingerprint``); see
        :mod:`graphstore.migrate`. Nothing is deleted."""
        unknown = sorted(set(mapping) - set(self._legacy))
        if unknown:
            raise StoreError(
                f"{', '.join(map(repr, unknown))} are not legacy transcoders of this store "
                f"(legacy: {', '.join(map(repr, sorted(self._legacy))) or 'none'})"
            )
        with self._session() as s:
            results = migrate.migrate_identities(s, mapping)
            self._legacy = migrate.legacy_transcoders(s)
        return results

    # --- cross-prompt results (graphstore.crossprompt) -------------------------------------

    def add_supernodes(self, graph_id: str, supernodes: list[dict]) -> int:
        """Replace the supernodes of a stored graph (dicts of
        tracer.analyses.supernodes.Supernode)."""
        with self._session() as s:
            return crossprompt.write_supernodes(s, graph_id, supernodes)

    def supernodes(self, graph_id: str) -> list[dict]:
        """The stored supernodes of a graph (dicts of tracer.analyses.supernodes.Supernode; [] if
        none)."""
        with self._session() as s:
            return crossprompt.read_supernodes(s, graph_id)

    def add_global_weights(self, table, model: str, progress=None) -> int:
        """Replace the stored top-k global weights of a transcoder (a GlobalWeights table)."""
        import json

        head = json.loads(table.schema.metadata[b"circuit_atlas_global_weights"])
        with self._session() as s:
            return crossprompt.write_global_weights(
                s, head["transcoder"], model, table, norm=head["norm"], top_k=head["top_k"],
                input_site=head["input_site"], progress=progress,
            )  # fmt: skip

    def add_swap(self, graph_id: str, result: dict, other_graph_id: str | None = None) -> str:
        """Store a swap result (tracer.analyses.swap.SwapResult.to_dict()) with a stored graph."""
        with self._session() as s:
            return crossprompt.write_swap(s, graph_id, other_graph_id, result)

    def delete(self, graph_id: str) -> bool:
        """Remove a stored graph (its archive file stays); True if it existed."""
        with self._session() as s, ingest.claimed(s, graph_id) as token:  # not mid-write
            return ingest.delete_graph(s, graph_id, token)

    # --- reading -------------------------------------------------------------------------------

    def graph_ids(self) -> list[str]:
        """Ids of all complete graphs, sorted."""
        with self._session() as s:
            return s.execute_read(
                lambda tx: [
                    r["id"]
                    for r in tx.run(
                        "MATCH (g:Graph) WHERE g.complete = true RETURN g.id AS id ORDER BY id"
                    )
                ]
            )

    def load(self, graph_id: str) -> Graph:
        """The stored (pruned) graph, equal to the one that was added."""
        with self._session() as s:
            return export.read_graph(s, graph_id)

    def load_full(self, graph_id: str) -> Graph:
        """The archived full graph of a stored graph (from its Parquet file)."""
        with self._session() as s:
            rec = s.execute_read(
                lambda tx: tx.run(
                    "MATCH (g:Graph {id: $id}) RETURN g.parquet_path AS p", id=graph_id
                ).single()
            )
        if rec is not None and rec["p"] and os.path.exists(rec["p"]):
            return Graph.load(rec["p"])
        return self.archive.load(graph_id)

    def to_networkx(self, graph_id: str):
        """The stored graph as a networkx.DiGraph (see Graph.to_networkx)."""
        return self.load(graph_id).to_networkx()

    def export_parquet(self, graph_id: str, path: str | Path) -> Path:
        """Write the stored (pruned) graph to a Parquet file."""
        return self.load(graph_id).save(path)

    # --- saved subgraphs (the explorer's pinned nodes, supernodes, labels) ---------------------

    def save_subgraph(self, graph_id: str, subgraph) -> None:
        """Save a :class:`tracer.subgraph.Subgraph` with stored graph ``graph_id`` (replacing
        one of the same name); a refused or failed save writes nothing (graphstore.subgraphs)."""
        with self._session() as s:
            subgraphs.save_subgraph(s, graph_id, subgraph)

    def subgraphs(self, graph_id: str) -> list[dict]:
        """Saved subgraphs of a graph: name, updated_ms, counts of pinned nodes and supernodes."""
        with self._session() as s:
            return subgraphs.list_subgraphs(s, graph_id)

    def load_subgraph(self, graph_id: str, name: str):
        """A saved :class:`tracer.subgraph.Subgraph` (SubgraphNotFoundError if none)."""
        with self._session() as s:
            return subgraphs.load_subgraph(s, graph_id, name)

    # --- feature labels (written in the explorer, one per feature identity) ---------------------

    def set_feature_label(self, transcoder: str, layer: int, index: int, label: str) -> str:
        """Label feature (layer, index) of ``transcoder`` in every graph (graphstore.labels);
        an empty label removes it. Returns the label as stored."""
        from graphstore import labels

        with self._session() as s:
            return labels.set_label(s, transcoder, layer, index, label)

    def feature_labels(self, transcoder: str, features=None) -> dict[tuple[int, int], str]:
        """``{(layer, index): label}`` of the labelled features of ``transcoder``."""
        from graphstore import labels

        with self._session() as s:
            return labels.labels(s, transcoder, features)

    # --- queries -------------------------------------------------------------------------------

    def query(self, name: str, **params) -> readonly.QueryResult:
        """Run a canned query (see graphstore.queries.CANNED)."""
        self._check_usable()
        if name in ("feature-feeds", "feature-heads") and params.get("transcoder") is None:
            params["transcoder"] = self._default_transcoder()
        try:
            with self._session() as s:
                return queries.run_canned(s, name, open_session=self._session, **params)
        except neo4j.exceptions.Neo4jError as err:
            raise StoreError(f"query {name} failed on the server: {err.message}") from err

    def _default_transcoder(self) -> str:
        if self.transcoder is not None:
            return self.transcoder
        with self._session() as s:
            names = s.execute_read(
                lambda tx: [
                    r["n"]
                    for r in tx.run(
                        "MATCH (g:Graph)-[:USES]->(t:Transcoder) WHERE g.complete = true "
                        "RETURN DISTINCT t.name AS n"
                    )
                ]
            )
        if len(names) != 1:
            raise ValueError(
                f"the store's graphs use {len(names)} transcoders ({', '.join(sorted(names))}): "
                "name one with transcoder=..."
            )
        return names[0]

    def cypher(
        self,
        query: str,
        params: dict | None = None,
        *,
        timeout: float | None = None,
        max_rows: int | None = None,
    ) -> readonly.QueryResult:
        """Run user Cypher read-only: writes are refused (ReadOnlyViolation) before anything
        runs, and nothing is ever committed.

        Bounded by ``timeout`` seconds (QueryTimeoutError; the query is stopped on the server
        as well) and ``max_rows`` rows (ResultTooLargeError); None takes the store's limits
        (``self.limits``), 0 means no bound.
        """
        limits = self.limits.override(timeout, max_rows)
        if readonly.lexical_violation(query) is None and self._explain_ok is None:
            with self._session() as s:
                self._explain_ok = self.dialect.explain_classifies and readonly.explain_classifies(
                    s
                )

        def work(session, tag: str) -> readonly.QueryResult:
            return readonly.run_read_only(
                session,
                query,
                params,
                use_explain=bool(self._explain_ok),
                max_rows=limits.max_rows,
                tx_timeout=limits.tx_timeout,
                tag=tag,
            )

        return run_bounded(self._session, work, limits.timeout)

    def stats(self) -> dict:
        """Counts of complete graphs, prompts, features, nodes and edges. Features: those of
        complete graphs (their counters are nonzero), so an interrupted write adds none."""
        q = """
        MATCH (g:Graph) WHERE g.complete = true
        RETURN count(g) AS graphs, count(DISTINCT g.prompt_id) AS prompts,
               sum(g.n_nodes) AS nodes, sum(g.n_edges) AS edges
        """
        with self._session() as s:
            rec = s.execute_read(lambda tx: tx.run(q).single().data())
            rec["features"] = s.execute_read(
                lambda tx: tx.run(
                    "MATCH (f:Feature) WHERE f.graphs > 0 RETURN count(f) AS c"
                ).single()["c"]
            )
        return rec
