"""The rollout in Dagster: gating on the run's checks, advance_to, step back, read rollback."""

import dagster as dg

from kimera_core.db import connect
from kimera_core.rollout import get_stage, set_stage, stage_history
from kimera_pipelines.defs.rollout import auto_rollback_reads
from pipelines.helpers import (
    ALL_BUCKETS,
    advance_config,
    check_results,
    plant_divergence,
    run_job,
)


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
    assert meta["moved_through"].data == ["dual-write"] and meta["held_by"].data == []
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
    (failure,) = [e for e in held.all_events if e.is_step_failure]
    assert "advance from verified refused" in failure.step_failure_data.error.message
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
    assert meta["moved_through"].data == ["dual-write", "backfilled", "verified", "read-new"]
    assert any("soak" in reason for reason in meta["held_by"].data)


def test_step_back_is_always_allowed_and_recorded(instance, database, db_path):
    with connect(db_path) as con:
        set_stage(con, "backfilled", actor="test")
    result = run_job("step_back_rollout_job", instance, database)
    assert result.success
    with connect(db_path, read_only=True) as con:
        assert get_stage(con) == "dual-write"
        assert stage_history(con)[-1]["actor"] == "dagster"


def _to_read_new(instance, database):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    assert run_job("consistency_check_job", instance, database).success
    result = run_job(
        "advance_rollout_job", instance, database, run_config=advance_config("read-new")
    )
    assert result.success


def test_auto_rollback_moves_reads_back_when_a_check_fails(instance, database, db_path):
    _to_read_new(instance, database)
    skip = auto_rollback_reads(dg.build_sensor_context(instance=instance))
    assert isinstance(skip, dg.SkipReason)
    plant_divergence(db_path)
    assert not run_job("consistency_check_job", instance, database).success

    context = dg.build_sensor_context(instance=instance)
    request = auto_rollback_reads(context)
    assert isinstance(request, dg.RunRequest)
    assert "field_equality" in request.tags["kimera/failed-checks"]
    rollback = run_job(
        "rollback_reads_job", instance, database, run_config=request.run_config, tags=request.tags
    )
    assert rollback.success
    meta = rollback.asset_materializations_for_node("rollout_stage")[0].metadata
    assert meta["reads_from"].value == "legacy"
    with connect(db_path, read_only=True) as con:
        assert get_stage(con) == "verified"
        last = stage_history(con)[-1]
    assert last["actor"] == "sensor:auto_rollback_reads"
    assert "field_equality" in last["reason"]
    # the same failure is not acted on twice
    again = auto_rollback_reads(dg.build_sensor_context(instance=instance, cursor=context.cursor))
    assert isinstance(again, dg.SkipReason)


def test_auto_rollback_does_nothing_while_reads_come_from_legacy(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    assert run_job("advance_rollout_job", instance, database, run_config=advance_config()).success
    plant_divergence(db_path)
    assert not run_job("consistency_check_job", instance, database).success
    skip = auto_rollback_reads(dg.build_sensor_context(instance=instance))
    assert isinstance(skip, dg.SkipReason)
    assert "reads already come from legacy" in skip.skip_message
