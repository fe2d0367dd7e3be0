"""Run the code location's jobs in-process against a test database and instance."""

from __future__ import annotations

from typing import Any

import dagster as dg

from kimera_core.db import connect
from kimera_pipelines.assets import bucket_partitions
from kimera_pipelines.definitions import defs

ALL_BUCKETS = {
    "dagster/asset_partition_range_start": bucket_partitions.get_partition_keys()[0],
    "dagster/asset_partition_range_end": bucket_partitions.get_partition_keys()[-1],
}


def run_job(name: str, instance, database, **kwargs: Any) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(name).execute_in_process(
        instance=instance, resources={"database": database}, raise_on_error=False, **kwargs
    )


def advance_config(target: str = "", **extra: Any) -> dict:
    return {"ops": {"rollout_stage": {"config": {"target": target, **extra}}}}


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def plant_divergence(db_path) -> str:
    """Change one migrated geoid's raw text in identities only; returns its id."""
    with connect(db_path) as con:
        key = con.execute(
            "SELECT min(id) FROM identities WHERE identity_type = 'geoid'"
        ).fetchone()[0]
        con.execute(
            'UPDATE identities SET data = json_merge_patch(data, \'{"raw": "planted"}\'), '
            "updated_at = updated_at + 1 WHERE id = ?",
            [key],
        )
    return key
