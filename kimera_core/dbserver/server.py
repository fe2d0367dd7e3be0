"""The database server: this process owns the DuckDB file; each client gets its own cursor.

DuckDB allows one writing process per file but any number of connections inside it, each
with its own transaction, run concurrently under MVCC (DuckDB releases the GIL while it
executes). So the server opens the file once (``kimera_core.db.open_database``: header
checked first) and gives every accepted TCP connection one thread and one ``cursor()`` of
that connection, used by that thread only. A client's ``BEGIN ... COMMIT`` is therefore a
real DuckDB transaction, bound parameters stay bound parameters, and temporary macros and
registered Arrow tables live as long as the client's connection.

The first frame must be ``hello`` with the token (``hmac.compare_digest``); anything else
closes the connection. When a client goes away (closed, killed, network gone: TCP keepalive)
its open transaction is rolled back and its cursor closed, so nothing half-done is ever
committed. A COMMIT that returned to the client is in DuckDB's WAL: a killed server recovers
it on the next open. When DuckDB invalidates the database (a ``FatalException``: nothing
works until a restart), the server stops itself and ``kimera db serve`` exits with status 3,
so a supervisor restarts it and the WAL is replayed.

At start the server creates, once, the tables clients create on first use (``SHARED_SCHEMA``:
the legacy tables and ``dual_write_log``, the rollout stage, the shadow-read mismatches, the
migration's run tables). Every ``Storage`` asks for some of them as it opens, and two
clients creating one table at the same moment abort one another on DuckDB's catalog
("Catalog write-write conflict", seen with two writers opening at once); once they exist,
``CREATE TABLE IF NOT EXISTS`` writes nothing and conflicts with nobody. This is why the
server sits with the orchestration modules: it imports the engines' DDL, never their logic.
``create_function`` imports the function on the server, only from a ``kimera_core.`` module
by its qualified name (nothing else is ever imported or run).
"""

from __future__ import annotations

import contextlib
import hmac
import importlib
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from kimera_core.db import checkpoint, open_database
from kimera_core.dbserver.protocol import (
    Address,
    ProtocolError,
    arrow_reader,
    arrow_to_bytes,
    decode_params,
    encode_value,
    recv_frame,
    send_frame,
)
from kimera_core.legacy import create_legacy_schema
from kimera_core.migration.schema import ensure_schema as ensure_migration_schema
from kimera_core.rollout import ensure_rollout_tables
from kimera_core.shadow import SHADOW_DDL

AUTH_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 20.0
UDF_MODULE_PREFIX = "kimera_core."
UDF_OPTIONS = ("type", "null_handling", "exception_handling", "side_effects")


def _create_shadow_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SHADOW_DDL)


# What clients create on first use, created once by the server at start (module docstring).
SHARED_SCHEMA: tuple[Callable[[duckdb.DuckDBPyConnection], None], ...] = (
    create_legacy_schema,
    ensure_rollout_tables,
    _create_shadow_table,
    ensure_migration_schema,
)


@dataclass
class ClientInfo:
    """One connected client: its peer address, what it said it is, since when (epoch s)."""

    peer: str
    pid: int | None = None
    program: str | None = None
    connected_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "pid": self.pid,
            "program": self.program,
            "connected_at": self.connected_at,
        }


class DatabaseServer:
    """Serve the DuckDB file at ``path`` on ``host:port`` (0: a free port) to token holders.

    ``start()`` opens the file and listens; ``address`` is then the ``kimera://`` address
    clients pass as ``--db``; ``serve_forever()`` blocks; ``stop()`` (from another thread or
    a signal handler) closes every client (rolling back their open transactions),
    checkpoints and closes the file. Raises DatabaseOpenError when the file cannot be used.

    ``checkpoint_threshold`` (a DuckDB size, ``"1GB"``) and ``threads`` (DuckDB worker
    threads, >= 1, else ValueError) are set once for the whole database: DuckDB has no
    per-connection value of either. ``trace``: a file that gets one line per request
    (``RequestTrace``), for diagnostics.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        token: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        checkpoint_threshold: str | None = None,
        threads: int | None = None,
        log: Callable[[str], None] | None = None,
        trace: str | os.PathLike[str] | None = None,
    ) -> None:
        if not token:
            raise ValueError("the server needs a non-empty token")
        self.path = Path(path)
        self._token = token.encode("utf-8")
        self._host, self._port = host, port
        self._checkpoint_threshold = checkpoint_threshold
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self._threads = threads
        self._log = log or (lambda line: None)
        self._trace = RequestTrace(Path(trace)) if trace else None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._listener: _Listener | None = None
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, tuple[ClientInfo, duckdb.DuckDBPyConnection]] = {}
        self._stopping = False
        self.fatal_error: str | None = None
        self._stopped = threading.Event()
        self.started_at = time.time()

    # --- life cycle -------------------------------------------------------------------
    def start(self) -> Address:
        """Open the file, create ``SHARED_SCHEMA``, listen; returns the address."""
        self._con = open_database(self.path)
        if self._checkpoint_threshold:
            # DuckDB checkpoints by itself when the WAL passes this size, inside whichever
            # COMMIT crosses it: every client's commit waits that long (kimera_core.db.checkpoint)
            self._con.execute("SET checkpoint_threshold = ?", [self._checkpoint_threshold])
        if self._threads is not None:
            # DuckDB's threads act on the whole database: a bulk client's statement (a
            # migration partition) then leaves the other cores to the live clients' short
            # statements and their Python threads (docs/deployment.md)
            self._con.execute("SET threads = ?", [self._threads])
        for create in SHARED_SCHEMA:
            create(self._con)
        self._listener = _Listener((self._host, self._port), self)
        host, port = self._listener.server_address[:2]
        self.started_at = time.time()
        return Address(str(host), int(port))

    @property
    def address(self) -> Address:
        if self._listener is None:
            raise RuntimeError("the server is not started")
        host, port = self._listener.server_address[:2]
        return Address(str(host), int(port))

    def serve_forever(self) -> None:
        if self._listener is None:
            raise RuntimeError("the server is not started")
        self._listener.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        """Stop listening, drop every client (their transactions roll back), checkpoint, close.

        Each client's thread rolls back and closes its own cursor; the file is closed only
        when every one has (a running statement is interrupted first), never under them.
        """
        with self._lock:
            self._stopping = True
            clients = list(self._clients.items())
        if self._listener is not None:
            self._listener.shutdown()
            self._listener.server_close()
        for sock, (_info, cur) in clients:
            with contextlib.suppress(duckdb.Error):
                cur.interrupt()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while self.client_count() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            con, self._con = self._con, None
        if con is not None and not self.client_count():
            with contextlib.suppress(duckdb.Error):
                checkpoint(con)
            con.close()
        if self._trace is not None:
            self._trace.close()
        self._stopped.set()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until ``stop()`` has closed the file (True), or ``timeout`` seconds (False)."""
        return self._stopped.wait(timeout)

    def invalidated(self, message: str) -> None:
        """DuckDB invalidated the database (a FatalException): nothing can be served until a
        restart, which replays the WAL. Record why and stop; ``fatal_error`` says it."""
        with self._lock:
            if self.fatal_error is not None:
                return
            self.fatal_error = message.splitlines()[0]
        self._log(f"DuckDB invalidated the database, stopping: {self.fatal_error}")
        threading.Thread(target=self.stop, daemon=True).start()

    # --- state ------------------------------------------------------------------------
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    def status(self) -> dict[str, Any]:
        """Health: the file, this server's pid, DuckDB release, uptime and the clients."""
        with self._lock:
            clients = [info.to_dict() for info, _cur in self._clients.values()]
        return {
            "healthy": self._con is not None and not self._stopping and not self.fatal_error,
            "fatal_error": self.fatal_error,
            "database": str(self.path),
            "pid": os.getpid(),
            "duckdb": duckdb.__version__,
            "started_at": self.started_at,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "clients": len(clients),
            "client_list": clients,
        }

    # --- one client -------------------------------------------------------------------
    def handle(self, sock: socket.socket, peer: str) -> None:
        """Serve one client connection until it closes (run in the connection's thread)."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        info = self._authenticate(sock, peer)
        if info is None:
            return
        with self._lock:  # registered with its cursor at once: stop() waits for it
            if self._con is None or self._stopping:
                return
            cur = self._con.cursor()
            self._clients[sock] = (info, cur)
        self._log(f"client connected: {peer} pid {info.pid} ({info.program})")
        try:
            # counted before it is told: a status right after connecting includes it
            send_frame(sock, {"ok": True, "duckdb": duckdb.__version__, "database": str(self.path)})
            session = _Session(self, cur)
            trace = self._trace
            while True:
                frame = recv_frame(sock)
                if frame is None:
                    break
                received = time.time()
                header, body = frame
                session.timing = None
                reply, payload = session.dispatch(header, body)
                if trace is None:
                    send_frame(sock, reply, payload)
                else:
                    done = time.time()
                    send_frame(sock, reply, payload)
                    trace.record(info, header, received, session.timing, done, time.time())
                if header.get("op") == "close":
                    break
        except (OSError, ProtocolError, ValueError):
            pass  # the client went away mid-frame: its transaction rolls back below
        finally:
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")  # no-op error when no transaction is open
            with contextlib.suppress(duckdb.Error):
                cur.close()
            with self._lock:  # only now: stop() closes the file when no cursor is left
                self._clients.pop(sock, None)
            self._log(f"client gone: {peer} pid {info.pid}")

    def _authenticate(self, sock: socket.socket, peer: str) -> ClientInfo | None:
        sock.settimeout(AUTH_TIMEOUT_SECONDS)
        try:
            frame = recv_frame(sock)
        except (OSError, ProtocolError, ValueError):
            return None
        if frame is None:
            return None
        header, _body = frame
        token = header.get("token")
        if header.get("op") != "hello" or not isinstance(token, str):
            ok = False
        else:
            ok = hmac.compare_digest(token.encode("utf-8"), self._token)
        if not ok:
            self._log(f"refused {peer}: bad token")
            with contextlib.suppress(OSError):
                send_frame(sock, _error_reply(PermissionError("bad token")))
            return None
        sock.settimeout(None)
        pid = header.get("pid")
        program = header.get("program")
        return ClientInfo(
            peer=peer,
            pid=pid if isinstance(pid, int) else None,
            program=program if isinstance(program, str) else None,
        )


class _Session:
    """The operations of one client connection on its own cursor."""

    def __init__(self, server: DatabaseServer, cur: duckdb.DuckDBPyConnection) -> None:
        self.server = server
        self.cur = cur
        # the last execute's (start, end) epoch s and its thread CPU s, for RequestTrace
        self.timing: tuple[float, float, float] | None = None

    def dispatch(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        op = header.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            return _error_reply(ProtocolError(f"unknown operation {op!r}")), b""
        try:
            return handler(header, body)
        except duckdb.FatalException as exc:
            self.server.invalidated(str(exc))
            return _error_reply(exc), b""
        except Exception as exc:  # every failure goes back to the client, typed
            return _error_reply(exc), b""

    def op_execute(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        params = decode_params(header.get("params"))
        if self.server._trace is None:
            self.cur.execute(header["sql"], params)
        else:
            cpu, start = time.thread_time(), time.time()
            try:
                self.cur.execute(header["sql"], params)
            finally:
                self.timing = (start, time.time(), time.thread_time() - cpu)
        return {"ok": True, "description": _description(self.cur)}, b""

    def op_executemany(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        rows = [decode_params(p) for p in header["params"]]
        self.cur.executemany(header["sql"], rows)
        return {"ok": True, "description": _description(self.cur)}, b""

    def op_fetch(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        size = header.get("size")
        rows = self.cur.fetchall() if size is None else self.cur.fetchmany(int(size))
        return {"ok": True, "rows": [encode_value(list(row)) for row in rows]}, b""

    def op_arrow(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        return {"ok": True}, arrow_to_bytes(self.cur.to_arrow_table())

    def op_register(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        self.cur.register(header["name"], arrow_reader(body).read_all())
        return {"ok": True}, b""

    def op_unregister(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        self.cur.unregister(header["name"])
        return {"ok": True}, b""

    def op_create_function(
        self, header: dict[str, Any], body: bytes
    ) -> tuple[dict[str, Any], bytes]:
        function = allowed_function(header["module"], header["qualname"])
        options = {k: header[k] for k in UDF_OPTIONS if header.get(k) is not None}
        self.cur.create_function(
            header["name"], function, header.get("parameters"), header.get("return_type"), **options
        )
        return {"ok": True}, b""

    def op_remove_function(
        self, header: dict[str, Any], body: bytes
    ) -> tuple[dict[str, Any], bytes]:
        self.cur.remove_function(header["name"])
        return {"ok": True}, b""

    def op_status(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        return {"ok": True, "status": self.server.status()}, b""

    def op_close(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        return {"ok": True}, b""


class RequestTrace:
    """One tab-separated line per request (``kimera db serve --trace FILE``; diagnostics):
    client pid, operation, the first 60 characters of its SQL, then epoch seconds: frame
    received, statement started, statement ended, reply built, reply sent, and the
    statement's thread CPU seconds (empty for operations that run no statement). Started
    minus received and sent minus ended are the time the client's thread spent on
    decoding, encoding and waiting for the GIL; ended minus started minus CPU is what the
    statement waited for (a lock, a COMMIT, a core)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._file = path.open("a", encoding="utf-8", buffering=1 << 20)

    def record(
        self,
        info: ClientInfo,
        header: dict[str, Any],
        received: float,
        timing: tuple[float, float, float] | None,
        done: float,
        sent: float,
    ) -> None:
        sql = " ".join(str(header.get("sql") or "").split())[:60]
        start, end, cpu = timing if timing is not None else ("", "", "")
        line = f"{info.pid}\t{header.get('op')}\t{sql}\t{received:.6f}\t{start}\t{end}\t"
        with self._lock:
            if not self._file.closed:
                self._file.write(f"{line}{done:.6f}\t{sent:.6f}\t{cpu}\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


def allowed_function(module: str, qualname: str) -> Callable[..., Any]:
    """The function ``module.qualname``, only from a ``kimera_core.`` module; PermissionError."""
    if not module.startswith(UDF_MODULE_PREFIX) or not all(
        part.isidentifier() and not part.startswith("__") for part in qualname.split(".")
    ):
        raise PermissionError(
            f"{module}.{qualname}: the server registers functions from kimera_core modules only"
        )
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise PermissionError(f"{module}.{qualname} is not a function")
    return target


def _description(cur: duckdb.DuckDBPyConnection) -> list[list[str]] | None:
    description = cur.description
    if description is None:
        return None
    return [[str(column[0]), str(column[1])] for column in description]


def _error_reply(exc: BaseException) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


class _Handler(socketserver.BaseRequestHandler):
    server: _Listener

    def handle(self) -> None:
        host, port = self.client_address[:2]
        self.server.owner.handle(self.request, f"{host}:{port}")


class _Listener(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], owner: DatabaseServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
