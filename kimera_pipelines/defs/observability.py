"""Sensors that record run outcomes and push Kimera's metrics to a Pushgateway.

Everything pushed is read from Dagster's own records: run records (outcome, start, end) and
the event log, where the domains publish the core's typed reports as JSON metadata
(``kimera_pipelines.metadata``). A run's reports are rebuilt with their ``from_dict``
(``run_reports``) and ``kimera_core.metrics.pushed`` turns each into a snapshot: no regex, no
key aliases, no guessing which check is a consistency gate. No sensor opens the DuckDB file:
the daemon must not contend for its one writer lock.

* ``kimera_push_on_success`` / ``kimera_push_on_failure`` (run-status sensors): when a run
  ends, push its job's gauges and the snapshots of the reports its events carry.
* ``kimera_metrics_sensor`` (every minute): push every recent job's gauges, the latest
  snapshot of each kind, a running migration's progress (from its per-step
  observations) and a heartbeat with the push failures seen.
* ``record_run_success`` / ``record_run_failure``: log each run's outcome as one JSON line.

The push goes through dagster-prometheus's ``PrometheusResource`` (resource ``prometheus``,
gateway from ``KIMERA_PUSHGATEWAY``, default 127.0.0.1:9091): each snapshot is registered
alone on its registry, pushed (PUT, or POST for the consistency group) and unregistered. The
push sensors start RUNNING when that variable is set where the code location loads, else
STOPPED (turn them on in the UI). A failed push is logged, counted in the instance's
key-value store and pushed as ``kimera_pushgateway_push_failures_total`` with the next
heartbeat; Prometheus sees a gateway it cannot reach through ``push_time_seconds`` going
stale (docs/observability.md).
"""

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster_prometheus import PrometheusResource

from kimera_core.gates import Gate
from kimera_core.metrics import pushed
from kimera_core.metrics.pushed import JobRuns, MigrationProgress, Snapshot
from kimera_core.migration import MigrationReport
from kimera_core.report import EntropyStatistics
from kimera_pipelines.defs.rollout import AUTO_ROLLBACK_TAG, ROLLOUT_STAGE
from kimera_pipelines.metadata import (
    ENTROPY_STATISTICS,
    GATE,
    MIGRATION_PARTITION,
    MIGRATION_REPORT,
    STEPS_DONE,
    STEPS_PLANNED,
)

PUSH_FAILURES_KEY = "kimera_observability/push_failures"
RECENT_RUNS = 25
REPORT_EVENTS = {
    DagsterEventType.ASSET_MATERIALIZATION,
    DagsterEventType.ASSET_OBSERVATION,
    DagsterEventType.ASSET_CHECK_EVALUATION,
}
_STATUS_OUTCOME = {
    DagsterRunStatus.SUCCESS: "success",
    DagsterRunStatus.FAILURE: "failure",
    DagsterRunStatus.CANCELED: "canceled",
}


# --- run outcomes --------------------------------------------------------------------------
def _status(context: dg.RunStatusSensorContext) -> str:
    event = context.dagster_event.event_type_value if context.dagster_event else ""
    return {"PIPELINE_SUCCESS": "success", "PIPELINE_FAILURE": "failure"}.get(event, event.lower())


def record_run_outcome(context: dg.RunStatusSensorContext) -> dict[str, Any]:
    """One run's outcome as a plain dict (job, run id, status, timings, kimera tags), logged."""
    run = context.dagster_run
    record = context.instance.get_run_record_by_id(run.run_id)
    start = record.start_time if record else None
    end = record.end_time if record else None
    outcome = {
        "job": run.job_name,
        "run_id": run.run_id,
        "status": _status(context),
        "started_at": start,
        "ended_at": end,
        "duration_seconds": (end - start) if start and end else None,
        "kind": run.tags.get("kimera/kind"),
        "trigger": run.tags.get("dagster/schedule_name") or run.tags.get("dagster/sensor_name"),
    }
    context.log.info(f"run outcome: {json.dumps(outcome, default=str)}")
    return outcome


@dg.run_status_sensor(
    run_status=DagsterRunStatus.SUCCESS,
    name="record_run_success",
    monitor_all_code_locations=False,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Record every successful run's outcome (duration, job, trigger) for metrics.",
)
def record_run_success(context: dg.RunStatusSensorContext):
    record_run_outcome(context)


@dg.run_failure_sensor(
    name="record_run_failure",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Record every failed run's outcome (duration, job, trigger) for metrics.",
)
def record_run_failure(context: dg.RunFailureSensorContext):
    record_run_outcome(context)


# --- reading the typed reports back --------------------------------------------------------
@dataclass
class RunReports:
    """The typed reports one run published (the latest of each kind) and when (Unix s)."""

    entropy: EntropyStatistics | None = None
    migration: MigrationProgress | None = None
    gates: dict[str, Gate] = field(default_factory=dict)
    checked_at: float | None = None
    stage: str | None = None
    stage_at: float | None = None
    auto_rollback_at: float | None = None


def job_summary(instance: DagsterInstance, job_name: str) -> JobRuns:
    """Runs by outcome and the last finished / last successful run of a job."""
    runs = {
        outcome: instance.get_runs_count(RunsFilter(job_name=job_name, statuses=[status]))
        for status, outcome in _STATUS_OUTCOME.items()
    }
    finished = instance.get_run_records(
        RunsFilter(job_name=job_name, statuses=list(_STATUS_OUTCOME)), limit=1
    )
    succeeded = instance.get_run_records(
        RunsFilter(job_name=job_name, statuses=[DagsterRunStatus.SUCCESS]), limit=1
    )
    last = finished[0] if finished else None
    ended = last.end_time if last else None
    return JobRuns(
        runs=runs,
        last_outcome=_STATUS_OUTCOME[last.dagster_run.status] if last else None,
        last_duration_seconds=(ended - last.start_time)
        if ended is not None and last.start_time is not None
        else None,
        last_success_timestamp=succeeded[0].end_time if succeeded else None,
        last_finished_timestamp=ended,
    )


def run_reports(instance: DagsterInstance, run_id: str, *, running: bool = False) -> RunReports:
    """The reports in one run's events, rebuilt typed; ``running``: the run has not ended."""
    found = RunReports()
    report: MigrationReport | None = None
    steps: tuple[int, int, float] | None = None
    report_at = 0.0
    for entry in instance.all_logs(run_id, of_type=REPORT_EVENTS):
        event = entry.dagster_event
        if event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.event_specific_data
            if GATE in evaluation.metadata:
                gate = Gate.from_dict(evaluation.metadata[GATE].data)
                found.gates[gate.name] = gate
                found.checked_at = entry.timestamp
            continue
        if event.event_type == DagsterEventType.ASSET_OBSERVATION:
            metadata = event.event_specific_data.asset_observation.metadata
            if MIGRATION_PARTITION in metadata:
                done, planned = metadata[STEPS_DONE].value, metadata[STEPS_PLANNED].value
                steps = (int(done), int(planned), entry.timestamp)
            continue
        materialization = event.event_specific_data.materialization
        metadata = materialization.metadata
        if MIGRATION_REPORT in metadata:
            report = MigrationReport.from_dict(metadata[MIGRATION_REPORT].data)
            report_at = entry.timestamp
        if ENTROPY_STATISTICS in metadata:
            found.entropy = EntropyStatistics.from_dict(metadata[ENTROPY_STATISTICS].data)
        if materialization.asset_key == ROLLOUT_STAGE and "stage" in metadata:
            found.stage, found.stage_at = str(metadata["stage"].value), entry.timestamp
    if report is not None:  # finished: every step of the run is done
        planned = len(report.partition_counts)
        found.migration = MigrationProgress(report, planned, planned, running, report_at)
    elif steps is not None:
        done, planned, at = steps
        found.migration = MigrationProgress(None, done, planned, running, at)
    return found


def snapshots(reports: RunReports, now: float) -> list[Snapshot]:
    """The Pushgateway snapshots of a run's reports (entropy, migration, consistency, rollout)."""
    out = []
    if reports.entropy is not None:
        out.append(pushed.entropy_snapshot(reports.entropy))
    if reports.migration is not None:
        out.append(pushed.migration_snapshot(reports.migration, now))
    if reports.gates and reports.checked_at is not None:
        out.append(
            pushed.consistency_snapshot(list(reports.gates.values()), reports.checked_at, now)
        )
    if reports.stage is not None and reports.stage_at is not None:
        out.append(
            pushed.rollout_snapshot(reports.stage, reports.stage_at, reports.auto_rollback_at)
        )
    return out


# --- pushing -------------------------------------------------------------------------------
def _count_failure(instance: DagsterInstance) -> None:
    storage = instance.run_storage
    current = int(storage.get_cursor_values({PUSH_FAILURES_KEY}).get(PUSH_FAILURES_KEY, "0"))
    storage.set_cursor_values({PUSH_FAILURES_KEY: str(current + 1)})


def push_failures(instance: DagsterInstance) -> int:
    """Failed pushes counted so far in this Dagster instance."""
    values = instance.run_storage.get_cursor_values({PUSH_FAILURES_KEY})
    return int(values.get(PUSH_FAILURES_KEY, "0"))


def push(
    instance: DagsterInstance, log: Any, prometheus: PrometheusResource, snapshot: Snapshot
) -> bool:
    """Push one snapshot alone (PUT, or POST when it keeps the group's other families).

    A failure (connection refused, timeout, the gateway's refusal: all OSError) is logged and
    counted, never raised: one group's failure must not stop the others.
    """
    prometheus.registry.register(snapshot)
    try:
        send = prometheus.push_to_gateway if snapshot.replace else prometheus.pushadd_to_gateway
        send(job=snapshot.job, grouping_key=dict(snapshot.grouping_key))
    except OSError as exc:
        _count_failure(instance)
        where = f"{snapshot.job} {dict(snapshot.grouping_key)} to {prometheus.gateway}"
        log.warning(f"push of {where} failed: {exc}")
        return False
    finally:
        prometheus.registry.unregister(snapshot)
    return True


def push_job(
    instance: DagsterInstance, log: Any, prometheus: PrometheusResource, job_name: str
) -> bool:
    """Push one job's gauges under the grouping key {dagster_job: job_name}."""
    return push(
        instance, log, prometheus, pushed.job_snapshot(job_name, job_summary(instance, job_name))
    )


def last_auto_rollback(instance: DagsterInstance) -> float | None:
    """When the latest automatic read rollback run ended (Unix s), from the run records."""
    records = instance.get_run_records(
        RunsFilter(
            job_name="rollback_reads_job",
            tags={AUTO_ROLLBACK_TAG: "reads"},
            statuses=[DagsterRunStatus.SUCCESS],
        ),
        limit=1,
    )
    return records[0].end_time if records else None


def push_reports(
    instance: DagsterInstance, log: Any, prometheus: PrometheusResource, reports: RunReports
) -> list[str]:
    """Push the snapshots of a run's reports; returns the groups pushed."""
    if reports.stage is not None:
        reports.auto_rollback_at = last_auto_rollback(instance)
    return [
        snapshot.job
        for snapshot in snapshots(reports, time.time())
        if push(instance, log, prometheus, snapshot)
    ]


def _on_run_end(context: dg.RunStatusSensorContext, prometheus: PrometheusResource) -> None:
    run = context.dagster_run
    push_job(context.instance, context.log, prometheus, run.job_name)
    push_reports(
        context.instance, context.log, prometheus, run_reports(context.instance, run.run_id)
    )


def _default_status() -> dg.DefaultSensorStatus:
    if os.environ.get(pushed.PUSHGATEWAY_ENV):
        return dg.DefaultSensorStatus.RUNNING
    return dg.DefaultSensorStatus.STOPPED


@dg.run_status_sensor(
    run_status=DagsterRunStatus.SUCCESS,
    name="kimera_push_on_success",
    description="Push the finished job's gauges and its entropy/migration/consistency snapshots.",
    default_status=_default_status(),
)
def kimera_push_on_success(context: dg.RunStatusSensorContext, prometheus: PrometheusResource):
    _on_run_end(context, prometheus)


@dg.run_failure_sensor(
    name="kimera_push_on_failure",
    description="Push the failed job's gauges (last outcome, runs by outcome) to the Pushgateway.",
    default_status=_default_status(),
)
def kimera_push_on_failure(context: dg.RunFailureSensorContext, prometheus: PrometheusResource):
    _on_run_end(context, prometheus)


def collect_latest(instance: DagsterInstance) -> tuple[list[str], RunReports]:
    """Job names of recent runs, and the latest report of each kind among them."""
    jobs: list[str] = []
    latest = RunReports()
    for record in instance.get_run_records(limit=RECENT_RUNS):  # newest first
        run = record.dagster_run
        if not run.job_name.startswith("__") and run.job_name not in jobs:
            jobs.append(run.job_name)
        if run.status not in (*_STATUS_OUTCOME, DagsterRunStatus.STARTED):
            continue
        found = run_reports(instance, run.run_id, running=run.status == DagsterRunStatus.STARTED)
        if latest.entropy is None:
            latest.entropy = found.entropy
        if latest.migration is None:
            latest.migration = found.migration
        if not latest.gates and found.gates:
            latest.gates, latest.checked_at = found.gates, found.checked_at
        if latest.stage is None:
            latest.stage, latest.stage_at = found.stage, found.stage_at
    return jobs, latest


@dg.sensor(
    name="kimera_metrics_sensor",
    minimum_interval_seconds=60,
    description=(
        "Every minute: push every job's gauges, the latest entropy/migration/consistency "
        "snapshots from the event log, a running migration's progress and a heartbeat."
    ),
    default_status=_default_status(),
)
def kimera_metrics_sensor(
    context: dg.SensorEvaluationContext, prometheus: PrometheusResource
) -> dg.SkipReason:
    instance = context.instance
    jobs, latest = collect_latest(instance)
    ok = [job for job in jobs if push_job(instance, context.log, prometheus, job)]
    groups = push_reports(instance, context.log, prometheus, latest)
    heartbeat = pushed.heartbeat_snapshot(push_failures(instance), time.time())
    beat = push(instance, context.log, prometheus, heartbeat)
    return dg.SkipReason(
        f"pushed {len(ok)}/{len(jobs)} jobs, snapshots {sorted(groups)}, "
        f"heartbeat {'ok' if beat else 'failed'} (this sensor never launches runs)"
    )


defs = dg.Definitions(
    sensors=[
        record_run_success,
        record_run_failure,
        kimera_push_on_success,
        kimera_push_on_failure,
        kimera_metrics_sensor,
    ]
)
