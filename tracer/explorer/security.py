"""The explorer's door: what a request must be before any route sees it.

Modelled on Jupyter's server defaults for local research servers (docs/explorer-security.md):

- **Host allowlist** (against DNS rebinding): ``localhost``, loopback addresses, the bound
  address, any IP literal when bound to every interface (0.0.0.0 / ::), and the names given with
  ``--allow-host`` (``*``: any). A page on evil.example that rebinds its name to 127.0.0.1 still
  sends ``Host: evil.example`` and is refused (403).
- **Access token** on every request, loopback included (``--no-token`` turns it off, on loopback
  only): ``?token=`` (it then goes into an HttpOnly cookie), the ``X-Explorer-Token`` header,
  ``Authorization: token T`` or that cookie (401 without it).
- **State-changing requests** (every method but GET/HEAD/OPTIONS): the ``Origin`` (else the
  ``Referer``) must be this server's own origin (403); the body must be ``Content-Type:
  application/json`` (415); and it must carry the per-session CSRF token, double-submitted: the
  ``X-CSRF-Token`` header equal to the signed cookie the server set (403). A request that
  carries the access token in a header needs no CSRF token (a cross-site page cannot set
  headers without a CORS preflight, which this server never grants), as in Jupyter.
- **Bodies bounded while they stream** (413 once the declared or the received length passes
  ``max_body``, before the rest is read); JSON parsed once at the door with non-finite numbers
  (``NaN``, ``Infinity``, ``1e999``) and nesting deeper than ``max_depth`` refused (400).

Every refusal is JSON ``{"error": "one line"}``. Responses carry a strict Content-Security-Policy.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_HEADER = "x-explorer-token"
CSRF_HEADER = "x-csrf-token"
TOKEN_COOKIE = "circuit_atlas_token"  # + "_<port>": cookies are shared by every port of a host
CSRF_COOKIE = "circuit_atlas_csrf"
BODY_KEY = "explorer.json"  # the parsed body, in scope["state"]
MAX_BODY = 2_000_000  # bytes
MAX_DEPTH = 64  # nesting of JSON arrays and objects
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
# The page may load only what this server serves: a browser-enforced guard that nothing is
# fetched from the internet at run time.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class Refused(Exception):
    """A request the door turns away: HTTP ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class DoorPolicy:
    """What the door lets in. ``token``: the access token (None: none needed, loopback only);
    ``host``: the address the server is bound to; ``allow_hosts``: more Host names (``*``:
    any); ``max_body``: bytes of a request body; ``max_depth``: JSON nesting."""

    token: str | None = None
    host: str = "127.0.0.1"
    allow_hosts: tuple[str, ...] = ()
    max_body: int = MAX_BODY
    max_depth: int = MAX_DEPTH


# --- pieces -----------------------------------------------------------------------------------


def split_host(value: str) -> tuple[str, str]:
    """``Host`` header -> (lower-case name without brackets or trailing dot, port or '')."""
    value = value.strip().lower()
    name, port = value, ""
    if value.startswith("["):  # [v6]:port
        name, _, rest = value[1:].partition("]")
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return value, ""  # not a host[:port]: matches nothing
        port = rest[1:]
    elif value.count(":") == 1:
        name, port = value.split(":")
        if not port.isdigit():
            return value, ""
    return name.rstrip("."), port


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_allowed(header: str | None, policy: DoorPolicy) -> bool:
    """Whether a ``Host`` header names this server (see the module docstring)."""
    if not header:
        return False
    name, _ = split_host(header)
    extra = {h.strip().lower().rstrip(".") for h in policy.allow_hosts}
    if "*" in extra or name == "localhost" or name in extra:
        return True
    bound = policy.host.strip("[]").lower()
    ip = _ip(name)
    if ip is None:
        return name == bound
    return ip.is_loopback or ip == _ip(bound) or bound in WILDCARDS


def cookie_name(base: str, host_header: str) -> str:
    """``base_<port>``: the port the browser sees (the page's ``location.port``, 80 if none)."""
    port = split_host(host_header)[1] or "80"
    return f"{base}_{port}"


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH):
    """A JSON body -> Python value. ValueError (one line) for what is not JSON, for ``NaN``,
    ``Infinity`` or numbers beyond float range (``1e999``), and for nesting deeper than
    ``max_depth``."""

    def constant(name: str):
        raise ValueError(f"{name} is not a finite number: send finite numbers only")

    def number(text: str) -> float:
        v = float(text)
        if not math.isfinite(v):
            raise ValueError(f"{text} is beyond the range of a float: send finite numbers only")
        return v

    try:
        value = json.loads(raw or b"null", parse_constant=constant, parse_float=number)
    except RecursionError:
        raise ValueError(f"the JSON body is nested too deep: at most {max_depth} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"the request body is not JSON: {err}") from None
    except ValueError as err:  # from the hooks above, or an integer of too many digits
        raise ValueError(f"the JSON body was refused: {err}") from None
    if nesting(value) > max_depth:
        raise ValueError(f"the JSON body is nested too deep: at most {max_depth} levels")
    return value


def nesting(value) -> int:
    """Depth of nested lists and dicts (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        stack.extend((x, d + 1) for x in v if isinstance(x, list | dict))
    return deepest


def json_safe(v):
    """``v`` with non-finite floats as None and unknown types as strings: JSON a browser can
    parse (strict JSON has no NaN or Infinity)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, int | float | str | bool) or v is None:
        return v
    return str(v)


def _cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq:
            out.setdefault(name, value)
    return out


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# --- the middleware ---------------------------------------------------------------------------


class Door:
    """ASGI middleware enforcing :class:`DoorPolicy` (see the module docstring)."""

    def __init__(self, app, policy: DoorPolicy):
        self.app, self.policy = app, policy
        self._secret = secrets.token_bytes(32)  # signs this process's CSRF cookies

    # CSRF tokens: nonce.signature, so a cookie planted by another service of the same host
    # (cookies ignore ports) is not one of ours.
    def _sign(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()[:32]

    def new_csrf(self) -> str:
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{self._sign(nonce)}"

    def csrf_valid(self, value: str | None) -> bool:
        if not value or "." not in value:
            return False
        nonce, sig = value.rsplit(".", 1)
        return _same(sig, self._sign(nonce))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        set_cookies: list[str] = []

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                hs = list(message.get("headers", []))
                have = {k.lower() for k, _ in hs}
                hs += [(k, v) for k, v in HEADERS if k not in have]
                hs += [(b"set-cookie", c.encode("latin-1")) for c in set_cookies]
                message = {**message, "headers": hs}
            await send(message)

        try:
            receive = await self._check(scope, headers, receive, set_cookies)
        except Refused as r:
            return await _refuse(send_with_headers, r.status, r.message)
        await self.app(scope, receive, send_with_headers)

    async def _check(self, scope, headers: dict, receive, set_cookies: list):
        """Raise Refused, or return the ``receive`` the app should read the body from."""
        p = self.policy
        host = headers.get("host")
        if not host_allowed(host, p):
            raise Refused(
                403,
                f"Host {host!r} is not one this explorer answers to (a DNS-rebinding guard): "
                "open it by its loopback address, or restart `circuit-atlas serve` with "
                "--allow-host NAME",
            )
        cookies = _cookies(headers.get("cookie", ""))
        token_cookie = cookie_name(TOKEN_COOKIE, host)
        csrf_cookie = cookie_name(CSRF_COOKIE, host)
        in_header = headers.get(TOKEN_HEADER) or _auth_token(headers.get("authorization"))
        if p.token is not None:
            query = _query_token(scope.get("query_string", b""))
            given = in_header or query or cookies.get(token_cookie) or ""
            if not _same(given, p.token):
                raise Refused(
                    401,
                    "this explorer needs its access token: open the URL that `circuit-atlas "
                    "serve` printed (it ends in ?token=...), or send the X-Explorer-Token header",
                )
            if query and cookies.get(token_cookie) != p.token:
                set_cookies.append(f"{token_cookie}={p.token}; Path=/; HttpOnly; SameSite=Strict")
        csrf = cookies.get(csrf_cookie)
        if not self.csrf_valid(csrf):
            csrf = None
            set_cookies.append(f"{csrf_cookie}={self.new_csrf()}; Path=/; SameSite=Strict")
        if scope["method"] in SAFE_METHODS:
            return receive
        _check_origin(headers, scope.get("scheme", "http"), host)
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise Refused(
                415,
                f"a {scope['method']} needs a JSON body with Content-Type: application/json "
                f"(got {kind or 'none'!r})",
            )
        header_token = p.token is not None and in_header and _same(in_header, p.token)
        if not header_token and not (csrf and _same(headers.get(CSRF_HEADER, ""), csrf)):
            raise Refused(
                403,
                f"missing or wrong CSRF token: send the {csrf_cookie} cookie's value in the "
                "X-CSRF-Token header (the explorer's page does), or the access token in the "
                "X-Explorer-Token header",
            )
        raw = await _read_bounded(receive, headers.get("content-length"), p.max_body)
        try:
            value = parse_json(raw, p.max_depth)
        except ValueError as err:
            raise Refused(400, str(err)) from None
        scope.setdefault("state", {})[BODY_KEY] = value
        return _replay(raw, receive)


def _auth_token(value: str | None) -> str | None:
    if value and value.lower().startswith("token "):
        return value[6:].strip()
    return None


def _query_token(qs: bytes) -> str | None:
    from urllib.parse import parse_qs

    vals = parse_qs(qs.decode("latin-1")).get("token")
    return vals[0] if vals else None


def _check_origin(headers: dict, scheme: str, host: str) -> None:
    """A state-changing request from a browser must come from this server's own page."""
    origin = headers.get("origin")
    if origin is None and headers.get("referer"):
        ref = urlsplit(headers["referer"])
        origin = f"{ref.scheme}://{ref.netloc}"
    if origin is None:
        return  # not a browser (browsers send Origin on every POST): the token guards it
    if origin.lower() != f"{scheme}://{host}".lower():
        raise Refused(
            403,
            f"cross-origin request from {origin} refused: only the explorer's own page "
            f"({scheme}://{host}) may change anything",
        )


async def _read_bounded(receive, declared: str | None, limit: int) -> bytes:
    """The request body, refused (413) as soon as the declared or received length passes
    ``limit``: nothing past the limit is read."""
    too_big = f"request body over {limit:,} bytes: send a smaller one"
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise Refused(400, f"Content-Length {declared!r} is not a number") from None
        if n > limit:
            raise Refused(413, f"{too_big} (Content-Length {n:,})")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "the client went away before sending the whole body")
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise Refused(413, too_big)
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(raw: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replay


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})
