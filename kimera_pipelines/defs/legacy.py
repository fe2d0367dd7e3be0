"""The legacy tables as observed source assets: row count, last updated_at, checksum.

Kimera SWM 0.7 writes these tables; the code location only observes them (hourly), and the
checksum is the data version, so the UI shows when legacy changed since identities were
migrated from it.
"""

import dagster as dg

from kimera_core.checksum import table_checksum
from kimera_core.legacy import missing_tables
from kimera_pipelines.resources import IN_PROCESS, OWNERS, KimeraDatabase

LEGACY_TABLES: dict[str, str] = {
    "legacy_geoids": "Legacy Geoids (content records) as Kimera SWM 0.7 writes them.",
    "legacy_scars": "Legacy Scars (relationships between geoids) as Kimera SWM 0.7 writes them.",
    "echoforms": "CLS lattice echoforms of resolved geoid pairs (read, not migrated).",
}
LAST_UPDATED_SQL = {table: f"SELECT max(updated_at) FROM {table}" for table in LEGACY_TABLES}


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
    with database.get_connection(read_only=True) as con:
        missing = missing_tables(con)
        for table in LEGACY_TABLES:
            if table in missing:
                yield dg.ObserveResult(asset_key=table, metadata={"missing": True})
                continue
            checksum = table_checksum(con, table)
            last = con.execute(LAST_UPDATED_SQL[table]).fetchone()[0]
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


observe_legacy_job = dg.define_asset_job(
    name="observe_legacy_job",
    selection=dg.AssetSelection.assets(legacy_tables),
    description="Observe the legacy tables: row counts, last updated_at, checksums.",
    executor_def=IN_PROCESS,
)

observe_legacy_hourly = dg.ScheduleDefinition(
    name="observe_legacy_hourly",
    job=observe_legacy_job,
    cron_schedule="5 * * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Observe the legacy tables hourly. Running by default: safe, read-only.",
)

defs = dg.Definitions(
    assets=[legacy_tables], jobs=[observe_legacy_job], schedules=[observe_legacy_hourly]
)
