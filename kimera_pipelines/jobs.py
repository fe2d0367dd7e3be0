"""Jobs: migration, consistency checks, entropy report, rollout advance and the rollbacks.

Every job runs in-process: DuckDB allows one writer process per file, so a run's steps
share one process and hold a connection one step at a time.
"""

import dagster as dg

from kimera_core.backup import backup_database
from kimera_core.migration import rollback as rollback_migration_runs
from kimera_core.rollout import get_stage, routing
from kimera_pipelines.assets import (
    ACTION_TAG,
    database_backup,
    effective_tau_distribution,
    entropy_daily_series,
    entropy_distribution,
    entropy_distribution_report,
    identities,
    legacy_tables,
    migration_quarantine,
    rollout_stage,
)
from kimera_pipelines.checks import CONSISTENCY_JOB, REQUIRED_CHECK_KEYS
from kimera_pipelines.resources import KimeraDatabase

IN_PROCESS = dg.in_process_executor
REQUIRED_CHECKS = dg.AssetSelection.checks(*REQUIRED_CHECK_KEYS)

migration_job = dg.define_asset_job(
    name="migration_job",
    selection=dg.AssetSelection.assets(identities, migration_quarantine) - REQUIRED_CHECKS,
    description=(
        "Migrate the selected hash buckets of the legacy tables into identities (launch a "
        "backfill of some or all partitions: one run, geoids first), check the run's "
        "reconciliation, and summarise the quarantine. Never retried automatically: a failed "
        "migration is resumed or rolled back by an operator."
    ),
    executor_def=IN_PROCESS,
    tags={"dagster/max_retries": "0", "kimera/kind": "migration"},
)

observe_legacy_job = dg.define_asset_job(
    name="observe_legacy_job",
    selection=dg.AssetSelection.assets(legacy_tables),
    description="Observe the legacy tables: row counts, last updated_at, checksums.",
    executor_def=IN_PROCESS,
)

consistency_check_job = dg.define_asset_job(
    name=CONSISTENCY_JOB,
    selection=REQUIRED_CHECKS,
    description=(
        "Run the blocking consistency checks and the entropy sanity check on identities, alone "
        "(no materialization). Config consistency_checks.incremental: only keys written since "
        "the last verification."
    ),
    executor_def=IN_PROCESS,
    tags={"kimera/kind": "consistency"},
)

entropy_report_job = dg.define_asset_job(
    name="entropy_report_job",
    selection=dg.AssetSelection.assets(
        entropy_distribution,
        effective_tau_distribution,
        entropy_daily_series,
        entropy_distribution_report,
    ),
    description="Compute the entropy statistics of identities and write the entropy report.",
    executor_def=IN_PROCESS,
)

advance_rollout_job = dg.define_asset_job(
    name="advance_rollout_job",
    selection=dg.AssetSelection.assets(database_backup, rollout_stage) | REQUIRED_CHECKS,
    description=(
        "Back up the database, run the blocking checks, then advance the rollout one stage "
        "(or up to rollout_stage.config.target) as far as the gates allow. A failing check "
        "stops the run before rollout_stage."
    ),
    executor_def=IN_PROCESS,
    tags={"kimera/kind": "rollout"},
)

step_back_rollout_job = dg.define_asset_job(
    name="step_back_rollout_job",
    selection=dg.AssetSelection.assets(rollout_stage),
    description="Move the rollout back one stage (always allowed; recorded with actor and reason).",
    executor_def=IN_PROCESS,
    tags={"kimera/kind": "rollout", ACTION_TAG: "step_back"},
)

rollback_reads_job = dg.define_asset_job(
    name="rollback_reads_job",
    selection=dg.AssetSelection.assets(rollout_stage),
    description=(
        "Serve reads from the legacy store again (read-new -> verified). Launched by the "
        "auto_rollback_reads sensor when consistency checks fail while reads come from identities."
    ),
    executor_def=IN_PROCESS,
    tags={"kimera/kind": "rollout", ACTION_TAG: "rollback_reads"},
)


@dg.op(
    description="Back up the database before the migration is rolled back.", pool="kimera_duckdb"
)
def backup_before_rollback(context: dg.OpExecutionContext, database: KimeraDatabase) -> str:
    target = database.new_backup_path(context.run.run_id, "-pre-rollback")
    backup_database(database.path, target)
    return str(target)


class MigrationRollbackConfig(dg.Config):
    """Roll back one migration run (newest first), or every run when empty."""

    run_id: str = ""


@dg.op(
    description=(
        "Undo migration runs from their journal (inserted rows deleted, updated rows restored). "
        "Refused while reads are served from identities."
    ),
    pool="kimera_duckdb",
)
def rollback_migration(
    context: dg.OpExecutionContext,
    config: MigrationRollbackConfig,
    database: KimeraDatabase,
    backup: str,
) -> dict:
    with database.connect() as con:
        stage = get_stage(con)
        if routing(stage).read == "new":
            raise dg.Failure(
                f"stage {stage} reads from identities: step the rollout back to verified or "
                "earlier before rolling the migration back"
            )
        report = rollback_migration_runs(con, config.run_id or None)
    context.log.info(
        f"rolled back {report.runs}: deleted {report.deleted}, restored {report.restored}"
    )
    return report.to_dict()


@dg.job(
    description="Roll back the migration (one run or all), after a backup.",
    executor_def=IN_PROCESS,
    tags={"dagster/max_retries": "0", "kimera/kind": "migration"},
)
def rollback_migration_job():
    rollback_migration(backup_before_rollback())
