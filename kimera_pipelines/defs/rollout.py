"""The rollout step (gates, backup, stage), the rollout jobs, and the read rollback sensor.

One step, ``rollout`` (a multi-asset over ``database_backup`` and ``rollout_stage``, holding
the gate checks of ``rollout_stage``), does everything that judges or moves the rollout.
What it does follows from what the run selected:

* ``rollout_stage`` (advance_rollout_job, the asset page's Materialize, a schedule, a sensor,
  ``make run``): evaluate the gates (``gates.judge_gates``, ``report.entropy_sanity``); ask
  the core what the advance would move (``rollout.advance_to``, dry run);
  only if a stage moves, back the database up (``database_backup``; retention keeps the
  newest ``backups_kept``); then advance (``rollout.advance_to``). A refused advance is a
  materialization like any other: the stage unchanged, ``outcome`` refused and the gates
  that held it. The gates' results are reported after the materialization, so the check
  pages always show the verdict on the stage as it is. The step-back and read-rollback jobs
  (their ``kimera/rollout-action`` tag, or config ``action``) move back without gates, then
  judge them for the new stage.
* only the gate checks (consistency_check_job and its schedules): judge and report the
  gates; the run fails when one fails.
* only ``database_backup``: a backup on demand.

Because the gates are checks of ``rollout_stage`` evaluated in the step that moves it, every
launch of an advance evaluates them (the UI includes a selected asset's checks that are in
the launching job, and the step judges them even when a launch leaves them out); the
across-runs evidence (past ``verified``: the latest evaluations by the verifying jobs) comes
from Dagster's event log. The rules are ``kimera_core.rollout``'s, so the CLI gets the same.

``auto_rollback_reads`` runs in the daemon and never opens the DuckDB file: it reads the
latest gate evaluations and the latest ``rollout_stage`` materialization, and when a gate
failed while reads come from identities it launches ``rollback_reads_job``, which the run
queue serialises with every other writer and which re-reads the stage before moving it.
"""

import time
from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from kimera_core import rollout
from kimera_core.backup import backup_database
from kimera_core.errors import KimeraError
from kimera_core.gates import judge_gates
from kimera_core.report import entropy_sanity
from kimera_core.rollout import CheckEvidence, Evidence
from kimera_pipelines.defs.consistency import (
    GATE_CHECK_SPECS,
    GATES_METADATA,
    GATES_OP,
    REQUIRED_CHECK_SELECTION,
    REQUIRED_CHECKS,
    VERIFYING_JOBS,
    ConsistencyConfig,
    failed_gates,
    gate_results,
    run_evidence,
)
from kimera_pipelines.metadata import ADVANCE, md_table
from kimera_pipelines.resources import (
    DATABASE_BACKUP,
    IDENTITIES,
    IN_PROCESS,
    KIND_TAG,
    OWNERS,
    POOL,
    ROLLOUT_BACKUP_SUFFIX,
    ROLLOUT_STAGE,
    KimeraDatabase,
    folder_bytes,
)

ROLLOUT = {"group_name": "rollout", "kinds": {"duckdb"}, "owners": OWNERS}
ACTION_TAG = "kimera/rollout-action"  # set by the step-back and rollback-reads jobs
AUTO_ROLLBACK_TAG = "kimera/auto-rollback"  # on the runs auto_rollback_reads launches
ACTIONS = ("advance", "step_back", "rollback_reads")
FINISHED = ("SUCCEEDED", "FAILED")  # check execution statuses that carry a verdict
HISTORY_SHOWN = 8


# --- evidence from other runs: the gates' evaluations, from Dagster's event log -----------
def _evaluations(instance: dg.DagsterInstance, name: str) -> list:
    return instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(ROLLOUT_STAGE, name), limit=50
    )


def latest_check_evaluations(
    instance: dg.DagsterInstance,
    *,
    exclude_run: str | None = None,
    job_names: tuple[str, ...] | None = None,
    names: tuple[str, ...] = REQUIRED_CHECKS,
) -> list[CheckEvidence]:
    """The latest completed evaluation of each gate (by ``job_names`` only, when given)."""
    found: list[CheckEvidence] = []
    jobs: dict[str, str | None] = {}
    for name in names:
        for record in _evaluations(instance, name):
            if record.status.value not in FINISHED:
                continue
            if exclude_run and record.run_id == exclude_run:
                continue
            if job_names:
                if record.run_id not in jobs:
                    run = instance.get_run_by_id(record.run_id)
                    jobs[record.run_id] = run.job_name if run else None
                if jobs[record.run_id] not in job_names:
                    continue
            passed = record.status.value == "SUCCEEDED"
            found.append(CheckEvidence(name, passed, record.run_id, record.create_timestamp))
            break
    return found


# --- the assets and their step ---------------------------------------------------------------
BACKUP_SPEC = dg.AssetSpec(
    DATABASE_BACKUP,
    skippable=True,
    description=(
        "A verified backup of the whole database (Parquet export with a checksum manifest), "
        "taken before a rollout advance that moves a stage (never for a refused one), or on "
        "demand by materializing this asset alone. The newest backups_kept (database "
        "resource, default 5) are kept; older rollout backups are deleted."
    ),
    **ROLLOUT,
)
STAGE_SPEC = dg.AssetSpec(
    ROLLOUT_STAGE,
    deps=[IDENTITIES, DATABASE_BACKUP],
    skippable=True,
    description=(
        "The live rollout stage (legacy-only -> dual-write -> backfilled -> verified -> "
        "read-new -> write-new -> legacy-retired), stored in the database with its history. "
        "Materializing it advances: its checks (the gates) are evaluated in the same step, "
        "then the stage moves as far as they allow; past verified the latest consistency-job "
        "gates must have passed too. A refused advance materializes the "
        "unchanged stage and says why. Stepping back is always allowed (step_back_rollout_job)."
    ),
    **ROLLOUT,
)


class RolloutConfig(ConsistencyConfig):
    """What the rollout step does: which action, up to where, who and why."""

    action: str = Field(
        default="",
        description=(
            "advance | step_back | rollback_reads; empty: the job's own (advance from "
            "advance_rollout_job and the asset page)."
        ),
    )
    target: str = Field(
        default="",
        description="Advance up to this stage, stopping at the first gate that holds; "
        "empty: one stage.",
    )
    actor: str = Field(
        default="dagster", description="Who acts: recorded in the stage history and journals."
    )
    reason: str = Field(default="", description="Why: recorded in the stage history.")


def _backup(context: dg.AssetExecutionContext, database: KimeraDatabase) -> dict:
    """A backup now, then retention; the metadata of its materialization."""
    target = database.new_backup_path(context.run.run_id, ROLLOUT_BACKUP_SUFFIX)
    manifest = backup_database(database.path, target)
    pruned = database.prune_rollout_backups()
    size = folder_bytes(target)
    context.log.info(f"backup {target.name}: {size / 1e6:,.1f} MB, pruned {len(pruned)}")
    return {
        "path": dg.MetadataValue.path(str(target.resolve())),
        "tables": dg.MetadataValue.int(len(manifest.tables)),
        "rows": dg.MetadataValue.int(sum(t.rows for t in manifest.tables.values())),
        "size_bytes": dg.MetadataValue.int(size),
        "backups_kept": dg.MetadataValue.int(database.backups_kept),
        "pruned": dg.MetadataValue.json([p.name for p in pruned]),
        "restore": dg.MetadataValue.text(
            f"kimera db restore --from {target} --db {database.path} --force"
        ),
    }


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


def _stage_result(con, action: str, outcome: str, extra: dict) -> dg.MaterializeResult:
    stage = rollout.get_stage(con)
    route = rollout.routing(stage)
    return dg.MaterializeResult(
        asset_key=ROLLOUT_STAGE,
        metadata={
            "stage": dg.MetadataValue.text(stage),
            "reads_from": dg.MetadataValue.text(route.read),
            "writes_to": dg.MetadataValue.text(route.write),
            "action": dg.MetadataValue.text(action),
            "outcome": dg.MetadataValue.text(outcome),
            **extra,
            "history": _history_table(rollout.stage_history(con)[-HISTORY_SHOWN:]),
        },
    )


def _advance(
    context: dg.AssetExecutionContext, config: RolloutConfig, database: KimeraDatabase
) -> Iterator:
    run_id = context.run.run_id
    target, reason = config.target or None, config.reason or None
    scheduled = latest_check_evaluations(
        context.instance, exclude_run=run_id, job_names=VERIFYING_JOBS
    )
    with database.get_connection() as con:
        judged = judge_gates(con, incremental=config.incremental, sample=config.sample)
        sanity = entropy_sanity(con, config.sample)
        now = time.time()
        evidence = Evidence(
            run_id, REQUIRED_CHECKS, run_evidence(judged, sanity, run_id, now), tuple(scheduled)
        )
        plan = rollout.advance_to(con, target, evidence, config.actor, reason, dry_run=True)
    backup: dict = {}
    if plan.moved_through:  # a backup only when a stage moves
        backup = _backup(context, database)
        if DATABASE_BACKUP in context.selected_asset_keys:
            yield dg.MaterializeResult(asset_key=DATABASE_BACKUP, metadata=backup)
    with database.get_connection() as con:
        result = rollout.advance_to(con, target, evidence, config.actor, reason)
        if result.refused:
            outcome = f"refused at {result.stage}: " + "; ".join(result.held_by)
            context.log.warning(f"advance {outcome}")
        elif result.held_by:
            outcome = f"moved to {result.stage}, then held: " + "; ".join(result.held_by)
        else:
            outcome = f"moved to {result.stage}" if result.moved_through else "already there"
        gates = [
            [n, "passed" if n not in failed_gates(judged, sanity) else "FAILED"]
            for n in REQUIRED_CHECKS
        ]
        yield _stage_result(
            con,
            "advance",
            outcome,
            {
                ADVANCE: dg.MetadataValue.json(result.to_dict()),
                "moved_through": dg.MetadataValue.json(list(result.moved_through)),
                "held_by": dg.MetadataValue.json(list(result.held_by)),
                "gates": md_table(["gate (this run)", "verdict"], gates),
                "backup": backup.get("path", dg.MetadataValue.text("none: nothing moved")),
            },
        )
    # after the materialization: the check pages show the gates of the stage as it is now
    yield from gate_results(judged, sanity, context.selected_asset_check_keys)


def _move_back(
    context: dg.AssetExecutionContext, action: str, config: RolloutConfig, database
) -> Iterator:
    with database.get_connection() as con:
        if action == "step_back":
            moved = rollout.step_back(con, config.actor, config.reason or "step back")
            outcome = f"moved back to {moved}"
        else:
            back = rollout.rollback_reads(
                con, config.actor, config.reason or "reads back to legacy"
            )
            outcome = "reads already come from legacy" if back is None else f"moved to {back}"
        context.log.info(outcome)
        yield _stage_result(con, action, outcome, {})
        checks = context.selected_asset_check_keys
        if checks:  # judged after the move, which they never hold: what the new stage stands on
            judged = judge_gates(con, incremental=config.incremental, sample=config.sample)
            yield from gate_results(judged, entropy_sanity(con, config.sample), checks)


def _gates_only(
    context: dg.AssetExecutionContext, config: RolloutConfig, database: KimeraDatabase
) -> Iterator:
    with database.get_connection() as con:
        judged = judge_gates(con, incremental=config.incremental, sample=config.sample)
        sanity = entropy_sanity(con, config.sample)
    verification = judged.verification
    context.log.info(
        f"verifier: {verification.verdict} ({verification.mode}) {verification.reasons}"
    )
    yield from gate_results(judged, sanity, context.selected_asset_check_keys)
    failed = failed_gates(judged, sanity)
    if failed:
        raise dg.Failure(
            description=f"{len(failed)} of {len(REQUIRED_CHECKS)} gates failed: "
            f"{', '.join(failed)} (the checks of rollout_stage say why)"
        )


@dg.multi_asset(
    name=GATES_OP,
    specs=[BACKUP_SPEC, STAGE_SPEC],
    check_specs=GATE_CHECK_SPECS,
    can_subset=True,
    pool=POOL,
    description=(
        "The rollout step: evaluate the gates, then advance, step back, roll reads back or "
        "back up, depending on what the run selected (docs/runbook.md)."
    ),
)
def rollout_step(
    context: dg.AssetExecutionContext, config: RolloutConfig, database: KimeraDatabase
):
    selected = context.selected_asset_keys
    action = config.action or context.run.tags.get(ACTION_TAG, "advance")
    try:
        if ROLLOUT_STAGE in selected:
            if action not in ACTIONS:
                raise dg.Failure(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
            if action == "advance":
                yield from _advance(context, config, database)
            else:
                yield from _move_back(context, action, config, database)
        elif DATABASE_BACKUP in selected:
            yield dg.MaterializeResult(
                asset_key=DATABASE_BACKUP, metadata=_backup(context, database)
            )
        else:
            yield from _gates_only(context, config, database)
    except KimeraError as exc:  # a refusal or a database that cannot be used: one line
        raise dg.Failure(description=str(exc)) from None


# --- jobs --------------------------------------------------------------------------------
advance_rollout_job = dg.define_asset_job(
    name="advance_rollout_job",
    selection=dg.AssetSelection.assets(DATABASE_BACKUP, ROLLOUT_STAGE) | REQUIRED_CHECK_SELECTION,
    description=(
        "Evaluate the gates (the checks of rollout_stage), then advance the rollout one stage "
        "(or up to config rollout.target) as far as they allow, with a backup first when a "
        "stage moves. A refused advance succeeds with the unchanged stage and the reasons."
    ),
    executor_def=IN_PROCESS,
    tags={KIND_TAG: "rollout"},
    metadata=GATES_METADATA,
)

step_back_rollout_job = dg.define_asset_job(
    name="step_back_rollout_job",
    selection=dg.AssetSelection.assets(ROLLOUT_STAGE),
    description=(
        "Move the rollout back one stage (always allowed; recorded with actor and reason), "
        "then evaluate the gates of the new stage (they never hold a step back)."
    ),
    executor_def=IN_PROCESS,
    tags={KIND_TAG: "rollout", ACTION_TAG: "step_back"},
)

rollback_reads_job = dg.define_asset_job(
    name="rollback_reads_job",
    selection=dg.AssetSelection.assets(ROLLOUT_STAGE),
    description=(
        "Serve reads from the legacy store again (read-new -> verified), then evaluate the "
        "gates of the new stage. Launched by the auto_rollback_reads sensor when a gate fails "
        "while reads come from identities."
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
        "When a gate (a check of rollout_stage) fails while reads are served from identities "
        "(read-new), launch rollback_reads_job to serve reads from legacy again. Running by "
        "default: safe, legacy still receives every write at read-new. From write-new on it "
        "only alerts (legacy is stale): follow docs/runbook.md."
    ),
)
def auto_rollback_reads(context: dg.SensorEvaluationContext):
    latest = latest_check_evaluations(context.instance, names=REQUIRED_CHECKS)
    failed = [c for c in latest if not c.passed]
    newest = max((c.at or 0.0 for c in failed), default=0.0)
    if not failed:
        return dg.SkipReason("latest gate evaluations passed")
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
                GATES_OP: {
                    "config": {
                        "action": "rollback_reads",
                        "actor": "sensor:auto_rollback_reads",
                        "reason": reason,
                    }
                }
            }
        },
        tags={AUTO_ROLLBACK_TAG: "reads", "kimera/failed-checks": names},
    )


defs = dg.Definitions(
    assets=[rollout_step],
    jobs=[advance_rollout_job, step_back_rollout_job, rollback_reads_job],
    sensors=[auto_rollback_reads],
)
