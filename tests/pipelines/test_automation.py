"""Schedules and sensors evaluated with Dagster's context builders."""

import dagster as dg
from tests_helpers import ALL_BUCKETS, advance_config, plant_divergence, run_job

from kimera_core.db import connect
from kimera_core.rollout import get_stage, stage_history
from kimera_pipelines import extensions
from kimera_pipelines.schedules import (
    consistency_daily_full,
    consistency_hourly,
    migration_nightly,
)
from kimera_pipelines.sensors import auto_rollback_reads, record_run_outcome, record_run_success


def test_consistency_schedules_run_incremental_hourly_and_full_daily():
    hourly = consistency_hourly.evaluate_tick(dg.build_schedule_context())
    daily = consistency_daily_full.evaluate_tick(dg.build_schedule_context())
    config = "ops", "consistency_checks", "config", "incremental"

    def incremental(data):
        value = data.run_requests[0].run_config
        for key in config:
            value = value[key]
        return value

    assert incremental(hourly) is True
    assert incremental(daily) is False
    assert consistency_hourly.default_status == dg.DefaultScheduleStatus.RUNNING


def test_migration_schedule_is_stopped_and_backfills_every_bucket():
    assert migration_nightly.default_status == dg.DefaultScheduleStatus.STOPPED
    request = migration_nightly(dg.build_schedule_context())
    assert request.tags == ALL_BUCKETS


def test_run_status_sensor_records_the_outcome_through_the_hooks(instance, database, monkeypatch):
    seen = []
    monkeypatch.setattr(extensions, "RUN_OUTCOME_HOOKS", [seen.append])
    result = run_job("observe_legacy_job", instance, database)
    context = dg.build_run_status_sensor_context(
        sensor_name="record_run_success",
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        dagster_event=result.get_run_success_event(),
    )
    record_run_success(context)
    (outcome,) = seen
    assert outcome["job"] == "observe_legacy_job"
    assert outcome["status"] == "success"
    assert outcome["run_id"] == result.run_id
    assert outcome["duration_seconds"] >= 0
    assert record_run_outcome(context)["status"] == "success"


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
    rollback = defs_job_run(instance, database, request)
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


def defs_job_run(instance, database, request: dg.RunRequest):
    return run_job(
        "rollback_reads_job", instance, database, run_config=request.run_config, tags=request.tags
    )
