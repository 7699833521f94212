"""The explorer's web safety, probed against the running app (a real uvicorn server, the real
store): requests from another origin or with a rebound Host, without the CSRF token or the
access token are refused and write nothing (checked in the store); bad input (deep JSON,
non-finite numbers, a Cypher syntax error, an oversized body, a stopped store) answers a
4xx/503 with one clear line and the server keeps serving; interventions can be cancelled and
their queue is bounded."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest
from explorer_client import Client, raw

from graphstore import GraphStore
from tracer.explorer import ExplorerConfig, GraphSource, InterventionService, ServerThread
from tracer.explorer import create_app as make_app
from tracer.explorer.security import DoorPolicy, host_allowed, parse_json
from tracer.graph import FEATURE
from tracer.reports.neuronpedia import np_node_id

TOKEN = "t0k3n-for-the-security-tests-0123456789"


@pytest.fixture(scope="module")
def guarded(world):
    """The explorer as `circuit-atlas serve` runs it: an access token, a short queue."""
    service = InterventionService(rm=world.rm, max_pending=2, max_new_tokens=6)
    app = make_app(
        GraphSource(world.store),
        features=world.features,
        interventions=service,
        config=ExplorerConfig(token=TOKEN),
        decode=lambda i: world.rm.model.decode([i]),
    )
    server = ServerThread(app).start()
    try:
        yield server.url, service
    finally:
        server.stop()
        service.close()


def subgraph_doc(world, name: str) -> dict:
    g = world.graphs[0][0]
    feats = [np_node_id(g, int(i)) for i in np.flatnonzero(g.kind == FEATURE)[:2]]
    return {"name": name, "pinnedIds": feats}


def saved(world) -> list:
    return world.store.cypher("MATCH (s:Subgraph) RETURN s.key, s.doc_json ORDER BY s.key").rows


def served(url: str) -> bool:
    return Client(url, TOKEN).call("/api/info")[0] == 200


def one_line(body) -> str:
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    assert "\n" not in body["error"] and "Traceback" not in body["error"]
    return body["error"]


# --- the door's parts --------------------------------------------------------------------------


def test_host_allowlist():
    local = DoorPolicy()
    for host in ("127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765", "127.0.0.2"):
        assert host_allowed(host, local), host
    for host in ("evil.example:8765", "evil.example", "localhost.evil.example", "", None,
                 "192.168.1.5:8765", "[::1].evil.example"):  # fmt: skip
        assert not host_allowed(host, local), host
    extra = DoorPolicy(allow_hosts=("atlas.lan",))
    assert host_allowed("atlas.lan:8765", extra) and host_allowed("ATLAS.LAN.", extra)
    assert not host_allowed("evil.example", extra)
    assert host_allowed("evil.example", DoorPolicy(allow_hosts=("*",)))
    # bound to every interface: IP literals (no name can rebind to them), names still refused
    wide = DoorPolicy(host="0.0.0.0")
    assert host_allowed("192.168.1.5:8765", wide) and not host_allowed("evil.example", wide)
    assert host_allowed("10.0.0.7", DoorPolicy(host="10.0.0.7"))
    assert not host_allowed("10.0.0.8", DoorPolicy(host="10.0.0.7"))


def test_json_at_the_door():
    assert parse_json(b'{"a": [1, 2.5, {"b": null}]}') == {"a": [1, 2.5, {"b": None}]}
    for raw_body, message in [
        (b'{"value": 1e999}', "beyond the range of a float"),
        (b'{"value": -1e999}', "beyond the range of a float"),
        (b'{"value": NaN}', "NaN is not a finite number"),
        (b'{"value": Infinity}', "Infinity is not a finite number"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
        (b"[" * 65 + b"]" * 65, "nested too deep"),
        (b'{"a": ' * 70 + b"1" + b"}" * 70, "nested too deep"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_json(raw_body)
    assert parse_json(b"[" * 64 + b"]" * 64) is not None


# --- the security probes against the running app ----------------------------------------------


def test_cross_site_and_rebinding_requests_are_refused_and_write_nothing(world, guarded):
    url, _ = guarded
    gid = world.ids[0]
    path = f"/api/graphs/{gid}/subgraphs"
    me = Client(url, TOKEN)
    csrf = me.csrf()
    cookie = f"circuit_atlas_token_{me.port}={TOKEN}; circuit_atlas_csrf_{me.port}={csrf}"
    before = saved(world)
    body = json.dumps(subgraph_doc(world, "evil")).encode()
    form = b"name=evil&pinnedIds=1_2_3"
    netloc = url.split("//")[1]
    port = netloc.rsplit(":", 1)[1]
    probes = [
        # DNS rebinding: evil.example resolves to 127.0.0.1, the browser sends its own name
        ({"Host": f"evil.example:{port}", "Cookie": cookie, "X-CSRF-Token": csrf,
          "Content-Type": "application/json", "Origin": f"http://evil.example:{port}"},
         body, 403, "Host 'evil.example"),
        # cross-origin "simple" requests a page of another site can send without a preflight
        ({"Origin": "http://evil.example", "Cookie": cookie, "Content-Type": "text/plain"},
         body, 403, "cross-origin request from http://evil.example"),
        ({"Origin": "http://evil.example", "Cookie": cookie,
          "Content-Type": "application/x-www-form-urlencoded"},
         form, 403, "cross-origin request"),
        ({"Referer": "http://evil.example/page", "Cookie": cookie,
          "Content-Type": "text/plain"}, body, 403, "cross-origin request"),
        # even with the CSRF token (as if it leaked): another origin is refused
        ({"Origin": "http://evil.example", "Cookie": cookie, "X-CSRF-Token": csrf,
          "Content-Type": "application/json"}, body, 403, "cross-origin request"),
        ({"Origin": "null", "Cookie": cookie, "X-CSRF-Token": csrf,
          "Content-Type": "application/json"}, body, 403, "cross-origin request"),
        # same origin, but not JSON
        ({"Origin": f"http://{netloc}", "Cookie": cookie, "X-CSRF-Token": csrf,
          "Content-Type": "text/plain"}, body, 415, "Content-Type: application/json"),
        # missing, wrong or self-made CSRF token
        ({"Origin": f"http://{netloc}", "Cookie": cookie, "Content-Type": "application/json"},
         body, 403, "CSRF token"),
        ({"Origin": f"http://{netloc}", "Cookie": cookie, "X-CSRF-Token": csrf[:-2] + "xx",
          "Content-Type": "application/json"}, body, 403, "CSRF token"),
        ({"Origin": f"http://{netloc}", "X-CSRF-Token": "a.b",
          "Cookie": f"circuit_atlas_token_{port}={TOKEN}; circuit_atlas_csrf_{port}=a.b",
          "Content-Type": "application/json"}, body, 403, "CSRF token"),
        # missing or wrong access token (the CSRF pair is right)
        ({"Origin": f"http://{netloc}", "Cookie": f"circuit_atlas_csrf_{port}={csrf}",
          "X-CSRF-Token": csrf, "Content-Type": "application/json"}, body, 401, "access token"),
        ({"Origin": f"http://{netloc}", "X-Explorer-Token": "wrong", "X-CSRF-Token": csrf,
          "Cookie": f"circuit_atlas_csrf_{port}={csrf}", "Content-Type": "application/json"},
         body, 401, "access token"),
    ]  # fmt: skip
    for headers, data, status, text in probes:
        got, answer = raw(url, "POST", path, data, headers)
        assert got == status and text in one_line(answer), (headers, got, answer)
    # reads are refused the same way: a rebound Host, no token, no Host at all
    assert raw(url, "GET", f"/api/graphs/{gid}", headers={"Host": f"evil.example:{port}",
               "Cookie": cookie})[0] == 403  # fmt: skip
    assert raw(url, "GET", f"/api/graphs/{gid}")[0] == 401
    assert raw(url, "GET", "/", headers={"Host": None, "Cookie": cookie})[0] in (400, 403)
    # the interventions and the Cypher console are behind the same door
    for p, b in [("/api/interventions", {"graph": gid, "edits": []}),
                 ("/api/cypher", {"query": "MATCH (n) RETURN n LIMIT 1"})]:  # fmt: skip
        got, _ = raw(url, "POST", p, json.dumps(b).encode(),
                     {"Origin": "http://evil.example", "Cookie": cookie,
                      "Content-Type": "text/plain"})  # fmt: skip
        assert got == 403
    assert saved(world) == before  # nothing written
    assert "evil" not in {s["name"] for s in world.store.subgraphs(gid)}
    # the page's own requests go through: same origin, cookie + X-CSRF-Token
    status, answer = me.call(path, subgraph_doc(world, "mine"), headers={"Origin": url})
    assert status == 200 and answer["saved"] == "mine", answer
    # a script with the token in a header needs no CSRF token (no page can set that header)
    status, _ = raw(url, "POST", path, json.dumps(subgraph_doc(world, "scripted")).encode(),
                    {"X-Explorer-Token": TOKEN, "Content-Type": "application/json"})  # fmt: skip
    assert status == 200
    names = {s["name"] for s in world.store.subgraphs(gid)}
    assert {"mine", "scripted"} <= names and "evil" not in names


def test_the_token_in_the_url_becomes_a_cookie(guarded):
    url, _ = guarded
    me = Client(url)
    assert me.open_page()[0] == 401 and me.call("/api/info")[0] == 401
    status, html = me.open_page(f"?token={TOKEN}")
    assert status == 200 and "<html" in html.lower()
    assert me.cookie("circuit_atlas_token") == TOKEN
    assert me.call("/api/info")[0] == 200  # from now on the cookie carries it
    status, headers = _head(url, f"/?token={TOKEN}")
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    assert "default-src 'self'" in headers["content-security-policy"]


def _head(url: str, path: str):
    import http.client
    from urllib.parse import urlsplit

    p = urlsplit(url)
    conn = http.client.HTTPConnection(p.hostname, p.port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    r.read()
    out = {k.lower(): v for k, v in r.getheaders() if k.lower() != "set-cookie"}
    out["set-cookie"] = " | ".join(v for k, v in r.getheaders() if k.lower() == "set-cookie")
    conn.close()
    return r.status, out


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_gets_one_clear_line_and_the_server_keeps_serving(world, guarded):
    url, _ = guarded
    me = Client(url, TOKEN)
    g, gid = world.graphs[0][0], world.ids[0]
    feat = np_node_id(g, int(np.flatnonzero(g.kind == FEATURE)[0]))
    head = {"X-Explorer-Token": TOKEN, "Content-Type": "application/json"}
    clamp = (b'{"graph": "%s", "edits": [{"nodes": ["%s"], "op": "clamp", "value": 1e999}]}'
             % (gid.encode(), feat.encode()))  # fmt: skip
    queued_before = me.call("/api/info")[1]["queue"]
    cases = [
        (raw(url, "POST", "/api/cypher", b"[" * 100_000 + b"]" * 100_000, head),
         400, "nested too deep"),
        (raw(url, "POST", "/api/interventions", clamp, head), 400, "beyond the range"),
        (raw(url, "POST", "/api/interventions", clamp.replace(b"1e999", b"NaN"), head),
         400, "NaN is not a finite number"),
        (me.call("/api/cypher", {"query": "MATCH (n:Node RETURN n"}), 400, "Cypher error"),
        (me.call("/api/cypher", {"query": "MATCH (n:Node) RETURN nosuchfunction(n)"}),
         400, "Cypher error"),
        (me.call(f"/api/features/0/-1?transcoder={g.transcoder_name}"), 400, "out of range"),
        (me.call(f"/api/features/-3/1?transcoder={g.transcoder_name}"), 400, "out of range"),
        (me.call(f"/api/features/0/99999999999999?transcoder={g.transcoder_name}"),
         400, "out of range"),
        (me.call(f"/api/features/0/abc?transcoder={g.transcoder_name}"), 400, "not an integer"),
        (me.call(f"/api/features/0/5000000?transcoder={g.transcoder_name}"),
         404, "no graph has it"),
        (me.call(f"/api/graphs/{gid}/subgraphs", {"name": "x", "pinnedIds": "1"}),
         400, "not a node of this graph"),
    ]  # fmt: skip
    for (status, body), want, text in cases:
        assert status == want and text in one_line(body), (status, body)
    # no job was queued by the refused interventions
    assert me.call("/api/info")[1]["queue"] == queued_before and served(url)


def test_oversized_bodies_are_refused_before_they_are_read(world, guarded):
    url, _ = guarded
    host, port = url.split("//")[1].rsplit(":", 1)
    head = (f"POST /api/cypher HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"X-Explorer-Token: {TOKEN}\r\nContent-Type: application/json\r\n")  # fmt: skip
    # a declared 3 MB body: refused on the headers alone, not a byte of it sent
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall((head + "Content-Length: 3000000\r\n\r\n").encode())
        status, body = _response(s)
    assert status == 413 and "over 2,000,000 bytes" in one_line(body)
    # a streamed (chunked) body: refused once 2 MB have come in; the rest is never sent
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b'{"query": "' + b"x" * 100_000
        sent = 0
        while sent <= 2_100_000:
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        status, body = _response(s)
    assert status == 413 and "over 2,000,000 bytes" in one_line(body)
    assert served(url)


def _response(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))  # fmt: skip
    while len(rest) < length:
        rest += s.recv(65536)
    return int(head.split()[1]), json.loads(rest[:length])


class Proxy:
    """A TCP forwarder to the store's Bolt port: stopping it is the store going down for the
    explorer behind it (the real server keeps running for the other tests)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = None
        self.conns: list[socket.socket] = []

    def start(self) -> Proxy:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port or 0))
        self.port = self.sock.getsockname()[1]
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        sock = self.sock
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(): the port stops listening
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.conns = []


def test_store_down_is_a_quick_503_naming_store_start(world, server_auth):
    from urllib.parse import urlsplit

    target = urlsplit(server_auth["uri"])
    proxy = Proxy((target.hostname, target.port)).start()
    store = GraphStore(f"bolt://127.0.0.1:{proxy.port}", server_auth["user"],
                       server_auth["password"], server_auth["database"],
                       archive_dir=world.folder / "archive")  # fmt: skip
    app = make_app(GraphSource(store), config=ExplorerConfig(token=TOKEN))
    server = ServerThread(app).start()
    me = Client(server.url, TOKEN)
    gid = world.ids[0]
    try:
        assert me.call(f"/api/graphs/{gid}")[0] == 200
        proxy.stop()
        time.sleep(2.1)  # past the probe's memory of the last good answer
        for path, body in [(f"/api/graphs/{gid}", None), ("/api/graphs", None),
                           ("/api/cypher", {"query": "MATCH (n) RETURN n LIMIT 1"})]:  # fmt: skip
            t0 = time.monotonic()
            status, answer = me.call(path, body)
            waited = time.monotonic() - t0
            assert status == 503, answer
            assert "circuit-atlas store start" in one_line(answer)
            assert waited < 5.0  # the driver alone retries for 5 s before it gives up
        assert me.call("/api/info")[0] == 200  # the server itself keeps serving
        proxy.start()  # the store is back (same port): so are the graphs
        for _ in range(3):  # the driver finds its pooled connections dead on first use
            status, doc = me.call(f"/api/graphs/{gid}")
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200 and len(doc["nodes"]["id"]) == world.graphs[0][0].n_nodes
    finally:
        server.stop()
        proxy.stop()
        store.close()


def test_serve_reads_the_store_credentials_of_every_command(world, server_auth, monkeypatch):
    import argparse

    from tracer.cli.graph_args import open_store
    from tracer.cli.serve_cmd import build

    monkeypatch.setenv("CIRCUIT_ATLAS_USER", server_auth["user"])
    monkeypatch.setenv("CIRCUIT_ATLAS_PASSWORD", server_auth["password"])
    monkeypatch.setenv("CIRCUIT_ATLAS_DATABASE", server_auth["database"])
    args = argparse.Namespace(store=server_auth["uri"], graphs=None, transcoders=None,
                              model=None, host="127.0.0.1", port=8765, token="x",
                              allow_host=[])  # fmt: skip
    app, store = build(args)
    try:
        assert store.uri == server_auth["uri"]
        assert world.ids[0] in store.graph_ids()
    finally:
        store.close()
        app.state.interventions.close()
    # the same function behind --store/--no-store of the other commands
    assert open_store(argparse.Namespace(no_store=True, store=server_auth["uri"])) is None
    monkeypatch.setenv("CIRCUIT_ATLAS_PASSWORD", "not-the-password")
    from graphstore.errors import StoreAuthError

    with pytest.raises(StoreAuthError, match="refused user"):
        open_store(server_auth["uri"])


# --- interventions: cancel, a bounded queue, status kept until read ----------------------------


def _job_body(world, n_new: int = 64) -> dict:
    g, gid = world.graphs[0][0], world.ids[0]
    feat = np_node_id(g, int(np.flatnonzero(g.kind == FEATURE)[0]))
    return {"graph": gid, "edits": [{"nodes": [feat], "op": "scale", "value": 3}],
            "max_new_tokens": n_new}  # fmt: skip


def _wait(me: Client, jid: str, until, timeout: float = 120.0) -> dict:
    t0 = time.monotonic()
    while True:
        status, job = me.call(f"/api/jobs/{jid}")
        assert status == 200, job
        if until(job):
            return job
        assert time.monotonic() - t0 < timeout, job
        time.sleep(0.005)


def test_a_cancelled_intervention_stops(world, guarded):
    url, service = guarded
    me = Client(url, TOKEN)
    status, job = me.call("/api/interventions", _job_body(world))
    assert status == 202
    running = _wait(me, job["id"], lambda j: "token" in j["message"] or j["state"] != "running"
                    and j["state"] != "queued")  # fmt: skip
    assert running["state"] == "running", running
    status, asked = me.call(f"/api/jobs/{job['id']}/cancel", {})
    assert status == 200 and asked["state"] in ("running", "cancelled")
    done = _wait(me, job["id"], lambda j: j["state"] != "running")
    assert done["state"] == "cancelled" and done["result"] is None, done
    assert (
        done["progress"] < 1.0 and "cancelled during: generating continuations" in (done["message"])
    )
    step = int(done["message"].split("token ")[1].split("/")[0])
    assert step < 64  # it stopped before the last token
    # the worker is free again: the next job runs to its end
    status, nxt = me.call("/api/interventions", _job_body(world, n_new=2))
    finished = _wait(me, nxt["id"], lambda j: j["state"] in ("done", "error", "cancelled"))
    assert finished["state"] == "done" and finished["result"]["steered"] is not None
    # a finished job's status stays until read, and can be read again for a while
    assert me.call(f"/api/jobs/{nxt['id']}")[1]["state"] == "done"
    status, again = me.call(f"/api/jobs/{nxt['id']}/cancel", {})
    assert status == 200 and again["state"] == "done"  # cancelling a finished job changes nothing
    status, missing = me.call("/api/jobs/j99999/cancel", {})
    assert status == 404 and "no intervention job" in one_line(missing)


def test_the_queue_is_bounded_and_a_queued_job_can_be_cancelled(world, guarded):
    url, service = guarded
    me = Client(url, TOKEN)
    assert service.max_pending == 2
    first = me.call("/api/interventions", _job_body(world))[1]
    second = me.call("/api/interventions", _job_body(world))[1]
    status, refused = me.call("/api/interventions", _job_body(world))
    assert status == 429 and "queue is full" in one_line(refused) and "cancel" in refused["error"]
    # cancel the queued one: it never runs, and it frees a place at once
    status, c = me.call(f"/api/jobs/{second['id']}/cancel", {})
    assert status == 200 and c["state"] == "cancelled" and c["message"] == "cancelled before it ran"
    status, third = me.call("/api/interventions", _job_body(world, n_new=1))
    assert status == 202
    me.call(f"/api/jobs/{first['id']}/cancel", {})
    assert _wait(me, first["id"], lambda j: j["state"] != "running")["state"] == "cancelled"
    assert _wait(me, third["id"], lambda j: j["state"] in ("done", "error"))["state"] == "done"
    assert _wait(me, second["id"], lambda j: True)["state"] == "cancelled"  # it never ran


def test_finished_jobs_are_kept_until_read(world):
    service = InterventionService(rm=world.rm, keep_unread=2, keep_read_s=0.0)
    g, gid = world.graphs[0][0], world.ids[0]
    try:
        jobs = [service.submit(g, gid, _job_body(world, n_new=0)) for _ in range(3)]
        t0 = time.monotonic()
        while not all(j.finished for j in jobs):
            assert time.monotonic() - t0 < 120
            time.sleep(0.01)
        assert [service.read(j.id)["state"] for j in jobs[1:]] == ["done", "done"]
        fourth = service.submit(g, gid, _job_body(world, n_new=0))
        while not fourth.finished:
            time.sleep(0.01)
        # two unread at most: the first (never read) went at the first read; the ones read
        # once go at the next look after keep_read_s (0 s here)
        time.sleep(0.01)
        assert service.read(fourth.id)["state"] == "done"
        for j in jobs:
            with pytest.raises(LookupError, match="no intervention job"):
                service.read(j.id)
    finally:
        service.close()


# --- in a real browser ---------------------------------------------------------------------------


def test_in_the_browser_the_page_works_and_other_sites_cannot_write(world, guarded, browser):
    url, _ = guarded
    gid = world.ids[0]
    port = url.rsplit(":", 1)[1]
    before = saved(world)
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        # the printed URL: the page loads, the token leaves the address bar for a cookie
        page.goto(f"{url}/?token={TOKEN}&graph={gid}")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert "token=" not in page.url and f"graph={gid}" in page.url
        # a write from the page (the Cypher console posts JSON with the CSRF header)
        page.click("#tabs button[data-tab=cypher]")
        page.fill("#cypher-text", f"MATCH (g:Graph {{id: '{gid}'}}) RETURN g.id")
        page.click("#cypher-run")
        page.wait_for_selector("#cypher-table")
        assert page.locator("#cypher-table tr").count() == 2
        # another site (its page served from http://evil.example:PORT2, a name this browser
        # resolves to 127.0.0.1) posts to the explorer the ways a page can without a
        # preflight: fetch text/plain and a form
        evil = _serve_html("<html><body>elsewhere</body></html>")
        page.goto(f"http://evil.example:{evil.server_address[1]}/")
        target = f"{url}/api/graphs/{gid}/subgraphs"
        answers = []  # what the explorer answered them (hidden from the other site)
        context.on("response", lambda r: r.url == target and answers.append(r.status))
        doc = json.dumps(subgraph_doc(world, "evil-browser"))
        status = page.evaluate(
            """async ([target, doc]) => {
                 const r = await fetch(target, {method: "POST", body: doc, mode: "no-cors",
                   credentials: "include", headers: {"Content-Type": "text/plain"}});
                 return r.type; }""",
            [target, doc],
        )
        assert status == "opaque"  # the browser sent it; its answer is hidden from the page
        # with no access token at all (the tests' token-less server) the Origin check refuses
        open_target = f"{world.url}/api/graphs/{gid}/subgraphs"
        with page.expect_response(open_target) as caught:
            page.evaluate(
                """async ([target, doc]) => { await fetch(target, {method: "POST", body: doc,
                     mode: "no-cors", headers: {"Content-Type": "text/plain"}}); }""",
                [open_target, doc],
            )
        assert caught.value.status == 403
        page.evaluate(
            """(target) => { const f = document.createElement("form");
                 f.method = "POST"; f.action = target;
                 const i = document.createElement("input"); i.name = "name";
                 i.value = "evil-form"; f.appendChild(i); document.body.appendChild(f);
                 f.submit(); }""",
            target,
        )
        page.wait_for_load_state()
        t0 = time.monotonic()
        while len(answers) < 2 and time.monotonic() - t0 < 20:
            page.wait_for_timeout(50)
        # refused: the token cookie (SameSite=Strict) does not go along (401), and the
        # Origin check would refuse them anyway (403)
        assert len(answers) == 2 and set(answers) <= {401, 403}, answers
        # DNS rebinding: evil.example now resolves to 127.0.0.1 (the browser's resolver map),
        # so its pages are "same origin" with a server on that port, yet the Host is refused
        page = context.new_page()  # (the form's navigation may still be under way)
        answer = page.goto(f"http://evil.example:{port}/?token={TOKEN}")
        assert answer.status == 403 and "not one this explorer answers to" in answer.text()
        got = page.evaluate(
            """async (doc) => { const r = await fetch("/api/graphs", {method: "GET"});
                 return [r.status, (await r.json()).error]; }""",
            doc,
        )
        assert got[0] == 403 and "Host" in got[1]
    finally:
        context.close()
        if "evil" in locals():
            evil.shutdown()
    assert errors == []
    assert saved(world) == before  # nothing written by any of it
    assert not {"evil-browser", "evil-form"} & {s["name"] for s in world.store.subgraphs(gid)}


def _serve_html(html: str):
    """A one-page HTTP server on a free loopback port (the other site), on a thread."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- circuit-atlas serve --------------------------------------------------------------------------


def test_serve_prints_its_url_with_a_token_and_refuses_no_token_off_loopback(
    world, tmp_path, capsys
):
    import re
    import subprocess
    import sys

    from tracer.cli import main
    from tracer.explorer.server import free_port

    assert main(["serve", "--graphs", str(tmp_path), "--host", "0.0.0.0", "--no-token"]) == 2
    err = capsys.readouterr().err
    assert "--no-token is allowed on loopback only" in err and err.count("\n") == 1
    world.graphs[0][0].save(tmp_path / "a.parquet")
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from tracer.cli import main; sys.exit(main())",
           "serve", "--graphs", str(tmp_path), "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        t0 = time.monotonic()
        while "circuit-atlas explorer:" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "serve exited"
            assert time.monotonic() - t0 < 120
        found = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=([0-9a-f]{48})", line)
        assert found and int(found.group(1)) == port, line
        base = f"http://127.0.0.1:{port}"
        while True:  # the URL is printed just before uvicorn listens
            try:
                status, answer = raw(base, "GET", "/api/graphs")
                break
            except OSError:
                assert time.monotonic() - t0 < 120
                time.sleep(0.1)
        assert status == 401 and "access token" in answer["error"]
        me = Client(base, found.group(2))
        status, listed = me.call("/api/graphs")
        assert status == 200 and [x["id"] for x in listed["graphs"]] == [world.ids[0]]
        assert raw(base, "GET", "/api/graphs", headers={"Host": f"evil.example:{port}",
                   "X-Explorer-Token": found.group(2)})[0] == 403  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)
