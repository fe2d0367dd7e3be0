"""The migration: identities backfilled by hash bucket, the quarantine, the rollback job.

``identities`` is partitioned by the migration's hash bucket; one run (a backfill of some or
all partitions, ``BackfillPolicy.single_run``) migrates the selected buckets, geoids first.
The run's ``MigrationReport`` is published whole (``MIGRATION_REPORT``) beside the run's
totals (``run_*``); each partition's materialization carries that partition's own counts
(``legacy_rows``, ``inserted``, ...), so the UI's per-partition plots are true. The unit of
work is the partition (one hash bucket, what the UI shows); a run migrates the geoids of
every selected partition, then their scars, one step each, and every finished step is an
``AssetObservation`` of identities with that step's own counts (``MIGRATION_PARTITION``) and
``steps_done`` of ``steps_planned``, which the metrics sensor reads while the run is still
going. The reconciliation check comes back with the materialization and balances the run.

``rollback_migration_job`` backs the database up, then undoes runs from their journal;
``kimera_core.migration.rollback`` refuses while reads come from identities, so this job,
the CLI and any other caller get the same rule and the same one-line reason.
"""

from dataclasses import asdict

import dagster as dg

from kimera_core.backup import backup_database
from kimera_core.errors import KimeraError
from kimera_core.migration import (
    WAITING_KIND,
    MigrationCounts,
    MigrationReport,
    PartitionCounts,
    migrate_buckets,
    quarantine_summary,
    rollback,
)
from kimera_pipelines.metadata import (
    MIGRATION_PARTITION,
    MIGRATION_REPORT,
    STEPS_DONE,
    STEPS_PLANNED,
    md_table,
)
from kimera_pipelines.resources import (
    ALL_BUCKETS_TAGS,
    IN_PROCESS,
    KIND_TAG,
    MIGRATION_BUCKETS,
    NEVER_RETRY,
    OWNERS,
    POOL,
    KimeraDatabase,
    bucket_partitions,
)

MIGRATION = {"group_name": "identities", "kinds": {"duckdb"}, "owners": OWNERS, "pool": POOL}
# Keys a run quarantined that identities holds anyway: the migration counts their rows as
# quarantined, the gates as present (quarantined_in_identities), so both sides can be read.
QUARANTINED_IN_IDENTITIES_SQL = """
SELECT count(DISTINCT q.key) FROM kimera_quarantine q
WHERE q.run_id = ? AND q.key IN (SELECT id FROM identities)
"""


def _step_observation(
    done: int, planned: int, kind: str, bucket: int, counts: MigrationCounts
) -> dg.AssetObservation:
    """One finished step of the run (one table of one partition), with its own counts."""
    return dg.AssetObservation(
        asset_key="identities",
        partition=str(bucket),
        metadata={
            MIGRATION_PARTITION: dg.MetadataValue.json(
                PartitionCounts(kind, bucket, counts).to_dict()
            ),
            STEPS_DONE: dg.MetadataValue.int(done),
            STEPS_PLANNED: dg.MetadataValue.int(planned),
        },
        description=(
            f"partition {bucket}: {kind}s migrated, {counts.read:,} read (step {done} of "
            f"{planned}: the geoids of every selected partition, then their scars)"
        ),
    )


def partition_counts(report: MigrationReport) -> dict[int, dict[str, int]]:
    """Each migrated partition's own counts (geoids and scars of its bucket added up).

    A run also judges again the scars other buckets' runs left waiting for their geoids
    (``WAITING_KIND`` entries); those rows belong to partitions the run may not target, so
    they count in the run's totals only, never in a partition's own metadata.
    """
    own: dict[int, MigrationCounts] = {}
    for part in report.partition_counts:
        if part.kind == WAITING_KIND:
            continue
        own.setdefault(part.bucket, MigrationCounts()).add(part.counts)
    return {b: {"legacy_rows": c.read, **asdict(c)} for b, c in own.items()}


@dg.asset(
    partitions_def=bucket_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["legacy_geoids", "legacy_scars"],
    check_specs=[
        dg.AssetCheckSpec(
            "migration_reconciliation",
            asset="identities",
            blocking=True,
            description=(
                "The migration run balances: legacy rows of the selected buckets = migrated "
                "(inserted + updated) + already present (unchanged + kept) + quarantined."
            ),
        )
    ],
    description=(
        "The unified identities table, backfilled from legacy_geoids and legacy_scars by the "
        "set-based migration. Partitioned by the migration's hash bucket: one run migrates the "
        "selected buckets, geoids first, then scars."
    ),
    **MIGRATION,
)
def identities(context: dg.AssetExecutionContext, database: KimeraDatabase) -> dg.MaterializeResult:
    buckets = sorted(int(k) for k in context.partition_keys)
    with database.get_connection() as con:
        report = migrate_buckets(
            con,
            buckets,
            partitions=MIGRATION_BUCKETS,
            on_partition=lambda *progress: context.log_event(_step_observation(*progress)),
        )
    c = report.counts
    counts = {"legacy_rows": report.legacy_rows, **asdict(c)}  # the run's six row counts
    equation = (
        f"legacy {report.legacy_rows:,} = migrated {c.changes:,} + already present "
        f"{c.already_present:,} + quarantined {c.quarantined:,}"
    )
    # each partition's materialization carries its own counts, not the run's totals
    for bucket, own in partition_counts(report).items():
        context.add_asset_metadata(
            {k: dg.MetadataValue.int(v) for k, v in own.items()}, partition_key=str(bucket)
        )
    return dg.MaterializeResult(
        metadata={
            MIGRATION_REPORT: dg.MetadataValue.json(report.to_dict()),
            "migration_run_id": dg.MetadataValue.text(report.run_id),
            "buckets": dg.MetadataValue.json(buckets),
            "run_counts": dg.MetadataValue.json(counts),
            "run_totals": dg.MetadataValue.text(equation),
            "balanced": dg.MetadataValue.bool(report.balanced),
            "run_rows_per_second": dg.MetadataValue.float(round(report.rows_per_second, 1)),
            "run_seconds": dg.MetadataValue.float(round(report.seconds, 3)),
            "identities_rows": dg.MetadataValue.int(report.identities_checksum["rows"]),
            "identities_checksum": dg.MetadataValue.text(report.identities_checksum["checksum"]),
            "quarantine_reasons": dg.MetadataValue.json(report.quarantine_reasons),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="migration_reconciliation",
                passed=report.balanced,
                description=equation if report.balanced else f"does not balance: {equation}",
                metadata={
                    "counts": dg.MetadataValue.json(counts),
                    "migration_run_id": dg.MetadataValue.text(report.run_id),
                },
            )
        ],
    )


@dg.asset(
    deps=[identities],
    description=(
        "Legacy rows the latest migration run could not migrate, with counts by reason and "
        "sample keys (table kimera_quarantine; docs/migration.md says what to do per reason), "
        "and how many of their keys identities already holds (the gates count those as "
        "present, so their quarantine count is the rest)."
    ),
    **MIGRATION,
)
def migration_quarantine(database: KimeraDatabase) -> dg.MaterializeResult:
    with database.get_connection(read_only=True) as con:
        summary = quarantine_summary(con, sample=5)
        held = con.execute(QUARANTINED_IN_IDENTITIES_SQL, [summary["run_id"]]).fetchone()[0]
    reasons = summary["reasons"]
    rows = [[k, v["rows"], ", ".join(v["sample_keys"])] for k, v in reasons.items()]
    total = summary["total"]
    return dg.MaterializeResult(
        metadata={
            "migration_run_id": dg.MetadataValue.text(str(summary["run_id"])),
            "quarantined": dg.MetadataValue.int(total),
            "quarantined_in_identities": dg.MetadataValue.int(held),
            "quarantined_not_in_identities": dg.MetadataValue.int(total - held),
            "accounting": dg.MetadataValue.text(
                f"{total:,} rows quarantined by this run; identities already holds "
                f"{held:,} of their keys (written before the migration, e.g. by the dual "
                f"write), which the gates count as present: their quarantine count is "
                f"{total - held:,}"
            ),
            "by_reason": dg.MetadataValue.json({k: v["rows"] for k, v in reasons.items()}),
            "reasons": md_table(["reason", "rows", "sample keys"], rows),
        }
    )


migration_job = dg.define_asset_job(
    name="migration_job",
    # identities and its own reconciliation check; not the consistency checks on identities
    selection=dg.AssetSelection.assets(identities, migration_quarantine).without_checks()
    | dg.AssetSelection.checks(dg.AssetCheckKey(identities.key, "migration_reconciliation")),
    description=(
        "Migrate the selected hash buckets of the legacy tables into identities (launch a "
        "backfill of some or all partitions: one run, geoids first), check the run's "
        "reconciliation, and summarise the quarantine. Never retried automatically: a failed "
        "migration is resumed or rolled back by an operator."
    ),
    executor_def=IN_PROCESS,
    tags={**NEVER_RETRY, KIND_TAG: "migration"},
)


@dg.schedule(
    name="migration_nightly",
    job=migration_job,
    cron_schedule="0 1 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description=(
        "Re-run the migration over every bucket nightly at 01:00 UTC (idempotent: picks up rows "
        "written to legacy only). Stopped by default: it writes identities; start it only in "
        "the dual-write stages, and stop it before write-new."
    ),
)
def migration_nightly(context: dg.ScheduleEvaluationContext):
    return dg.RunRequest(run_key=None, tags=ALL_BUCKETS_TAGS)


# --- rollback ----------------------------------------------------------------------------
@dg.op(description="Back up the database before the migration is rolled back.", pool=POOL)
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
    pool=POOL,
)
def rollback_migration(
    context: dg.OpExecutionContext,
    config: MigrationRollbackConfig,
    database: KimeraDatabase,
    backup: str,
) -> dict:
    with database.get_connection() as con:
        try:
            report = rollback(con, config.run_id or None)
        except KimeraError as exc:  # a refusal: its one line is the whole story
            raise dg.Failure(description=str(exc)) from None
    context.log.info(
        f"rolled back {report.runs}: deleted {report.deleted}, restored {report.restored}"
    )
    return report.to_dict()


@dg.job(
    description="Roll back the migration (one run or all), after a backup.",
    executor_def=IN_PROCESS,
    tags={**NEVER_RETRY, KIND_TAG: "migration"},
)
def rollback_migration_job():
    rollback_migration(backup_before_rollback())


defs = dg.Definitions(
    assets=[identities, migration_quarantine],
    jobs=[migration_job, rollback_migration_job],
    schedules=[migration_nightly],
)
