"""Assets and checks against a DuckDB file in tmp_path: migration by bucket, checks, gating."""

import dagster as dg
from tests_helpers import ALL_BUCKETS, advance_config, check_results, plant_divergence, run_job

from kimera_core.db import connect
from kimera_core.rollout import get_stage, set_stage, stage_history
from kimera_pipelines.assets import MIGRATION_BUCKETS, identities, migration_quarantine


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


def test_full_backfill_then_the_consistency_job_passes(instance, database):
    migration = run_job("migration_job", instance, database, tags=ALL_BUCKETS)
    assert migration.success
    assert set(check_results(migration)) == {"migration_reconciliation"}
    quarantine = migration.asset_materializations_for_node("migration_quarantine")[0].metadata
    assert quarantine["quarantined"].value > 0  # the demo's broken share
    checks = run_job("consistency_check_job", instance, database)
    assert checks.success
    results = check_results(checks)
    assert set(results) == {
        "count_parity",
        "key_coverage_legacy_to_new",
        "key_coverage_new_to_legacy",
        "field_equality",
        "reconciliation",
        "entropy_sanity",
    }
    assert all(r.passed for r in results.values())
    recon = results["reconciliation"].metadata["counts"].data
    assert recon["legacy"] == recon["present"] + recon["quarantined"]


def test_quarantine_asset_counts_by_reason(database):
    dg.materialize([identities], partition_key="0", resources={"database": database})
    result = dg.materialize([migration_quarantine], resources={"database": database})
    meta = result.asset_materializations_for_node("migration_quarantine")[0].metadata
    assert sum(meta["by_reason"].data.values()) == meta["quarantined"].value


def test_a_failing_blocking_check_stops_the_advance_in_the_same_run(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    key = plant_divergence(db_path)
    result = run_job("advance_rollout_job", instance, database, run_config=advance_config())
    assert not result.success
    field = check_results(result)["field_equality"]
    assert not field.passed
    assert field.metadata["offending_keys_sample"].data[0]["id"] == key
    assert field.metadata["counts"].data["field_mismatches"] == 1
    assert result.asset_materializations_for_node("rollout_stage") == []
    with connect(db_path, read_only=True) as con:
        assert get_stage(con) == "legacy-only"
        assert stage_history(con) == []


def test_advance_moves_one_stage_after_a_backup(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    result = run_job("advance_rollout_job", instance, database, run_config=advance_config())
    assert result.success
    meta = result.asset_materializations_for_node("rollout_stage")[0].metadata
    assert meta["stage"].value == "dual-write"
    backup = result.asset_materializations_for_node("database_backup")[0].metadata
    assert (db_path.parent / "backups").is_dir() and backup["tables"].value > 0
    with connect(db_path, read_only=True) as con:
        (move,) = stage_history(con)
    assert move["to_stage"] == "dual-write" and result.run_id in move["reason"]


def test_past_verified_needs_a_consistency_job_run(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    with connect(db_path) as con:
        set_stage(con, "verified", actor="test")
    held = run_job("advance_rollout_job", instance, database, run_config=advance_config())
    assert not held.success
    assert run_job("consistency_check_job", instance, database).success
    moved = run_job("advance_rollout_job", instance, database, run_config=advance_config())
    assert moved.success
    with connect(db_path, read_only=True) as con:
        assert get_stage(con) == "read-new"


def test_advance_to_a_target_stops_where_the_soak_holds(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    assert run_job("consistency_check_job", instance, database).success
    result = run_job(
        "advance_rollout_job", instance, database, run_config=advance_config("legacy-retired")
    )
    assert result.success
    meta = result.asset_materializations_for_node("rollout_stage")[0].metadata
    assert meta["stage"].value == "read-new"
    assert any("soak" in reason for reason in meta["held_by"].data)


def test_step_back_is_always_allowed_and_recorded(instance, database, db_path):
    with connect(db_path) as con:
        set_stage(con, "backfilled", actor="test")
    result = run_job("step_back_rollout_job", instance, database)
    assert result.success
    with connect(db_path, read_only=True) as con:
        assert get_stage(con) == "dual-write"
        assert stage_history(con)[-1]["actor"] == "dagster"


def test_entropy_report_is_written_and_attached(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    result = run_job("entropy_report_job", instance, database)
    assert result.success
    meta = result.asset_materializations_for_node("entropy_distribution_report")[0].metadata
    assert "data:image/png;base64," in meta["report"].value
    assert (db_path.parent / "reports" / "entropy_report.md").exists()
    assert (db_path.parent / "reports" / "entropy_histogram.png").read_bytes()[:4] == b"\x89PNG"
    dist = result.asset_materializations_for_node("entropy_distribution")[0].metadata
    assert dist["geoid/count"].value > 0


def test_legacy_tables_are_observed(instance, database):
    result = run_job("observe_legacy_job", instance, database)
    assert result.success
    record = instance.get_latest_data_version_record(dg.AssetKey("legacy_geoids"))
    assert record is not None
    meta = record.asset_observation.metadata
    assert meta["rows"].value == 600 and len(meta["checksum"].value) == 32


def test_migration_rollback_job_refuses_while_reads_come_from_identities(
    instance, database, db_path
):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    with connect(db_path) as con:
        set_stage(con, "read-new", actor="test")
    assert not run_job("rollback_migration_job", instance, database).success
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
