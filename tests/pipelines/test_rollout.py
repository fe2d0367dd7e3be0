"""The rollout step: gates evaluated where the stage moves, backups only on a move, step back,
read rollback, and launches that leave the checks out still judge them."""

import dagster as dg

from kimera_core.db import connect
from kimera_core.rollout import get_stage, set_stage, stage_history
from kimera_pipelines.definitions import defs
from kimera_pipelines.defs.rollout import auto_rollback_reads
from kimera_pipelines.resources import ROLLOUT_STAGE, KimeraDatabase
from pipelines.helpers import (
    ALL_BUCKETS,
    REQUIRED_CHECKS,
    advance_config,
    check_results,
    materialized,
    plant_divergence,
    run_job,
)


def test_a_failing_gate_refuses_the_advance_cleanly_without_a_backup(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    key = plant_divergence(db_path)
    result = run_job("advance_rollout_job", instance, database, run_config=advance_config())
    assert result.success  # a refusal is an outcome, not a failed run
    field = check_results(result)["field_equality"]
    assert not field.passed
    assert field.metadata["offending_keys_sample"].data[0]["id"] == key
    assert field.metadata["counts"].data["field_mismatches"] == 1
    (stage,) = materialized(result, "rollout_stage")
    assert stage["stage"].value == "legacy-only"
    assert stage["outcome"].value.startswith("refused at legacy-only: check field_equality failed")
    assert stage["backup"].value == "none: nothing moved"
    assert materialized(result, "database_backup") == []
    assert not (db_path.parent / "backups").exists()
    with connect(db_path, read_only=True) as con:
        assert get_stage(con) == "legacy-only"
        assert stage_history(con) == []


def test_advance_moves_one_stage_after_a_backup(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    result = run_job("advance_rollout_job", instance, database, run_config=advance_config())
    assert result.success
    assert set(check_results(result)) == REQUIRED_CHECKS
    (meta,) = materialized(result, "rollout_stage")
    assert meta["stage"].value == "dual-write" and meta["outcome"].value == "moved to dual-write"
    assert meta["moved_through"].data == ["dual-write"] and meta["held_by"].data == []
    (backup,) = materialized(result, "database_backup")
    assert (db_path.parent / "backups").is_dir() and backup["tables"].value > 0
    assert backup["size_bytes"].value > 0
    with connect(db_path, read_only=True) as con:
        (move,) = stage_history(con)
    assert move["to_stage"] == "dual-write" and result.run_id in move["reason"]


def test_materializing_rollout_stage_alone_still_evaluates_the_gates(instance, database, db_path):
    """What the asset page's Materialize launches: the asset without the checks in the run."""
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    result = (
        defs.resolve_implicit_global_asset_job_def()
        .get_subset(asset_selection={ROLLOUT_STAGE}, asset_check_selection=set())
        .execute_in_process(
            instance=instance, resources={"database": database}, run_config=advance_config()
        )
    )
    assert result.success and result.get_asset_check_evaluations() == []
    (meta,) = materialized(result, "rollout_stage")
    assert meta["stage"].value == "dual-write"
    assert "passed" in meta["gates"].value and "FAILED" not in meta["gates"].value
    assert meta["backup"].value.endswith("-rollout")  # not selected, taken all the same


def test_past_verified_needs_a_consistency_job_run(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    with connect(db_path) as con:
        set_stage(con, "verified", actor="test")
    held = run_job("advance_rollout_job", instance, database, run_config=advance_config())
    assert held.success
    (meta,) = materialized(held, "rollout_stage")
    assert meta["stage"].value == "verified"
    assert "past verified needs consistency-job evaluations" in meta["outcome"].value
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
    (meta,) = materialized(result, "rollout_stage")
    assert meta["stage"].value == "read-new"
    assert meta["moved_through"].data == ["dual-write", "backfilled", "verified", "read-new"]
    assert any("soak" in reason for reason in meta["held_by"].data)
    assert len(materialized(result, "database_backup")) == 1  # one backup for the whole move


def test_backups_are_pruned_to_the_newest_kept(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    kept = KimeraDatabase(database=str(db_path), lock_timeout_seconds=5, backups_kept=2)
    pruned = []
    for _ in range(3):  # legacy-only -> dual-write -> backfilled -> verified: three moves
        result = run_job("advance_rollout_job", instance, kept, run_config=advance_config())
        (backup,) = materialized(result, "database_backup")
        pruned.append(len(backup["pruned"].data))
    assert pruned == [0, 0, 1]
    assert len(list((db_path.parent / "backups").iterdir())) == 2


def test_step_back_is_always_allowed_and_recorded(instance, database, db_path):
    with connect(db_path) as con:
        set_stage(con, "backfilled", actor="test")
    result = run_job("step_back_rollout_job", instance, database)
    assert result.success
    assert set(check_results(result)) == REQUIRED_CHECKS  # judged for the new stage
    with connect(db_path, read_only=True) as con:
        assert get_stage(con) == "dual-write"
        assert stage_history(con)[-1]["actor"] == "dagster"


def test_the_consistency_job_fails_with_one_line_when_a_gate_fails(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    plant_divergence(db_path)
    result = run_job("consistency_check_job", instance, database)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.user_failure_data.description
    assert message == (
        f"1 of {len(REQUIRED_CHECKS)} gates failed: field_equality "
        "(the checks of rollout_stage say why)"
    )
    assert materialized(result, "rollout_stage") == []


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
    (meta,) = materialized(rollback, "rollout_stage")
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
