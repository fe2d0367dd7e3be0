"""The client proxy: a DuckDB-connection look-alike that forwards every call to the server.

``RemoteConnection`` answers the calls the project makes on a DuckDB connection:
``execute(sql, params)`` (returns itself, as DuckDB's does), ``executemany``, ``fetchone``,
``fetchall``, ``fetchmany``, ``description``, ``arrow()`` (a RecordBatchReader, as DuckDB
1.5's), ``to_arrow_table()`` (and its old name ``fetch_arrow_table()``), ``register(name, arrow)``, ``unregister``,
``create_function`` / ``remove_function`` (a function of a ``kimera_core.`` module, imported
by name on the server), ``cursor()`` (a new connection: its own server-side cursor and
transaction context), ``close`` and the context manager. One request, one reply; each
connection is one TCP socket guarded by a lock, so a thread may share it as it would share
a DuckDB connection, one call at a time.

Errors come back as the exception type DuckDB raised on the server (``duckdb.CatalogException``
and so on, or the built-in ``ValueError``/``TypeError``/``PermissionError``), so the project's
``except duckdb.Error`` clauses work unchanged. A lost server raises
``duckdb.ConnectionException``; a server that cannot be reached or refuses the token raises
``DatabaseOpenError`` (one line, like a file that cannot be opened).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from kimera_core.dbserver.protocol import (
    ProtocolError,
    TokenError,
    arrow_reader,
    arrow_to_bytes,
    decode_value,
    encode_params,
    parse_address,
    read_token,
    recv_frame,
    send_frame,
)
from kimera_core.errors import DatabaseOpenError

CONNECT_TIMEOUT_SECONDS = 10.0
_BUILTIN_ERRORS = frozenset({"ValueError", "TypeError", "PermissionError", "KeyError"})


class RemoteConnection:
    """A connection to a database server (see the module docstring); use ``connect``."""

    def __init__(self, address: str, sock: socket.socket, token: str) -> None:
        self.address = address
        self._sock: socket.socket | None = sock
        self._token = token
        self._lock = threading.Lock()
        self._description: list[tuple[Any, ...]] | None = None

    # --- plumbing ---------------------------------------------------------------------
    def _call(self, header: dict[str, Any], body: bytes = b"") -> tuple[dict[str, Any], bytes]:
        with self._lock:
            sock = self._sock
            if sock is None:
                raise duckdb.ConnectionException(f"{self.address}: connection already closed")
            try:
                send_frame(sock, header, body)
                frame = recv_frame(sock)
            except (OSError, ProtocolError) as exc:
                self._drop()
                raise duckdb.ConnectionException(
                    f"{self.address}: lost the database server ({exc})"
                ) from None
            if frame is None:
                self._drop()
                raise duckdb.ConnectionException(
                    f"{self.address}: the database server closed the connection"
                )
        reply, payload = frame
        error = reply.get("error")
        if error is not None:
            raise _exception(error.get("type", ""), error.get("message", ""))
        return reply, payload

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # --- the DuckDB connection calls --------------------------------------------------
    def execute(self, query: str, parameters: Any = None) -> RemoteConnection:
        """Run one statement (bound ``parameters``: a sequence or a mapping); returns self."""
        reply, _ = self._call({"op": "execute", "sql": query, "params": encode_params(parameters)})
        self._set_description(reply)
        return self

    def executemany(self, query: str, parameters: Iterable[Any]) -> RemoteConnection:
        """Run one statement once per parameter set; returns self."""
        params = [encode_params(p) for p in parameters]
        reply, _ = self._call({"op": "executemany", "sql": query, "params": params})
        self._set_description(reply)
        return self

    def _set_description(self, reply: dict[str, Any]) -> None:
        described = reply.get("description")
        self._description = (
            None
            if described is None
            else [(name, kind, None, None, None, None, None) for name, kind in described]
        )

    @property
    def description(self) -> list[tuple[Any, ...]] | None:
        """(name, type name, None x5) per column of the last result; None without one."""
        return self._description

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._fetch(None)

    def fetchmany(self, size: int = 1) -> list[tuple[Any, ...]]:
        return self._fetch(size)

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self._fetch(1)
        return rows[0] if rows else None

    def _fetch(self, size: int | None) -> list[tuple[Any, ...]]:
        reply, _ = self._call({"op": "fetch", "size": size})
        return [tuple(decode_value(row)) for row in reply["rows"]]

    def to_arrow_table(self) -> pa.Table:
        """The rest of the result as an Arrow table."""
        _reply, payload = self._call({"op": "arrow"})
        return arrow_reader(payload).read_all()

    fetch_arrow_table = to_arrow_table  # DuckDB's older name for it

    def arrow(self) -> pa.RecordBatchReader:
        """The rest of the result as a RecordBatchReader (what DuckDB 1.5's ``arrow()`` gives)."""
        _reply, payload = self._call({"op": "arrow"})
        return arrow_reader(payload)

    def register(self, view_name: str, python_object: Any) -> RemoteConnection:
        """Make an Arrow table (or batch, or reader) queryable as ``view_name`` on this
        connection, until ``unregister`` or close; TypeError for anything not Arrow."""
        if not isinstance(python_object, (pa.Table, pa.RecordBatch, pa.RecordBatchReader)):
            raise TypeError(
                f"the database server registers Arrow data only, not {type(python_object).__name__}"
            )
        self._call({"op": "register", "name": view_name}, arrow_to_bytes(python_object))
        return self

    def unregister(self, view_name: str) -> RemoteConnection:
        self._call({"op": "unregister", "name": view_name})
        return self

    def create_function(
        self,
        name: str,
        function: Callable[..., Any],
        parameters: Sequence[Any] | None = None,
        return_type: Any = None,
        *,
        type: Any = None,  # noqa: A002 - DuckDB's keyword
        null_handling: Any = None,
        exception_handling: Any = None,
        side_effects: bool | None = None,
    ) -> RemoteConnection:
        """Register ``function`` on the server, which imports it by module and qualified name
        (``kimera_core.`` modules only: PermissionError otherwise)."""
        self._call(
            {
                "op": "create_function",
                "name": name,
                "module": getattr(function, "__module__", None) or "",
                "qualname": getattr(function, "__qualname__", None) or "",
                "parameters": None if parameters is None else [str(p) for p in parameters],
                "return_type": None if return_type is None else str(return_type),
                "type": _option(type),
                "null_handling": _option(null_handling),
                "exception_handling": _option(exception_handling),
                "side_effects": side_effects,
            }
        )
        return self

    def remove_function(self, name: str) -> RemoteConnection:
        self._call({"op": "remove_function", "name": name})
        return self

    def cursor(self) -> RemoteConnection:
        """A new connection to the same server: its own cursor and transaction context."""
        return connect(self.address, token=self._token)

    def begin(self) -> RemoteConnection:
        return self.execute("BEGIN TRANSACTION")

    def commit(self) -> RemoteConnection:
        return self.execute("COMMIT")

    def rollback(self) -> RemoteConnection:
        return self.execute("ROLLBACK")

    def status(self) -> dict[str, Any]:
        """The server's health: file, pid, DuckDB release, uptime, clients."""
        reply, _ = self._call({"op": "status"})
        return reply["status"]

    def close(self) -> None:
        """Close the connection; the server rolls back a transaction left open."""
        if self._sock is None:
            return
        with contextlib.suppress(duckdb.Error):  # the server already gone: nothing to close
            self._call({"op": "close"})
        with self._lock:
            self._drop()

    def __enter__(self) -> RemoteConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()


def _option(value: Any) -> str | None:
    """A DuckDB enum option (``PythonUDFType.ARROW`` or ``"arrow"``) as its lower-case name."""
    if value is None:
        return None
    name = getattr(value, "name", None) or str(value)
    return name.rsplit(".", 1)[-1].lower()


def _exception(kind: str, message: str) -> BaseException:
    """The server's exception as the same type here: a DuckDB error class or a built-in."""
    cls = getattr(duckdb, kind, None)
    if isinstance(cls, type) and issubclass(cls, duckdb.Error):
        return cls(message)
    if kind in _BUILTIN_ERRORS:
        return getattr(builtins, kind)(message)
    return duckdb.Error(f"{kind}: {message}" if kind else message)


def connect(address: str, *, token: str | None = None) -> RemoteConnection:
    """Connect and authenticate to the server at ``address`` (``kimera://HOST:PORT``).

    The token is ``token``, else ``KIMERA_DB_TOKEN``, else the token file. Raises
    DatabaseOpenError, one line, when there is no token, the server cannot be reached or it
    refuses the token.
    """
    target = parse_address(address)
    shown = str(target)
    try:
        token = token or read_token()
    except TokenError as exc:
        raise DatabaseOpenError(f"{shown}: {exc}") from None
    if not token:
        raise DatabaseOpenError(
            f"{shown}: no token: set KIMERA_DB_TOKEN or write the server's token to "
            "~/.config/kimera/db-token (mode 0600; KIMERA_DB_TOKEN_FILE names another file)"
        )
    try:
        sock = socket.create_connection((target.host, target.port), CONNECT_TIMEOUT_SECONDS)
    except OSError as exc:
        raise DatabaseOpenError(
            f"{shown}: cannot reach the database server ({exc.strerror or exc}); is "
            "`kimera db serve` running there?"
        ) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    try:
        send_frame(
            sock,
            {"op": "hello", "token": token, "pid": os.getpid(), "program": _program()},
        )
        frame = recv_frame(sock)
    except (OSError, ProtocolError) as exc:
        sock.close()
        raise DatabaseOpenError(f"{shown}: the database server did not answer ({exc})") from None
    if frame is None or "error" in frame[0]:
        sock.close()
        raise DatabaseOpenError(f"{shown}: the database server refused the token")
    sock.settimeout(None)
    return RemoteConnection(shown, sock, token)


def _program() -> str:
    args = [os.path.basename(sys.argv[0] if sys.argv else "python"), *sys.argv[1:3]]
    return " ".join(args)[:80]
