"""Scars only after their geoids, through Dagster: identities' partitions one run each.

Materializing the partitions one run each (a user clicking partitions, a per-partition
backfill, a retry of one) puts a partition's scars before the geoids of the partitions that
run later. Such a scar waits in quarantine (``related_geoid_pending``) and the next run of
any partition judges it again, so every order ends where one run over all partitions ends.
"""

from __future__ import annotations

import random
import shutil

import pytest
from support.legacy_rows import insert_geoids, insert_scars

from kimera_core.checksum import table_checksum
from kimera_core.db import connect
from kimera_core.demo import generate_demo_data
from kimera_core.identity import Geoid, Scar
from kimera_core.migration import IDENTITY_COLUMNS, waiting_scars
from kimera_core.rollout import get_stage
from kimera_core.storage import Storage
from kimera_pipelines.resources import MIGRATION_BUCKETS
from pipelines.helpers import ALL_BUCKETS, advance_config, check_results, materialized, run_job

T0 = 1_790_000_000.0


@pytest.fixture(scope="module")
def clean_template(tmp_path_factory):
    """A legacy database with nothing broken: every row must end in identities."""
    path = tmp_path_factory.mktemp("order") / "clean.duckdb"
    generate_demo_data(path, geoids=240, scars=120, seed=19, broken_share=0, dual_written_share=0)
    return path


@pytest.fixture
def db_path(tmp_path, clean_template):
    path = tmp_path / "kimera.duckdb"
    shutil.copy(clean_template, path)
    return path


def migrate_partition(instance, database, bucket: int):
    result = run_job("migration_job", instance, database, partition_key=str(bucket))
    assert result.success
    assert check_results(result)["migration_reconciliation"].passed
    return result


def standing(db_path):
    with connect(db_path, read_only=True) as con:
        legacy = con.execute(
            "SELECT (SELECT count(*) FROM legacy_geoids) + (SELECT count(*) FROM legacy_scars)"
        ).fetchone()[0]
        present = con.execute("SELECT count(*) FROM identities").fetchone()[0]
        current = con.execute(
            "SELECT count(*) FROM kimera_quarantine WHERE cleared_by IS NULL"
        ).fetchone()[0]
        checksum = table_checksum(con, "identities", IDENTITY_COLUMNS)
        return legacy, present, current, waiting_scars(con), checksum


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_partitions_one_run_each_end_with_every_row_migrated(instance, database, db_path, order):
    buckets = list(range(MIGRATION_BUCKETS))
    if order == "descending":
        buckets.reverse()
    elif order == "shuffled":
        random.Random(19).shuffle(buckets)
    waited = 0
    for bucket in buckets:
        result = migrate_partition(instance, database, bucket)
        (meta,) = materialized(result, "migration_quarantine")
        waited += meta["by_reason"].data.get("legacy_scars:related_geoid_pending", 0)
    assert waited > 0  # scar work did come before the geoids it needs
    legacy, present, current, waiting, _ = standing(db_path)
    assert (present, current, waiting) == (legacy, 0, 0)
    assert run_job("consistency_check_job", instance, database).success
    advanced = run_job(
        "advance_rollout_job", instance, database, run_config=advance_config("read-new")
    )
    assert advanced.success
    with connect(db_path, read_only=True) as con:
        assert get_stage(con) == "read-new"


def test_partition_runs_and_one_backfill_leave_the_same_identities(
    instance, database, db_path, tmp_path, clean_template
):
    for bucket in range(MIGRATION_BUCKETS):
        migrate_partition(instance, database, bucket)
    one_by_one = standing(db_path)[-1]
    # a retry of one partition afterwards changes nothing
    migrate_partition(instance, database, 3)
    assert standing(db_path)[-1] == one_by_one
    # one backfill of every partition (one run) on a fresh copy
    shutil.copy(clean_template, db_path)
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    assert standing(db_path)[-1] == one_by_one


def _late_pair(db_path):
    """A new geoid and a new scar on it whose partitions differ; (geoid, scar, scar's bucket)."""
    with connect(db_path) as con:
        anchor = con.execute("SELECT gid FROM legacy_geoids ORDER BY gid LIMIT 1").fetchone()[0]
        for i in range(100):
            geoid = Geoid.new(f"a late thought {i}", "en", created_at=T0)
            scar = Scar(f"scar_late_{i}", [geoid.gid, anchor], 0.5, {}, T0, T0)
            g_bucket, s_bucket = con.execute(
                "SELECT hash(?) % ?, hash(?) % ?",
                [geoid.gid, MIGRATION_BUCKETS, scar.scar_id, MIGRATION_BUCKETS],
            ).fetchone()
            if g_bucket != s_bucket:
                insert_geoids(con, [geoid])
                insert_scars(con, [scar])
                return geoid, scar, int(s_bucket)
    raise AssertionError("no pair in different partitions")


def test_a_waiting_scar_follows_when_any_partition_runs_next(instance, database, db_path):
    for bucket in range(MIGRATION_BUCKETS):
        migrate_partition(instance, database, bucket)
    geoid, scar, bucket = _late_pair(db_path)
    migrate_partition(instance, database, bucket)  # the scar's partition, before its geoid's
    assert standing(db_path)[3] == 1
    # the application writes the geoid itself (dual write); the next run of any partition
    # judges the waiting scar again
    with Storage.open(str(db_path), stage="dual-write", shadow_sample=0.0) as storage:
        storage.store(geoid.to_identity())
    other = next(b for b in range(MIGRATION_BUCKETS) if b != bucket)
    migrate_partition(instance, database, other)
    legacy, present, current, waiting, _ = standing(db_path)
    assert (present, current, waiting) == (legacy, 0, 0)


def test_the_gates_hold_while_a_scar_waits_for_migration_work(instance, database, db_path):
    for bucket in range(MIGRATION_BUCKETS):
        migrate_partition(instance, database, bucket)
    geoid, scar, bucket = _late_pair(db_path)
    migrate_partition(instance, database, bucket)
    with Storage.open(str(db_path), stage="dual-write", shadow_sample=0.0) as storage:
        storage.store(geoid.to_identity())
    # every legacy key is now in identities or quarantined, but the scar only waits: a run
    # of any partition would migrate it, so the rollout must not move yet
    held = run_job("advance_rollout_job", instance, database, run_config=advance_config())
    assert held.success
    (meta,) = materialized(held, "rollout_stage")
    assert meta["stage"].value == "legacy-only"
    assert scar.scar_id in str(check_results(held)["key_coverage_legacy_to_new"].metadata)
