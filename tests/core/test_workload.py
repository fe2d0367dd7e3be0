"""The workload driver (kimera_core.workload) and ``kimera workload``, which runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pytest

from kimera_core.storage import Storage
from kimera_core.workload import WorkloadReport, run_workload

KIMERA = Path(sys.executable).parent / "kimera"


@pytest.fixture
def storage(tmp_path):
    with Storage.open(str(tmp_path / "app.duckdb"), stage="dual-write") as storage:
        yield storage


def _total(report: WorkloadReport, outcome: str) -> int:
    return sum(counts[outcome] for counts in report.operations.values())


def test_every_operation_is_counted_and_the_stores_hold_what_was_written(storage):
    report = run_workload(storage, seconds=0.6, rate=400, seed=3)
    assert report.seconds >= 0.6
    ops = report.operations
    assert {"store", "fetch"} <= set(ops) and _total(report, "success") > 20
    assert _total(report, "failure") == 0
    kept = ops["store"]["success"] - ops.get("delete", {"success": 0})["success"]
    legacy = storage.con.execute(
        "SELECT (SELECT count(*) FROM legacy_geoids) + (SELECT count(*) FROM legacy_scars)"
    ).fetchone()[0]
    new = storage.con.execute("SELECT count(*) FROM identities").fetchone()[0]
    assert legacy == new == kept  # dual-write: both stores
    log = storage.con.execute("SELECT count(*) FROM dual_write_log").fetchone()[0]
    assert log == ops["store"]["success"] + ops.get("delete", {"success": 0})["success"]


def test_invalid_stores_are_refused_and_counted_not_raised(storage):
    report = run_workload(storage, seconds=0.3, rate=400, seed=3, failure_share=1.0)
    invalid = report.operations["store_invalid"]
    assert invalid["failure"] > 0 and invalid["success"] == 0
    assert storage.con.execute("SELECT count(*) FROM legacy_geoids").fetchone()[0] == 0


def test_a_set_stop_event_ends_the_run_before_any_operation(storage):
    stop = threading.Event()
    stop.set()
    report = run_workload(storage, seconds=0, rate=10, stop=stop)
    assert report.operations == {} and report.to_dict()["operations"] == {}


def test_the_command_prints_its_report_as_json(tmp_path):
    path = tmp_path / "cli.duckdb"
    result = subprocess.run(
        [str(KIMERA), "workload", "--db", str(path), "--seconds", "0.5", "--rate", "200"]
        + ["--stage", "dual-write", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "serving http://127.0.0.1:" in result.stderr and "stage dual-write" in result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["seconds"] >= 0.5 and report["operations"]["store"]["success"] > 0
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM identities").fetchone()[0] > 0
