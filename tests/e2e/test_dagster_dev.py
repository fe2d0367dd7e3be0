"""`dagster dev` (webserver + daemon) really starts over this code location and runs the main job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from support.servers import ROOT, free_port, stop_process_group, wait_until

from kimera_core.demo import generate_demo_data

pytestmark = pytest.mark.e2e

LOCATION = "kimera_pipelines.definitions"


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        payload = json.loads(resp.read())
    assert "errors" not in payload, payload
    return payload["data"]


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dagster_dev")
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    db = tmp / "kimera.duckdb"
    generate_demo_data(db, geoids=1000, scars=400, seed=11)
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "KIMERA_DB": str(db)}
    log = (tmp / "dagster_dev.log").open("w")
    dagster = Path(sys.executable).parent / "dagster"
    proc = subprocess.Popen(
        [
            str(dagster),
            "dev",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            str(ROOT / "workspace.yaml"),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2).status
                == 200
            ),
            timeout=180,
            what="dagster webserver",
        )
        yield port, db, tmp / "dagster_dev.log"
    finally:
        stop_process_group(proc)
        log.close()


def test_webserver_lists_the_code_location_and_job(dagster_dev):
    port, _, _ = dagster_dev
    data = wait_until(
        lambda: graphql(
            port,
            "{ repositoriesOrError { ... on RepositoryConnection { nodes { name "
            "location { name } jobs { name } assetNodes { assetKey { path } } } } } }",
        ),
        timeout=120,
        what="code location",
    )
    nodes = data["repositoriesOrError"]["nodes"]
    assert any(n["location"]["name"] == LOCATION for n in nodes)
    jobs = {j["name"] for n in nodes for j in n["jobs"]}
    assets = {tuple(a["assetKey"]["path"]) for n in nodes for a in n["assetNodes"]}
    assert "kimera_main_job" in jobs
    assert ("legacy_summary",) in assets


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


def test_launching_main_job_from_the_webserver_succeeds(dagster_dev):
    port, _, _ = dagster_dev
    launched = graphql(
        port,
        """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
             __typename
             ... on LaunchRunSuccess { run { runId } }
             ... on PythonError { message }
             ... on RunConfigValidationInvalid { errors { message } } } }""",
        {
            "params": {
                "selector": {
                    "repositoryLocationName": LOCATION,
                    "repositoryName": "__repository__",
                    "jobName": "kimera_main_job",
                },
                "runConfigData": {},
            }
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    def finished():
        status = graphql(
            port,
            "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }",
            {"id": run_id},
        )["runOrError"]["status"]
        return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

    assert wait_until(finished, timeout=240, interval=1, what="run to finish") == "SUCCESS"
    events = graphql(
        port,
        """query($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset {
             assetMaterializations(limit: 1) { runId metadataEntries { label
               ... on IntMetadataEntry { intValue } } } } } }""",
        {"key": {"path": ["legacy_summary"]}},
    )
    (mat,) = events["assetOrError"]["assetMaterializations"]
    assert mat["runId"] == run_id
    values = {e["label"]: e.get("intValue") for e in mat["metadataEntries"]}
    assert values["rows/legacy_geoids"] == 1000
    assert values["rows/legacy_scars"] == 400
