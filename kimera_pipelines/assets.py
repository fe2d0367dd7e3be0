"""Assets: the legacy summary and the migrated identities (the full asset graph comes later)."""


import dagster as dg

from kimera_core.migration import migrate
from kimera_core.stats import legacy_summary as compute_legacy_summary
from kimera_pipelines.resources import KimeraDatabase

OWNERS = ["team:kimera-migration"]


@dg.asset(
    group_name="legacy",
    kinds={"duckdb"},
    owners=OWNERS,
    pool="kimera_duckdb",
    description=(
        "Row counts of the legacy Kimera tables and the entropy distribution (bits) and "
        "effective tau (days) of legacy geoids and scars, computed set-based in DuckDB."
    ),
)
def legacy_summary(database: KimeraDatabase) -> dg.MaterializeResult:
    with database.connect(read_only=True) as con:
        summary = compute_legacy_summary(con)
    metadata: dict[str, object] = {
        f"rows/{name}": dg.MetadataValue.int(count) for name, count in summary.tables.items()
    }
    metadata["missing_tables"] = dg.MetadataValue.json(summary.missing_tables)
    for dist in summary.distributions:
        prefix = f"entropy/{dist.identity_type}"
        metadata[f"{prefix}/count"] = dg.MetadataValue.int(dist.count)
        metadata[f"{prefix}/unknown"] = dg.MetadataValue.int(dist.unknown)
        for stat in ("mean", "p50", "p90", "p99"):
            value = getattr(dist, stat)
            metadata[f"{prefix}/{stat}"] = dg.MetadataValue.float(float(value or 0.0))
        metadata[f"{prefix}/histogram"] = dg.MetadataValue.json(dist.histogram)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    group_name="identities",
    kinds={"duckdb"},
    owners=OWNERS,
    pool="kimera_duckdb",
    deps=[legacy_summary],
    description=(
        "The unified identities table, backfilled from the legacy tables by the set-based "
        "migration (resumes an unfinished run; quarantines what cannot be migrated)."
    ),
)
def identities(context: dg.AssetExecutionContext, database: KimeraDatabase) -> dg.MaterializeResult:
    with database.connect() as con:
        report = migrate(
            con,
            on_partition=lambda done, total, kind, bucket, counts: context.log.info(
                f"partition {done}/{total} ({kind} bucket {bucket}): read {counts.read}, "
                f"inserted {counts.inserted}, updated {counts.updated}, "
                f"quarantined {counts.quarantined}"
            ),
        )
    counts = report.counts
    metadata = {
        "run_id": dg.MetadataValue.text(report.run_id),
        "read": dg.MetadataValue.int(counts.read),
        "inserted": dg.MetadataValue.int(counts.inserted),
        "updated": dg.MetadataValue.int(counts.updated),
        "unchanged": dg.MetadataValue.int(counts.unchanged),
        "kept": dg.MetadataValue.int(counts.kept),
        "quarantined": dg.MetadataValue.int(counts.quarantined),
        "balanced": dg.MetadataValue.bool(report.balanced),
        "rows_per_second": dg.MetadataValue.float(round(report.rows_per_second, 1)),
        "identities_rows": dg.MetadataValue.int(report.identities_checksum["rows"]),
        "identities_checksum": dg.MetadataValue.text(report.identities_checksum["checksum"]),
        "quarantine_reasons": dg.MetadataValue.json(report.quarantine_reasons),
    }
    if not report.balanced:
        raise dg.Failure(
            description=(
                f"reconciliation does not balance: legacy rows {report.legacy_rows} != migrated "
                f"{counts.changes} + already present {counts.already_present} + quarantined "
                f"{counts.quarantined}; run the migration again (rows arrived during the run)"
            ),
            metadata=metadata,
        )
    return dg.MaterializeResult(metadata=metadata)
