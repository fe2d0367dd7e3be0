"""The rollout: the backup before a move, the live stage, its jobs, and the read rollback sensor.

``rollout_stage`` reads like the operator's sentence: open the database, gather the evidence
(the blocking checks of this run and, past verified, of the consistency job, both from
Dagster's event log), and call one core function: ``rollout.advance_to`` (advance until the
target or a gate holds), ``step_back`` or ``rollback_reads``. The gates themselves live in
``kimera_core.rollout``, so the CLI and Dagster enforce the same rules.

``auto_rollback_reads`` runs in the daemon and never opens the DuckDB file: it reads the
latest check evaluations and the latest ``rollout_stage`` materialization, and when a check
failed while reads come from identities it launches ``rollback_reads_job``, which the run
queue serialises with every other writer and which re-reads the stage before moving it.
"""

import time

import dagster as dg

from kimera_core import rollout
from kimera_core.backup import backup_database
from kimera_core.rollout import CheckEvidence, Evidence
from kimera_pipelines.defs.consistency import (
    CONSISTENCY_JOB,
    REQUIRED_CHECK_SELECTION,
    REQUIRED_CHECKS,
)
from kimera_pipelines.metadata import md_table
from kimera_pipelines.resources import (
    IDENTITIES,
    IN_PROCESS,
    KIND_TAG,
    OWNERS,
    POOL,
    KimeraDatabase,
)

ROLLOUT = {"group_name": "rollout", "kinds": {"duckdb"}, "owners": OWNERS, "pool": POOL}
ROLLOUT_STAGE = dg.AssetKey("rollout_stage")
ACTION_TAG = "kimera/rollout-action"  # set by the step-back and rollback-reads jobs
FINISHED = ("SUCCEEDED", "FAILED")  # check execution statuses that carry a verdict
HISTORY_SHOWN = 8


# --- evidence: the blocking checks, from Dagster's event log -----------------------------
def _evaluations(instance: dg.DagsterInstance, name: str) -> list:
    return instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(IDENTITIES, name), limit=50
    )


def _evidence(name: str, record) -> CheckEvidence:
    return CheckEvidence(
        name, record.status.value == "SUCCEEDED", record.run_id, record.create_timestamp
    )


def latest_check_evaluations(
    instance: dg.DagsterInstance,
    *,
    exclude_run: str | None = None,
    job_name: str | None = None,
    names: tuple[str, ...] = REQUIRED_CHECKS,
) -> list[CheckEvidence]:
    """The latest completed evaluation of each identities check, from Dagster's event log."""
    found: list[CheckEvidence] = []
    jobs: dict[str, str | None] = {}
    for name in names:
        for record in _evaluations(instance, name):
            if record.status.value not in FINISHED:
                continue
            if exclude_run and record.run_id == exclude_run:
                continue
            if job_name:
                if record.run_id not in jobs:
                    run = instance.get_run_by_id(record.run_id)
                    jobs[record.run_id] = run.job_name if run else None
                if jobs[record.run_id] != job_name:
                    continue
            found.append(_evidence(name, record))
            break
    return found


def run_check_evaluations(instance: dg.DagsterInstance, run_id: str) -> list[CheckEvidence]:
    """The identities checks evaluated in one run."""
    found = []
    for name in REQUIRED_CHECKS:
        for record in _evaluations(instance, name):
            if record.run_id == run_id and record.status.value in FINISHED:
                found.append(_evidence(name, record))
                break
    return found


def rollout_evidence(instance: dg.DagsterInstance, run_id: str) -> Evidence:
    """What an advance in ``run_id`` rests on: this run's checks and the consistency job's."""
    return Evidence(
        run_id=run_id,
        required=REQUIRED_CHECKS,
        run_checks=tuple(run_check_evaluations(instance, run_id)),
        scheduled_checks=tuple(
            latest_check_evaluations(instance, exclude_run=run_id, job_name=CONSISTENCY_JOB)
        ),
    )


# --- assets ------------------------------------------------------------------------------
@dg.asset(
    description=(
        "A verified backup of the whole database (Parquet export with a checksum manifest), "
        "taken before every rollout advance."
    ),
    **ROLLOUT,
)
def database_backup(
    context: dg.AssetExecutionContext, database: KimeraDatabase
) -> dg.MaterializeResult:
    target = database.new_backup_path(context.run.run_id)
    manifest = backup_database(database.path, target)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(target.resolve())),
            "tables": dg.MetadataValue.int(len(manifest.tables)),
            "rows": dg.MetadataValue.int(sum(t.rows for t in manifest.tables.values())),
            "restore": dg.MetadataValue.text(
                f"kimera db restore --from {target} --db {database.path} --force"
            ),
        }
    )


class RolloutConfig(dg.Config):
    """What to do with the rollout stage."""

    action: str = ""  # advance | step_back | rollback_reads; default: the job's tag, else advance
    target: str = ""  # advance up to this stage (default: the next one)
    actor: str = "dagster"
    reason: str = ""


def _history_table(history: list[dict[str, object]]) -> dg.MetadataValue:
    return md_table(
        ["at (UTC)", "from", "to", "actor", "reason"],
        [
            [
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h["at"])),
                h["from_stage"],
                h["to_stage"],
                h["actor"],
                h["reason"] or "",
            ]
            for h in history
        ],
    )


@dg.asset(
    deps=[IDENTITIES, database_backup],
    description=(
        "The live rollout stage (legacy-only -> dual-write -> backfilled -> verified -> "
        "read-new -> write-new -> legacy-retired), stored in the database with its history. "
        "Advances only through a run whose blocking checks passed; past verified also needs "
        "the latest consistency-job checks passed. Stepping back is always allowed."
    ),
    **ROLLOUT,
)
def rollout_stage(
    context: dg.AssetExecutionContext, config: RolloutConfig, database: KimeraDatabase
) -> dg.MaterializeResult:
    reason = config.reason or None
    action = config.action or context.run.tags.get(ACTION_TAG, "advance")
    moved: list[str] = []
    held: list[str] = []
    with database.get_connection() as con:
        if action == "advance":
            evidence = rollout_evidence(context.instance, context.run.run_id)
            result = rollout.advance_to(con, config.target or None, evidence, config.actor, reason)
            if result.refused:
                raise dg.Failure(
                    description=f"advance from {result.stage} refused: "
                    + "; ".join(result.held_by),
                    metadata={"stage": result.stage, "refused": list(result.held_by)},
                )
            moved, held = list(result.moved_through), list(result.held_by)
        elif action == "step_back":
            moved.append(rollout.step_back(con, config.actor, reason or "step back"))
        elif action == "rollback_reads":
            back = rollout.rollback_reads(con, config.actor, reason or "reads back to legacy")
            if back is None:
                context.log.info("reads already come from the legacy store: nothing to do")
            else:
                moved.append(back)
        else:
            raise dg.Failure(f"unknown action {action!r}: advance, step_back, rollback_reads")
        stage = rollout.get_stage(con)
        history = rollout.stage_history(con)[-HISTORY_SHOWN:]
    route = rollout.routing(stage)
    return dg.MaterializeResult(
        metadata={
            "stage": dg.MetadataValue.text(stage),
            "reads_from": dg.MetadataValue.text(route.read),
            "writes_to": dg.MetadataValue.text(route.write),
            "moved_through": dg.MetadataValue.json(moved),
            "held_by": dg.MetadataValue.json(held),
            "history": _history_table(history),
        }
    )


# --- jobs --------------------------------------------------------------------------------
advance_rollout_job = dg.define_asset_job(
    name="advance_rollout_job",
    selection=dg.AssetSelection.assets(database_backup, rollout_stage) | REQUIRED_CHECK_SELECTION,
    description=(
        "Back up the database, run the blocking checks, then advance the rollout one stage "
        "(or up to rollout_stage.config.target) as far as the gates allow. A failing check "
        "stops the run before rollout_stage."
    ),
    executor_def=IN_PROCESS,
    tags={KIND_TAG: "rollout"},
)

step_back_rollout_job = dg.define_asset_job(
    name="step_back_rollout_job",
    selection=dg.AssetSelection.assets(rollout_stage),
    description="Move the rollout back one stage (always allowed; recorded with actor and reason).",
    executor_def=IN_PROCESS,
    tags={KIND_TAG: "rollout", ACTION_TAG: "step_back"},
)

rollback_reads_job = dg.define_asset_job(
    name="rollback_reads_job",
    selection=dg.AssetSelection.assets(rollout_stage),
    description=(
        "Serve reads from the legacy store again (read-new -> verified). Launched by the "
        "auto_rollback_reads sensor when consistency checks fail while reads come from identities."
    ),
    executor_def=IN_PROCESS,
    tags={KIND_TAG: "rollout", ACTION_TAG: "rollback_reads"},
)


# --- the automatic read rollback ---------------------------------------------------------
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
    latest = latest_check_evaluations(context.instance, names=REQUIRED_CHECKS)
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
    if rollout.routing(stage).read != "new":
        return dg.SkipReason(f"checks failed ({names}); reads already come from legacy ({stage})")
    context.update_cursor(str(newest))
    if not rollout.reads_can_fall_back(stage):
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


defs = dg.Definitions(
    assets=[database_backup, rollout_stage],
    jobs=[advance_rollout_job, step_back_rollout_job, rollback_reads_job],
    sensors=[auto_rollback_reads],
)
