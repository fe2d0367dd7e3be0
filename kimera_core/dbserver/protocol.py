"""The wire format of the database server: frames, typed values, addresses and tokens.

A frame is two big-endian uint32 lengths (JSON header, binary body), the UTF-8 JSON header
and the body. Requests and replies are JSON objects; Arrow payloads (query results asked
for as Arrow, tables given to ``register``) travel in the body as one Arrow IPC stream.
Nothing is pickled: a peer can only send JSON and Arrow.

Values (bound parameters, result rows) are JSON with tags, so every value comes back as the
Python type an embedded DuckDB connection gives: ``None``, ``bool``, ``str`` and ``int`` (any
size) and finite ``float`` are plain JSON (a float is written by ``repr``, so it reads back
bit for bit, ``-0.0`` included); a JSON array is a ``list``; any JSON object is a tagged
value ``{"$t": tag, "v": ...}``: ``float`` (nan, inf, -inf), ``bytes`` (base64),
``decimal``, ``uuid``, ``date``, ``time`` (ISO, with its offset), ``datetime`` (ISO, and the
zone name for an aware one, restored with pytz as DuckDB does), ``timedelta`` (days,
seconds, microseconds), ``tuple`` (a DuckDB ARRAY) and ``dict`` (a STRUCT or MAP, as key /
value pairs, so keys of any type survive). Anything else is refused with ``TypeError``
naming the type (a numpy scalar is carried as its Python value).

An address is ``kimera://HOST:PORT``. The token is read from ``KIMERA_DB_TOKEN``, else from
a file (``KIMERA_DB_TOKEN_FILE``, default ``~/.config/kimera/db-token``) that only its owner
may read and that lies outside any git work tree.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import os
import socket
import stat
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytz

from kimera_core.errors import KimeraError

SCHEME = "kimera://"
TOKEN_ENV = "KIMERA_DB_TOKEN"  # noqa: S105 - the variable's name, not a token
TOKEN_FILE_ENV = "KIMERA_DB_TOKEN_FILE"  # noqa: S105 - a variable's name
DEFAULT_TOKEN_FILE = Path("~/.config/kimera/db-token")

_LENGTHS = struct.Struct("!II")
MAX_HEADER_BYTES = 1 << 30  # a JSON header (rows of one fetch) above 1 GiB is refused
MAX_BODY_BYTES = (1 << 32) - 1


class ProtocolError(KimeraError):
    """A peer broke the protocol (bad frame, bad token, closed mid-frame)."""


class TokenError(KimeraError):
    """No usable token: none set, or its file is readable by others or inside a repository."""


# --- addresses ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    """A server's address: host and TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{SCHEME}{host}:{self.port}"


def _text(target: object) -> str | None:
    """``target`` as text when it is a str or a path; an address a ``Path`` mangled
    (``kimera:/host:port``, one slash) is given back its two slashes."""
    if not isinstance(target, (str, os.PathLike)):
        return None
    text = os.fspath(target)
    if not isinstance(text, str):
        return None
    if text.startswith("kimera:/") and not text.startswith(SCHEME):
        text = SCHEME + text[len("kimera:/") :]
    return text


def is_address(target: object) -> bool:
    """Whether ``target`` (a path or an address, str or ``os.PathLike``) names a server."""
    text = _text(target)
    return text is not None and text.startswith(SCHEME)


def parse_address(target: str | os.PathLike[str]) -> Address:
    """``kimera://127.0.0.1:5433`` -> Address; ValueError for anything else."""
    text = _text(target) or ""
    if not text.startswith(SCHEME):
        raise ValueError(f"{target!r}: not a database server address ({SCHEME}HOST:PORT)")
    rest = text[len(SCHEME) :].rstrip("/")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{target!r}: not a database server address ({SCHEME}HOST:PORT)")
    return Address(host, int(port))


# --- tokens ---------------------------------------------------------------------------------
def token_file() -> Path:
    """The token file: ``KIMERA_DB_TOKEN_FILE`` or ``~/.config/kimera/db-token``."""
    return Path(os.environ.get(TOKEN_FILE_ENV) or DEFAULT_TOKEN_FILE).expanduser()


def check_token_file(path: Path) -> None:
    """Refuse (TokenError, one line) a token file others may read or one inside a git tree."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise TokenError(
            f"{path}: token file is readable by group or others (mode {mode:04o}); "
            f"run `chmod 600 {path}`"
        )
    for parent in path.resolve().parents:
        if (parent / ".git").exists():
            raise TokenError(f"{path}: token file lies inside the git work tree {parent}; move it")


def read_token() -> str | None:
    """The token from ``KIMERA_DB_TOKEN``, else the token file; None when neither exists."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token.strip()
    path = token_file()
    if not path.exists():
        return None
    check_token_file(path)
    return path.read_text(encoding="utf-8").strip() or None


def write_token_file(path: Path, token: str) -> None:
    """Create ``path`` (mode 0600, parents 0700) holding ``token``; FileExistsError if present."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    check_token_file(path)


# --- frames ---------------------------------------------------------------------------------
def send_frame(sock: socket.socket, header: dict[str, Any], body: bytes | memoryview = b"") -> None:
    """Send one frame (JSON header, binary body)."""
    data = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"a frame body of {len(body):,} bytes is over the 4 GiB limit")
    head = _LENGTHS.pack(len(data), len(body)) + data
    if len(body) < 65536:
        sock.sendall(head + bytes(body))
    else:
        sock.sendall(head)
        sock.sendall(body)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes] | None:
    """One frame as (header, body); None when the peer closed cleanly between frames."""
    lengths = _recv_exact(sock, _LENGTHS.size, eof_ok=True)
    if lengths is None:
        return None
    header_len, body_len = _LENGTHS.unpack(lengths)
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"a frame header of {header_len:,} bytes is over the limit")
    header = json.loads(_recv_exact(sock, header_len))
    if not isinstance(header, dict):
        raise ProtocolError("a frame header must be a JSON object")
    body = _recv_exact(sock, body_len) if body_len else b""
    return header, body


def _recv_exact(sock: socket.socket, size: int, *, eof_ok: bool = False) -> bytes | None:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            if eof_ok and got == 0:
                return None
            raise ProtocolError("the peer closed the connection in the middle of a frame")
        got += n
    return bytes(buf)


# --- Arrow payloads -------------------------------------------------------------------------
def arrow_to_bytes(data: pa.Table | pa.RecordBatchReader | pa.RecordBatch) -> bytes:
    """An Arrow table, batch or reader as one IPC stream."""
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, data.schema) as writer:
        if isinstance(data, pa.RecordBatchReader):
            for batch in data:
                writer.write_batch(batch)
        else:
            writer.write_table(data)
    return sink.getvalue().to_pybytes()


def arrow_reader(body: bytes) -> pa.RecordBatchReader:
    """The IPC stream in ``body`` as a RecordBatchReader."""
    return pa.ipc.open_stream(pa.BufferReader(body))


# --- typed values ---------------------------------------------------------------------------
def encode_value(value: Any) -> Any:
    """A Python value as tagged JSON (see the module docstring); TypeError for other types."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {
            "$t": "float",
            "v": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"),
        }
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    if isinstance(value, tuple):
        return {"$t": "tuple", "v": [encode_value(v) for v in value]}
    if isinstance(value, dict):
        return {"$t": "dict", "v": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$t": "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, decimal.Decimal):
        return {"$t": "decimal", "v": str(value)}
    if isinstance(value, uuid.UUID):
        return {"$t": "uuid", "v": str(value)}
    if isinstance(value, dt.datetime):
        zone = getattr(value.tzinfo, "zone", None) if value.tzinfo is not None else None
        return {"$t": "datetime", "v": value.isoformat(), "tz": zone}
    if isinstance(value, dt.date):
        return {"$t": "date", "v": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$t": "time", "v": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"$t": "timedelta", "v": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, np.generic):
        return encode_value(value.item())
    if isinstance(value, np.ndarray):
        return encode_value(value.tolist())
    raise TypeError(f"a value of type {type(value).__name__} cannot be sent to the database server")


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def decode_value(value: Any) -> Any:
    """The inverse of ``encode_value``; ProtocolError for an unknown tag."""
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag, data = value.get("$t"), value.get("v")
    if tag == "float":
        return _FLOATS[data]
    if tag == "tuple":
        return tuple(decode_value(v) for v in data)
    if tag == "dict":
        return {decode_value(k): decode_value(v) for k, v in data}
    if tag == "bytes":
        return base64.b64decode(data)
    if tag == "decimal":
        return decimal.Decimal(data)
    if tag == "uuid":
        return uuid.UUID(data)
    if tag == "datetime":
        moment = dt.datetime.fromisoformat(data)
        zone = value.get("tz")
        return moment.astimezone(pytz.timezone(zone)) if zone else moment
    if tag == "date":
        return dt.date.fromisoformat(data)
    if tag == "time":
        return dt.time.fromisoformat(data)
    if tag == "timedelta":
        days, seconds, micros = data
        return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
    raise ProtocolError(f"unknown value tag {tag!r}")


def encode_params(params: Any) -> Any:
    """Bound parameters (a sequence, a mapping of names, or None) as tagged JSON."""
    if params is None:
        return None
    if isinstance(params, dict):
        return {"named": {str(k): encode_value(v) for k, v in params.items()}}
    return [encode_value(v) for v in params]


def decode_params(params: Any) -> Any:
    """The inverse of ``encode_params``."""
    if params is None:
        return None
    if isinstance(params, dict):
        return {k: decode_value(v) for k, v in params["named"].items()}
    return [decode_value(v) for v in params]
