"""Run the code location's jobs in-process against a test database and instance."""

from __future__ import annotations

from typing import Any

import dagster as dg

from kimera_core.db import connect
from kimera_pipelines.definitions import defs
from kimera_pipelines.resources import ALL_BUCKETS_TAGS

ALL_BUCKETS = ALL_BUCKETS_TAGS
# The gates (checks of rollout_stage) a rollout advance requires, by the names the UI and runbook use.
REQUIRED_CHECKS = {
    "count_parity",
    "key_coverage_legacy_to_new",
    "key_coverage_new_to_legacy",
    "field_equality",
    "reconciliation",
    "column_agreement",
    "entropy_sanity",
}


def run_job(name: str, instance, database, **kwargs: Any) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(name).execute_in_process(
        instance=instance, resources={"database": database}, raise_on_error=False, **kwargs
    )


def rollout_config(**config: Any) -> dict:
    """Run config of the rollout step (op ``rollout``)."""
    return {"ops": {"rollout": {"config": config}}}


def advance_config(target: str = "", **extra: Any) -> dict:
    return rollout_config(target=target, **extra)


def materialized(result: dg.ExecuteInProcessResult, asset: str) -> list[dict[str, Any]]:
    """The metadata of each materialization of ``asset`` in the run, in order."""
    return [
        e.event_specific_data.materialization.metadata
        for e in result.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key == dg.AssetKey(asset)
    ]


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def plant_divergences(db_path, rows: int = 1) -> list[str]:
    """Change the raw text of ``rows`` migrated geoids in identities only; returns their ids."""
    with connect(db_path) as con:
        keys = [
            r[0]
            for r in con.execute(
                "SELECT id FROM identities WHERE identity_type = 'geoid' ORDER BY id LIMIT ?",
                [rows],
            ).fetchall()
        ]
        # updated_at unchanged: a newer identities row would be legacy_stale, an exception
        con.execute(
            'UPDATE identities SET data = json_merge_patch(data, \'{"raw": "planted"}\') '
            "WHERE list_contains(?, id)",
            [keys],
        )
    return keys


def plant_divergence(db_path) -> str:
    """Change one migrated geoid's raw text in identities only; returns its id."""
    return plant_divergences(db_path, 1)[0]
