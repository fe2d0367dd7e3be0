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
        # the process's first bound statement makes DuckDB import its Python conversions
        # (~1 s, 355 modules, measured): done here, not inside a timed 0.6 s run
        assert storage.fetch("warm-up") is None
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


def test_tracking_keeps_every_acknowledged_write_and_the_stores_agree(storage):
    report = run_workload(storage, seconds=0.6, rate=400, seed=3, track=True)
    present, deleted = set(report.present_ids), set(report.deleted_ids)
    assert present and deleted and not present & deleted
    new = {r[0] for r in storage.con.execute("SELECT id FROM identities").fetchall()}
    legacy = {
        r[0]
        for r in storage.con.execute(
            "SELECT gid FROM legacy_geoids UNION ALL SELECT id FROM legacy_scars"
        ).fetchall()
    }
    assert new == legacy == present
    acknowledged = report.to_dict()["acknowledged"]
    assert sorted(acknowledged["present"]) == sorted(present)
    assert "acknowledged" not in run_workload(storage, seconds=0.05, rate=10).to_dict()
