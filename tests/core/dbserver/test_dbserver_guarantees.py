"""Every unit of work keeps its guarantees through the server, and survives kill -9.

Real parts only: a ``kimera db serve`` process on a demo database, clients in other
processes (``kimera migrate``, a storage writer), killed with SIGKILL by PID. The reference
for "the same result" is an uninterrupted embedded ``kimera migrate`` of a copy of the same
file, compared by table checksums (``kimera_core.checksum``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from dbserver_proc import KIMERA
from support.servers import wait_until

from kimera_core.checksum import table_checksum
from kimera_core.db import connect, open_database
from kimera_core.demo import generate_demo_data
from kimera_core.rollout import get_stage, set_stage
from kimera_core.storage import WRITE_STEPS, Storage
from kimera_core.workload import run_workload

pytestmark = pytest.mark.slow

PARTITIONS = 16  # per table: 32 partition transactions, so a kill lands mid-run
CHECKED_TABLES = ("identities", "legacy_geoids", "legacy_scars")


def _copy(source: Path, target: Path) -> Path:
    shutil.copy(source, target)
    if Path(f"{source}.wal").exists():
        shutil.copy(f"{source}.wal", f"{target}.wal")
    return target


def checksums(con) -> dict[str, dict]:
    return {table: table_checksum(con, table).to_dict() for table in CHECKED_TABLES}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(demo database, checksums after an uninterrupted embedded migration of a copy)."""
    folder = tmp_path_factory.mktemp("online")
    path = folder / "source.duckdb"
    generate_demo_data(path, geoids=60_000, scars=15_000, seed=11)
    reference = _copy(path, folder / "reference.duckdb")
    done = subprocess.run(
        [KIMERA, "migrate", "--db", str(reference), "--partitions", str(PARTITIONS)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    with connect(reference) as con:
        return path, checksums(con)


def _env(token: str) -> dict[str, str]:
    return {**os.environ, "KIMERA_DB_TOKEN": token}


def _partitions_done(address: str) -> int:
    with open_database(address) as con:
        return con.execute("SELECT count(*) FROM kimera_migration_partitions").fetchone()[0]


def _migrate(address: str, token: str) -> subprocess.Popen:
    return subprocess.Popen(
        [KIMERA, "migrate", "--db", address, "--partitions", str(PARTITIONS)],
        env=_env(token),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _resume_and_compare(address: str, token: str, expected: dict) -> None:
    done = subprocess.run(
        [KIMERA, "migrate", "--db", address], env=_env(token), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "lock" not in done.stderr.lower()
    with open_database(address) as con:
        assert checksums(con) == expected
        runs = con.execute("SELECT count(DISTINCT run_id) FROM kimera_migration_partitions")
        assert runs.fetchone() == (1,)  # the resumed run finished the killed one


@pytest.mark.parametrize("victim", ["client", "server"])
def test_a_migration_killed_mid_run_resumes_to_the_uninterrupted_result(
    source, tmp_path, token, servers, victim
):
    path, expected = source
    server = servers(_copy(path, tmp_path / "live.duckdb"), token)
    proc = _migrate(server.address, token)
    try:
        wait_until(lambda: _partitions_done(server.address) >= 2, 300, 0.02, "two partitions")
        if victim == "client":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            server.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0  # killed, or lost its server
    if victim == "server":
        server.start()  # the same file and port: DuckDB replays its WAL
    done = _partitions_done(server.address)
    assert 2 <= done < 2 * PARTITIONS, "the kill must land in the middle of the run"
    _resume_and_compare(server.address, token, expected)


FAULTY_CLIENT = """
import os, random, signal, sys, time
from kimera_core.storage import Storage
from kimera_core.workload import random_geoid

address, die_at = sys.argv[1], sys.argv[2]
written = []

def fault(step):
    if len(written) == 2 and step == die_at:
        os.kill(os.getpid(), signal.SIGKILL)

storage = Storage.open(address, stage="dual-write", fault=fault)
rng = random.Random(3)
for _ in range(3):
    item = random_geoid(rng, time.time())
    print(item.id, flush=True)
    storage.store(item)
    written.append(item.id)
    print("acknowledged", flush=True)
"""


@pytest.mark.parametrize("step", WRITE_STEPS)
def test_a_client_killed_inside_a_dual_write_leaves_nothing_of_it(served, step):
    with open_database(served.address) as con:
        set_stage(con, "dual-write", "test")
    done = subprocess.run(
        [sys.executable, "-c", FAULTY_CLIENT, served.address, step],
        capture_output=True,
        text=True,
        env=_env(served.token),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    lines = done.stdout.split()
    acked = [lines[0], lines[2]]
    assert lines[1] == lines[3] == "acknowledged" and len(lines) == 5
    killed = lines[4]
    with open_database(served.address) as con:
        wait_until(lambda: con.status()["clients"] == 1, 10, 0.05, "the killed client gone")
        new = {r[0] for r in con.execute("SELECT id FROM identities").fetchall()}
        legacy = {r[0] for r in con.execute("SELECT gid FROM legacy_geoids").fetchall()}
        log = con.execute("SELECT identity_id, status FROM dual_write_log").fetchall()
    assert new == legacy == set(acked) and killed not in new
    assert sorted(log) == sorted((i, "success") for i in acked)  # no failed row either


BURST_WRITER = """
import dataclasses, random, sys, time
from kimera_core.storage import Storage
from kimera_core.workload import random_geoid

storage = Storage.open(sys.argv[1], stage="dual-write")
rng = random.Random(5)
for n in range(1_000_000):
    item = dataclasses.replace(random_geoid(rng, time.time()), id=f"burst_{n:07d}")
    storage.store(item)
    print(item.id, flush=True)
"""


def test_the_server_killed_in_a_dual_write_burst_loses_no_acknowledged_write(served):
    with open_database(served.address) as con:
        set_stage(con, "dual-write", "test")
    writer = subprocess.Popen(
        [sys.executable, "-c", BURST_WRITER, served.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(served.token),
    )
    acked: list[str] = []
    try:
        while len(acked) < 200:
            line = writer.stdout.readline()
            assert line, writer.stderr.read()
            acked.append(line.strip())
        served.kill()
        out, err = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    acked += out.split()
    assert writer.returncode != 0 and "DualWriteError" in err  # it lost the server mid-write
    served.start()
    with open_database(served.address) as con:
        con.execute("CREATE TEMP TABLE acked (id VARCHAR)")
        con.executemany("INSERT INTO acked VALUES (?)", [[i] for i in acked])
        missing = con.execute(
            "SELECT count(*) FILTER (WHERE id NOT IN (SELECT id FROM identities)), "
            "count(*) FILTER (WHERE id NOT IN (SELECT gid FROM legacy_geoids)), "
            "count(*) FILTER (WHERE id NOT IN (SELECT identity_id FROM dual_write_log "
            "WHERE status = 'success')) FROM acked"
        ).fetchone()
        assert missing == (0, 0, 0)
        # the write in flight at the kill is wholly there or wholly absent
        counts = con.execute(
            "SELECT (SELECT count(*) FROM identities WHERE id LIKE 'burst_%'), "
            "(SELECT count(*) FROM legacy_geoids WHERE gid LIKE 'burst_%'), "
            "(SELECT count(*) FROM dual_write_log WHERE identity_id LIKE 'burst_%'), "
            "(SELECT count(*) FROM dual_write_log WHERE status = 'failed')"
        ).fetchone()
    assert counts[0] == counts[1] == counts[2] in (len(acked), len(acked) + 1)
    assert counts[3] == 0


def test_writer_migration_and_verification_at_once_on_one_server(source, tmp_path, token, servers):
    path, _expected = source
    server = servers(_copy(path, tmp_path / "live.duckdb"), token)
    with open_database(server.address) as con:
        set_stage(con, "dual-write", "test")
        failed_before = con.execute(
            "SELECT count(*) FROM dual_write_log WHERE status = 'failed'"
        ).fetchone()[0]
    stop = threading.Event()
    result: dict = {}

    def write() -> None:
        with Storage.open(server.address) as storage:
            result["report"] = run_workload(storage, seconds=0, rate=100, stop=stop, track=True)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_until(lambda: _clients(server.address) >= 1, 30, 0.05, "the writer connected")
        migration = subprocess.run(
            [KIMERA, "migrate", "--db", server.address],
            env=_env(token),
            capture_output=True,
            text=True,
        )
        verification = subprocess.run(
            [KIMERA, "verify", "--db", server.address],
            env=_env(token),
            capture_output=True,
            text=True,
        )
    finally:
        stop.set()
        writer.join(timeout=60)
    report = result["report"]
    assert migration.returncode == 0, migration.stderr
    assert verification.returncode == 0, verification.stdout + verification.stderr
    for output in (migration.stderr, verification.stderr):
        assert "lock" not in output.lower() and "conflict" not in output.lower()
    assert all(counts["failure"] == 0 for counts in report.operations.values())
    assert report.operations["store"]["success"] > 10
    with open_database(server.address) as con:
        con.execute("CREATE TEMP TABLE present (id VARCHAR)")
        con.executemany("INSERT INTO present VALUES (?)", [[i] for i in report.present_ids])
        con.execute("CREATE TEMP TABLE deleted (id VARCHAR)")
        con.executemany(
            "INSERT INTO deleted VALUES (?)", [[i] for i in report.deleted_ids] or [[None]]
        )
        legacy = "SELECT gid FROM legacy_geoids UNION ALL SELECT id FROM legacy_scars"
        assert con.execute(
            f"SELECT count(*) FILTER (WHERE id NOT IN (SELECT id FROM identities)), "
            f"count(*) FILTER (WHERE id NOT IN ({legacy})) FROM present"
        ).fetchone() == (0, 0)
        assert con.execute(
            f"SELECT count(*) FROM deleted WHERE id IN (SELECT id FROM identities) "
            f"OR id IN ({legacy})"
        ).fetchone() == (0,)
        failed_after = con.execute(
            "SELECT count(*) FROM dual_write_log WHERE status = 'failed'"
        ).fetchone()[0]
    assert failed_after == failed_before


def _clients(address: str) -> int:
    with open_database(address) as con:
        return con.status()["clients"] - 1


def test_readers_see_one_stage_or_the_next_never_a_half_moved_one(served):
    stages = ("dual-write", "backfilled")
    with open_database(served.address) as con:
        set_stage(con, stages[0], "test")
    seen: list[str] = []
    stop = threading.Event()

    def read() -> None:
        with open_database(served.address) as con:
            while not stop.is_set():
                seen.append(get_stage(con))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    with open_database(served.address) as con:
        for n in range(40):
            set_stage(con, stages[(n + 1) % 2], "test")
    stop.set()
    for reader in readers:
        reader.join(timeout=30)
    assert len(seen) > 40 and set(seen) == set(stages)  # never the default of a missing row


def test_writers_opening_at_once_on_a_new_file_do_not_conflict_on_the_catalog(
    tmp_path, token, servers
):
    path = tmp_path / "new.duckdb"
    open_database(path, create=True).close()  # no table at all: the server creates them
    server = servers(path, token)
    errors: list[BaseException] = []
    connections = [open_database(server.address) for _ in range(8)]
    gate = threading.Barrier(len(connections))

    def open_storage(con) -> None:
        try:
            gate.wait(timeout=30)
            for _ in range(5):  # what every Storage does as it opens
                Storage(con)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_storage, args=(c,)) for c in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for con in connections:
        con.close()
    assert errors == []


def test_full_verifications_beside_live_writers_find_the_stores_consistent(
    source, tmp_path, token, servers
):
    path, _expected = source
    live = _copy(path, tmp_path / "live.duckdb")
    done = subprocess.run([KIMERA, "migrate", "--db", str(live)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    server = servers(live, token)
    with open_database(server.address) as con:
        set_stage(con, "dual-write", "test")
    stop = threading.Event()

    def write(seed: int) -> None:
        with Storage.open(server.address) as storage:
            run_workload(storage, seconds=0, rate=300, stop=stop, seed=seed)

    writers = [threading.Thread(target=write, args=(seed,)) for seed in range(3)]
    for writer in writers:
        writer.start()
    verdicts = []
    try:
        for _ in range(3):
            run = subprocess.run(
                [KIMERA, "verify", "--db", server.address, "--no-cache"],
                env=_env(token),
                capture_output=True,
                text=True,
            )
            verdicts.append((run.returncode, run.stdout[-400:]))
    finally:
        stop.set()
        for writer in writers:
            writer.join(timeout=60)
    assert [code for code, _ in verdicts] == [0, 0, 0], verdicts
