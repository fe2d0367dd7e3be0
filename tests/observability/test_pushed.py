"""Pushgateway snapshots built from the core's typed reports (kimera_core.metrics.pushed)."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from kimera_core.entropy import ENTROPY_BUCKETS_BITS, effective_tau
from kimera_core.gates import Gate
from kimera_core.metrics import pushed
from kimera_core.migration import MigrationCounts, MigrationReport
from kimera_core.report import EntropyStatistics
from kimera_core.stats import Distribution


def _gate(name: str, passed: bool, offending: int) -> Gate:
    return Gate(name, passed, "summary", {}, [], offending)


def _distribution(**overrides) -> Distribution:
    values = dict(
        identity_type="geoid", count=4, unknown=1, mean=1.0, p50=1.0, p90=2.0, p99=2.0,
        min=0.0, max=2.0, tau_mean_days=15.4, tau_p50_days=15.4, tau_p99_days=16.8,
        histogram={"0": 1, "1": 1, "2": 1},
    )  # fmt: skip
    values.update(overrides)
    return Distribution(**values)


def value(snapshot: pushed.Snapshot, name: str, **labels: str) -> float | None:
    return snapshot.registry().get_sample_value(name, labels)


def test_a_failing_gate_reports_its_offending_count_and_never_zero():
    assert pushed.finding_count(_gate("field_equality", False, 7)) == 7
    assert pushed.finding_count(_gate("key_coverage_new_to_legacy", False, 0)) == 1
    assert pushed.finding_count(_gate("field_equality", True, 0)) == 0


def test_consistency_verdict_is_consistent_only_when_every_gate_passed():
    clean = pushed.consistency_snapshot([_gate("a", True, 0), _gate("b", True, 0)], 10.0, 20.0)
    assert value(clean, "kimera_consistency_verdict", verdict="consistent") == 1
    assert value(clean, "kimera_consistency_last_success_timestamp_seconds") == 10.0
    dirty = pushed.consistency_snapshot([_gate("a", True, 0), _gate("b", False, 3)], 10.0, 20.0)
    assert value(dirty, "kimera_consistency_verdict", verdict="inconsistent") == 1
    assert value(dirty, "kimera_consistency_findings", kind="b") == 3
    assert value(dirty, "kimera_consistency_last_success_timestamp_seconds") is None
    assert value(dirty, "kimera_consistency_last_check_timestamp_seconds") == 10.0


def test_entropy_histogram_is_cumulative_over_the_fixed_buckets():
    snapshot = pushed.entropy_snapshot(EntropyStatistics([_distribution()], [], 5.0))
    bucket = "kimera_entropy_snapshot_bucket"
    assert value(snapshot, bucket, identity_type="geoid", le="0") == 1
    assert value(snapshot, bucket, identity_type="geoid", le="1") == 2
    assert value(snapshot, bucket, identity_type="geoid", le="+Inf") == 3
    assert value(snapshot, "kimera_entropy_snapshot_count", identity_type="geoid") == 3
    assert value(snapshot, "kimera_entropy_snapshot_sum", identity_type="geoid") == 3.0
    assert value(snapshot, "kimera_entropy_snapshot_unknown_identities", identity_type="geoid") == 1
    assert value(snapshot, "kimera_entropy_snapshot_timestamp_seconds") == 5.0
    assert len(pushed.ENTROPY_BUCKETS) == len(ENTROPY_BUCKETS_BITS) + 1


def test_tau_at_a_percentile_comes_from_the_statistics_or_the_formula():
    snapshot = pushed.entropy_snapshot(EntropyStatistics([_distribution()], [], 5.0))
    tau = "kimera_effective_tau_snapshot_percentile_seconds"
    assert value(snapshot, tau, identity_type="geoid", percentile="50") == 15.4 * 86400
    assert value(snapshot, tau, identity_type="geoid", percentile="90") == effective_tau(2.0)
    empty = pushed.entropy_snapshot(
        EntropyStatistics([_distribution(p50=None, p90=None, p99=None, histogram={})], [], 5.0)
    )
    assert value(empty, tau, identity_type="geoid", percentile="50") is None
    assert value(empty, "kimera_entropy_snapshot_count", identity_type="geoid") is None


def test_migration_rows_by_outcome_come_from_the_report():
    counts = MigrationCounts(read=10, inserted=6, updated=1, unchanged=1, kept=0, quarantined=2)
    report = MigrationReport("run", False, False, 8, counts, 10)
    snapshot = pushed.migration_snapshot(pushed.MigrationProgress(report, 16, 16, False, 3.0), 4.0)
    for outcome in pushed.MIGRATION_OUTCOMES:
        expected = getattr(counts, outcome)
        assert value(snapshot, "kimera_migration_rows", outcome=outcome) == expected
    assert value(snapshot, "kimera_migration_rows_read") == 10
    assert value(snapshot, "kimera_migration_steps_planned") == 16
    assert value(snapshot, "kimera_migration_running") == 0
    assert value(snapshot, "kimera_migration_last_progress_timestamp_seconds") == 3.0


def test_job_snapshot_is_grouped_by_the_dagster_job():
    runs = pushed.JobRuns({"success": 3, "failure": 1}, "failure", 2.5, 1.0, 2.0)
    snapshot = pushed.job_snapshot("migration_job", runs)
    assert snapshot.grouping_key == {"dagster_job": "migration_job"} and snapshot.replace
    assert value(snapshot, "kimera_dagster_job_runs_total", outcome="canceled") == 0
    assert value(snapshot, "kimera_dagster_job_last_run_outcome", outcome="failure") == 1
    never = pushed.job_snapshot("new_job", pushed.JobRuns({}))
    assert value(never, "kimera_dagster_job_last_success_timestamp_seconds") is None


NAME_AUTO = "kimera_rollout_last_auto_rollback_timestamp_seconds"


@pytest.mark.parametrize("stage", ["legacy-only", "read-new", "legacy-retired"])
def test_rollout_stage_number_is_its_position(stage):
    snapshot = pushed.rollout_snapshot(stage, 1.0)
    assert value(snapshot, "kimera_rollout_stage", stage=stage) == 1
    assert value(snapshot, "kimera_rollout_stage_number") == pushed.STAGES.index(stage)


def test_the_latest_automatic_rollback_is_pushed_beside_the_stage():
    assert value(pushed.rollout_snapshot("verified", 1.0), NAME_AUTO) is None
    snapshot = pushed.rollout_snapshot("verified", 2.0, auto_rollback_at=1.5)
    assert value(snapshot, NAME_AUTO) == 1.5


def test_a_snapshot_exposes_only_its_own_group():
    text = generate_latest(pushed.heartbeat_snapshot(2, 1.0).registry()).decode()
    assert "kimera_pushgateway_push_failures_total 2.0" in text
    assert "kimera_entropy" not in text
