"""``make run``'s headless pipeline: real runs of the code location the UI serves, re-executable."""

import time

import dagster as dg
from dagster._core.workspace.context import WorkspaceProcessContext, WorkspaceRequestContext
from dagster._core.workspace.load_target import WorkspaceFileTarget
from dagster_graphql.test.utils import execute_dagster_graphql
from support.servers import ROOT

from kimera_core.migration import MigrationReport
from kimera_pipelines.headless import LOCATION, run_pipeline

# No daemon in the test: the re-execution is launched at once instead of queued.
LAUNCH_AT_ONCE = {
    "run_coordinator": {
        "module": "dagster._core.run_coordinator",
        "class": "DefaultRunCoordinator",
    }
}
REEXECUTE = """
mutation($parentRunId: String!) {
  launchPipelineReexecution(reexecutionParams: {parentRunId: $parentRunId, strategy: ALL_STEPS}) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""


def test_the_headless_pipeline_runs_every_job_and_says_what_held_the_rollout(instance, database):
    out = run_pipeline(instance, database, target="legacy-retired")
    assert out["ok"]
    migration = out["migration"]
    assert isinstance(migration, MigrationReport) and migration.balanced
    assert out["report"].endswith("entropy_report.md")
    assert out["stage"] == "read-new"  # the soak holds writes on legacy
    assert any("soak" in reason for reason in out["held_by"])
    run = instance.get_run_by_id(out["runs"]["migration_job"])
    assert run.remote_job_origin.location_name == LOCATION
    assert run.run_config["resources"]["database"]["config"]["database"] == database.database


def _wait(instance: dg.DagsterInstance, run_id: str, timeout: float = 180) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = instance.get_run_by_id(run_id)
        if run.is_finished:
            return run
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id} did not finish")


def test_a_headless_run_is_re_executed_through_graphql(tmp_path, database):
    """What the UI's "Re-execute all" sends, against a workspace loaded from workspace.yaml."""
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(
        temp_dir=str(tmp_path / "home"), overrides=LAUNCH_AT_ONCE
    ) as instance:
        out = run_pipeline(instance, database, target="dual-write")
        parent = out["runs"]["migration_job"]
        target = WorkspaceFileTarget(paths=[str(ROOT / "workspace.yaml")])
        with WorkspaceProcessContext(instance, target) as process:
            context = WorkspaceRequestContext(
                instance=instance,
                current_workspace=process.get_current_workspace(),
                process_context=process,
                version=process.version,
                source=None,
                read_only=False,
            )
            result = execute_dagster_graphql(context, REEXECUTE, {"parentRunId": parent})
        launched = result.data["launchPipelineReexecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        child = _wait(instance, launched["run"]["runId"])
        assert child.status == dg.DagsterRunStatus.SUCCESS
        assert child.parent_run_id == parent
        assert child.tags["dagster/asset_partition_range_end"] == "7"
