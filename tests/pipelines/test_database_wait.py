"""Waits that talk: a step that meets another process's lock says who holds it, at once and every
few seconds, finishes when the holder lets go, and fails with one line at its deadline."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from kimera_core.db import DatabaseOpenError, lock_holder, open_database, open_waiting
from kimera_pipelines.resources import KimeraDatabase
from pipelines.helpers import run_job

HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("held", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


@pytest.fixture
def hold(db_path):
    """Start a process holding the database for ``seconds``; returns its Popen once it holds."""
    started: list[subprocess.Popen] = []

    def start(seconds: float) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(db_path), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "held"
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_the_holder_is_named_with_its_command_on_one_line(db_path, hold):
    proc = hold(30)
    with pytest.raises(DatabaseOpenError) as caught:
        open_database(db_path)
    holder = lock_holder(str(caught.value))
    assert re.fullmatch(
        rf"PID {proc.pid} \(`python[0-9.]* -c import sys, time, duckdb .*`\)", holder
    )


def test_a_wait_is_told_at_once_and_gives_up_with_one_line(db_path, hold):
    proc = hold(30)
    told: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(DatabaseOpenError) as caught:
        open_waiting(db_path, read_only=True, timeout=1.5, on_wait=told.append, report_every=1)
    assert 1.5 <= time.monotonic() - t0 < 5
    assert re.fullmatch(
        rf"waiting for the database: held by PID {proc.pid} \(`.*`\) for 0 s, giving up in \d s",
        told[0],
    )
    assert len(told) == 2  # at once, then after a second
    message = str(caught.value)
    assert "\n" not in message and f"still held by PID {proc.pid}" in message


def test_a_step_logs_the_wait_within_5_s_and_finishes_when_the_holder_lets_go(
    instance, db_path, hold
):
    database = KimeraDatabase(database=str(db_path), lock_timeout_seconds=60)
    proc = hold(7)
    t0 = time.time()
    result = run_job("observe_legacy_job", instance, database)
    assert result.success
    assert time.time() - t0 >= 6  # it did wait for the holder
    messages = [
        (entry.timestamp, entry.user_message)
        for entry in instance.all_logs(result.run_id)
        if "waiting for the database" in entry.user_message
    ]
    step_start = next(
        e.timestamp
        for e in instance.all_logs(result.run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "STEP_START"
    )
    assert messages and messages[0][0] - step_start < 5
    assert f"held by PID {proc.pid}" in messages[0][1]
    assert len(messages) >= 2  # and again every few seconds


def test_a_step_fails_with_one_line_at_its_deadline(instance, db_path, hold):
    proc = hold(30)
    database = KimeraDatabase(database=str(db_path), lock_timeout_seconds=1)
    result = run_job("observe_legacy_job", instance, database)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert f"still held by PID {proc.pid}" in description and "\n" not in description
