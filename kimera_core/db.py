"""Opening DuckDB files safely: check the header first, refuse with a clear error, touch nothing.

A DuckDB file starts with an 8-byte checksum, the magic ``DUCK`` at offset 8 and the
storage format version (uint64, little endian) at offset 12. DuckDB 0.10 and later also
write the library version that created the file (e.g. ``v1.1.3``) at offset 52.

Two database headers follow at 4096 and 8192 (8 x uint64: checksum, iteration, meta block,
free list, block count, block alloc size, vector size, serialization compatibility); the
one with the higher iteration is live, rewritten at every checkpoint, whereas the main
header names the release that *created* the file and never changes. DuckDB 0.9 wrote only
the first five fields, so a live header with a block alloc size of 0 means the catalog and
index metadata are still in the 0.9 layout (``FileHeader.metadata_from_duckdb_09``).
DuckDB >= 1.5 cannot read that layout when an index is empty (an empty table, or a column
that is NULL in every row): ``INTERNAL Error: ExtractIndexStorageInfo``. DuckDB 1.1 to 1.4
read it, and one write + CHECKPOINT by 1.4 rewrites it (``kimera db upgrade``,
kimera_core/upgrade.py; docs/files.md).

DuckDB itself would happily turn an empty file into a new database, and a file opened
read-write is rewritten at checkpoint. ``open_database`` therefore refuses, before DuckDB
sees the file, anything that is not a readable DuckDB file in a format this DuckDB reads;
when DuckDB refuses a file an older DuckDB can read, the error names the release that
wrote it and the command that upgrades a copy.

Every opener here also takes a database server's address (``kimera://HOST:PORT``,
``kimera_core.dbserver``) in place of a path: it then returns the server's proxy connection
(``dbserver.client.RemoteConnection``), which answers the same calls. A path keeps the
embedded behaviour unchanged. Nothing waits on a file lock through a server (the server
owns the file); ``read_only`` and ``create`` apply to files only.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb

from kimera_core.dbserver.client import RemoteConnection
from kimera_core.dbserver.client import connect as connect_server
from kimera_core.dbserver.protocol import is_address
from kimera_core.errors import DatabaseOpenError

T = TypeVar("T")

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


# The command that repairs a file DuckDB refuses but DuckDB 1.4 reads (kimera_core.upgrade).
UPGRADE_COMMAND = "kimera db upgrade --db {path}"


@dataclass(frozen=True)
class FileHeader:
    """What the first bytes of a DuckDB file say about it.

    ``library_version`` is the release that created the file (``v0.9.2``; None before 0.9),
    ``source_id`` its git hash; ``iteration`` and ``block_alloc_size`` come from the live
    database header (the last checkpoint): a ``block_alloc_size`` of 0 is DuckDB 0.9's.
    """

    storage_version: int
    library_version: str | None
    source_id: str | None = None
    iteration: int | None = None
    block_alloc_size: int | None = None

    @property
    def metadata_from_duckdb_09(self) -> bool:
        """True when the last checkpoint wrote DuckDB 0.9's catalog and index layout."""
        return self.storage_version == 64 and self.block_alloc_size == 0

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
    live = _live_database_header(head)
    if storage_version == VERSION_IN_DATABASE_HEADER and live is not None:
        storage_version = live[3] or storage_version
    return FileHeader(
        storage_version=storage_version,
        library_version=_text(head, 52, 84, prefix=b"v"),
        source_id=_text(head, 84, 116),
        iteration=None if live is None else live[0],
        block_alloc_size=None if live is None else live[1],
    )


def _text(head: bytes, start: int, end: int, prefix: bytes = b"") -> str | None:
    """A NUL-padded ASCII field of the main header; None when absent or not printable."""
    raw = head[start:end].split(b"\x00", 1)[0]
    if not raw.startswith(prefix) or not raw.isascii() or not raw.decode("ascii").isprintable():
        return None
    return raw.decode("ascii") or None


def _live_database_header(head: bytes) -> tuple[int, int, int, int] | None:
    """(iteration, block_alloc_size, vector_size, serialization_compatibility) of the live
    database header (the one with the higher iteration), None if the file is too short."""
    best: tuple[int, int, int, int] | None = None
    for offset in (4096, 8192):
        if len(head) < offset + 64:
            continue
        _checksum, iteration, _meta, _free, _count, alloc, vector, compat = struct.unpack_from(
            "<8Q", head, offset
        )
        if best is None or iteration > best[0]:
            best = (iteration, alloc, vector, compat)
    return best


def _hint_for(message: str, header: FileHeader | None, path: Path) -> str:
    lower = message.lower()
    if "lock" in lower:
        return (
            "another process holds the database (DuckDB allows one writer per file, and no "
            "reader while it writes): stop the other kimera/dagster process and try again"
        )
    if header is not None and _older_duckdb_reads_it(message, header):
        layout = ""
        if header.metadata_from_duckdb_09:
            layout = " (its index metadata is still in DuckDB 0.9's layout)"
        return (
            f"written by {header.written_by}{layout}, which DuckDB {duckdb.__version__} "
            f"cannot read but DuckDB 1.4 can: run `{UPGRADE_COMMAND.format(path=path)}` "
            "(it upgrades a copy and leaves this file as it is; docs/files.md)"
        )
    if "version" in lower or "serializ" in lower or "storage" in lower:
        written = f"written by {header.written_by}, " if header is not None else ""
        return (
            f"{written}a format this DuckDB ({duckdb.__version__}) cannot read: open it with "
            "the DuckDB that wrote it and EXPORT DATABASE, or upgrade kimera's duckdb"
        )
    if "wal" in lower:
        return "its write-ahead log (.wal) is damaged: restore from a backup"
    return "the file may be damaged or truncated: restore it from a backup"


def _older_duckdb_reads_it(message: str, header: FileHeader) -> bool:
    """Whether DuckDB's refusal is one an older release's rewrite cures (not damage, not a
    lock): the 0.9 index metadata, or an internal or deserialization error on a file whose
    format DuckDB 1.4 reads (storage 64-67) and that an older release created."""
    lower = message.lower()
    if "could not read" in lower or "checksum" in lower or "not a valid duckdb" in lower:
        return False
    if header.metadata_from_duckdb_09:
        return True
    created_older = header.library_version is not None and _release(
        header.library_version
    ) < _release(duckdb.__version__)
    return (
        created_older
        and header.storage_version in range(64, 68)
        and ("internal error" in lower or "deserializ" in lower)
    )


def _release(version: str) -> tuple[int, ...]:
    """``"v1.4.4"`` -> (1, 4, 4); non-numeric parts (``dev12``) end the tuple."""
    parts: list[int] = []
    for part in version.lstrip("v").split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def open_database(
    path: str | os.PathLike[str], *, read_only: bool = False, create: bool = False
) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB file, or raise DatabaseOpenError naming the file and the cause.

    ``create=True`` makes a new file when none exists; an existing file must already be a
    DuckDB database. A refused file is left byte-identical. A server address
    (``kimera://HOST:PORT``) returns a ``RemoteConnection`` to that server instead
    (DatabaseOpenError when it cannot be reached or refuses the token).
    """
    if is_address(path):
        return connect_server(path)  # type: ignore[return-value]
    path = Path(path)
    if not path.exists():
        if not create:
            raise DatabaseOpenError(f"{path}: no such file")
        if read_only:
            raise DatabaseOpenError(f"{path}: no such file (cannot create it read-only)")
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
    header = None
    if path.exists():
        header = read_header(path)
        if header.storage_version < READABLE_STORAGE_VERSIONS.start:
            raise DatabaseOpenError(
                f"{path}: written by {header.written_by}, older than DuckDB 0.9; open it "
                "with DuckDB 0.8, EXPORT DATABASE, and IMPORT DATABASE into a new file"
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
        hint = _hint_for(message, header, path)
        raise DatabaseOpenError(f"{path}: cannot open ({message}); {hint}") from None
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
def transaction(
    con: duckdb.DuckDBPyConnection, *, commit: bool = True
) -> Iterator[duckdb.DuckDBPyConnection]:
    """``BEGIN TRANSACTION`` ... ``COMMIT``; on any exception ``ROLLBACK`` and re-raise.

    The one way the project opens a transaction (DuckDB: one writer process per file, so
    every unit of work is one transaction, short). ``commit=False`` always rolls back (a dry
    run computes everything and keeps nothing). A failed ROLLBACK (the connection is already
    gone) does not hide the original exception.
    """
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT" if commit else "ROLLBACK")


# DuckDB aborts a transaction that wrote what a concurrent one wrote first (MVCC, optimistic):
# "Conflict on update!", "Conflict on tuple deletion!", "Catalog write-write conflict on
# create ...", or at COMMIT "Failed to commit: PRIMARY KEY or UNIQUE constraint violation"
# for a key another transaction inserted meanwhile. Only the server mode (several
# transactions in one process) meets these; an embedded file has one writer at a time.
CONFLICT_MARKERS = ("conflict", "failed to commit")
# A key inserted and committed by another transaction after this one's snapshot fails the
# INSERT itself: "Duplicate key ... violates primary key constraint" (a ConstraintException).
DUPLICATE_KEY_MARKER = "duplicate key"
CONFLICT_ATTEMPTS = 5
CONFLICT_BACKOFF_SECONDS = 0.01


def is_conflict(exc: BaseException, *, duplicate_keys: bool = False) -> bool:
    """Whether ``exc`` is DuckDB aborting a transaction for a concurrent one's write.

    ``duplicate_keys=True`` counts a duplicate-key error too: right for work that inserts
    only keys it found absent in its own snapshot, where a duplicate can only be a key a
    concurrent transaction committed meanwhile (the migration's partition insert).
    """
    text = str(exc).lower()
    if isinstance(exc, duckdb.TransactionException):
        return any(marker in text for marker in CONFLICT_MARKERS)
    return (
        duplicate_keys
        and isinstance(exc, duckdb.ConstraintException)
        and DUPLICATE_KEY_MARKER in text
    )


def retry_conflicts(
    con: duckdb.DuckDBPyConnection,
    work: Callable[[duckdb.DuckDBPyConnection], T],
    *,
    attempts: int = CONFLICT_ATTEMPTS,
    duplicate_keys: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``work(con)`` in one ``transaction``; run again (rolled back first) when DuckDB aborts it
    for a concurrent transaction's write (``is_conflict``; ``duplicate_keys`` as there), up to
    ``attempts`` times in all, waiting 10, 20, 40 ... ms between; returns what ``work`` returns.

    ``work`` must be a whole unit of work that can run again from the start (it reads what it
    writes from the database, inside the transaction), and must not run statements after a
    failed one (DuckDB refuses them in an aborted transaction, hiding the first error). Any
    other error, or a conflict on the last attempt, is raised as it came.
    """
    for attempt in range(1, attempts + 1):
        try:
            with transaction(con):
                return work(con)
        except (duckdb.TransactionException, duckdb.ConstraintException) as exc:
            if attempt == attempts or not is_conflict(exc, duplicate_keys=duplicate_keys):
                raise
        sleep(CONFLICT_BACKOFF_SECONDS * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


@contextlib.contextmanager
def setting_within(con: duckdb.DuckDBPyConnection, change: str, restore: str) -> Iterator[None]:
    """Run the ``SET`` statement ``change`` for the block and ``restore`` (a ``SET`` or
    ``RESET``) after it, also when the block raises, if DuckDB still takes a statement then
    (its failure is ignored and the block's error raised). Both are the caller's vetted SQL.
    DuckDB's settings are per database instance: through a server they act on every client,
    so callers skip this for a served connection (``is_served``)."""
    con.execute(change)
    try:
        yield
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute(restore)
        raise
    con.execute(restore)


def is_served(con: object) -> bool:
    """Whether ``con`` reaches its database through a server (``kimera://``), where other
    clients' transactions run beside this one's (the application writing live). Work that
    holds rows or commits for long (a migration partition, an index rebuild) should stay
    short then: DuckDB serialises commits, and every client's COMMIT waits for a long one."""
    return isinstance(con, RemoteConnection)


def checkpoint(con: duckdb.DuckDBPyConnection) -> bool:
    """``CHECKPOINT``: write the WAL into the file; True when it ran.

    The one place the project asks for a checkpoint. When another connection to the same
    database has a write transaction open (a database server with live clients), DuckDB
    refuses a plain checkpoint; that is not an error for us: the work is committed and in the
    WAL, and DuckDB's automatic checkpoint writes it later. Returns False then.

    Through a database server (a ``RemoteConnection``) nothing is asked and False is returned:
    a checkpoint holds every client's COMMIT for as long as it runs (measured: a small
    insert waited 1.6 s behind a 0.5 s checkpoint of 1.5 M new rows), so a client's
    housekeeping must not stall the live application; the server checkpoints when it stops
    and DuckDB when its WAL passes ``checkpoint_threshold``.
    """
    if is_served(con):
        return False
    try:
        con.execute("CHECKPOINT")
    except duckdb.TransactionException as exc:
        if "checkpoint" not in str(exc).lower():
            raise
        return False
    return True


# --- waiting for another process's lock -----------------------------------------------------
# DuckDB's lock error names the holder: "... Conflicting lock is held in /usr/bin/python3 (PID 42)"
LOCK_HOLDER_RE = re.compile(r"\(PID (\d+)\)")
WAIT_REPORT_SECONDS = 5.0
COMMAND_SHOWN_CHARS = 80


def holder_command(pid: int) -> str | None:
    """The command line of process ``pid`` as an operator would type it, from /proc; None if gone.

    A Python interpreter in front of a script is dropped (``python .../bin/kimera workload``
    reads ``kimera workload``); whitespace runs become one space (one line); the text is cut
    at ``COMMAND_SHOWN_CHARS``.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    args = [a for a in raw.decode("utf-8", "replace").split("\0") if a]
    if len(args) > 1 and Path(args[0]).name.startswith("python") and not args[1].startswith("-"):
        args = args[1:]
    if not args:
        return None
    text = " ".join(" ".join([Path(args[0]).name, *args[1:]]).split())
    return text if len(text) <= COMMAND_SHOWN_CHARS else text[: COMMAND_SHOWN_CHARS - 1] + "…"


def lock_holder(message: str) -> str | None:
    """Who holds the lock an open error is about: "PID 42 (`kimera workload`)"; None if no lock."""
    if "lock" not in message.lower():
        return None
    found = LOCK_HOLDER_RE.search(message)
    if found is None:
        return "another process"
    pid = int(found.group(1))
    command = holder_command(pid)
    return f"PID {pid}" + (f" (`{command}`)" if command else "")


def open_waiting(
    path: str | os.PathLike[str],
    *,
    read_only: bool = False,
    create: bool = False,
    timeout: float = 120.0,
    on_wait: Callable[[str], None] | None = None,
    report_every: float = WAIT_REPORT_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> duckdb.DuckDBPyConnection:
    """``open_database``, waiting up to ``timeout`` seconds while another process holds the file.

    DuckDB locks a file for the process that opens it, read-only opens included, so a
    reader waits for a writer too. ``on_wait(line)`` is told at once and then every
    ``report_every`` seconds: "waiting for the database: held by PID 42 (`kimera workload`)
    for 12 s, giving up in 108 s". Retries every 0.25 s, so the open follows the holder's
    exit closely. Raises DatabaseOpenError, one line naming the holder, at the deadline; any
    other open error at once.
    """
    start = clock()
    reported: float | None = None
    while True:
        try:
            return open_database(path, read_only=read_only, create=create)
        except DatabaseOpenError as exc:
            holder = lock_holder(str(exc))
            waited = clock() - start
            if holder is None:
                raise
            if waited >= timeout:
                raise DatabaseOpenError(
                    f"{path}: still held by {holder} after {waited:,.0f} s; stop that process "
                    "(or let it finish) and try again"
                ) from None
            if on_wait is not None and (reported is None or waited - reported >= report_every):
                on_wait(
                    f"waiting for the database: held by {holder} for {waited:,.0f} s, "
                    f"giving up in {timeout - waited:,.0f} s"
                )
                reported = waited
            sleep(min(0.25, max(timeout - waited, 0.0)))


@contextlib.contextmanager
def connect_waiting(
    path: str | os.PathLike[str],
    *,
    read_only: bool = False,
    create: bool = False,
    timeout: float = 120.0,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """``connect`` through ``open_waiting``: a short connection that waits for the lock, talking."""
    con = open_waiting(path, read_only=read_only, create=create, timeout=timeout, on_wait=on_wait)
    try:
        yield con
    finally:
        con.close()
