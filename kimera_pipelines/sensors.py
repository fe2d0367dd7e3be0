"""Sensors: record each run's outcome, and roll reads back to legacy when checks fail.

Sensors run in the daemon and never open the DuckDB file: they read Dagster's event log
(run records, check evaluations, the rollout_stage materialization). The one sensor that
must change the database, ``auto_rollback_reads``, does it by launching ``rollback_reads_job``:
the run queue serialises it with every other writer, and the job re-reads the stage from the
database before it moves anything.
"""

import json
from typing import Any

import dagster as dg

from kimera_core.rollout import reads_can_fall_back, routing
from kimera_pipelines import extensions
from kimera_pipelines.checks import CONSISTENCY_GATES, ENTROPY_SANITY, latest_check_evaluations
from kimera_pipelines.jobs import rollback_reads_job

ROLLOUT_STAGE = dg.AssetKey("rollout_stage")


def _status(context: dg.RunStatusSensorContext) -> str:
    event = context.dagster_event.event_type_value if context.dagster_event else ""
    return {"PIPELINE_SUCCESS": "success", "PIPELINE_FAILURE": "failure"}.get(event, event.lower())


def record_run_outcome(context: dg.RunStatusSensorContext) -> dict[str, Any]:
    """One run's outcome as a plain dict (job, run id, status, timings, kimera tags)."""
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
    for hook in extensions.RUN_OUTCOME_HOOKS:
        try:
            hook(outcome)
        except Exception as exc:  # a broken hook must not hide the others
            context.log.warning(f"run outcome hook {hook!r} failed: {exc}")
    context.log.info(f"run outcome: {json.dumps(outcome, default=str)}")
    return outcome


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
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


def latest_stage(instance: dg.DagsterInstance) -> str | None:
    """The stage recorded by the latest rollout_stage materialization, or None."""
    event = instance.get_latest_materialization_event(ROLLOUT_STAGE)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("stage")
    return None if value is None else str(value.value)


@dg.sensor(
    name="auto_rollback_reads",
    job=rollback_reads_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "When a consistency check fails while reads are served from identities (read-new), "
        "launch rollback_reads_job to serve reads from legacy again. Running by default: "
        "safe, legacy still receives every write at read-new. From write-new on it only "
        "alerts (legacy is stale): follow docs/runbook.md."
    ),
)
def auto_rollback_reads(context: dg.SensorEvaluationContext):
    latest = latest_check_evaluations(context.instance, names=(*CONSISTENCY_GATES, ENTROPY_SANITY))
    failed = [c for c in latest if not c.passed]
    newest = max((c.at or 0.0 for c in failed), default=0.0)
    if not failed:
        return dg.SkipReason("latest consistency checks passed")
    if context.cursor and newest <= float(context.cursor):
        return dg.SkipReason("failed checks already acted on")
    stage = latest_stage(context.instance)
    names = ", ".join(sorted(c.name for c in failed))
    if stage is None:
        return dg.SkipReason(f"checks failed ({names}) but no rollout_stage is recorded yet")
    if routing(stage).read != "new":
        return dg.SkipReason(f"checks failed ({names}); reads already come from legacy ({stage})")
    context.update_cursor(str(newest))
    if not reads_can_fall_back(stage):
        return dg.SkipReason(
            f"ALERT: checks failed ({names}) at {stage}: legacy no longer receives writes, so "
            "reads cannot move back automatically; follow docs/runbook.md"
        )
    runs = sorted({c.run_id or "?" for c in failed})
    reason = f"auto-rollback: consistency checks failed ({names}) in run(s) {', '.join(runs)}"
    context.log.warning(f"{reason}; moving reads back to legacy")
    return dg.RunRequest(
        run_key=f"auto-rollback-{newest}",
        run_config={
            "ops": {
                "rollout_stage": {
                    "config": {
                        "action": "rollback_reads",
                        "actor": "sensor:auto_rollback_reads",
                        "reason": reason,
                    }
                }
            }
        },
        tags={"kimera/auto-rollback": "reads", "kimera/failed-checks": names},
    )


SENSORS = [record_run_success, record_run_failure, auto_rollback_reads]
