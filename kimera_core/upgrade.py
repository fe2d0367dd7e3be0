"""Which DuckDB files open, and the upgrade of those the current DuckDB refuses (``kimera db``).

``inspect_file`` is ``kimera db info``: the header (db.read_header: the release that created
the file, whether the last checkpoint left DuckDB 0.9's index metadata), the ``.wal`` beside
it, and the legacy tables' row counts only when the file opens read-only; when it does
not, the reason and the next command instead of an error. It never writes.

``upgrade_file`` is ``kimera db upgrade``: a file that the current DuckDB refuses but DuckDB
1.4 LTS reads (a DuckDB 0.9 file with an empty index, docs/files.md) is rewritten *on a
copy* by DuckDB 1.4.4, a pinned wheel installed by ``make setup`` into its own folder
(``var/duckdb-versions/1.4.4``, or ``$KIMERA_DUCKDB_VERSIONS/1.4.4``) and run in a
subprocess (kimera_core/upgrade_worker.py): the venv keeps its own DuckDB, and the wheel,
unlike the ``duckdb-cli`` binary, hands back the rows as Python values, so both DuckDBs
digest them with one function. Steps:

1. sha256 of the original (and its ``.wal``); a byte copy of both beside it
   (``NAME.upgraded.duckdb``, same folder so that ``--replace`` is a rename);
2. DuckDB 1.4.4 reads the original read-only (row count and checksum of every table, the
   names of its indexes, views and sequences) and rewrites the copy (one write +
   CHECKPOINT);
3. the current DuckDB opens the copy read-only and digests it again: every table's count
   and checksum, and the catalog names, must equal the original's as DuckDB 1.4.4 read
   them, and the original's sha256 must not have changed;
4. only then, and only with ``replace=True``: the original (and ``.wal``) is renamed to
   ``NAME.pre-upgrade.duckdb`` (never overwriting an older backup) and the copy takes its
   name. Without it the original is left byte-identical and the copy waits beside it.

Any failure removes the copy and raises ``UpgradeError`` (a KimeraError, one line for the
CLI); the original is never opened for writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from kimera_core.db import UPGRADE_COMMAND, FileHeader, open_database, read_header
from kimera_core.errors import DatabaseOpenError, KimeraError
from kimera_core.legacy import missing_tables, table_counts
from kimera_core.upgrade_worker import catalog, table_digests

UPGRADE_DUCKDB = "1.4.4"
# Storage formats DuckDB 1.4 reads (db.STORAGE_VERSIONS).
UPGRADE_READS = range(64, 68)
VERSIONS_ENV = "KIMERA_DUCKDB_VERSIONS"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("upgrade_worker.py")
WORKER_TIMEOUT_S = 6 * 3600
HASH_CHUNK = 1 << 20


class UpgradeError(KimeraError):
    """The upgrade did not happen; the original file is as it was."""


def versions_dir() -> Path:
    """Where pinned old DuckDB wheels live, one folder per version (``pip --target``)."""
    return Path(os.environ.get(VERSIONS_ENV) or PROJECT_ROOT / "var" / "duckdb-versions")


def install_command(version: str) -> str:
    """The command that installs DuckDB ``version`` where ``duckdb_release`` looks."""
    target = versions_dir() / version
    return f"python -m pip install --no-deps --target {target} duckdb=={version}"


def duckdb_release(version: str) -> Path | None:
    """The folder holding DuckDB ``version`` (put it on PYTHONPATH), None if not installed."""
    folder = versions_dir() / version
    return folder if (folder / "duckdb" / "__init__.py").is_file() else None


def wal_of(path: Path) -> Path:
    """DuckDB's write-ahead log of ``path``: the same name plus ``.wal``."""
    return path.with_name(path.name + ".wal")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


# --- kimera db info ----------------------------------------------------------------------
@dataclass
class FileInfo:
    """What ``kimera db info`` says about a file; ``tables`` only when it opens.

    ``problem`` is DatabaseOpenError's one line when it does not open, ``next_command`` the
    command that repairs it when there is one (``kimera db upgrade --db PATH``).
    """

    path: str
    size_bytes: int
    wal_bytes: int | None
    header: FileHeader
    opens: bool
    tables: dict[str, int] | None = None
    missing_legacy_tables: list[str] | None = None
    problem: str | None = None
    next_command: str | None = None

    @property
    def written_by(self) -> str:
        return self.header.written_by

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        header = data.pop("header")
        data.update(
            written_by=self.written_by,
            storage_version=header["storage_version"],
            library_version=header["library_version"],
            source_id=header["source_id"],
            metadata_from_duckdb_09=self.header.metadata_from_duckdb_09,
        )
        return data


def inspect_file(path: str | os.PathLike[str]) -> FileInfo:
    """Header, ``.wal`` and (when the file opens read-only) the legacy tables' row counts.

    Raises DatabaseOpenError only when the header cannot be read (not a DuckDB file,
    missing, a directory); a DuckDB file that does not open is described, not raised.
    """
    path = Path(path)
    header = read_header(path)
    wal = wal_of(path)
    info = FileInfo(
        path=str(path),
        size_bytes=path.stat().st_size,
        wal_bytes=wal.stat().st_size if wal.is_file() else None,
        header=header,
        opens=False,
    )
    try:
        con = open_database(path, read_only=True)
    except DatabaseOpenError as exc:
        info.problem = str(exc)
        if UPGRADE_COMMAND.format(path=path) in info.problem:
            info.next_command = UPGRADE_COMMAND.format(path=path)
        return info
    try:
        info.tables = table_counts(con)
        info.missing_legacy_tables = missing_tables(con)
    finally:
        con.close()
    info.opens = True
    return info


# --- kimera db upgrade -------------------------------------------------------------------
@dataclass
class UpgradeReport:
    """What ``upgrade_file`` did; ``needed`` False means the file opens already (no copy).

    ``tables``: ``"schema.table"`` -> ``{"rows", "checksum"}`` as DuckDB ``upgraded_with``
    read the original and the current DuckDB read the copy (equal, or it raised).
    ``original_sha256`` is the same before and after; ``copy`` is None once it replaced
    the original (then ``backup`` holds the original, byte-identical).
    """

    path: str
    written_by: str
    needed: bool
    upgraded_with: str | None = None
    opened_with: str = duckdb.__version__
    copy: str | None = None
    backup: str | None = None
    replaced: bool = False
    original_sha256: str | None = None
    original_wal_sha256: str | None = None
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    catalog: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def upgraded_copy_path(path: Path) -> Path:
    """``kimera.duckdb`` -> ``kimera.upgraded.duckdb`` (same folder)."""
    return path.with_name(f"{path.stem}.upgraded{path.suffix}")


def backup_path(path: Path) -> Path:
    """``kimera.pre-upgrade.duckdb``, or ``-2``, ``-3`` ... when taken (never overwritten)."""
    candidate = path.with_name(f"{path.stem}.pre-upgrade{path.suffix}")
    n = 1
    while candidate.exists() or wal_of(candidate).exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.pre-upgrade-{n}{path.suffix}")
    return candidate


def _remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _fingerprint(path: Path) -> tuple[str, str | None]:
    wal = wal_of(path)
    return sha256_file(path), sha256_file(wal) if wal.is_file() else None


def _run_worker(release: Path, original: Path, copy: Path) -> dict[str, Any]:
    """DuckDB ``release`` digests ``original`` and rewrites ``copy`` (upgrade_worker.py)."""
    env = {**os.environ, "PYTHONPATH": str(release)}
    # -P: not the worker's folder first on sys.path; -s: no user site. duckdb = the release.
    command = [sys.executable, "-P", "-s", str(WORKER), "upgrade", str(original), str(copy)]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise UpgradeError(
            f"{original}: DuckDB {UPGRADE_DUCKDB} did not finish within {WORKER_TIMEOUT_S} s"
        ) from None
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UpgradeError(
            f"{original}: the DuckDB {UPGRADE_DUCKDB} worker failed ({tail})"
        ) from None
    if "error" in result:
        raise UpgradeError(
            f"{original}: DuckDB {result.get('duckdb', UPGRADE_DUCKDB)} cannot upgrade it either "
            f"({result['error']}); the file is unchanged"
        )
    if result["duckdb"] != UPGRADE_DUCKDB:
        raise UpgradeError(
            f"{release} holds DuckDB {result['duckdb']}, not {UPGRADE_DUCKDB}: "
            f"reinstall it with `{install_command(UPGRADE_DUCKDB)}`"
        )
    return result


def _differences(expected: dict[str, Any], found: dict[str, Any], what: str) -> list[str]:
    """One phrase per table or catalog entry that differs between two digests."""
    out = []
    for name in sorted(set(expected["tables"]) | set(found["tables"])):
        a, b = expected["tables"].get(name), found["tables"].get(name)
        if a != b:
            out.append(f"{name}: {a} before, {b} in {what}")
    for kind in sorted(set(expected["catalog"]) | set(found["catalog"])):
        a, b = expected["catalog"].get(kind), found["catalog"].get(kind)
        if a != b:
            out.append(f"{kind}: {a} before, {b} in {what}")
    return out


def _read_with_current_duckdb(copy: Path) -> dict[str, Any]:
    try:
        con = open_database(copy, read_only=True)
    except DatabaseOpenError as exc:
        raise UpgradeError(
            f"the copy upgraded by DuckDB {UPGRADE_DUCKDB} still does not open with DuckDB "
            f"{duckdb.__version__} ({exc}); the original is unchanged"
        ) from None
    try:
        return {"tables": table_digests(con), "catalog": catalog(con)}
    finally:
        con.close()


def _needs_upgrade(path: Path, header: FileHeader) -> bool:
    """False when the current DuckDB opens the file; raises when no upgrade can help."""
    try:
        open_database(path, read_only=True).close()
    except DatabaseOpenError as exc:
        if "another process holds" in str(exc):
            raise
        if UPGRADE_COMMAND.format(path=path) not in str(exc):
            raise UpgradeError(f"{exc} (an upgrade with DuckDB 1.4 cannot repair this)") from None
    else:
        return False
    if header.storage_version not in UPGRADE_READS:
        raise UpgradeError(
            f"{path}: written by {header.written_by}, a format DuckDB {UPGRADE_DUCKDB} does "
            "not read either"
        )
    return True


def upgrade_file(path: str | os.PathLike[str], *, replace: bool = False) -> UpgradeReport:
    """Upgrade a copy of ``path`` with DuckDB 1.4.4, verify it, and with ``replace`` swap it in.

    Raises DatabaseOpenError when ``path`` is no DuckDB file, UpgradeError when DuckDB 1.4.4
    is not installed (the message gives the install command), cannot read the file either,
    or the copy does not match the original (copy removed). The original is never written.
    """
    started = time.perf_counter()
    path = Path(path)
    header = read_header(path)
    report = UpgradeReport(path=str(path), written_by=header.written_by, needed=False)
    if not _needs_upgrade(path, header):
        report.seconds = time.perf_counter() - started
        return report
    release = duckdb_release(UPGRADE_DUCKDB)
    if release is None:
        raise UpgradeError(
            f"{path} needs DuckDB {UPGRADE_DUCKDB} to upgrade it, which is not installed in "
            f"{versions_dir()}: run `make setup` or `{install_command(UPGRADE_DUCKDB)}`"
        )
    report.needed = True
    report.original_sha256, report.original_wal_sha256 = _fingerprint(path)
    copy = upgraded_copy_path(path)
    _remove(copy, wal_of(copy))
    try:
        shutil.copyfile(path, copy)
        if wal_of(path).is_file():
            shutil.copyfile(wal_of(path), wal_of(copy))
        result = _run_worker(release, path, copy)
        report.upgraded_with = result["duckdb"]
        current = _read_with_current_duckdb(copy)
        problems = _differences(
            result["original"], current, f"the copy read by DuckDB {duckdb.__version__}"
        )
        if problems:
            raise UpgradeError(
                f"{path}: the upgraded copy differs from the original ({'; '.join(problems)}); "
                "copy removed, the original is unchanged"
            )
        if wal_of(copy).exists():
            raise UpgradeError(f"{copy}: a .wal remained after the checkpoint; copy removed")
        if _fingerprint(path) != (report.original_sha256, report.original_wal_sha256):
            raise UpgradeError(
                f"{path} changed while it was being upgraded (another process writes to it?): "
                "copy removed; stop the writer and run the upgrade again"
            )
    except BaseException:
        _remove(copy, wal_of(copy))
        raise
    report.tables = current["tables"]
    report.catalog = current["catalog"]
    report.copy = str(copy)
    if replace:
        _swap_in(path, copy, report)
    report.seconds = time.perf_counter() - started
    return report


def _swap_in(path: Path, copy: Path, report: UpgradeReport) -> None:
    """The original (and its .wal) to a new backup name, then the copy to the original's."""
    backup = backup_path(path)
    os.replace(path, backup)
    if wal_of(path).exists():
        os.replace(wal_of(path), wal_of(backup))
    os.replace(copy, path)
    report.backup = str(backup)
    report.copy = None
    report.replaced = True
    if sha256_file(backup) != report.original_sha256:  # a rename never changes bytes
        raise UpgradeError(f"{backup}: the backup's sha256 differs from the original's")
