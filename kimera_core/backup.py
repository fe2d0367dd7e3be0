"""Backup and restore of a whole database: DuckDB ``EXPORT DATABASE`` to Parquet plus a manifest.

A backup is a directory holding DuckDB's export (``schema.sql``, ``load.sql``, one Parquet
file per table) and ``manifest.json``: the row count and checksum
(``kimera_core.checksum``) of every table in the ``main`` schema, the sequences, and the
size and SHA-256 of every file. The export and the checksums are taken inside one read
transaction on a read-only connection, so they describe the same snapshot; the directory
appears under its final name only once complete.

A restore imports into a new file beside the target, checks every table against the
manifest, and only then replaces the target with ``os.replace``: a failed restore leaves
the target byte-identical.

``EXPORT``/``IMPORT DATABASE`` take the directory as a string literal, not a bound
parameter: paths are embedded with single quotes doubled, and paths holding control
characters are refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from kimera_core.checksum import Checksum, table_checksum
from kimera_core.db import open_database, read_header, transaction
from kimera_core.dbserver.protocol import is_address
from kimera_core.errors import KimeraError
from kimera_core.sql import vetted_identifier

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "kimera-backup"
MANIFEST_VERSION = 1

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_NEXTVAL_RE = re.compile(r"""^nextval\('([A-Za-z_][A-Za-z0-9_]*)'\)$""")

TABLES_SQL = (
    "SELECT table_name FROM duckdb_tables() "
    "WHERE database_name = current_database() AND schema_name = 'main' AND NOT temporary "
    "ORDER BY table_name"
)
SEQUENCES_SQL = (
    "SELECT sequence_name, start_value, last_value, increment_by FROM duckdb_sequences() "
    "WHERE database_name = current_database() AND schema_name = 'main' AND NOT temporary "
    "ORDER BY sequence_name"
)
SEQUENCE_COLUMNS_SQL = (
    "SELECT table_name, column_name, column_default FROM information_schema.columns "
    "WHERE table_catalog = current_database() AND table_schema = 'main' "
    "AND column_default LIKE 'nextval(%'"
)


class BackupError(KimeraError):
    """A backup could not be written, read or verified."""


@dataclass(frozen=True)
class TableEntry:
    """One table as the manifest records it."""

    rows: int
    checksum: str

    def as_checksum(self) -> Checksum:
        return Checksum.from_dict({"rows": self.rows, "checksum": self.checksum})


@dataclass
class Manifest:
    """What ``manifest.json`` holds."""

    created_at: str
    source: dict[str, Any]
    duckdb_version: str
    tables: dict[str, TableEntry]
    sequences: dict[str, dict[str, int | None]]
    files: dict[str, dict[str, Any]]
    path: str = ""  # the backup directory (not stored in the file)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "created_at": self.created_at,
            "source": self.source,
            "duckdb_version": self.duckdb_version,
            "export_format": "parquet",
            "tables": {
                name: {"rows": t.rows, "checksum": t.checksum} for name, t in self.tables.items()
            },
            "sequences": self.sequences,
            "files": self.files,
        }


@dataclass
class TableCheck:
    """A restored table against its manifest entry."""

    table: str
    expected: Checksum
    actual: Checksum

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


@dataclass
class RestoreReport:
    """What a restore did."""

    path: str
    from_dir: str
    replaced: bool
    tables: list[TableCheck] = field(default_factory=list)
    sequences: dict[str, int] = field(default_factory=dict)  # name -> next value it will issue
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "from": self.from_dir,
            "replaced": self.replaced,
            "verified": all(t.ok for t in self.tables),
            "tables": {
                t.table: {"rows": t.actual.rows, "checksum": t.actual.hex, "ok": t.ok}
                for t in self.tables
            },
            "sequences_next_value": self.sequences,
            "seconds": round(self.seconds, 3),
        }


def sql_path_literal(path: str | os.PathLike[str]) -> str:
    """A path as a SQL string literal for EXPORT/IMPORT DATABASE (quotes doubled)."""
    text = os.fspath(path)
    if _CONTROL_CHARS.search(text):
        raise BackupError(f"{text!r}: path contains control characters; choose another path")
    return "'" + text.replace("'", "''") + "'"


# --- backup -------------------------------------------------------------------------------


def backup_database(db_path: str | os.PathLike[str], to_dir: str | os.PathLike[str]) -> Manifest:
    """Write a consistent backup of ``db_path`` into the new or empty directory ``to_dir``.

    ``db_path`` is a file or a database server's address (``kimera://HOST:PORT``). Through a
    server the export is written by the server process, so ``to_dir`` must be a path both
    see (the same machine or a shared mount): a staging folder the client cannot see after
    the export is refused with one line, and the manifest names the address and the server's
    status instead of the file's header and size. Raises BackupError.
    """
    remote = is_address(db_path)
    address = os.fspath(db_path)
    db_path, to_dir = Path(db_path), Path(to_dir)
    sql_path_literal(to_dir)  # refuse before doing any work
    if to_dir.exists():
        if not to_dir.is_dir():
            raise BackupError(f"{to_dir}: exists and is not a directory")
        if any(to_dir.iterdir()):
            raise BackupError(f"{to_dir}: directory is not empty; choose a new backup directory")
    header = None if remote else read_header(db_path)
    con = open_database(address if remote else db_path, read_only=True)
    source = {"address": address, "server": con.status()} if remote else None
    to_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = to_dir.parent / f".{to_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        try:
            with transaction(con):  # one snapshot for the checksums and the export
                tables = {
                    name: _entry(table_checksum(con, name))
                    for (name,) in con.execute(TABLES_SQL).fetchall()
                }
                sequences = {
                    name: {"start_value": start, "last_value": last, "increment_by": inc}
                    for name, start, last, inc in con.execute(SEQUENCES_SQL).fetchall()
                }
                con.execute(
                    f"EXPORT DATABASE {sql_path_literal(staging.absolute())} (FORMAT PARQUET)"
                )
        except duckdb.Error as exc:
            raise BackupError(f"{db_path}: export failed ({_first_line(exc)})") from None
        finally:
            con.close()
        if remote and not (staging / "schema.sql").is_file():
            raise BackupError(
                f"{address}: the server wrote the export to {staging.absolute()}, which this "
                "machine cannot see; back up on the server's machine or into a shared folder"
            )
        if header is not None:
            source = {
                "path": str(db_path.absolute()),
                "bytes": db_path.stat().st_size,
                "written_by": header.written_by,
                "storage_version": header.storage_version,
                "library_version": header.library_version,
            }
        manifest = Manifest(
            created_at=datetime.now(UTC).isoformat(),
            source=source,
            duckdb_version=duckdb.__version__,
            tables=tables,
            sequences=sequences,
            files=_file_digests(staging),
            path=str(to_dir),
        )
        (staging / MANIFEST_NAME).write_text(
            json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        _fsync_tree(staging)
        os.replace(staging, to_dir)  # POSIX rename replaces an empty directory
        _fsync_dir(to_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _entry(checksum: Checksum) -> TableEntry:
    return TableEntry(rows=checksum.rows, checksum=checksum.hex)


def _file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            files[path.relative_to(directory).as_posix()] = {
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
            }
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- reading and verifying a backup -------------------------------------------------------


def read_manifest(from_dir: str | os.PathLike[str]) -> Manifest:
    """Parse and validate ``manifest.json`` of a backup directory; raises BackupError."""
    from_dir = Path(from_dir)
    path = from_dir / MANIFEST_NAME
    if not from_dir.is_dir():
        raise BackupError(f"{from_dir}: no such backup directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"{from_dir}: no {MANIFEST_NAME}; not a kimera backup") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BackupError(
            f"{path}: cannot be read as JSON ({exc}); the backup is damaged"
        ) from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise BackupError(f"{path}: not a kimera backup manifest")
    if data.get("version") != MANIFEST_VERSION:
        raise BackupError(
            f"{path}: manifest version {data.get('version')!r} is not supported "
            f"(this kimera reads version {MANIFEST_VERSION})"
        )
    try:
        tables = {
            str(name): TableEntry(rows=int(t["rows"]), checksum=str(t["checksum"]))
            for name, t in data["tables"].items()
        }
        for entry in tables.values():
            entry.as_checksum()  # a valid hex digest
        files = {
            str(name): {"bytes": int(f["bytes"]), "sha256": str(f["sha256"])}
            for name, f in data["files"].items()
        }
        manifest = Manifest(
            created_at=str(data["created_at"]),
            source=dict(data["source"]),
            duckdb_version=str(data["duckdb_version"]),
            tables=tables,
            sequences={str(k): dict(v) for k, v in data["sequences"].items()},
            files=files,
            path=str(from_dir),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BackupError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BackupError(f"{path}: malformed manifest (file entry {name!r} leaves the backup)")
    for required in ("schema.sql", "load.sql"):
        if required not in files:
            raise BackupError(f"{path}: malformed manifest (no entry for {required})")
    return manifest


def verify_backup(from_dir: str | os.PathLike[str]) -> Manifest:
    """Check the manifest parses and every file it lists is present with its size and SHA-256."""
    manifest = read_manifest(from_dir)
    from_dir = Path(from_dir)
    for name, expected in manifest.files.items():
        path = from_dir / name
        if not path.is_file():
            raise BackupError(f"{from_dir}: {name} is missing; the backup is incomplete")
        size = path.stat().st_size
        if size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise BackupError(
                f"{from_dir}: {name} does not match the manifest (size or SHA-256 differs); "
                "the backup is damaged"
            )
    return manifest


# --- restore ------------------------------------------------------------------------------


def restore_database(
    from_dir: str | os.PathLike[str], db_path: str | os.PathLike[str], *, force: bool = False
) -> RestoreReport:
    """Restore a backup into ``db_path``, verified against the manifest before it replaces anything.

    ``db_path`` must be a file: a restore replaces the whole file, which a running database
    server owns, so an address is refused (stop the server, restore its file, start it again).
    """
    if is_address(db_path):
        raise BackupError(
            f"{os.fspath(db_path)}: a restore replaces the database file, which the server "
            "owns; stop `kimera db serve`, restore into its file, then start it again"
        )
    started = time.perf_counter()
    from_dir, db_path = Path(from_dir), Path(db_path)
    manifest = verify_backup(from_dir)
    import_literal = sql_path_literal(from_dir.absolute())
    if db_path.is_dir():
        raise BackupError(f"{db_path}: is a directory, not a database file")
    existed = db_path.exists()
    if existed:
        if not force:
            raise BackupError(f"{db_path}: already exists; pass --force to replace it")
        _refuse_if_in_use(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    staging = db_path.parent / f".{db_path.name}.restore-{os.getpid()}-{secrets.token_hex(4)}"
    report = RestoreReport(path=str(db_path), from_dir=str(from_dir), replaced=existed)
    try:
        con = duckdb.connect(
            str(staging),
            config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
        )
        try:
            try:
                con.execute(f"IMPORT DATABASE {import_literal}")
            except duckdb.Error as exc:
                raise BackupError(f"{from_dir}: import failed ({_first_line(exc)})") from None
            report.sequences = _continue_sequences(con, manifest)
            report.tables = _check_tables(con, manifest)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        _fsync_file(staging)
        # The old file's WAL would be replayed onto the restored file: it goes first.
        Path(f"{db_path}.wal").unlink(missing_ok=True)
        os.replace(staging, db_path)
        _fsync_dir(db_path.parent)
    except BaseException:
        staging.unlink(missing_ok=True)
        Path(f"{staging}.wal").unlink(missing_ok=True)
        raise
    report.seconds = time.perf_counter() - started
    return report


def _check_tables(con: duckdb.DuckDBPyConnection, manifest: Manifest) -> list[TableCheck]:
    """Every restored table against the manifest; raises BackupError on the first difference."""
    present = [name for (name,) in con.execute(TABLES_SQL).fetchall()]
    missing = sorted(set(manifest.tables) - set(present))
    extra = sorted(set(present) - set(manifest.tables))
    if missing or extra:
        raise BackupError(
            f"{manifest.path}: restored tables differ from the manifest "
            f"(missing: {', '.join(missing) or '-'}; not in manifest: {', '.join(extra) or '-'})"
        )
    checks = []
    for name in sorted(manifest.tables):
        check = TableCheck(name, manifest.tables[name].as_checksum(), table_checksum(con, name))
        if not check.ok:
            hint = ""
            if manifest.duckdb_version != duckdb.__version__:
                hint = (
                    f"; the backup was checksummed with DuckDB {manifest.duckdb_version}, "
                    f"this is {duckdb.__version__}, whose hash() may differ"
                )
            raise BackupError(
                f"{manifest.path}: table {name} does not match the manifest after restore "
                f"(manifest: {check.expected.rows} rows, checksum {check.expected.hex}; "
                f"restored: {check.actual.rows} rows, checksum {check.actual.hex}){hint}; "
                "the target was not touched"
            )
        checks.append(check)
    return checks


def _continue_sequences(con: duckdb.DuckDBPyConnection, manifest: Manifest) -> dict[str, int]:
    """Advance each sequence past the source's values and its columns' maxima; return next values.

    ``EXPORT DATABASE`` recreates a sequence starting at the source's next value. A sequence
    must also never hand out a key a table already holds (rows inserted with explicit ids),
    nor one the source already issued, so it is advanced past both.
    """
    floors: dict[str, int] = {}
    for name, seq in manifest.sequences.items():
        last = seq.get("last_value")
        if last is not None:
            # After a reload DuckDB reports the next value here, in a session the last one
            # issued: taking it as issued may leave a gap of one, never a reissue.
            floors[name] = int(last)
    for table, column, default in con.execute(SEQUENCE_COLUMNS_SQL).fetchall():
        match = _NEXTVAL_RE.match(str(default).strip())
        if not match:
            continue
        top = con.execute(
            f"SELECT max({vetted_identifier(column)}) FROM {vetted_identifier(table)}"
        ).fetchone()[0]
        if top is not None:
            name = match.group(1)
            floors[name] = max(floors.get(name, int(top)), int(top))
    next_values: dict[str, int] = {}
    for name, start, last, increment in con.execute(SEQUENCES_SQL).fetchall():
        upcoming = start if last is None else last + increment
        floor = floors.get(name)
        if floor is not None and increment > 0 and upcoming <= floor:
            steps = (floor - upcoming) // increment + 1
            # nextval is volatile: one call per row of range(steps)
            con.execute("SELECT max(nextval(?)) FROM range(?)", [name, steps])
            upcoming += steps * increment
        next_values[name] = int(upcoming)
    return next_values


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _refuse_if_in_use(path: Path) -> None:
    """Refuse to replace a file another process has open through DuckDB (which locks it)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except PermissionError:
        raise BackupError(f"{path}: permission denied (cannot replace the file)") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BackupError(
                f"{path}: another process holds the database; stop it before restoring"
            ) from None
        with contextlib.suppress(OSError):
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
