"""Sensors that push Kimera's job, entropy, migration and consistency metrics to a Pushgateway.

Everything pushed is read from Dagster's own records: run records (outcome, start, end) and
the event log (asset materialization metadata, asset check evaluations, the migration's
partition log lines). No sensor opens the DuckDB file: the daemon must not contend for its
one writer lock.

* ``kimera_push_on_success`` / ``kimera_push_on_failure`` (run-status sensors): when a run
  ends, push its job's gauges, and the entropy, migration and consistency snapshots its
  events carry.
* ``kimera_metrics_sensor`` (every minute): push every job's gauges, the latest snapshots,
  the progress of a migration still running, and a heartbeat with the push failures seen.

The gateway comes from ``KIMERA_PUSHGATEWAY`` (default 127.0.0.1:9091). The sensors start
RUNNING when that variable is set where the code location loads, else STOPPED (turn them on
in the UI). A failed push is logged, counted in the instance's key-value store and pushed as
``kimera_pushgateway_push_failures_total`` with the next heartbeat; Prometheus sees a gateway
it cannot reach through ``push_time_seconds`` going stale (docs/observability.md).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from kimera_core import metrics, rollout
from kimera_core.gates import CONSISTENCY_GATES

PUSH_FAILURES_KEY = "kimera_observability/push_failures"
RECENT_RUNS = 25
PUSH_TIMEOUT_SECONDS = 5.0

_STATUS_OUTCOME = {
    DagsterRunStatus.SUCCESS: "success",
    DagsterRunStatus.FAILURE: "failure",
    DagsterRunStatus.CANCELED: "canceled",
}
# the identities asset logs "partition {done}/{total} (...)" per finished partition
_PARTITION_LOG = re.compile(r"\bpartition (\d+)/(\d+)\b")
# entropy metadata: "<type>/<stat>" (entropy_distribution, effective_tau_distribution) or
# "entropy/<type>/<stat>" (the earlier legacy summary)
_ENTROPY_KEY = re.compile(r"^(?:entropy/)?(geoid|scar)/([a-z0-9_]+)$")
_ENTROPY_STATS = frozenset(
    {"count", "unknown", "mean", "p50", "p90", "p99", "histogram"}
    | {"tau_mean_days", "tau_p50_days", "tau_p90_days", "tau_p99_days"}
)
# the consistency gates are checks on identities (kimera_core.gates.CONSISTENCY_GATES)
CONSISTENCY_CHECKS = frozenset(CONSISTENCY_GATES)
# numbers a failing check's "counts" metadata may carry as its count of offending keys
_OFFENDING_COUNT_KEYS = ("unexplained", "offending", "mismatched_rows", "total", "rows")
_MIGRATION_KEYS = ("read", *metrics.MIGRATION_OUTCOMES)
# consistency metadata: a finding kind as a top-level int, or under "findings/<kind>"
_FINDING_ALIASES = {
    "count_difference": ("count_difference", "row_count_difference", "counts_difference"),
    "null_keys": ("null_keys",),
    "duplicate_keys": ("duplicate_keys",),
    "missing_in_new": ("missing_in_new",),
    "missing_in_legacy": ("missing_in_legacy",),
    "field_mismatches": ("field_mismatches",),
}


# --- reading Dagster's records ------------------------------------------------------------
def _value(entry: Any) -> Any:
    """The plain value of a metadata entry (MetadataValue or raw)."""
    return getattr(entry, "value", entry)


def _number(entry: Any) -> float | None:
    value = _value(entry)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return None


def job_summary(instance: DagsterInstance, job_name: str) -> dict[str, Any]:
    """Runs by outcome and the last finished / last successful run of a job."""
    summary: dict[str, Any] = {"runs": {}}
    for status, outcome in _STATUS_OUTCOME.items():
        summary["runs"][outcome] = instance.get_runs_count(
            RunsFilter(job_name=job_name, statuses=[status])
        )
    finished = instance.get_run_records(
        RunsFilter(job_name=job_name, statuses=list(_STATUS_OUTCOME)), limit=1
    )
    if finished:
        record = finished[0]
        summary["last_outcome"] = _STATUS_OUTCOME[record.dagster_run.status]
        if record.end_time is not None:
            summary["last_finished_timestamp"] = record.end_time
            if record.start_time is not None:
                summary["last_duration_seconds"] = record.end_time - record.start_time
    succeeded = instance.get_run_records(
        RunsFilter(job_name=job_name, statuses=[DagsterRunStatus.SUCCESS]), limit=1
    )
    if succeeded and succeeded[0].end_time is not None:
        summary["last_success_timestamp"] = succeeded[0].end_time
    return summary


def entropy_from_metadata(metadata: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per identity type: count, unknown, mean, p50/p90/p99 and histogram, where present."""
    out: dict[str, dict[str, Any]] = {}
    for key, entry in metadata.items():
        match = _ENTROPY_KEY.match(key)
        if not match:
            continue
        identity_type, stat = match.groups()
        if stat not in _ENTROPY_STATS:
            continue
        value = _value(entry)
        if stat == "histogram":
            if isinstance(value, str):
                value = json.loads(value)
            if isinstance(value, Mapping):
                out.setdefault(identity_type, {})["histogram"] = dict(value)
        elif (number := _number(entry)) is not None:
            out.setdefault(identity_type, {})[stat] = number
    return out


def migration_from_metadata(metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """Rows by outcome (and partitions, when recorded) from the identities asset's metadata."""
    if not all(key in metadata for key in _MIGRATION_KEYS):
        return None
    progress: dict[str, Any] = {
        "rows": {k: _number(metadata[k]) or 0.0 for k in metrics.MIGRATION_OUTCOMES},
        "read": _number(metadata["read"]),
    }
    for key, target in (
        ("partitions", "partitions_total"),
        ("partitions_total", "partitions_total"),
        ("partitions_done", "partitions_done"),
    ):
        if key in metadata and (number := _number(metadata[key])) is not None:
            progress[target] = number
    return progress


def consistency_from_metadata(
    metadata: Mapping[str, Any], passed: bool | None = None
) -> dict[str, Any] | None:
    """Verdict and findings by kind from a verification's metadata (or a check's pass/fail)."""
    verdict = _value(metadata.get("verdict")) if "verdict" in metadata else None
    if verdict not in metrics.VERDICTS:
        if passed is None:
            return None
        verdict = "consistent" if passed else "inconsistent"
    findings: dict[str, float] = {}
    for kind, aliases in _FINDING_ALIASES.items():
        for alias in aliases:
            for key in (alias, f"findings/{alias}", f"{alias}/total"):
                if key in metadata and (number := _number(metadata[key])) is not None:
                    findings[kind] = number
    return {"verdict": verdict, "findings": findings}


def _is_consistency_check(check_name: str, metadata: Mapping[str, Any]) -> bool:
    return (
        check_name in CONSISTENCY_CHECKS
        or "consisten" in check_name
        or "verdict" in metadata
        or "verifier_verdict" in metadata
    )


def _offending(metadata: Mapping[str, Any], passed: bool) -> float:
    """A failing check's count of offending keys where its metadata has one, else 1."""
    if passed:
        return 0.0
    counts = _value(metadata.get("counts"))
    if isinstance(counts, Mapping):
        for key in _OFFENDING_COUNT_KEYS:
            number = _number(counts.get(key))
            if number:
                return number
    return 1.0


def run_snapshots(instance: DagsterInstance, run_id: str) -> dict[str, Any]:
    """The entropy, migration and consistency snapshots in one run's events (latest wins)."""
    found: dict[str, Any] = {}
    partitions: tuple[int, int, float] | None = None
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            match = _PARTITION_LOG.search(entry.user_message or "")
            if match:
                partitions = (int(match[1]), int(match[2]), entry.timestamp)
            continue
        if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            metadata = event.event_specific_data.materialization.metadata
            entropy = entropy_from_metadata(metadata)
            if entropy:
                found["entropy"] = (entropy, entry.timestamp)
            migration = migration_from_metadata(metadata)
            if migration is not None:
                migration["progress_timestamp"] = entry.timestamp
                found["migration"] = migration
            if "verdict" in metadata:
                result = consistency_from_metadata(metadata)
                if result is not None:
                    found["consistency"] = {**result, "checked_at": entry.timestamp}
            stage = _value(metadata.get("stage"))
            if stage in rollout.STAGES:
                found["rollout"] = (stage, entry.timestamp)
        elif event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.event_specific_data
            metadata = evaluation.metadata
            if not _is_consistency_check(evaluation.check_name, metadata):
                continue
            if "verdict" in metadata:  # one evaluation carrying a whole verification
                result = consistency_from_metadata(metadata, evaluation.passed)
                if result is not None:
                    found["consistency"] = {**result, "checked_at": entry.timestamp}
                continue
            # one evaluation per gate: the run's verdict is consistent when every gate passed
            gates = found.setdefault("consistency", {"verdict": "consistent", "findings": {}})
            gates["findings"][evaluation.check_name] = _offending(metadata, evaluation.passed)
            gates["checked_at"] = entry.timestamp
            if not evaluation.passed:
                gates["verdict"] = "inconsistent"
    if partitions is not None:
        done, total, at = partitions
        migration = found.setdefault("migration", {"progress_timestamp": at})
        migration.setdefault("partitions_total", float(total))
        if "rows" in migration:  # materialized: every partition is done
            migration.setdefault("partitions_done", migration["partitions_total"])
        else:
            migration["partitions_done"] = float(done)
    return found


# --- pushing ------------------------------------------------------------------------------
def _count_failure(instance: DagsterInstance) -> None:
    storage = instance.run_storage
    current = int(storage.get_cursor_values({PUSH_FAILURES_KEY}).get(PUSH_FAILURES_KEY, "0"))
    storage.set_cursor_values({PUSH_FAILURES_KEY: str(current + 1)})


def push_failures(instance: DagsterInstance) -> int:
    """Failed pushes counted so far in this Dagster instance."""
    values = instance.run_storage.get_cursor_values({PUSH_FAILURES_KEY})
    return int(values.get(PUSH_FAILURES_KEY, "0"))


def _push(
    instance: DagsterInstance,
    log: Any,
    registry: Any,
    job: str,
    grouping_key: Mapping[str, str] | None = None,
    *,
    replace: bool = True,
) -> bool:
    gateway = metrics.pushgateway_address()
    try:
        metrics.push(
            registry,
            job,
            grouping_key,
            replace=replace,
            gateway=gateway,
            timeout=PUSH_TIMEOUT_SECONDS,
        )
    except OSError as exc:  # URLError and HTTPError are OSErrors
        _count_failure(instance)
        log.warning(f"push of {job} {dict(grouping_key or {})} to {gateway} failed: {exc}")
        return False
    return True


def push_job(instance: DagsterInstance, log: Any, job_name: str) -> bool:
    """Push one job's gauges under the grouping key {dagster_job: job_name}."""
    registry = metrics.job_registry(job_summary(instance, job_name))
    return _push(instance, log, registry, metrics.PUSH_JOB_DAGSTER, {"dagster_job": job_name})


def push_snapshots(
    instance: DagsterInstance, log: Any, snapshots: Mapping[str, Any], *, running: bool = False
) -> list[str]:
    """Push the snapshots found in a run's events; returns the names pushed."""
    pushed = []
    now = time.time()
    if "entropy" in snapshots:
        entropy, at = snapshots["entropy"]
        if _push(instance, log, metrics.entropy_registry(entropy, at), metrics.PUSH_JOB_ENTROPY):
            pushed.append("entropy")
    if "migration" in snapshots:
        progress = {**snapshots["migration"], "running": 1.0 if running else 0.0}
        if _push(
            instance, log, metrics.migration_registry(progress, now), metrics.PUSH_JOB_MIGRATION
        ):
            pushed.append("migration")
    if "consistency" in snapshots:
        result = dict(snapshots["consistency"])
        if result["verdict"] == "consistent":
            result["last_success_at"] = result["checked_at"]
        # pushadd: an inconsistent verdict keeps the last success time already on the gateway
        if _push(
            instance,
            log,
            metrics.consistency_registry(result, now),
            metrics.PUSH_JOB_CONSISTENCY,
            replace=False,
        ):
            pushed.append("consistency")
    if "rollout" in snapshots:
        stage, at = snapshots["rollout"]
        if _push(instance, log, metrics.rollout_registry(stage, at), metrics.PUSH_JOB_ROLLOUT):
            pushed.append("rollout")
    return pushed


def _on_run_end(context: dg.RunStatusSensorContext) -> None:
    run = context.dagster_run
    push_job(context.instance, context.log, run.job_name)
    push_snapshots(context.instance, context.log, run_snapshots(context.instance, run.run_id))


def _default_status() -> dg.DefaultSensorStatus:
    if os.environ.get(metrics.PUSHGATEWAY_ENV):
        return dg.DefaultSensorStatus.RUNNING
    return dg.DefaultSensorStatus.STOPPED


@dg.run_status_sensor(
    run_status=DagsterRunStatus.SUCCESS,
    name="kimera_push_on_success",
    description="Push the finished job's gauges and its entropy/migration/consistency snapshots.",
    default_status=_default_status(),
)
def kimera_push_on_success(context: dg.RunStatusSensorContext) -> None:
    _on_run_end(context)


@dg.run_failure_sensor(
    name="kimera_push_on_failure",
    description="Push the failed job's gauges (last outcome, runs by outcome) to the Pushgateway.",
    default_status=_default_status(),
)
def kimera_push_on_failure(context: dg.RunFailureSensorContext) -> None:
    _on_run_end(context)


def _recent_runs(instance: DagsterInstance) -> Sequence[Any]:
    return instance.get_run_records(limit=RECENT_RUNS)


def collect_latest(instance: DagsterInstance) -> tuple[list[str], dict[str, Any], bool]:
    """Job names of recent runs, the latest snapshot of each kind, and whether one is running."""
    jobs: list[str] = []
    latest: dict[str, Any] = {}
    running = False
    for record in _recent_runs(instance):
        run = record.dagster_run
        if not run.job_name.startswith("__") and run.job_name not in jobs:
            jobs.append(run.job_name)
        if run.status not in (*_STATUS_OUTCOME, DagsterRunStatus.STARTED):
            continue
        snapshots = run_snapshots(instance, run.run_id)
        for kind, value in snapshots.items():
            if kind not in latest:
                latest[kind] = value
                if kind == "migration" and run.status == DagsterRunStatus.STARTED:
                    running = True
    return jobs, latest, running


@dg.sensor(
    name="kimera_metrics_sensor",
    minimum_interval_seconds=60,
    description=(
        "Every minute: push every job's gauges, the latest entropy/migration/consistency "
        "snapshots from the event log, a running migration's progress and a heartbeat."
    ),
    default_status=_default_status(),
)
def kimera_metrics_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    instance = context.instance
    jobs, latest, running = collect_latest(instance)
    ok = [job for job in jobs if push_job(instance, context.log, job)]
    pushed = push_snapshots(instance, context.log, latest, running=running)
    heartbeat = metrics.heartbeat_registry(push_failures(instance), time.time())
    beat = _push(instance, context.log, heartbeat, metrics.PUSH_JOB_HEARTBEAT)
    return dg.SkipReason(
        f"pushed {len(ok)}/{len(jobs)} jobs, snapshots {sorted(pushed)}, "
        f"heartbeat {'ok' if beat else 'failed'} (this sensor never launches runs)"
    )


OBSERVABILITY_SENSORS: list[Any] = [
    kimera_push_on_success,
    kimera_push_on_failure,
    kimera_metrics_sensor,
]
