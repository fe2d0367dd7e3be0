"""The gates as checks of rollout_stage: each publishes its typed Gate; the schedules."""

import dagster as dg

from kimera_core.gates import CONSISTENCY_GATES, Gate, GateReport
from kimera_pipelines.defs.consistency import consistency_daily_full, consistency_hourly
from kimera_pipelines.metadata import GATE, GATE_REPORT
from pipelines.helpers import (
    ALL_BUCKETS,
    REQUIRED_CHECKS,
    check_results,
    plant_divergences,
    run_job,
)


def test_full_backfill_then_the_consistency_job_passes(instance, database):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    checks = run_job("consistency_check_job", instance, database)
    assert checks.success
    results = check_results(checks)
    assert set(results) == REQUIRED_CHECKS
    assert all(r.passed for r in results.values())
    recon = results["reconciliation"].metadata["counts"].data
    assert recon["legacy"] == recon["present"] + recon["quarantined"]


def test_each_gate_is_published_whole_beside_its_readable_entries(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    planted = plant_divergences(db_path, 3)
    checks = run_job("consistency_check_job", instance, database)
    assert not checks.success
    results = check_results(checks)
    for name in CONSISTENCY_GATES:
        gate = Gate.from_dict(results[name].metadata[GATE].data)
        assert gate.name == name and gate.passed == results[name].passed
        assert gate.summary == results[name].metadata["summary"].value
        assert gate.counts == results[name].metadata["counts"].data
    field = Gate.from_dict(results["field_equality"].metadata[GATE].data)
    assert not field.passed and field.offending == 3
    # the whole GateReport, the verifier's report inside it, once per step
    observed = [
        e.asset_observation_data.asset_observation.metadata[GATE_REPORT].data
        for e in checks.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
        and GATE_REPORT in e.asset_observation_data.asset_observation.metadata
    ]
    assert len(observed) == 1
    report = GateReport.from_dict(observed[0])
    assert report.gate("field_equality") == field
    assert report.verification.field_mismatches.total == 3
    assert report.verification.verdict == "inconsistent"
    assert results["field_equality"].metadata["offending"].value == 3
    assert sorted(s["id"] for s in field.sample) == sorted(planted)
    assert results["field_equality"].metadata["verifier_verdict"].value == "inconsistent"


def test_consistency_schedules_run_incremental_hourly_and_full_daily():
    hourly = consistency_hourly.evaluate_tick(dg.build_schedule_context())
    daily = consistency_daily_full.evaluate_tick(dg.build_schedule_context())
    config = "ops", "rollout", "config", "incremental"

    def incremental(data):
        value = data.run_requests[0].run_config
        for key in config:
            value = value[key]
        return value

    assert incremental(hourly) is True
    assert incremental(daily) is False
    assert consistency_hourly.default_status == dg.DefaultScheduleStatus.RUNNING
