"""Resources: the one Kimera DuckDB database, opened through kimera_core's safe open.

DuckDB allows one writer process per file. Runs are queued one at a time (dagster.yaml),
execute in-process, and hold a connection only for one step; the webserver and the daemon
never open the file (sensors read Dagster's event log). A connection that meets the lock
of another process (a ``kimera`` CLI command, a test) waits and retries instead of failing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb

from kimera_core.db import connect
from kimera_core.errors import DatabaseOpenError

DEFAULT_DB_PATH = "var/kimera.duckdb"
DB_ENV = "KIMERA_DB"


class KimeraDatabase(dg.ConfigurableResource):
    """The Kimera DuckDB file, with folders for reports and backups next to it by default."""

    path: str = DEFAULT_DB_PATH
    reports_dir: str = ""  # default: <db folder>/reports
    backups_dir: str = ""  # default: <db folder>/backups
    lock_timeout_seconds: float = 120.0

    @contextlib.contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short connection; waits up to ``lock_timeout_seconds`` for another writer."""
        deadline = time.monotonic() + self.lock_timeout_seconds
        delay = 0.2
        while True:
            try:
                cm = connect(self.path, read_only=read_only)
                con = cm.__enter__()
                break
            except DatabaseOpenError as exc:
                if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        try:
            yield con
        finally:
            cm.__exit__(None, None, None)

    @property
    def reports_path(self) -> Path:
        return Path(self.reports_dir) if self.reports_dir else Path(self.path).parent / "reports"

    @property
    def backups_path(self) -> Path:
        return Path(self.backups_dir) if self.backups_dir else Path(self.path).parent / "backups"

    def new_backup_path(self, run_id: str, suffix: str = "") -> Path:
        """A fresh backup folder: UTC time to the second, then the Dagster run id.

        The run id keeps two backups taken in the same second (two runs, or a retry)
        from colliding; backup_database refuses a folder that is not empty.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        return self.backups_path / f"{stamp}-{run_id[:8]}{suffix}"


def database_from_env() -> KimeraDatabase:
    """The database named by KIMERA_DB (read when a run starts), else var/kimera.duckdb."""
    return KimeraDatabase(path=dg.EnvVar(DB_ENV).get_value(DEFAULT_DB_PATH) or DEFAULT_DB_PATH)
