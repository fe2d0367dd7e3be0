"""``kimera verify`` as a user runs it: the installed executable, exit status, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from kimera_core.identity import Identity
from kimera_core.storage import Storage

KIMERA = Path(sys.executable).parent / "kimera"


def kimera(*args):
    return subprocess.run(
        [str(KIMERA), *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def consistent_db(tmp_path):
    path = tmp_path / "c.duckdb"
    with Storage.open(str(path), stage="dual-write") as s:
        s.store_batch(
            [
                Identity(id=f"g{i}", identity_type="geoid", raw=f"text {i}", tags=["t"])
                for i in range(100)
            ]
        )
    return path


def test_consistent_database_exits_zero(consistent_db):
    result = kimera("verify", "--db", consistent_db)
    assert result.returncode == 0, result.stderr
    assert "CONSISTENT" in result.stdout


def test_disagreement_exits_one_with_json_findings(consistent_db):
    con = duckdb.connect(str(consistent_db))
    con.execute("DELETE FROM identities WHERE id IN ('g1', 'g2', 'g3')")
    con.close()
    result = kimera("verify", "--db", consistent_db, "--json", "--sample", "2")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["verdict"] == "inconsistent"
    assert report["missing_in_new"]["total"] == 3
    assert len(report["missing_in_new"]["sample"]) == 2
    assert any("not in identities" in r for r in report["reasons"])


def test_text_output_names_the_problem(consistent_db):
    con = duckdb.connect(str(consistent_db))
    con.execute("UPDATE legacy_geoids SET raw = 'edited' WHERE gid = 'g5'")
    con.close()
    result = kimera("verify", "--db", consistent_db)
    assert result.returncode == 1
    assert "INCONSISTENT" in result.stdout and "g5" in result.stdout


def test_incremental_uses_the_recorded_verification(consistent_db):
    assert kimera("verify", "--db", consistent_db).returncode == 0
    result = kimera("verify", "--db", consistent_db, "--incremental", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["mode"] == "incremental"
    assert report["keys_checked"] == 0


def test_no_record_leaves_the_file_untouched(consistent_db):
    before = consistent_db.read_bytes()
    assert kimera("verify", "--db", consistent_db, "--no-record").returncode == 0
    assert consistent_db.read_bytes() == before


def test_missing_file_is_one_line_error(tmp_path):
    result = kimera("verify", "--db", tmp_path / "nope.duckdb")
    # issue 11: could not run is exit 2, never 1 (1 is the inconsistent verdict)
    assert result.returncode == 2
    assert result.stderr.startswith("kimera: error:") and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_run_reuses_the_digest_cache(consistent_db):
    first = json.loads(kimera("verify", "--db", consistent_db, "--json").stdout)
    assert first["checksums"]["digest_cache"]["rows_digested"] == 200
    result = kimera("verify", "--db", consistent_db)
    assert result.returncode == 0
    assert "rows digested" in result.stdout
    second = json.loads(kimera("verify", "--db", consistent_db, "--json").stdout)
    cache = second["checksums"]["digest_cache"]
    assert cache["rows_digested"] == 0 and cache["reused"] == cache["segments"] > 0


def test_no_cache_digests_everything_and_writes_no_cache(consistent_db):
    result = kimera("verify", "--db", consistent_db, "--no-cache", "--json")
    assert result.returncode == 0, result.stderr
    cache = json.loads(result.stdout)["checksums"]["digest_cache"]
    assert cache["enabled"] is False and cache["rows_digested"] == 200
    con = duckdb.connect(str(consistent_db), read_only=True)
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    con.close()
    assert "kimera_verify_digests" not in tables
