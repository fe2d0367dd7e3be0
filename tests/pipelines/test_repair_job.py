"""repair_job: launched without config it repairs what the latest verification found and says,
in its own check, whether the repaired keys agree; the consistency job then turns green."""

from kimera_core.db import connect
from kimera_core.legacy import fetch_legacy_identity, read_identity_p1
from kimera_core.repair import RepairReport
from kimera_core.rollout import get_stage, set_stage
from kimera_pipelines.metadata import REPAIR_REPORT
from pipelines.helpers import (
    ALL_BUCKETS,
    advance_config,
    check_results,
    materialized,
    plant_divergence,
    run_job,
)


def _repair_config(**config) -> dict:
    return {"ops": {"repair": {"config": config}}}


def test_repair_after_a_failed_check_makes_the_stores_agree(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    key = plant_divergence(db_path)
    assert not run_job("consistency_check_job", instance, database).success
    result = run_job("repair_job", instance, database)
    assert result.success
    (meta,) = materialized(result, "repair")
    report = RepairReport.from_dict(meta[REPAIR_REPORT].data)
    assert report.stored == [key] and report.authority == "legacy" and report.ok
    assert meta["undo"].value.endswith(f"--undo {report.repair_id}")
    (verified,) = check_results(result).values()
    assert verified.check_name == "repaired_keys_agree" and verified.passed
    assert "field_equality" in verified.metadata["gates_after"].value
    with connect(db_path, read_only=True) as con:
        assert read_identity_p1(con, key) == fetch_legacy_identity(con, key)
    assert run_job("consistency_check_job", instance, database).success


def test_after_a_repair_the_consistency_job_opens_read_new(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    with connect(db_path) as con:
        set_stage(con, "verified", actor="test")
    plant_divergence(db_path)
    assert not run_job("consistency_check_job", instance, database).success
    assert run_job("repair_job", instance, database).success
    held = run_job("advance_rollout_job", instance, database, run_config=advance_config())
    (meta,) = materialized(held, "rollout_stage")
    assert meta["stage"].value == "verified"  # the latest consistency-job verdict failed
    assert run_job("consistency_check_job", instance, database).success
    assert run_job("advance_rollout_job", instance, database, run_config=advance_config()).success
    with connect(db_path, read_only=True) as con:
        assert get_stage(con) == "read-new"


def test_a_dry_run_changes_nothing_and_nothing_to_repair_is_said(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    key = plant_divergence(db_path)
    assert not run_job("consistency_check_job", instance, database).success
    dry = run_job("repair_job", instance, database, run_config=_repair_config(dry_run=True))
    assert dry.success
    (meta,) = materialized(dry, "repair")
    assert meta["summary"].value.startswith("would re-sync 1 key from")
    with connect(db_path, read_only=True) as con:
        assert read_identity_p1(con, key) != fetch_legacy_identity(con, key)
    assert run_job("repair_job", instance, database).success
    again = run_job("repair_job", instance, database)
    assert again.success
    (meta,) = materialized(again, "repair")
    assert meta["summary"].value.startswith("nothing to repair")


def test_without_a_recorded_verification_the_repair_fails_with_one_line(instance, database):
    result = run_job("repair_job", instance, database)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_failure_data.user_failure_data.description.startswith(
        "no verification is recorded"
    )
