"""A real `dagster dev` (webserver + daemon) serves the code location, runs the migration and the
gates (checks of rollout_stage)."""

from __future__ import annotations

import json

import pytest
from support.servers import (
    DAGSTER_LOCATION,
    check_executions,
    graphql,
    launch_run,
    shared_dagster_dev,
    wait_for_run,
    wait_until,
)

pytestmark = pytest.mark.e2e

ALL_BUCKETS = {
    "dagster/asset_partition_range_start": "0",
    "dagster/asset_partition_range_end": "7",
}


@pytest.fixture(scope="session")
def dagster_dev(request, tmp_path_factory):
    return shared_dagster_dev(request, tmp_path_factory)


def test_webserver_lists_the_code_location_jobs_and_assets(dagster_dev):
    port, _, _ = dagster_dev
    data = graphql(
        port,
        "{ repositoriesOrError { ... on RepositoryConnection { nodes { name "
        "location { name } jobs { name } assetNodes { assetKey { path } groupName } } } } }",
    )
    nodes = data["repositoriesOrError"]["nodes"]
    assert any(n["location"]["name"] == DAGSTER_LOCATION for n in nodes)
    jobs = {j["name"] for n in nodes for j in n["jobs"]}
    assert {"migration_job", "consistency_check_job", "advance_rollout_job"} <= jobs
    groups = {a["groupName"] for n in nodes for a in n["assetNodes"]}
    assert groups == {"legacy", "identities", "entropy", "rollout"}


def test_daemon_is_healthy(dagster_dev):
    port, _, _ = dagster_dev

    def healthy():
        data = graphql(
            port,
            "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }",
        )
        statuses = data["instance"]["daemonHealth"]["allDaemonStatuses"]
        required = [s for s in statuses if s["required"]]
        return required and all(s["healthy"] for s in required)

    assert wait_until(healthy, timeout=120, what="daemon heartbeat")


def test_migration_job_launched_through_graphql_succeeds_and_its_checks_pass(dagster_dev):
    port, _, _ = dagster_dev
    run_id = launch_run(port, "migration_job", tags=ALL_BUCKETS)
    assert wait_for_run(port, run_id) == "SUCCESS"
    (execution,) = check_executions(port, "migration_reconciliation")
    assert execution["runId"] == run_id
    assert execution["evaluation"]["success"] is True
    entries = {e["label"]: e for e in execution["evaluation"]["metadataEntries"]}
    counts = json.loads(entries["counts"]["jsonString"])
    assert counts["legacy_rows"] == counts["read"] == 1400
    assert counts["quarantined"] > 0

    checks = launch_run(port, "consistency_check_job")
    assert wait_for_run(port, checks) == "SUCCESS"
    for name in ("count_parity", "key_coverage_legacy_to_new", "field_equality", "reconciliation"):
        (latest,) = check_executions(port, name, asset="rollout_stage")
        assert latest["runId"] == checks and latest["evaluation"]["success"], name
