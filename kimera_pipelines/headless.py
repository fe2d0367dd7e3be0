"""The whole pipeline headless (``make run``): observe, migrate, check, report, advance, as real runs.

Each job becomes a run of the code location ``make ui`` serves: it is created in the Dagster
instance of DAGSTER_HOME with the origin of that location (``kimera_pipelines.definitions``,
as workspace.yaml loads it) and executed in this process. So the UI shows every run
afterwards and can re-execute it or open it in the launchpad; a run made by
``execute_in_process`` has no origin, and "Re-execute" fails on it. The database is part of
each run's config (``resources.database.config``), so a re-execution from the UI works on
the same file. The rollout advances as far as the gates allow and the output says what held
it.

Dagster's public API has no call that creates a run with its origin and executes it in this
process (``execute_job`` leaves the origin out; ``dagster job launch`` queues it for the
daemon), so the run is created and executed with the two internal calls those use.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import dagster as dg
from dagster import DagsterEventType
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.execution.api import execute_run
from dagster._core.remote_origin import (
    ManagedGrpcPythonEnvCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from kimera_core.migration import MigrationReport
from kimera_pipelines.defs.consistency import GATES_OP
from kimera_pipelines.metadata import MIGRATION_REPORT
from kimera_pipelines.resources import (
    ALL_BUCKETS_TAGS,
    IDENTITIES,
    ROLLOUT_STAGE,
    KimeraDatabase,
    database_from_env,
)

LOCATION = "kimera_pipelines.definitions"  # workspace.yaml's python_module: the location name
REPOSITORY = "__repository__"  # the repository of a module's Definitions
REPORT = dg.AssetKey("entropy_distribution_report")


def _origins(job_name: str, working_directory: str) -> tuple[Any, RemoteJobOrigin]:
    target = LoadableTargetOrigin(
        executable_path=sys.executable, module_name=LOCATION, working_directory=working_directory
    )
    location = ManagedGrpcPythonEnvCodeLocationOrigin(target, location_name=LOCATION)
    remote = RemoteJobOrigin(RemoteRepositoryOrigin(location, REPOSITORY), job_name)
    recon = ReconstructableRepository.for_module(
        LOCATION, "defs", working_directory=working_directory
    ).get_reconstructable_job(job_name)
    return recon, remote


def launch(
    instance: dg.DagsterInstance,
    job_name: str,
    *,
    run_config: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    working_directory: str | None = None,
) -> dg.DagsterRun:
    """Create a run of ``job_name`` with the UI's origin and execute it here; the finished run."""
    recon, remote = _origins(job_name, working_directory or os.getcwd())
    job = recon.get_definition()
    run = instance.create_run_for_job(
        job_def=job,
        run_config=run_config or {},
        tags={**job.tags, **(tags or {})},
        remote_job_origin=remote,
        job_code_origin=recon.get_python_origin(),
    )
    execute_run(recon, run, instance)
    return instance.get_run_by_id(run.run_id)


def materialization(instance: dg.DagsterInstance, run_id: str, asset: dg.AssetKey) -> dict:
    """The metadata values of ``asset``'s last materialization in a run ({} if none)."""
    found: dict[str, Any] = {}
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
        event = entry.dagster_event.event_specific_data.materialization
        if event.asset_key == asset:
            found = {k: v.value for k, v in event.metadata.items()}
    return found


def _database_config(database: KimeraDatabase) -> dict[str, Any]:
    config = {"database": database.database, "lock_timeout_seconds": database.lock_timeout_seconds}
    return {"resources": {"database": {"config": config}}}


def run_pipeline(
    instance: dg.DagsterInstance, database: KimeraDatabase, target: str = "legacy-retired"
) -> dict[str, Any]:
    """Run every job; returns what happened (runs, the MigrationReport, report path, stage)."""
    out: dict[str, Any] = {"ok": True, "runs": {}}
    base = _database_config(database)
    steps = [
        ("observe_legacy_job", base, {}),
        ("migration_job", base, ALL_BUCKETS_TAGS),
        ("consistency_check_job", base, {}),
        ("entropy_report_job", base, {}),
        (
            "advance_rollout_job",
            {**base, "ops": {GATES_OP: {"config": {"target": target, "actor": "make run"}}}},
            {},
        ),
    ]
    for name, run_config, tags in steps:
        run = launch(instance, name, run_config=run_config, tags=tags)
        success = run.status == dg.DagsterRunStatus.SUCCESS
        print(f"{name}: {'SUCCESS' if success else 'FAILURE'} (run {run.run_id})")
        out["runs"][name] = run.run_id
        out[name] = success
        out["ok"] = out["ok"] and success
    migration = materialization(instance, out["runs"]["migration_job"], IDENTITIES)
    if MIGRATION_REPORT in migration:
        out["migration"] = MigrationReport.from_dict(migration[MIGRATION_REPORT])
    out["report"] = materialization(instance, out["runs"]["entropy_report_job"], REPORT).get(
        "report_path"
    )
    stage = materialization(instance, out["runs"]["advance_rollout_job"], ROLLOUT_STAGE)
    out["stage"] = stage.get("stage")
    out["held_by"] = stage.get("held_by") or []
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
    print(f"rollout stage: {out.get('stage') or 'unknown (the advance run failed)'}")
    for reason in out["held_by"]:
        print(f"  held by: {reason}")
    print(f"entropy report: {out.get('report')}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
