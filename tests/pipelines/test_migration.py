"""Migration by bucket, its typed report and per-partition progress, quarantine, rollback."""

import dagster as dg

from kimera_core.db import connect
from kimera_core.demo import generate_demo_data
from kimera_core.migration import MigrationReport, PartitionCounts
from kimera_core.rollout import set_stage
from kimera_pipelines.defs.migration import identities, migration_nightly, migration_quarantine
from kimera_pipelines.metadata import (
    MIGRATION_PARTITION,
    MIGRATION_REPORT,
    STEPS_DONE,
    STEPS_PLANNED,
)
from kimera_pipelines.resources import MIGRATION_BUCKETS, KimeraDatabase
from pipelines.helpers import ALL_BUCKETS, check_results, run_job


def test_one_bucket_migrates_only_its_rows_and_balances(database, db_path):
    result = dg.materialize([identities], partition_key="3", resources={"database": database})
    assert result.success
    meta = result.asset_materializations_for_node("identities")[0].metadata
    with connect(db_path, read_only=True) as con:
        expected = con.execute(
            "SELECT (SELECT count(*) FROM legacy_geoids WHERE hash(gid) % ? = 3)"
            " + (SELECT count(*) FROM legacy_scars WHERE hash(id) % ? = 3)",
            [MIGRATION_BUCKETS, MIGRATION_BUCKETS],
        ).fetchone()[0]
    assert meta["legacy_rows"].value == meta["read"].value == expected
    assert meta["buckets"].data == [3]
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "migration_reconciliation" and check.passed


def test_the_migration_report_is_published_whole_and_comes_back_typed(database):
    result = dg.materialize([identities], partition_key="1", resources={"database": database})
    meta = result.asset_materializations_for_node("identities")[0].metadata
    report = MigrationReport.from_dict(meta[MIGRATION_REPORT].data)
    assert report.to_dict() == meta[MIGRATION_REPORT].data
    assert report.run_id == meta["migration_run_id"].value
    assert report.counts.read == meta["read"].value and report.balanced
    assert [(p.kind, p.bucket) for p in report.partition_counts] == [("geoid", 1), ("scar", 1)]


def test_each_partition_is_observed_with_its_own_counts(instance, database):
    result = run_job("migration_job", instance, database, tags=ALL_BUCKETS)
    assert result.success
    observations = [
        e.event_specific_data.asset_observation
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
    ]
    planned = 2 * MIGRATION_BUCKETS  # geoids, then scars, per bucket
    assert [o.metadata[STEPS_DONE].value for o in observations] == list(range(1, planned + 1))
    assert {o.metadata[STEPS_PLANNED].value for o in observations} == {planned}
    parts = [PartitionCounts.from_dict(o.metadata[MIGRATION_PARTITION].data) for o in observations]
    assert all(o.partition == str(p.bucket) for o, p in zip(observations, parts, strict=True))
    report = MigrationReport.from_dict(
        result.asset_materializations_for_node("identities")[0].metadata[MIGRATION_REPORT].data
    )
    # each observation carries its partition's own counts, which add up to the run's
    assert sum(p.counts.read for p in parts) == report.counts.read
    assert [p.counts for p in parts] == [p.counts for p in report.partition_counts]


def test_each_partition_materialization_carries_its_own_counts(instance, database):
    result = run_job("migration_job", instance, database, tags=ALL_BUCKETS)
    events = [
        e.event_specific_data.materialization
        for e in result.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key == dg.AssetKey("identities")
    ]
    assert sorted(m.partition for m in events) == [str(b) for b in range(MIGRATION_BUCKETS)]
    report = MigrationReport.from_dict(events[0].metadata[MIGRATION_REPORT].data)
    own = {
        m.partition: {k: m.metadata[k].value for k in ("legacy_rows", "read", "inserted")}
        for m in events
    }
    for bucket in range(MIGRATION_BUCKETS):
        parts = [p.counts for p in report.partition_counts if p.bucket == bucket]
        assert own[str(bucket)]["read"] == sum(c.read for c in parts)
        assert own[str(bucket)]["inserted"] == sum(c.inserted for c in parts)
    assert sum(o["read"] for o in own.values()) == report.counts.read
    assert len({o["inserted"] for o in own.values()}) > 1  # not the run's total repeated
    assert events[0].metadata["run_counts"].data["read"] == report.counts.read


def test_full_backfill_checks_only_its_reconciliation(instance, database):
    migration = run_job("migration_job", instance, database, tags=ALL_BUCKETS)
    assert migration.success
    assert set(check_results(migration)) == {"migration_reconciliation"}
    quarantine = migration.asset_materializations_for_node("migration_quarantine")[0].metadata
    assert quarantine["quarantined"].value > 0  # the demo's broken share


def test_quarantine_asset_counts_by_reason(database):
    dg.materialize([identities], partition_key="0", resources={"database": database})
    result = dg.materialize([migration_quarantine], resources={"database": database})
    meta = result.asset_materializations_for_node("migration_quarantine")[0].metadata
    assert sum(meta["by_reason"].data.values()) == meta["quarantined"].value


def test_the_quarantine_summary_accounts_for_the_gates_quarantine_count(instance, tmp_path):
    """A quarantined key identities already holds (P1's dual write wrote it before the
    migration): the migration counts its row quarantined, the gates count it present; the
    summary gives both numbers, so the two agree."""
    path = tmp_path / "held.duckdb"
    generate_demo_data(path, geoids=1500, scars=700)  # the demo has such a key
    database = KimeraDatabase(database=str(path), lock_timeout_seconds=5)
    migration = run_job("migration_job", instance, database, tags=ALL_BUCKETS)
    assert migration.success
    (meta,) = [
        e.event_specific_data.materialization.metadata
        for e in migration.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key == dg.AssetKey("migration_quarantine")
    ]
    checks = run_job("consistency_check_job", instance, database)
    gate = {e.check_name: e for e in checks.get_asset_check_evaluations()}["reconciliation"]
    quarantined = gate.metadata["counts"].data["quarantined"]
    assert meta["quarantined_in_identities"].value >= 1
    assert meta["quarantined_not_in_identities"].value == quarantined
    assert meta["quarantined"].value - meta["quarantined_in_identities"].value == quarantined


def test_migration_schedule_is_stopped_and_backfills_every_bucket():
    assert migration_nightly.default_status == dg.DefaultScheduleStatus.STOPPED
    request = migration_nightly(dg.build_schedule_context())
    assert request.tags == ALL_BUCKETS


def test_migration_rollback_job_refuses_while_reads_come_from_identities(
    instance, database, db_path
):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    with connect(db_path) as con:
        set_stage(con, "read-new", actor="test")
    refused = run_job("rollback_migration_job", instance, database)
    assert not refused.success
    (failure,) = [e for e in refused.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "reads from identities" in message and "\n" not in message.strip()
    with connect(db_path) as con:
        set_stage(con, "dual-write", actor="test")
    assert run_job("rollback_migration_job", instance, database).success
    with connect(db_path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM kimera_migration_changes").fetchone()[0] == 0


def test_two_rollbacks_in_the_same_second_back_up_to_distinct_folders(instance, database, db_path):
    """Backup folders carry the run id: a second run within the same second must not collide."""
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    first = run_job("rollback_migration_job", instance, database)
    second = run_job("rollback_migration_job", instance, database)
    assert first.success and second.success
    folders = sorted(p.name for p in (db_path.parent / "backups").iterdir())
    assert len(folders) == 2
    assert {first.run_id[:8], second.run_id[:8]} == {f.split("-")[1] for f in folders}
