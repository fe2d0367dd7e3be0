"""The observability sensors: run outcomes, typed reports read back, snapshots pushed."""

import dagster as dg
import pytest
from dagster_prometheus import PrometheusResource
from prometheus_client.parser import text_string_to_metric_families
from support.servers import free_port, recording_pushgateway

from kimera_core.db import connect
from kimera_core.metrics import pushed
from kimera_core.rollout import set_stage
from kimera_pipelines.defs import migration as migration_defs
from kimera_pipelines.defs import observability as obs
from kimera_pipelines.defs.rollout import AUTO_ROLLBACK_TAG
from kimera_pipelines.resources import MIGRATION_BUCKETS
from pipelines.helpers import ALL_BUCKETS, plant_divergences, run_job


def _sample(snapshot: pushed.Snapshot, name: str, **labels: str) -> float | None:
    return snapshot.registry().get_sample_value(name, labels)


def _by_job(snapshots: list[pushed.Snapshot]) -> dict[str, pushed.Snapshot]:
    return {s.job: s for s in snapshots}


def test_run_status_sensor_records_the_outcome(instance, database):
    result = run_job("observe_legacy_job", instance, database)
    context = dg.build_run_status_sensor_context(
        sensor_name="record_run_success",
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        dagster_event=result.get_run_success_event(),
    )
    obs.record_run_success(context)
    outcome = obs.record_run_outcome(context)
    assert outcome["job"] == "observe_legacy_job"
    assert outcome["status"] == "success"
    assert outcome["run_id"] == result.run_id
    assert outcome["duration_seconds"] >= 0


def test_findings_are_the_number_of_differing_rows(instance, database, db_path):
    """The defect of issue 10: a failing field_equality gate reported 1 whatever the rows."""
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    plant_divergences(db_path, 3)
    checks = run_job("consistency_check_job", instance, database)
    assert not checks.success
    reports = obs.run_reports(instance, checks.run_id)
    consistency = _by_job(obs.snapshots(reports, 0.0))[pushed.PUSH_JOB_CONSISTENCY]
    findings = "kimera_consistency_findings"
    assert _sample(consistency, findings, kind="field_equality") == 3
    assert _sample(consistency, findings, kind="count_parity") == 0
    assert _sample(consistency, "kimera_consistency_verdict", verdict="inconsistent") == 1
    assert _sample(consistency, "kimera_consistency_last_success_timestamp_seconds") is None
    assert not consistency.replace  # POST: the last success time on the gateway is kept


def test_a_finished_migration_is_pushed_from_its_report(instance, database):
    result = run_job("migration_job", instance, database, tags=ALL_BUCKETS)
    reports = obs.run_reports(instance, result.run_id)
    progress = reports.migration
    assert progress is not None and progress.report is not None and not progress.running
    assert progress.steps_done == progress.steps_planned == 2 * MIGRATION_BUCKETS
    snapshot = _by_job(obs.snapshots(reports, 0.0))[pushed.PUSH_JOB_MIGRATION]
    counts = progress.report.counts
    assert _sample(snapshot, "kimera_migration_rows", outcome="inserted") == counts.inserted
    assert _sample(snapshot, "kimera_migration_rows", outcome="quarantined") == counts.quarantined
    assert _sample(snapshot, "kimera_migration_rows_read") == counts.read


def test_an_unfinished_migration_shows_its_steps_done(instance, database, monkeypatch):
    """Progress comes from the per-partition observations, not from a parsed log line."""
    real = migration_defs.migrate_buckets

    def two_partitions_then_fail(con, buckets, *, partitions, on_partition):
        def stop_after_two(done, total, kind, bucket, counts):
            on_partition(done, total, kind, bucket, counts)
            if done == 2:
                raise RuntimeError("stopped for the test")

        return real(con, buckets, partitions=partitions, on_partition=stop_after_two)

    monkeypatch.setattr(migration_defs, "migrate_buckets", two_partitions_then_fail)
    result = run_job("migration_job", instance, database, tags=ALL_BUCKETS)
    assert not result.success
    progress = obs.run_reports(instance, result.run_id, running=True).migration
    assert progress is not None and progress.report is None
    assert (progress.steps_done, progress.steps_planned) == (2, 2 * MIGRATION_BUCKETS)
    snapshot = pushed.migration_snapshot(progress, 0.0)
    assert _sample(snapshot, "kimera_migration_steps_done") == 2
    assert _sample(snapshot, "kimera_migration_running") == 1
    assert _sample(snapshot, "kimera_migration_rows", outcome="inserted") is None


def test_the_run_end_sensor_pushes_each_group_alone(instance, database, db_path):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    plant_divergences(db_path, 3)
    checks = run_job("consistency_check_job", instance, database)
    with recording_pushgateway() as (gateway, pushes):
        prometheus = PrometheusResource(gateway=gateway, timeout=5)
        context = dg.build_run_status_sensor_context(
            sensor_name="kimera_push_on_failure",
            dagster_instance=instance,
            dagster_run=instance.get_run_by_id(checks.run_id),
            dagster_event=checks.get_run_failure_event(),
            resources={"prometheus": prometheus},
        )
        obs.kimera_push_on_failure(context)
    by_path = {path: (method, body) for method, path, body in pushes}
    job_path = "/metrics/job/kimera_dagster/dagster_job/consistency_check_job"
    assert by_path[job_path][0] == "PUT"
    method, body = by_path["/metrics/job/kimera_consistency"]
    assert method == "POST"
    assert 'kimera_consistency_findings{kind="field_equality"} 3.0' in body
    assert "kimera_dagster_job_runs_total" not in body  # one group per push


def test_the_rollout_group_carries_the_stage_and_the_latest_automatic_rollback(
    instance, database, db_path
):
    assert run_job("migration_job", instance, database, tags=ALL_BUCKETS).success
    with connect(db_path) as con:
        set_stage(con, "read-new", actor="test")
    rollback = run_job("rollback_reads_job", instance, database, tags={AUTO_ROLLBACK_TAG: "reads"})
    assert rollback.success
    reports = obs.run_reports(instance, rollback.run_id)
    with (
        recording_pushgateway() as (gateway, pushes),
        dg.build_resources({"prometheus": PrometheusResource(gateway=gateway)}) as resources,
    ):
        groups = obs.push_reports(instance, None, resources.prometheus, reports)
    assert "kimera_rollout" in groups
    (body,) = [b for _, path, b in pushes if path == "/metrics/job/kimera_rollout"]
    assert 'kimera_rollout_stage{stage="verified"} 1.0' in body
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    ended = instance.get_run_record_by_id(rollback.run_id).end_time
    assert samples["kimera_rollout_last_auto_rollback_timestamp_seconds"] == pytest.approx(ended)


def test_a_failed_push_is_counted_and_the_sensor_goes_on(instance):
    prometheus = PrometheusResource(gateway=f"127.0.0.1:{free_port()}", timeout=2)  # no one
    context = dg.build_sensor_context(instance=instance, resources={"prometheus": prometheus})
    result = obs.kimera_metrics_sensor(context)
    assert "heartbeat failed" in result.skip_message
    assert obs.push_failures(instance) == 1


@pytest.mark.parametrize("status", ["RUNNING", "STOPPED"])
def test_push_sensors_start_running_only_with_a_gateway(monkeypatch, status):
    if status == "RUNNING":
        monkeypatch.setenv(pushed.PUSHGATEWAY_ENV, "127.0.0.1:9091")
    else:
        monkeypatch.delenv(pushed.PUSHGATEWAY_ENV, raising=False)
    assert obs._default_status().value == status
