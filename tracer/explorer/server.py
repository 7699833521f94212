"""Running the explorer: uvicorn on loopback by default, with an access token printed in its URL
(as Jupyter's server does); ``--no-token`` drops the token, on loopback only.

:class:`ServerThread` runs the app in a background thread (tests, benchmarks, notebooks).
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import sys
import threading
import time


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_token(host: str, token: str | None, no_token: bool = False) -> str | None:
    """The token requests must carry: the given one, else a fresh random one (loopback too:
    another user of this machine, or a page in the browser, can reach a loopback port).
    ``no_token``: None, allowed on a loopback ``host`` only (ValueError elsewhere). Off
    loopback a warning goes to stderr."""
    if no_token:
        if token:
            raise ValueError("give --token or --no-token, not both")
        if not is_loopback(host):
            raise ValueError(
                f"--no-token is allowed on loopback only, and --host {host} is reachable from "
                "other machines: drop --no-token (the URL then carries a token)"
            )
        return None
    token = token or secrets.token_hex(24)
    if not is_loopback(host):
        print(
            f"circuit-atlas serve: WARNING: listening on {host}, reachable from other machines. "
            "Anyone with the URL below (it holds the access token) can read your graphs and "
            "run the model; use --host 127.0.0.1 to keep it local.",
            file=sys.stderr,
        )
    return token


def url(host: str, port: int, token: str | None) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(app, host: str, port: int, log_level: str = "warning") -> None:
    """Serve ``app`` until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


class ServerThread:
    """The app served by uvicorn on a background thread: ``start()`` returns when it accepts
    connections; ``stop()`` shuts it down."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="explorer")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the explorer did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
