"""repair_job: launched without config it repairs what the latest verification found, and the
gates it reports in the same run turn green; those count for an advance past verified."""

from kimera_core.db import connect
from kimera_core.legacy import fetch_legacy_identity, read_identity_p1
from kimera_core.repair import RepairReport
from kimera_core.rollout import get_stage, set_stage
from kimera_pipelines.metadata import REPAIR_REPORT
from pipelines.helpers import (
    ALL_BUCKETS,
    REQUIRED_CHECKS,
    advance_config,
    check_results,
    materialized,
    plant_divergence,
    rollout_config,
    run_job,
)


def test_repair_after_a_failed_check_turns_the_gates_green(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    key = plant_divergence(db_path)
    assert not run_job("consistency_check_job", instance, database).success
    result = run_job("repair_job", instance, database)
    assert result.success
    (meta,) = materialized(result, "repair")
    report = RepairReport.from_dict(meta[REPAIR_REPORT].data)
    assert report.stored == [key] and report.authority == "legacy" and report.ok
    assert meta["undo"].value.endswith(f"--undo {report.repair_id}")
    checks = check_results(result)
    assert set(checks) == REQUIRED_CHECKS and all(c.passed for c in checks.values())
    with connect(db_path, read_only=True) as con:
        assert read_identity_p1(con, key) == fetch_legacy_identity(con, key)


def test_a_repair_run_is_consistency_evidence_for_read_new(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    with connect(db_path) as con:
        set_stage(con, "verified", actor="test")
    plant_divergence(db_path)
    assert not run_job("consistency_check_job", instance, database).success
    assert run_job("repair_job", instance, database).success
    assert run_job("advance_rollout_job", instance, database, run_config=advance_config()).success
    with connect(db_path, read_only=True) as con:
        assert get_stage(con) == "read-new"


def test_a_dry_run_changes_nothing_and_nothing_to_repair_is_said(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    key = plant_divergence(db_path)
    assert not run_job("consistency_check_job", instance, database).success
    dry = run_job("repair_job", instance, database, run_config=rollout_config(dry_run=True))
    assert dry.success
    (meta,) = materialized(dry, "repair")
    assert meta["summary"].value.startswith("would re-sync 1 of 1 keys")
    with connect(db_path, read_only=True) as con:
        assert read_identity_p1(con, key) != fetch_legacy_identity(con, key)
    assert run_job("repair_job", instance, database).success
    again = run_job("repair_job", instance, database)
    assert again.success
    (meta,) = materialized(again, "repair")
    assert meta["summary"].value.startswith("nothing to repair")
