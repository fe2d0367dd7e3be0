"""The operator's path, through the installed ``kimera``: a DuckDB 0.9.2 file in the existing
system's layout with an empty echoforms goes through ``db info``, ``db upgrade`` and
``migrate`` to a balanced run, the original unchanged until ``--replace`` (sha256)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from duckdb_matrix import expected_rows, release_or_skip

from kimera_core.legacy import LEGACY_TABLES

KIMERA = Path(sys.executable).parent / "kimera"


def kimera(*args):
    return subprocess.run(
        [str(KIMERA), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_092_file_with_an_empty_echoforms_goes_through_info_upgrade_and_migrate(matrix_file):
    path = matrix_file("0.9.2", "no_lattice")
    original = sha256(path)
    counts = {t: len(expected_rows("no_lattice", t)) for t in LEGACY_TABLES}
    assert counts["echoforms"] == 0 and counts["legacy_geoids"] > 0

    info = kimera("db", "info", "--db", path, "--json")
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["opens"] is False and described["tables"] is None
    assert described["library_version"] == "v0.9.2"
    assert described["metadata_from_duckdb_09"] is True
    assert described["next_command"] == f"kimera db upgrade --db {path}"
    text = kimera("db", "info", "--db", path)
    assert "DuckDB v0.9.2" in text.stdout and f"next: kimera db upgrade --db {path}" in text.stdout

    refused = kimera("migrate", "--db", path)
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert "v0.9.2" in refused.stderr and f"kimera db upgrade --db {path}" in refused.stderr

    copy = kimera("db", "upgrade", "--db", path)
    assert copy.returncode == 0, copy.stderr
    assert f"next: kimera db upgrade --db {path} --replace" in copy.stdout
    assert sha256(path) == original

    replaced = kimera("db", "upgrade", "--db", path, "--replace", "--json")
    assert replaced.returncode == 0, replaced.stderr
    report = json.loads(replaced.stdout)
    assert report["replaced"] and report["original_sha256"] == original
    assert sha256(Path(report["backup"])) == original
    assert {k.removeprefix("main."): v["rows"] for k, v in report["tables"].items()} == counts

    info = json.loads(kimera("db", "info", "--db", path, "--json").stdout)
    assert info["opens"] is True and info["tables"] == counts and info["next_command"] is None

    run = kimera("migrate", "--db", path, "--json")
    assert run.returncode == 0, run.stderr
    migrated = json.loads(run.stdout)
    assert migrated["balanced"] is True and migrated["status"] == "completed"
    assert migrated["legacy_rows"] == counts["legacy_geoids"] + counts["legacy_scars"]
    assert migrated["counts"]["quarantined"] == 0


HOLD = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1])
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_upgrade_refuses_a_file_another_process_holds(matrix_file):
    path = matrix_file("0.9.2", "pre_p1")
    original = sha256(path)
    release = release_or_skip("1.4.4")  # the only kind of DuckDB that can hold this file
    holder = subprocess.Popen(
        [sys.executable, "-P", "-s", "-c", HOLD, str(path)],
        env={**os.environ, "PYTHONPATH": str(release)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        result = kimera("db", "upgrade", "--db", path, "--replace")
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "another process holds the database" in result.stderr
    assert sha256(path) == original
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_upgrade_refuses_what_is_not_a_duckdb_file_in_one_line(tmp_path):
    path = tmp_path / "notes.duckdb"
    path.write_text("not a database\n", encoding="utf-8")
    result = kimera("db", "upgrade", "--db", path)
    assert result.returncode == 1 and result.stderr.startswith("kimera: error:")
    assert len(result.stderr.splitlines()) == 1 and "not a DuckDB" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.duckdb"]
