"""The live rollout through the database server: the application writes while Dagster works.

One DuckDB file, owned by a real ``kimera db serve``. Beside it, all at once and all through
its address: a writer process standing in for the application (deployed with dual write on,
``KIMERA_ID_DUAL_WRITE=1``; it stores identities continuously through the storage API and
writes one JSON line per acknowledged write), and a real ``dagster dev`` (webserver and
daemon) with ``KIMERA_DB`` set to the address. The test drives the rollout as an operator
would: migration, consistency job, advance to read-new, a divergence planted in one store
through the server, the daemon's ``auto_rollback_reads`` sensor moving reads back, a step
back, the repair and a final consistency job, with the writer running until the repair.
Then it asserts that nothing waited on or failed for a lock (Dagster run logs, the writer's
report, the server's log), that no write failed (``dual_write_log`` and the writer), and
that every write the writer saw acknowledged is in both stores.

Every run succeeds beside the writer: the migration reconciles against the snapshots its
partitions read (rows the dual write adds meanwhile are already in both stores), and a
verification reads both stores in one snapshot.

Run as a script (``python test_online.py ADDRESS REPORT``) this file is the writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.servers import (
    ROOT,
    check_executions,
    graphql,
    kimera_db_server,
    launch_run,
    run_logs,
    start_dagster_dev,
    stop_process_group,
    wait_for_run,
    wait_until,
)

from kimera_core.db import open_database
from kimera_core.demo import generate_demo_data
from kimera_core.rollout import get_stage, stage_history
from kimera_core.storage import Storage
from kimera_core.workload import random_geoid, random_scar
from kimera_pipelines.resources import ALL_BUCKETS_TAGS

pytestmark = pytest.mark.e2e

WRITES_PER_SECOND = 20
TO_READ_NEW = {"ops": {"rollout": {"config": {"target": "read-new"}}}}
# DuckDB's lock errors ("Could not set lock on file", "Conflicting lock is held"), the
# project's lock wait ("waiting for the database: held by PID ..."), transaction conflicts
LOCK_TROUBLE = re.compile(r"\block(ed|s)?\b|conflict|waiting for the database", re.IGNORECASE)


# --- the writer (this file run as a script) ------------------------------------------------
def write_until_stopped(address: str, report: Path) -> None:
    """Store identities through ``address`` until SIGTERM; one JSON line per outcome.

    ``{"id", "type", "ms"}`` per acknowledged write (``Storage.store`` returned, so the
    transaction committed), ``{"error", "id"}`` per failed one, and last ``{"done", "stage"}``.
    """
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    rng = random.Random(2026)
    ids: list[str] = []
    with report.open("w") as out, Storage.open(address) as storage:
        out.write(json.dumps({"stage": storage.stage}) + "\n")
        while not stop.is_set():
            now = time.time()
            if len(ids) < 4 or rng.random() < 0.7:
                item = random_geoid(rng, now)
            else:
                item = random_scar(rng, ids, now)
            t0 = time.perf_counter()
            try:
                storage.store(item)
            except Exception as exc:  # noqa: BLE001 - every failure is reported, none hidden
                line = {"error": f"{type(exc).__name__}: {exc}", "id": item.id}
            else:
                ms = (time.perf_counter() - t0) * 1000
                line = {"id": item.id, "type": item.identity_type, "ms": round(ms, 3)}
                if item.identity_type == "geoid":
                    ids.append(item.id)
            out.write(json.dumps(line) + "\n")
            out.flush()
            stop.wait(1 / WRITES_PER_SECOND)
        out.write(json.dumps({"done": True, "stage": storage.stage}) + "\n")


def _stop(writer: subprocess.Popen) -> None:
    """SIGTERM to the writer's PID and wait for its last line (idempotent)."""
    if writer.poll() is None:
        writer.send_signal(signal.SIGTERM)
    writer.wait(timeout=60)


def _read_report(report: Path) -> list[dict]:
    return [json.loads(line) for line in report.read_text().splitlines() if line.strip()]


# --- the test ------------------------------------------------------------------------------
def _why(port: int, run_id: str) -> list[str]:
    """The lines of a run's log that say what failed (for an assertion's message)."""
    return [m for m in run_logs(port, run_id) if re.search(r"fail|did not pass|error", m, re.I)]


def _stage(address: str) -> str:
    with open_database(address) as con:
        return get_stage(con)


def _plant_divergence(address: str, candidates: list[str]) -> str:
    """The text of the first of ``candidates`` in identities changed there only; its key.

    Through the server, as the writer's writes go: the edit of one key in one store.
    """
    with open_database(address) as con:
        key = next(
            k
            for k in candidates
            if con.execute("SELECT 1 FROM identities WHERE id = ?", [k]).fetchone()
        )
        con.execute(
            'UPDATE identities SET data = json_merge_patch(data, \'{"raw": "planted"}\') '
            "WHERE id = ?",
            [key],
        )
    return key


def _rollback_run(port: int) -> str:
    """The run of rollback_reads_job the auto_rollback_reads sensor launched."""
    query = """query { runsOrError(filter: {pipelineName: "rollback_reads_job"}, limit: 5) {
      ... on Runs { results { runId tags { key value } } } } }"""

    def launched():
        runs = graphql(port, query)["runsOrError"]["results"]
        auto = [r for r in runs if {"key": "kimera/auto-rollback", "value": "reads"} in r["tags"]]
        return auto[0]["runId"] if auto else None

    return wait_until(launched, timeout=150, interval=2, what="the automatic read rollback")


def test_the_live_rollout_through_the_database_server(tmp_path, monkeypatch):
    db = tmp_path / "kimera.duckdb"
    generate_demo_data(db, geoids=1000, scars=400, seed=11, broken_share=0.02)
    with open_database(db, read_only=True) as con:  # keys the writer never writes
        demo_keys = [
            k for (k,) in con.execute("SELECT gid FROM legacy_geoids ORDER BY gid").fetchall()
        ]
    token = secrets.token_urlsafe(32)
    monkeypatch.setenv("KIMERA_DB_TOKEN", token)  # this process's own clients
    env = {"KIMERA_DB_TOKEN": token}
    server_log = tmp_path / "server.log"
    report = tmp_path / "writer.jsonl"
    runs: list[str] = []

    def run(job: str, expect: str | None = "SUCCESS", **kwargs) -> tuple[str, str]:
        run_id = launch_run(port, job, **kwargs)
        runs.append(run_id)
        status = wait_for_run(port, run_id)
        assert expect is None or status == expect, (job, status, _why(port, run_id))
        return run_id, status

    with contextlib.ExitStack() as cleanup:
        address, _ = cleanup.enter_context(kimera_db_server(db, token, server_log))
        writer = subprocess.Popen(
            [sys.executable, __file__, address, str(report)],
            env={
                **os.environ,
                **env,
                "KIMERA_ID_DUAL_WRITE": "1",  # deployed with dual write on
                "PYTHONPATH": str(ROOT / "tests"),  # for this file's imports
            },
            stderr=cleanup.enter_context((tmp_path / "writer.err").open("w")),
        )
        cleanup.callback(_stop, writer)
        wait_until(lambda: len(_read_report(report)) > 5, 60, what="the writer's first writes")
        dagster, port, dagster_log = start_dagster_dev(tmp_path, {"KIMERA_DB": address, **env})
        cleanup.callback(stop_process_group, dagster)

        # migrate and check while the application writes
        run("migration_job", tags=ALL_BUCKETS_TAGS)
        run("consistency_check_job")
        run("advance_rollout_job", run_config=TO_READ_NEW)  # with a backup through the server
        assert _stage(address) == "read-new"

        # a divergence in one store: the gates fail, the daemon's sensor moves reads back
        key = _plant_divergence(address, demo_keys)
        run("consistency_check_job", "FAILURE")
        (field_equality,) = check_executions(port, "field_equality", asset="rollout_stage")
        assert key in json.dumps(field_equality["evaluation"])
        rollback = _rollback_run(port)
        runs.append(rollback)
        assert wait_for_run(port, rollback) == "SUCCESS"
        assert _stage(address) == "verified"
        with open_database(address) as con:
            assert stage_history(con)[-1]["actor"] == "sensor:auto_rollback_reads"

        run("step_back_rollout_job")
        assert _stage(address) == "backfilled"

        # the operator repairs the key from the authoritative store (legacy), then checks
        run("repair_job")
        _stop(writer)
        run("consistency_check_job")
        logs = [m for r in runs for m in run_logs(port, r)]

        lines = _read_report(report)
        acked = [line for line in lines if "ms" in line]
        with open_database(address) as con:
            failed = con.execute(
                "SELECT count(*) FROM dual_write_log WHERE status <> 'success'"
            ).fetchone()[0]
            con.execute("CREATE TEMP TABLE acked (id TEXT, type TEXT)")
            con.executemany(
                "INSERT INTO acked VALUES (?, ?)", [[a["id"], a["type"]] for a in acked]
            )
            missing = con.execute(
                """SELECT a.id FROM acked a
                   WHERE a.id NOT IN (SELECT id FROM identities)
                      OR (a.type = 'geoid' AND a.id NOT IN (SELECT gid FROM legacy_geoids))
                      OR (a.type = 'scar' AND a.id NOT IN (SELECT id FROM legacy_scars))"""
            ).fetchall()

    assert lines[0] == {"stage": "dual-write"} and lines[-1]["done"]
    assert [line for line in lines if "error" in line] == []
    assert len(acked) > 100  # it wrote through the whole rollout
    assert failed == 0
    assert missing == []
    assert [m for m in logs if LOCK_TROUBLE.search(m)] == []
    assert not LOCK_TROUBLE.search((tmp_path / "writer.err").read_text())
    assert not LOCK_TROUBLE.search(server_log.read_text())
    assert not LOCK_TROUBLE.search(dagster_log.read_text())


if __name__ == "__main__":
    write_until_stopped(sys.argv[1], Path(sys.argv[2]))
