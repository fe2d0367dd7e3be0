"""The database server's contract: address, token, typed errors, transactions per client,
a vanished client rolled back, Arrow in and out, the function allowlist, the CLI through it."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from dbserver_proc import KIMERA, DbServer
from support.servers import wait_until

from kimera_core import textsearch
from kimera_core.db import checkpoint, is_served, open_database, transaction
from kimera_core.dbserver.client import RemoteConnection
from kimera_core.dbserver.protocol import parse_address
from kimera_core.dbserver.server import DatabaseServer
from kimera_core.errors import DatabaseOpenError


def _clients(address: str) -> int:
    with open_database(address) as con:
        return con.status()["clients"] - 1  # not counting this connection


def test_the_first_line_is_the_address_and_status_counts_the_clients(served):
    assert served.address == f"kimera://127.0.0.1:{served.port}"
    first = open_database(served.address)
    second = open_database(served.address)
    assert isinstance(first, RemoteConnection)
    status = first.status()
    assert status["healthy"] and status["database"] == str(served.path)
    assert status["clients"] == 2 and status["pid"] == served.pid
    second.close()
    wait_until(lambda: _clients(served.address) == 1, 10, 0.05, "one client left")
    first.close()


def test_an_address_a_path_folded_still_opens(served):
    folded = Path(served.address)  # Path folds "//" into "/"
    assert str(folded).startswith("kimera:/1")
    with open_database(folded) as con:
        assert con.execute("SELECT 41 + 1").fetchone() == (42,)
    with pytest.raises(ValueError, match="not a database server address"):
        parse_address("kimera://nohost")


def test_a_wrong_or_missing_token_is_refused(served, monkeypatch, tmp_path):
    monkeypatch.setenv("KIMERA_DB_TOKEN", "not-the-token")
    with pytest.raises(DatabaseOpenError, match="refused the token"):
        open_database(served.address)
    monkeypatch.delenv("KIMERA_DB_TOKEN")
    monkeypatch.setenv("KIMERA_DB_TOKEN_FILE", str(tmp_path / "absent"))
    with pytest.raises(DatabaseOpenError, match="no token"):
        open_database(served.address)


def test_a_token_file_others_may_read_is_refused_by_client_and_server(
    served, monkeypatch, tmp_path
):
    token_file = tmp_path / "token"
    token_file.write_text(served.token)
    token_file.chmod(0o644)
    monkeypatch.delenv("KIMERA_DB_TOKEN")
    monkeypatch.setenv("KIMERA_DB_TOKEN_FILE", str(token_file))
    with pytest.raises(DatabaseOpenError, match="chmod 600"):
        open_database(served.address)
    env = {k: v for k, v in os.environ.items() if k != "KIMERA_DB_TOKEN"}
    done = subprocess.run(
        [KIMERA, "db", "serve", "--db", str(served.path), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and done.stdout == ""
    assert "readable by group or others (mode 0644)" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    token_file.chmod(0o600)
    with open_database(served.address) as con:  # the same file, owner-only: accepted
        assert con.execute("SELECT 1").fetchone() == (1,)


def test_a_token_file_inside_a_git_tree_is_refused(served, monkeypatch, tmp_path):
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    token_file = tmp_path / "repo" / "token"
    token_file.write_text(served.token)
    token_file.chmod(0o600)
    monkeypatch.delenv("KIMERA_DB_TOKEN")
    monkeypatch.setenv("KIMERA_DB_TOKEN_FILE", str(token_file))
    with pytest.raises(DatabaseOpenError, match="inside the git work tree"):
        open_database(served.address)


def test_serve_writes_a_new_owner_only_token_file_when_there_is_none(tmp_path, monkeypatch):
    path = tmp_path / "fresh.duckdb"
    open_database(path, create=True).close()
    token_file = tmp_path / "cfg" / "db-token"
    monkeypatch.delenv("KIMERA_DB_TOKEN", raising=False)
    monkeypatch.setenv("KIMERA_DB_TOKEN_FILE", str(token_file))
    env = {k: v for k, v in os.environ.items() if k != "KIMERA_DB_TOKEN"}
    proc = subprocess.Popen(
        [KIMERA, "db", "serve", "--db", str(path), "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        address = proc.stdout.readline().strip() if ready else ""
        assert address.startswith("kimera://127.0.0.1:")
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        with open_database(address) as con:  # the client reads the same file
            assert con.execute("SELECT 1").fetchone() == (1,)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert "new token written to" in proc.stderr.read()


def test_errors_keep_their_duckdb_class_and_the_connection_goes_on(served):
    with open_database(served.address) as con:
        con.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
        con.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(duckdb.CatalogException):
            con.execute("SELECT * FROM no_such_table")
        with pytest.raises(duckdb.ConstraintException):
            con.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(duckdb.ParserException):
            con.execute("SELEC 1")
        with pytest.raises(TypeError, match="cannot be sent"):
            con.execute("SELECT ?", [object()])
        assert con.execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_each_client_has_its_own_transaction(served):
    with open_database(served.address) as a, open_database(served.address) as b:
        a.execute("CREATE TABLE t (k INTEGER)")
        with transaction(a):
            a.execute("INSERT INTO t VALUES (1)")
            assert b.execute("SELECT count(*) FROM t").fetchone() == (0,)  # not committed
            assert checkpoint(b) is False  # through a server: never asked (it stalls commits)
        assert b.execute("SELECT count(*) FROM t").fetchone() == (1,)
        with pytest.raises(RuntimeError), transaction(a):
            a.execute("INSERT INTO t VALUES (2)")
            raise RuntimeError("undo")
        assert b.execute("SELECT count(*) FROM t").fetchone() == (1,)
        cursor = a.cursor()  # a new connection: its own context
        with transaction(cursor):
            cursor.execute("INSERT INTO t VALUES (3)")
            assert a.execute("SELECT count(*) FROM t").fetchone() == (1,)
        cursor.close()
        assert a.execute("SELECT sum(k) FROM t").fetchone() == (4,)


HOLDER = """
import sys
import threading
from kimera_core.db import open_database
con = open_database(sys.argv[1])
con.execute("BEGIN TRANSACTION")
con.execute("INSERT INTO t VALUES (99)")
con.execute("UPDATE t SET k = k + 1000 WHERE k = 1")
print("inside", flush=True)
sys.stdin.read()
"""


def test_a_client_killed_mid_transaction_is_rolled_back(served):
    with open_database(served.address) as con:
        con.execute("CREATE TABLE t (k INTEGER)")
        con.execute("INSERT INTO t VALUES (1)")
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, served.address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "inside"
            assert _clients(served.address) == 2
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)
        finally:
            if holder.poll() is None:
                holder.kill()
        wait_until(lambda: _clients(served.address) == 1, 10, 0.05, "the killed client gone")
        assert con.execute("SELECT k FROM t").fetchall() == [(1,)]
        con.execute("UPDATE t SET k = 2 WHERE k = 1")  # the row is free: no conflict
        assert con.execute("SELECT k FROM t").fetchall() == [(2,)]


def test_arrow_out_and_register_in(served):
    table = pa.table({"k": [1, 2, 3], "name": ["a", None, "ç"], "x": [0.5, 2**-1074, -0.0]})
    embedded = duckdb.connect()
    embedded.register("batch", table)
    sql = "SELECT k, name, x, x::VARCHAR AS shown, [k, k] AS pair FROM batch ORDER BY k"
    with open_database(served.address) as con:
        con.register("batch", table)
        reader = con.execute(sql).arrow()
        assert isinstance(reader, pa.RecordBatchReader)
        assert reader.read_all().equals(embedded.execute(sql).to_arrow_table())
        assert con.execute("SELECT sum(k) FROM batch").fetchone() == (6,)
        assert con.execute("SELECT * FROM batch ORDER BY k").to_arrow_table().equals(table)
        con.unregister("batch")
        with pytest.raises(duckdb.CatalogException):
            con.execute("SELECT * FROM batch")
        with pytest.raises(TypeError, match="Arrow data only"):
            con.register("rows", [(1,)])


def _not_ours(texts):
    return texts


def test_functions_come_from_kimera_core_only(served):
    embedded = duckdb.connect()
    with open_database(served.address) as con:
        for c in (embedded, con):
            c.create_function(
                "kimera_tokenize",
                textsearch._tokenize_arrow,
                ["VARCHAR"],
                "VARCHAR[]",
                type="arrow",
                null_handling="special",
            )
        sql = "SELECT kimera_tokenize(?)"
        text = "L'entropie du réseau, 矛盾 résonance"
        assert con.execute(sql, [text]).fetchall() == embedded.execute(sql, [text]).fetchall()
        with pytest.raises(PermissionError, match="kimera_core modules only"):
            con.create_function("mine", _not_ours, ["VARCHAR"], "VARCHAR", type="arrow")
        con.remove_function("kimera_tokenize")
        with pytest.raises(duckdb.CatalogException):
            con.execute(sql, [text])


def test_every_kimera_command_takes_the_address(served):
    env = {**os.environ, "KIMERA_DB_TOKEN": served.token}
    summary = subprocess.run(
        [KIMERA, "summary", "--db", served.address], env=env, capture_output=True, text=True
    )
    assert summary.returncode == 0, summary.stderr
    status = subprocess.run(
        [KIMERA, "db", "status", "--db", served.address, "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["clients"] == 1 and report["client_list"][0]["program"] == "kimera db status"
    refused = subprocess.run(
        [KIMERA, "db", "status", "--db", str(served.path)], env=env, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "not a server address" in refused.stderr


def test_a_stopped_server_is_one_line_and_a_restart_serves_the_same_file(served):
    with open_database(served.address) as con:
        con.execute("CREATE TABLE kept AS SELECT 7 AS k")
        assert served.stop() == 0
        with pytest.raises(duckdb.ConnectionException):
            con.execute("SELECT 1")
    with pytest.raises(DatabaseOpenError, match="cannot reach the database server"):
        open_database(served.address)
    served.start()
    with open_database(served.address) as con:
        assert con.execute("SELECT k FROM kept").fetchall() == [(7,)]


def test_a_server_needs_a_file_not_an_address(tmp_path, token):
    done = subprocess.run(
        [KIMERA, "db", "serve", "--db", str(tmp_path / "missing.duckdb")],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "no such file" in done.stderr


def test_a_database_duckdb_invalidated_stops_the_server_with_the_reason(tmp_path, token):
    path = tmp_path / "invalid.duckdb"
    open_database(path, create=True).close()
    server = DatabaseServer(path, token)
    address = server.start()
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    with open_database(str(address)) as con:
        assert con.status()["healthy"] and con.status()["fatal_error"] is None
        server.invalidated("FATAL Error: database has been invalidated\nOriginal error: ...")
        serving.join(timeout=30)
        assert not serving.is_alive() and server.wait_stopped(30)
        with pytest.raises(duckdb.ConnectionException):
            con.execute("SELECT 1")
    assert server.fatal_error == "FATAL Error: database has been invalidated"


def test_the_checkpoint_threshold_is_the_servers_and_clients_never_checkpoint(tmp_path, token):
    path = tmp_path / "threshold.duckdb"
    open_database(path, create=True).close()
    server = DbServer(path, token, args=("--checkpoint-threshold", "256MB"))
    server.start()
    try:
        with open_database(server.address) as con:
            shown = con.execute("SELECT current_setting('checkpoint_threshold')").fetchone()[0]
            assert shown.startswith("256") or shown.startswith("244")  # MB or MiB
            con.execute("CREATE TABLE t AS SELECT range AS k FROM range(1000)")
            assert checkpoint(con) is False and is_served(con)
        assert not is_served(duckdb.connect())
        assert (tmp_path / "threshold.duckdb.wal").stat().st_size > 0  # still in the WAL
    finally:
        assert server.stop() == 0


def test_threads_and_the_request_trace_are_the_servers(tmp_path, token):
    path = tmp_path / "threads.duckdb"
    open_database(path, create=True).close()
    trace = tmp_path / "trace.tsv"
    server = DbServer(path, token, args=("--threads", "1", "--trace", str(trace)))
    server.start()
    try:
        with open_database(server.address) as con:
            assert con.execute("SELECT current_setting('threads')").fetchone()[0] == 1
            with transaction(con):
                con.execute("CREATE TABLE t AS SELECT range AS k FROM range(?)", [5000])
            assert con.execute("SELECT sum(k) FROM t").fetchone()[0] == sum(range(5000))
            pid = os.getpid()
    finally:
        assert server.stop() == 0
    lines = [line.split("\t") for line in trace.read_text().splitlines()]
    ours = [fields for fields in lines if fields[0] == str(pid)]
    assert [(f[1], f[2]) for f in ours] == [
        ("execute", "SELECT current_setting('threads')"),
        ("fetch", ""),
        ("execute", "BEGIN TRANSACTION"),
        ("execute", "CREATE TABLE t AS SELECT range AS k FROM range(?)"),
        ("execute", "COMMIT"),
        ("execute", "SELECT sum(k) FROM t"),
        ("fetch", ""),
        ("close", ""),
    ]
    for fields in ours:
        received, started, ended, done, sent, cpu = fields[3:]
        if fields[1] == "execute":  # a statement: its start, end and CPU, in order
            assert float(received) <= float(started) <= float(ended) <= float(done)
            assert float(cpu) >= 0
        else:
            assert started == ended == cpu == ""
        assert float(received) <= float(done) <= float(sent)


def test_threads_below_one_are_refused(tmp_path, token):
    path = tmp_path / "none.duckdb"
    open_database(path, create=True).close()
    result = subprocess.run(
        [KIMERA, "db", "serve", "--db", str(path), "--threads", "0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "--threads" in result.stderr


def test_garbage_and_requests_before_the_token_are_dropped_and_others_go_on(served):
    address = parse_address(served.address)
    with open_database(served.address) as con:
        for payload in (
            b"\xff" * 8,  # a header length of 4 GiB
            b"\x00\x00\x00\x05\x00\x00\x00\x00[1,2]",  # JSON, but not an object
            struct.pack("!II", 26, 0) + b'{"op":"execute","sql":"S"}',  # no hello first
        ):
            with socket.create_connection((address.host, address.port), timeout=10) as raw:
                raw.sendall(payload)
                reply = b""
                with contextlib.suppress(OSError):
                    while chunk := raw.recv(4096):
                        reply += chunk
                assert b"SELECT" not in reply and b'"ok"' not in reply  # nothing served
        assert con.execute("SELECT 6 * 7").fetchone() == (42,)
        assert con.status()["clients"] == 1
