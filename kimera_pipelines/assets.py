"""Assets: the legacy tables and their entropy summary (the full asset graph comes later)."""

from __future__ import annotations

import dagster as dg

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
