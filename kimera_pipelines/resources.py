"""What every domain of the code location shares: the DuckDB resource, the pool, tags, partitions.

``KimeraDatabase`` is dagster-duckdb's ``DuckDBResource`` with two overrides: a connection is
opened through ``kimera_core.db`` (the file header is checked first, and a file that is not a
DuckDB database this DuckDB reads is refused untouched, never turned into a new database),
and a connection that meets another process's lock waits, saying in the step's log who holds
the file and for how long, instead of failing (``kimera_core.db.open_waiting``). A file it
cannot use fails the step with one line (``dg.Failure``). It also names the report and backup
folders and prunes the rollout's backups to the newest ``backups_kept``.

``database`` (``KIMERA_DB``) may also be a database server's address (``kimera://HOST:PORT``,
``kimera db serve``): connections then go to the server, which owns the file, and nothing
waits on a lock; the report and backup folders default to ``var/reports`` and
``var/backups`` (an address has no folder), on the machine that runs the step.

DuckDB allows one writer process per file. Runs are queued one at a time (dagster.yaml),
execute in-process, and hold a connection only for one step; every step that opens the file
is in the ``kimera_duckdb`` pool (``POOL``, limit 1). The webserver and the daemon never open
the file: sensors read Dagster's event log.

The Pushgateway is dagster-prometheus's ``PrometheusResource`` (``pushgateway_from_env``):
the observability sensors register one snapshot at a time on its registry and push it.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from dagster_prometheus import PrometheusResource

from kimera_core.db import open_waiting
from kimera_core.dbserver.protocol import is_address
from kimera_core.errors import DatabaseOpenError
from kimera_core.metrics.pushed import pushgateway_address
from kimera_core.sql import vetted_identifier

DEFAULT_DB_PATH = "var/kimera.duckdb"
DB_ENV = "KIMERA_DB"

OWNERS = ["team:kimera-migration"]
POOL = "kimera_duckdb"  # dagster.yaml: one DuckDB step at a time
IN_PROCESS = dg.in_process_executor  # every job: a run's steps share the one writer process
KIND_TAG = "kimera/kind"  # migration | consistency | rollout: what a run does to the database
NEVER_RETRY = {"dagster/max_retries": "0"}  # resumed or rolled back by an operator instead
IDENTITIES = dg.AssetKey("identities")
LEGACY_TABLES = [dg.AssetKey("legacy_geoids"), dg.AssetKey("legacy_scars")]
ROLLOUT_STAGE = dg.AssetKey("rollout_stage")
DATABASE_BACKUP = dg.AssetKey("database_backup")
ROLLOUT_BACKUP_SUFFIX = "-rollout"  # the rollout's backups, the ones retention prunes

# The migration's hash buckets; each is a partition of identities. Fixed: buckets of one run
# and of its resume must agree, and so must the partitions the UI shows.
MIGRATION_BUCKETS = 8
bucket_partitions = dg.StaticPartitionsDefinition([str(b) for b in range(MIGRATION_BUCKETS)])
ALL_BUCKETS_TAGS = {
    "dagster/asset_partition_range_start": bucket_partitions.get_partition_keys()[0],
    "dagster/asset_partition_range_end": bucket_partitions.get_partition_keys()[-1],
}

PUSH_TIMEOUT_SECONDS = 5
# PrometheusResource is marked beta; the code location builds one per sensor tick.
warnings.filterwarnings("ignore", message=".*PrometheusResource.*", category=dg.BetaWarning)


class KimeraDatabase(DuckDBResource):
    """The Kimera DuckDB file (or server address), with report and backup folders."""

    database: str = DEFAULT_DB_PATH
    reports_dir: str = ""  # default: <db folder>/reports
    backups_dir: str = ""  # default: <db folder>/backups
    lock_timeout_seconds: float = 120.0
    backups_kept: int = 5  # the rollout's backups kept (oldest pruned first); >= 1

    @classmethod
    def _is_dagster_maintained(cls) -> bool:
        return False

    @property
    def path(self) -> str:
        """The database file (``database``, the stock resource's name for it)."""
        return self.database

    @contextlib.contextmanager
    def get_connection(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short connection; waits up to ``lock_timeout_seconds`` for another process's lock.

        The wait is logged at once and every few seconds (who holds the file, for how long,
        when the step gives up: ``kimera_core.db.open_waiting``). A file that cannot be used
        (missing, not DuckDB, still locked at the deadline) fails the step with one line,
        ``dg.Failure``, no stack trace. ``connection_config`` entries are applied with SET.
        """
        log = dg.get_dagster_logger()
        try:
            con = open_waiting(
                self.database,
                read_only=read_only,
                timeout=self.lock_timeout_seconds,
                on_wait=log.warning,
            )
        except DatabaseOpenError as exc:
            raise dg.Failure(description=str(exc)) from None
        try:
            for key, value in self.connection_config.items():
                con.execute(f"SET {vetted_identifier(key)} = ?", [value])
            yield con
        finally:
            con.close()

    @property
    def reports_path(self) -> Path:
        return Path(self.reports_dir) if self.reports_dir else self._folder() / "reports"

    @property
    def backups_path(self) -> Path:
        return Path(self.backups_dir) if self.backups_dir else self._folder() / "backups"

    def _folder(self) -> Path:
        """The database file's folder; ``var`` for a server address (it has no folder)."""
        return Path("var") if is_address(self.database) else Path(self.database).parent

    def new_backup_path(self, run_id: str, suffix: str = "") -> Path:
        """A fresh backup folder: UTC time to the second, then the Dagster run id.

        The run id keeps two backups taken in the same second (two runs, or a retry)
        from colliding; backup_database refuses a folder that is not empty.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        return self.backups_path / f"{stamp}-{run_id[:8]}{suffix}"

    def prune_rollout_backups(self) -> list[Path]:
        """Delete the rollout's backups beyond the newest ``backups_kept``; returns those deleted.

        Only folders named by ``new_backup_path`` with ``ROLLOUT_BACKUP_SUFFIX`` are counted
        (a pre-rollback backup of the migration is never pruned); names sort by time.
        """
        if self.backups_kept < 1:
            raise ValueError("backups_kept must be at least 1")
        if not self.backups_path.is_dir():
            return []
        ours = sorted(
            p
            for p in self.backups_path.iterdir()
            if p.is_dir() and p.name.endswith(ROLLOUT_BACKUP_SUFFIX)
        )
        doomed = ours[: -self.backups_kept]
        for path in doomed:
            shutil.rmtree(path)
        return doomed


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a backup's size on disk, without directories)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def database_from_env() -> KimeraDatabase:
    """The database named by KIMERA_DB where the code location loads, else var/kimera.duckdb."""
    return KimeraDatabase(database=dg.EnvVar(DB_ENV).get_value(DEFAULT_DB_PATH) or DEFAULT_DB_PATH)


def pushgateway_from_env() -> PrometheusResource:
    """The Pushgateway named by KIMERA_PUSHGATEWAY where the code location loads."""
    return PrometheusResource(gateway=pushgateway_address(), timeout=PUSH_TIMEOUT_SECONDS)
