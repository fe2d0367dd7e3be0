"""Opening DuckDB files safely: check the header first, refuse with a clear error, touch nothing.

A DuckDB file starts with an 8-byte checksum, the magic ``DUCK`` at offset 8 and the
storage format version (uint64, little endian) at offset 12. DuckDB 0.10 and later also
write the library version that created the file (e.g. ``v1.1.3``) at offset 52.

DuckDB itself would happily turn an empty file into a new database, and a file opened
read-write is rewritten at checkpoint. ``open_database`` therefore refuses, before DuckDB
sees the file, anything that is not a readable DuckDB file in a format this DuckDB reads.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

from kimera_core.errors import DatabaseOpenError

MAGIC = b"DUCK"
HEADER_BYTES = 4096 + 2 * 4096  # main header and the two database headers
# DuckDB 2.x writes this sentinel at offset 12 and the real format in the database headers.
VERSION_IN_DATABASE_HEADER = 999
READABLE_STORAGE_VERSIONS = range(64, 69)

# Storage format versions and the DuckDB releases that write them by default or on request.
STORAGE_VERSIONS: dict[int, str] = {
    51: "DuckDB 0.8.x",
    64: "DuckDB 0.9.0 - 1.x (the default format of 0.9 to 1.5)",
    65: "DuckDB 1.2 or newer (STORAGE_VERSION v1.2)",
    66: "DuckDB 1.3 or newer (STORAGE_VERSION v1.3)",
    67: "DuckDB 1.4 or newer (STORAGE_VERSION v1.4)",
    68: "DuckDB 1.5 or newer (STORAGE_VERSION v1.5)",
    69: "DuckDB 2.0 or newer",
}


@dataclass(frozen=True)
class FileHeader:
    """What the first bytes of a DuckDB file say about it."""

    storage_version: int
    library_version: str | None

    @property
    def written_by(self) -> str:
        if self.library_version:
            return f"DuckDB {self.library_version} (storage format {self.storage_version})"
        known = STORAGE_VERSIONS.get(self.storage_version, "an unknown DuckDB release")
        return f"{known} (storage format {self.storage_version})"


def read_header(path: str | os.PathLike[str]) -> FileHeader:
    """Parse the DuckDB file header without opening the database; raises DatabaseOpenError."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(HEADER_BYTES)
    except IsADirectoryError:
        raise DatabaseOpenError(f"{path}: is a directory, not a DuckDB database file") from None
    except PermissionError:
        raise DatabaseOpenError(f"{path}: permission denied (cannot read the file)") from None
    except FileNotFoundError:
        raise DatabaseOpenError(f"{path}: no such file") from None
    except OSError as exc:
        raise DatabaseOpenError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if len(head) == 0:
        raise DatabaseOpenError(f"{path}: the file is empty (0 bytes), not a DuckDB database")
    if len(head) < 20 or head[8:12] != MAGIC:
        raise DatabaseOpenError(
            f"{path}: not a DuckDB database file (no DUCK header; is it SQLite, text or a "
            f"truncated copy?)"
        )
    (storage_version,) = struct.unpack_from("<Q", head, 12)
    if storage_version == VERSION_IN_DATABASE_HEADER:
        storage_version = _database_header_version(head) or storage_version
    library = None
    if len(head) >= 84:
        raw = head[52:84].split(b"\x00", 1)[0]
        if raw.startswith(b"v") and raw.isascii():
            library = raw.decode("ascii")
    return FileHeader(storage_version=storage_version, library_version=library)


def _database_header_version(head: bytes) -> int | None:
    """serialization_compatibility of the active database header (the higher iteration)."""
    best: tuple[int, int] | None = None
    for offset in (4096, 8192):
        if len(head) < offset + 64:
            continue
        iteration, compat = (
            struct.unpack_from("<Q", head, offset + 8)[0],
            struct.unpack_from("<Q", head, offset + 56)[0],
        )
        if best is None or iteration > best[0]:
            best = (iteration, compat)
    return None if best is None else best[1]


def _hint_for(message: str) -> str:
    lower = message.lower()
    if "lock" in lower:
        return (
            "another process holds the database (DuckDB allows one writer per file): stop the "
            "other kimera/dagster process or open read-only"
        )
    if "version" in lower or "serializ" in lower or "storage" in lower:
        return (
            "the file was written in a format this DuckDB "
            f"({duckdb.__version__}) cannot read: open it with the DuckDB that wrote it and "
            "EXPORT DATABASE, or upgrade kimera's duckdb"
        )
    if "wal" in lower:
        return "its write-ahead log (.wal) is damaged: restore from a backup"
    return "the file may be damaged or truncated: restore it from a backup"


def open_database(
    path: str | os.PathLike[str], *, read_only: bool = False, create: bool = False
) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB file, or raise DatabaseOpenError naming the file and the cause.

    ``create=True`` makes a new file when none exists; an existing file must already be a
    DuckDB database. A refused file is left byte-identical.
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise DatabaseOpenError(f"{path}: no such file")
        if read_only:
            raise DatabaseOpenError(f"{path}: no such file (cannot create it read-only)")
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
    else:
        header = read_header(path)
        if header.storage_version < READABLE_STORAGE_VERSIONS.start:
            raise DatabaseOpenError(
                f"{path}: written by {header.written_by}, older than DuckDB 0.9; open it "
                "with DuckDB 0.9 or 0.10 once (which upgrades it) and try again"
            )
        if header.storage_version not in READABLE_STORAGE_VERSIONS:
            raise DatabaseOpenError(
                f"{path}: written by {header.written_by}, a storage format DuckDB "
                f"{duckdb.__version__} cannot read; open it with that DuckDB and EXPORT "
                "DATABASE, or upgrade kimera's duckdb"
            )
        if not read_only and not os.access(path, os.W_OK):
            raise DatabaseOpenError(f"{path}: permission denied (the file is not writable)")
    try:
        # Never reach for the network: an unknown file type would trigger an extension download.
        con = duckdb.connect(
            str(path),
            read_only=read_only,
            config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
        )
    except duckdb.Error as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatabaseOpenError(f"{path}: cannot open ({message}); {_hint_for(message)}") from None
    con.execute("SET enable_progress_bar = false")  # output is ours to format
    return con


@contextlib.contextmanager
def connect(
    path: str | os.PathLike[str], *, read_only: bool = False, create: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived connection, closed on exit (DuckDB has one writer process per file)."""
    con = open_database(path, read_only=read_only, create=create)
    try:
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """``BEGIN TRANSACTION`` ... ``COMMIT``; on any exception ``ROLLBACK`` and re-raise.

    The one way the project opens a transaction (DuckDB: one writer process per file, so
    every unit of work is one transaction, short). A failed ROLLBACK (the connection is
    already gone) does not hide the original exception.
    """
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
