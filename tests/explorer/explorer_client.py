"""Talking to a running explorer from tests as its page does: cookies kept (the access token's
and the CSRF token's), the CSRF token echoed in ``X-CSRF-Token`` on every write, JSON bodies.
:func:`raw` sends one request exactly as given (for the security probes)."""

from __future__ import annotations

import http.client
import http.cookiejar
import json
import urllib.error
import urllib.request
from urllib.parse import urlsplit


class Client:
    """A browser-like session with the explorer at ``base`` (``http://host:port``)."""

    def __init__(self, base: str, token: str | None = None):
        self.base, self.token = base.rstrip("/"), token
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.port = urlsplit(self.base).port or 80

    def cookie(self, base_name: str) -> str | None:
        for c in self.jar:
            if c.name == f"{base_name}_{self.port}":
                return c.value
        return None

    def csrf(self) -> str:
        """The session's CSRF token (a first GET sets the cookie)."""
        if self.cookie("circuit_atlas_csrf") is None:
            self.call("/api/info")
        return self.cookie("circuit_atlas_csrf") or ""

    def open_page(self, query: str = "") -> tuple[int, str]:
        """GET the page (as a browser opens the printed URL): (status, HTML)."""
        try:
            with self.opener.open(f"{self.base}/{query}", timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def call(self, path: str, body=None, method: str | None = None, headers=None):
        """(status, JSON) of one request; ``body`` (JSON-ready or bytes) makes it a POST."""
        if self.token and self.cookie("circuit_atlas_token") is None:
            self.open_page(f"?token={self.token}")
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers=headers or {}
        )
        if data is not None or (method or "GET") not in ("GET", "HEAD"):
            req.add_header("Content-Type", "application/json")
            req.add_header("X-CSRF-Token", self.csrf())
        try:
            with self.opener.open(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


_CLIENTS: dict[str, Client] = {}


def call(url: str, body=None, method=None, headers=None):
    """(status, JSON) of one request to a token-less explorer by full URL (one Client per
    server, so its CSRF cookie is kept)."""
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}"
    client = _CLIENTS.setdefault(base, Client(base))
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return client.call(path, body, method, headers)


def raw(base: str, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """(status, JSON or text) of one request sent exactly as given (no cookies kept)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        hs = {"Host": parts.netloc, **(headers or {})}
        if body or method not in ("GET", "HEAD"):
            hs.setdefault("Content-Length", str(len(body)))
        for k, v in hs.items():
            if v is not None:
                conn.putheader(k, v)
        conn.endheaders(body or None)
        r = conn.getresponse()
        text = r.read()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text.decode("utf-8", "replace")
    finally:
        conn.close()
