"""The migration beside other clients through a real ``kimera db serve`` (issue 15 follow-up).

Through a server (``db.is_served``) a run keeps identities' secondary indexes (never dropped,
so never rebuilt beside a live writer), sets none of DuckDB's database-wide options (they
would act on every client) and cuts its partitions at ~10 k rows. A failed partition raises
its own error, not DuckDB's "transaction is aborted" of a clean-up statement after it.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import time

import duckdb
import pytest
from dbserver_proc import KIMERA
from support.servers import wait_until

from kimera_core.db import connect, open_database
from kimera_core.dbserver.client import RemoteConnection
from kimera_core.demo import generate_demo_data
from kimera_core.legacy import secondary_indexes
from kimera_core.migration import engine, migrate
from kimera_core.migration import statements as q
from kimera_core.migration.schema import ensure_schema
from kimera_core.rollout import set_stage
from kimera_core.storage import Storage
from kimera_core.workload import random_geoid

pytestmark = pytest.mark.slow

GEOIDS = 40_000
SCARS = 8_000
# DuckDB options that act on the whole database, which a client through a server leaves alone
GLOBAL_SETTINGS = ("threads", "memory_limit", "checkpoint_threshold", "preserve_insertion_order")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("served_migration") / "demo.duckdb"
    generate_demo_data(path, geoids=GEOIDS, scars=SCARS, seed=5)
    with connect(path) as con:
        ensure_schema(con)  # identities with its secondary indexes
        assert secondary_indexes(con, "identities")
    return path


def _serve(demo, tmp_path, token, servers):
    live = tmp_path / "live.duckdb"
    live.write_bytes(demo.read_bytes())
    return servers(live, token)


def _settings(con) -> dict[str, str]:
    return {
        name: con.execute("SELECT current_setting(?)::VARCHAR", [name]).fetchone()[0]
        for name in GLOBAL_SETTINGS
    }


def _env(token: str) -> dict[str, str]:
    return {**os.environ, "KIMERA_DB_TOKEN": token}


def test_a_served_run_keeps_the_indexes_and_the_servers_settings(demo, tmp_path, token, servers):
    server = _serve(demo, tmp_path, token, servers)
    with open_database(server.address) as con:
        indexes = secondary_indexes(con, "identities")
        before = _settings(con)
        assert engine.auto_partitions(con) == math.ceil(GEOIDS / engine.ROWS_PER_PARTITION_SERVED)
        report = migrate(con)
        assert report.balanced and report.status == "completed"
        assert report.partitions == math.ceil(GEOIDS / engine.ROWS_PER_PARTITION_SERVED)
        assert secondary_indexes(con, "identities") == indexes
        assert _settings(con) == before
        dropped = con.execute("SELECT dropped_indexes FROM kimera_migration_runs").fetchall()
        assert dropped == [(None,)]
    # embedded, the same file still takes the 250 k-row partitions
    server.stop()
    with connect(server.path) as con:
        assert engine.auto_partitions(con) == math.ceil(GEOIDS / engine.ROWS_PER_PARTITION)


def _partitions_done(address: str) -> int:
    with open_database(address) as con:
        return con.execute("SELECT count(*) FROM kimera_migration_partitions").fetchone()[0]


def test_a_served_run_killed_and_resumed_never_drops_the_indexes(demo, tmp_path, token, servers):
    server = _serve(demo, tmp_path, token, servers)
    with open_database(server.address) as con:
        indexes = secondary_indexes(con, "identities")
    proc = subprocess.Popen(
        [KIMERA, "migrate", "--db", server.address, "--partitions", "16"],
        env=_env(token),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: _partitions_done(server.address) >= 2, 300, 0.02, "two partitions")
        with open_database(server.address) as con:
            assert secondary_indexes(con, "identities") == indexes  # mid-run
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 2 <= _partitions_done(server.address) < 32, "the kill must land mid-run"
    with open_database(server.address) as con:
        report = migrate(con)  # resumes the killed run
        assert report.resumed and report.balanced
        assert secondary_indexes(con, "identities") == indexes
        assert con.execute("SELECT dropped_indexes FROM kimera_migration_runs").fetchall() == [
            (None,)
        ]


class LiveWritesDuringOnePartition(RemoteConnection):
    """The migration's connection; when the ``at``-th partition is about to insert into
    identities, another client commits first, through the same server: the application
    storing one of the keys this partition is inserting (newer), and ``new`` dual writes of
    new geoids (in buckets this run has read already, or in this one after its snapshot)."""

    at = 4
    new = 8
    other: RemoteConnection
    applied = 0
    live: tuple | None = None

    def execute(self, query, parameters=None):
        if query == q.APPLY_INSERT_SQL:
            type(self).applied += 1
            if type(self).applied == self.at:
                row = (
                    super()
                    .execute(
                        "SELECT key, identity_type, doc, created_at, updated_at + 1000, lang_axis, "
                        "entropy FROM mig_src WHERE action = 'insert' ORDER BY key LIMIT 1"
                    )
                    .fetchone()
                )
                type(self).live = row
                self.other.execute("INSERT INTO identities VALUES (?, ?, ?, ?, ?, ?, ?)", row)
                storage = Storage(self.other, stage="dual-write")
                rng = random.Random(9)
                for _ in range(self.new):
                    storage.store(random_geoid(rng, time.time()))
        return super().execute(query, parameters)


def test_a_partition_beside_live_writes_runs_again_and_the_run_balances(
    demo, tmp_path, token, servers
):
    server = _serve(demo, tmp_path, token, servers)
    with open_database(server.address) as con, open_database(server.address) as other:
        set_stage(other, "dual-write", "test")
        legacy_before = con.execute(q.LEGACY_ROWS_SQL).fetchone()[0]
        LiveWritesDuringOnePartition.other = other
        con.__class__ = LiveWritesDuringOnePartition
        report = migrate(con, partitions=4)  # the 4th partition: the last geoid bucket
        con.__class__ = RemoteConnection
        # the 4th partition met the live key (duplicate key) and ran again; the four scar
        # buckets (2 k scars each, a fifth of a geoid bucket) are one transaction: 6 inserts
        assert LiveWritesDuringOnePartition.applied == 4 + 1 + 1
        assert report.status == "completed" and report.balanced
        assert con.execute(q.LEGACY_ROWS_SQL).fetchone()[0] == legacy_before + 8
        # the new rows are read only by the partition run again (those in its bucket): the run
        # reconciles with the rows its partitions' snapshots held, not the count at the end
        assert report.legacy_rows == report.counts.read < legacy_before + 8
        assert report.counts.kept == 1  # the live write, newer than its legacy row
        key, *values = LiveWritesDuringOnePartition.live
        # the live write wins (newer), and the journal does not claim it (a rollback keeps it)
        row = con.execute("SELECT * FROM identities WHERE id = ?", [key]).fetchone()
        assert row[0] == key and row[1] == values[0] and row[4] == values[3]
        journal = con.execute(
            "SELECT count(*) FROM kimera_migration_changes WHERE id = ?", [key]
        ).fetchone()
        assert journal == (0,)


def test_a_failed_partition_raises_its_own_error_and_resets_threads(demo, tmp_path):
    path = tmp_path / "failing.duckdb"
    path.write_bytes(demo.read_bytes())
    with connect(path) as con:
        threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
        identities = con.execute("SELECT count(*) FROM identities").fetchone()[0]
        # a journal that refuses every insert: the partition fails after SET threads = 1
        con.execute("DROP TABLE kimera_migration_changes")
        con.execute(
            "CREATE TABLE kimera_migration_changes (run_id TEXT, id TEXT, action TEXT "
            "CHECK (action = 'never'), before_identity_type TEXT, before_data JSON, "
            "before_created_at DOUBLE, before_updated_at DOUBLE, before_lang_axis TEXT, "
            "before_entropy_score DOUBLE, after_hash UBIGINT)"
        )
        with pytest.raises(duckdb.ConstraintException, match="CHECK constraint"):
            migrate(con)
        assert con.execute("SELECT current_setting('threads')").fetchone()[0] == threads
        assert con.execute("SELECT count(*) FROM identities").fetchone()[0] == identities
