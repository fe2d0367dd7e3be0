"""Assets: the legacy tables (observed), identities (migrated by bucket), the quarantine,
entropy statistics and report, the database backup and the live rollout stage."""

import base64
import time

import dagster as dg

from kimera_core import rollout
from kimera_core.backup import backup_database
from kimera_core.checksum import table_checksum
from kimera_core.legacy import missing_tables
from kimera_core.migration import migrate_buckets, quarantine_summary
from kimera_core.report import (
    daily_series,
    entropy_distributions,
    entropy_statistics,
    write_entropy_report,
)
from kimera_pipelines.resources import KimeraDatabase

OWNERS = ["team:kimera-migration"]
POOL = "kimera_duckdb"  # dagster.yaml: one DuckDB step at a time

# The migration's hash buckets; each is a partition of identities. Fixed: buckets of one run
# and of its resume must agree, and so must the partitions the UI shows.
MIGRATION_BUCKETS = 8
bucket_partitions = dg.StaticPartitionsDefinition([str(b) for b in range(MIGRATION_BUCKETS)])

LEGACY_TABLES: dict[str, str] = {
    "legacy_geoids": "Legacy Geoids (content records) as Kimera SWM 0.7 writes them.",
    "legacy_scars": "Legacy Scars (relationships between geoids) as Kimera SWM 0.7 writes them.",
    "echoforms": "CLS lattice echoforms of resolved geoid pairs (read, not migrated).",
}


def _md_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- legacy tables ----------------------------------------------------------------------------
@dg.multi_observable_source_asset(
    specs=[
        dg.AssetSpec(
            name,
            group_name="legacy",
            kinds={"duckdb"},
            owners=OWNERS,
            description=f"{text} Observed: row count, last updated_at, table checksum.",
        )
        for name, text in LEGACY_TABLES.items()
    ],
    name="legacy_tables",
    description="Observe the legacy tables: row count, last updated_at and checksum of each.",
)
def legacy_tables(database: KimeraDatabase):
    with database.connect(read_only=True) as con:
        for table in LEGACY_TABLES:
            if table in missing_tables(con):
                yield dg.ObserveResult(asset_key=table, metadata={"missing": True})
                continue
            checksum = table_checksum(con, table)
            last = con.execute(f"SELECT max(updated_at) FROM {table}").fetchone()[0]
            yield dg.ObserveResult(
                asset_key=table,
                data_version=dg.DataVersion(checksum.hex),
                metadata={
                    "rows": dg.MetadataValue.int(checksum.rows),
                    "last_updated_at": dg.MetadataValue.timestamp(last)
                    if last is not None
                    else dg.MetadataValue.null(),
                    "checksum": dg.MetadataValue.text(checksum.hex),
                },
            )


# --- identities -------------------------------------------------------------------------------
@dg.asset(
    partitions_def=bucket_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["legacy_geoids", "legacy_scars"],
    group_name="identities",
    kinds={"duckdb"},
    owners=OWNERS,
    pool=POOL,
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
)
def identities(context: dg.AssetExecutionContext, database: KimeraDatabase) -> dg.MaterializeResult:
    buckets = sorted(int(k) for k in context.partition_keys)
    with database.connect() as con:
        report = migrate_buckets(
            con,
            buckets,
            partitions=MIGRATION_BUCKETS,
            on_partition=lambda done, total, kind, bucket, c: context.log.info(
                f"partition {done}/{total} ({kind} bucket {bucket}): read {c.read}, inserted "
                f"{c.inserted}, updated {c.updated}, unchanged {c.unchanged}, quarantined "
                f"{c.quarantined}"
            ),
        )
    c = report.counts
    counts = {
        "legacy_rows": report.legacy_rows,
        "read": c.read,
        "inserted": c.inserted,
        "updated": c.updated,
        "unchanged": c.unchanged,
        "kept": c.kept,
        "quarantined": c.quarantined,
    }
    equation = (
        f"legacy {report.legacy_rows:,} = migrated {c.changes:,} + already present "
        f"{c.already_present:,} + quarantined {c.quarantined:,}"
    )
    return dg.MaterializeResult(
        metadata={
            "migration_run_id": dg.MetadataValue.text(report.run_id),
            "buckets": dg.MetadataValue.json(buckets),
            **{k: dg.MetadataValue.int(v) for k, v in counts.items()},
            "balanced": dg.MetadataValue.bool(report.balanced),
            "rows_per_second": dg.MetadataValue.float(round(report.rows_per_second, 1)),
            "seconds": dg.MetadataValue.float(round(report.seconds, 3)),
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
    group_name="identities",
    kinds={"duckdb"},
    owners=OWNERS,
    pool=POOL,
    description=(
        "Legacy rows the latest migration run could not migrate, with counts by reason and "
        "sample keys (table kimera_quarantine; docs/migration.md says what to do per reason)."
    ),
)
def migration_quarantine(database: KimeraDatabase) -> dg.MaterializeResult:
    with database.connect(read_only=True) as con:
        summary = quarantine_summary(con, sample=5)
    rows = [[k, v["rows"], ", ".join(v["sample_keys"])] for k, v in summary["reasons"].items()]
    return dg.MaterializeResult(
        metadata={
            "migration_run_id": dg.MetadataValue.text(str(summary["run_id"])),
            "quarantined": dg.MetadataValue.int(summary["total"]),
            "by_reason": dg.MetadataValue.json(
                {k: v["rows"] for k, v in summary["reasons"].items()}
            ),
            "reasons": dg.MetadataValue.md(_md_table(["reason", "rows", "sample keys"], rows)),
        }
    )


# --- entropy ----------------------------------------------------------------------------------
ENTROPY = {"group_name": "entropy", "kinds": {"duckdb"}, "owners": OWNERS, "pool": POOL}


@dg.asset(
    deps=[identities],
    description=(
        "Entropy (bits) of identities by identity type: count, mean, p50/p90/p99 and the "
        "fixed histogram buckets (Prometheus le semantics)."
    ),
    **ENTROPY,
)
def entropy_distribution(database: KimeraDatabase) -> dg.MaterializeResult:
    with database.connect(read_only=True) as con:
        dists = entropy_distributions(con)
    metadata: dict[str, object] = {}
    for d in dists:
        metadata[f"{d.identity_type}/count"] = dg.MetadataValue.int(d.count)
        for stat in ("mean", "p50", "p90", "p99"):
            metadata[f"{d.identity_type}/{stat}"] = dg.MetadataValue.float(
                float(getattr(d, stat) or 0.0)
            )
        metadata[f"{d.identity_type}/histogram"] = dg.MetadataValue.json(d.histogram)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    deps=[identities],
    description=(
        "Effective decay time constant tau_eff = tau_0 (1 + k H) of identities by type, in "
        "days: mean, p50, p99 (tau_0 = 14 days, k = 0.1)."
    ),
    **ENTROPY,
)
def effective_tau_distribution(database: KimeraDatabase) -> dg.MaterializeResult:
    with database.connect(read_only=True) as con:
        dists = entropy_distributions(con)
    metadata: dict[str, object] = {}
    for d in dists:
        for stat in ("tau_mean_days", "tau_p50_days", "tau_p99_days"):
            metadata[f"{d.identity_type}/{stat}"] = dg.MetadataValue.float(
                float(getattr(d, stat) or 0.0)
            )
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    deps=[identities],
    description=(
        "Daily time series of identities by updated_at (UTC day) and type: rows, mean and "
        "p90 entropy."
    ),
    **ENTROPY,
)
def entropy_daily_series(database: KimeraDatabase) -> dg.MaterializeResult:
    with database.connect(read_only=True) as con:
        series = daily_series(con)
    recent = series[-14:]
    return dg.MaterializeResult(
        metadata={
            "days": dg.MetadataValue.int(len({r["day"] for r in series})),
            "rows": dg.MetadataValue.int(sum(r["count"] for r in series)),
            "recent": dg.MetadataValue.md(
                _md_table(
                    ["day", "type", "rows", "mean", "p90"],
                    [
                        [
                            r["day"],
                            r["identity_type"],
                            r["count"],
                            f"{r['mean'] or 0:.3f}",
                            f"{r['p90'] or 0:.3f}",
                        ]
                        for r in recent
                    ],
                )
            ),
        }
    )


@dg.asset(
    deps=[entropy_distribution, effective_tau_distribution, entropy_daily_series],
    description=(
        "A readable entropy report: markdown tables and a histogram plot, attached to the "
        "materialization and written to <reports folder>/entropy_report.md and "
        "entropy_histogram.png."
    ),
    **ENTROPY,
)
def entropy_distribution_report(database: KimeraDatabase) -> dg.MaterializeResult:
    with database.connect(read_only=True) as con:
        stats = entropy_statistics(con)
    files = write_entropy_report(stats, database.reports_path)
    image = base64.b64encode(files.image.read_bytes()).decode("ascii")
    body = files.text.replace(
        f"![entropy histogram]({files.image.name})",
        f"![entropy histogram](data:image/png;base64,{image})",
    )
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.md(body),
            "report_path": dg.MetadataValue.path(str(files.markdown.resolve())),
            "image_path": dg.MetadataValue.path(str(files.image.resolve())),
        }
    )


# --- rollout ----------------------------------------------------------------------------------
@dg.asset(
    group_name="rollout",
    kinds={"duckdb"},
    owners=OWNERS,
    pool=POOL,
    description=(
        "A verified backup of the whole database (Parquet export with a checksum manifest), "
        "taken before every rollout advance."
    ),
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


ACTION_TAG = "kimera/rollout-action"  # set by the step-back and rollback-reads jobs


class RolloutConfig(dg.Config):
    """What to do with the rollout stage."""

    action: str = ""  # advance | step_back | rollback_reads; default: the job's tag, else advance
    target: str = ""  # advance up to this stage (default: the next one)
    actor: str = "dagster"
    reason: str = ""


@dg.asset(
    deps=[identities, database_backup],
    group_name="rollout",
    kinds={"duckdb"},
    owners=OWNERS,
    pool=POOL,
    description=(
        "The live rollout stage (legacy-only -> dual-write -> backfilled -> verified -> "
        "read-new -> write-new -> legacy-retired), stored in the database with its history. "
        "Advances only through a run whose blocking checks passed; past verified also needs "
        "the latest consistency-job checks passed. Stepping back is always allowed."
    ),
)
def rollout_stage(
    context: dg.AssetExecutionContext, config: RolloutConfig, database: KimeraDatabase
) -> dg.MaterializeResult:
    from kimera_pipelines.checks import rollout_evidence

    moved: list[str] = []
    held: list[str] = []
    reason = config.reason or None
    action = config.action or context.run.tags.get(ACTION_TAG, "advance")
    with database.connect() as con:
        if action == "advance":
            evidence = rollout_evidence(context.instance, context.run.run_id)
            current = rollout.get_stage(con)
            target = config.target or rollout.next_stage(current) or current
            rollout.check_stage(target)
            while current != target and (step := rollout.next_stage(current)) is not None:
                try:
                    rollout.advance(con, step, evidence, config.actor, reason)
                except rollout.RolloutGateError as exc:
                    held = exc.reasons
                    break
                moved.append(step)
                current = step
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
        history = rollout.stage_history(con)[-8:]
    if held and not moved:
        raise dg.Failure(
            description=f"advance from {stage} refused: " + "; ".join(held),
            metadata={"stage": stage, "refused": dg.MetadataValue.json(held)},
        )
    route = rollout.routing(stage)
    return dg.MaterializeResult(
        metadata={
            "stage": dg.MetadataValue.text(stage),
            "reads_from": dg.MetadataValue.text(route.read),
            "writes_to": dg.MetadataValue.text(route.write),
            "moved_through": dg.MetadataValue.json(moved),
            "held_by": dg.MetadataValue.json(held),
            "history": dg.MetadataValue.md(
                _md_table(
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
            ),
        }
    )
