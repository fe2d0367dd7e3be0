"""The whole pipeline headless (``make run``): observe, migrate, check, report, advance.

Runs each job in this process against the Dagster instance of DAGSTER_HOME, so every run
shows in the UI afterwards (``make ui``). The rollout advances as far as the gates allow
and the output says what held it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import dagster as dg

from kimera_core.migration import MigrationReport
from kimera_pipelines.definitions import defs
from kimera_pipelines.metadata import MIGRATION_REPORT
from kimera_pipelines.resources import ALL_BUCKETS_TAGS, KimeraDatabase, database_from_env


def _execute(instance: dg.DagsterInstance, name: str, database: KimeraDatabase, **kwargs: Any):
    result = defs.resolve_job_def(name).execute_in_process(
        instance=instance, resources={"database": database}, raise_on_error=False, **kwargs
    )
    print(f"{name}: {'SUCCESS' if result.success else 'FAILURE'} (run {result.run_id})")
    return result


def _meta(result: Any, node: str) -> dict[str, Any]:
    mats = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in mats[-1].metadata.items()} if mats else {}


def run_pipeline(
    instance: dg.DagsterInstance, database: KimeraDatabase, target: str = "legacy-retired"
) -> dict[str, Any]:
    """Run every step; returns what happened (the MigrationReport, report path, stage, holds)."""
    out: dict[str, Any] = {"ok": True}
    steps = [
        ("observe_legacy_job", {}),
        ("migration_job", {"tags": ALL_BUCKETS_TAGS}),
        ("consistency_check_job", {}),
        ("entropy_report_job", {}),
    ]
    for name, kwargs in steps:
        result = _execute(instance, name, database, **kwargs)
        out[name] = result.success
        out["ok"] = out["ok"] and result.success
        if name == "migration_job" and MIGRATION_REPORT in (meta := _meta(result, "identities")):
            out["migration"] = MigrationReport.from_dict(meta[MIGRATION_REPORT])
        if name == "entropy_report_job":
            out["report"] = _meta(result, "entropy_distribution_report").get("report_path")
    result = _execute(
        instance,
        "advance_rollout_job",
        database,
        run_config={"ops": {"rollout": {"config": {"target": target, "actor": "make run"}}}},
    )
    stage = _meta(result, "rollout")
    out["stage"] = stage.get("stage")
    out["held_by"] = stage.get("held_by") or []
    if not result.success:
        failure = [e for e in result.all_events if e.is_step_failure]
        out["held_by"] = [f.step_failure_data.error.message.strip() for f in failure][:3]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="legacy-retired", help="advance up to this stage")
    args = parser.parse_args(argv)
    database = database_from_env()
    with dg.DagsterInstance.get() as instance:
        out = run_pipeline(instance, database, args.target)
    migration = out.get("migration")
    if migration is not None:
        c = migration.counts
        print(
            f"migration: {c.read:,} legacy rows read, {c.inserted:,} inserted, "
            f"{c.unchanged:,} unchanged, {c.quarantined:,} quarantined, "
            f"{migration.rows_per_second:,.0f} rows/s"
        )
    print(f"rollout stage: {out.get('stage') or 'unchanged (advance refused)'}")
    for reason in out["held_by"]:
        print(f"  held by: {reason}")
    print(f"entropy report: {out.get('report')}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
