"""Backup and restore: consistent export, manifest, verified restore that never half-replaces."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest
from support.servers import kimera_db_server

import kimera_core.backup as backup_module
from kimera_core.backup import (
    MANIFEST_NAME,
    BackupError,
    backup_database,
    restore_database,
    verify_backup,
)
from kimera_core.checksum import table_checksum
from kimera_core.db import connect, read_header
from kimera_core.demo import generate_demo_data
from kimera_core.errors import DatabaseOpenError, KimeraError
from kimera_core.legacy import missing_tables, read_identity_p1

KIMERA = Path(sys.executable).parent / "kimera"

# Values whose round trip through Parquet is easy to get wrong.
FIDELITY_DDL = """
CREATE TABLE kimera_fidelity (
    id INTEGER PRIMARY KEY,
    d DOUBLE,
    j JSON,
    t TEXT,
    ts TIMESTAMP WITH TIME ZONE,
    dec DECIMAL(18, 6),
    big HUGEINT,
    l VARCHAR[]
)
"""
FIDELITY_ROWS = [
    (1, 0.1, '{"b": 1, "a": [1.0, "é"]}', "", "2026-01-01 00:00:00.123456+00", "1.5", 2**100, []),
    (2, -0.0, "null", "NULL", None, None, None, None),
    (3, 5e-324, '  {"spaces" :  true }  ', "naïve 🌍\n\ttab", None, "-0.000001", -1, ["x", None]),
    (4, float("inf"), "[]", None, None, None, None, [""]),
    (5, float("-inf"), '"a string"', "'quoted'", None, None, None, None),
    (6, float("nan"), None, "\\back", None, None, None, None),
    (7, 1.7976931348623157e308, "1e400", "x" * 10_000, None, None, None, None),
]


def all_checksums(path):
    with duckdb.connect(str(path), read_only=True) as con:
        names = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' ORDER BY 1"
            ).fetchall()
        ]
        return {name: table_checksum(con, name) for name in names}


def column_types(path):
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = 'main' ORDER BY 1, 2"
        ).fetchall()


def index_names(path):
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(
            "SELECT table_name, index_name FROM duckdb_indexes() ORDER BY 1, 2"
        ).fetchall()


@pytest.fixture(scope="module")
def source_template(tmp_path_factory):
    """A demo database plus a kimera_* table of hard-to-round-trip values (do not write to it)."""
    path = tmp_path_factory.mktemp("backup-src") / "source.duckdb"
    generate_demo_data(path, geoids=2000, scars=1000, seed=11)
    with duckdb.connect(str(path)) as con:
        con.execute(FIDELITY_DDL)
        con.executemany(
            "INSERT INTO kimera_fidelity VALUES (?, ?, ?, ?, ?, ?, ?, ?)", FIDELITY_ROWS
        )
    return path


@pytest.fixture
def source(source_template, tmp_path):
    path = tmp_path / "kimera.duckdb"
    shutil.copy(source_template, path)
    return path


@pytest.fixture(scope="module")
def backup_template(source_template, tmp_path_factory):
    """A backup of source_template (copy it before changing it)."""
    target = tmp_path_factory.mktemp("backup-tpl") / "backup"
    backup_database(source_template, target)
    return target


@pytest.fixture
def backup_dir(backup_template, tmp_path):
    path = tmp_path / "backup"
    shutil.copytree(backup_template, path)
    return path


def snapshot(path):
    return Path(path).read_bytes()


def leftovers(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


# --- backup -------------------------------------------------------------------------------


def test_manifest_records_every_table_with_its_checksum(source, tmp_path):
    manifest = backup_database(source, tmp_path / "b")
    expected = all_checksums(source)
    assert (
        set(manifest.tables)
        == set(expected)
        >= {
            "legacy_geoids",
            "legacy_scars",
            "echoforms",
            "identities",
            "dual_write_log",
            "kimera_fidelity",
        }
    )
    for name, checksum in expected.items():
        assert manifest.tables[name].as_checksum() == checksum, name
    on_disk = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())
    assert on_disk["version"] == 1
    assert on_disk["duckdb_version"] == duckdb.__version__
    assert on_disk["source"]["path"] == str(source.absolute())
    assert on_disk["source"]["storage_version"] == 64
    assert on_disk["created_at"].endswith("+00:00")
    assert "dual_write_log_seq" in on_disk["sequences"]
    listed = set(on_disk["files"])
    present = {p.name for p in (tmp_path / "b").iterdir()} - {MANIFEST_NAME}
    assert listed == present
    assert {"schema.sql", "load.sql", "legacy_geoids.parquet"} <= listed
    assert verify_backup(tmp_path / "b").tables == manifest.tables


def test_backup_leaves_the_source_untouched(source, tmp_path):
    before = snapshot(source)
    backup_database(source, tmp_path / "b")
    assert snapshot(source) == before
    assert not Path(f"{source}.wal").exists()


def test_backup_into_an_existing_empty_directory(source, tmp_path):
    (tmp_path / "empty").mkdir()
    backup_database(source, tmp_path / "empty")
    assert (tmp_path / "empty" / MANIFEST_NAME).exists()


def test_backup_refuses_a_non_empty_directory(source, tmp_path):
    target = tmp_path / "full"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(BackupError, match="not empty"):
        backup_database(source, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_backup_refuses_a_file_as_target(source, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BackupError, match="not a directory"):
        backup_database(source, tmp_path / "file")


def test_backup_of_a_file_that_is_not_a_database_is_refused(tmp_path):
    (tmp_path / "notes.duckdb").write_text("not a database")
    with pytest.raises(DatabaseOpenError, match="not a DuckDB database"):
        backup_database(tmp_path / "notes.duckdb", tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert leftovers(tmp_path) == []


def test_a_failed_backup_leaves_no_directory(source, tmp_path, monkeypatch):
    def boom(directory):
        raise OSError("disk full")

    monkeypatch.setattr(backup_module, "_file_digests", boom)
    with pytest.raises(OSError, match="disk full"):
        backup_database(source, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert leftovers(tmp_path) == []


def test_paths_with_quotes_work_and_control_characters_are_refused(source, tmp_path):
    odd = tmp_path / "it's a dir" / "back'up"
    backup_database(source, odd)
    report = restore_database(odd, tmp_path / "o'k.duckdb")
    assert all(check.ok for check in report.tables)
    with pytest.raises(BackupError, match="control characters"):
        backup_database(source, tmp_path / "bad\nname")
    assert not (tmp_path / "bad\nname").exists()


LOCK_HOLDER = textwrap.dedent(
    """
    import sys, duckdb
    con = duckdb.connect(sys.argv[1])
    print("locked", flush=True)
    sys.stdin.readline()
    """
)


@pytest.fixture
def locked(tmp_path):
    """Start a process that holds a database file open for writing; yields a function."""
    procs = []

    def hold(path):
        proc = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.communicate(input="\n", timeout=30)


def test_backup_of_a_file_another_process_writes_is_refused(source, tmp_path, locked):
    locked(source)
    with pytest.raises(DatabaseOpenError, match="another process holds the database"):
        backup_database(source, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert leftovers(tmp_path) == []


# --- restore ------------------------------------------------------------------------------


def test_restore_reproduces_every_table_type_and_index(source, backup_dir, tmp_path):
    target = tmp_path / "restored.duckdb"
    report = restore_database(backup_dir, target)
    assert not report.replaced
    assert all(check.ok for check in report.tables)
    assert all_checksums(target) == all_checksums(source)
    assert column_types(target) == column_types(source)
    assert index_names(target) == index_names(source)


def test_json_double_and_text_values_survive_exactly(source, backup_dir, tmp_path):
    target = tmp_path / "restored.duckdb"
    restore_database(backup_dir, target)
    query = (
        "SELECT id, d::VARCHAR, j, typeof(j), t, ts, dec, big, l FROM kimera_fidelity ORDER BY id"
    )
    with duckdb.connect(str(source), read_only=True) as a, duckdb.connect(str(target)) as b:
        assert b.execute(query).fetchall() == a.execute(query).fetchall()
        assert {r[3] for r in b.execute(query).fetchall()} == {"JSON"}
        # JSON text is kept as written (whitespace included), not re-serialised
        assert b.execute("SELECT j FROM kimera_fidelity WHERE id = 3").fetchone()[0] == (
            '  {"spaces" :  true }  '
        )
        # -0.0 keeps its sign bit
        assert b.execute("SELECT signbit(d) FROM kimera_fidelity WHERE id = 2").fetchone()[0]


@pytest.mark.parametrize(
    "damage",
    [
        "DELETE FROM legacy_geoids WHERE gid IN (SELECT gid FROM legacy_geoids LIMIT 100)",
        "UPDATE identities SET entropy_score = entropy_score + 1e-9 "
        "WHERE id = (SELECT min(id) FROM identities)",
        "UPDATE legacy_scars SET meta = '{}' WHERE id = (SELECT min(id) FROM legacy_scars)",
        "DROP TABLE kimera_fidelity",
        "DROP TABLE dual_write_log; DROP SEQUENCE dual_write_log_seq",
        "CREATE TABLE kimera_extra AS SELECT 1 AS x",
    ],
    ids=["delete-rows", "update-double", "update-json", "drop-table", "drop-seq", "add-table"],
)
def test_backup_damage_restore_gives_back_the_original(source, tmp_path, damage):
    original = all_checksums(source)
    manifest = backup_database(source, tmp_path / "b")
    with duckdb.connect(str(source)) as con:
        con.execute(damage)
    assert all_checksums(source) != original
    report = restore_database(tmp_path / "b", source, force=True)
    assert report.replaced
    restored = all_checksums(source)
    assert restored == original
    assert {name: entry.as_checksum() for name, entry in manifest.tables.items()} == restored
    assert leftovers(tmp_path) == []


def test_restore_replaces_a_damaged_file_and_drops_its_stale_wal(source, backup_dir, tmp_path):
    target = tmp_path / "broken.duckdb"
    target.write_bytes(snapshot(source)[:5000])  # truncated
    Path(f"{target}.wal").write_bytes(b"stale wal of the replaced file")
    restore_database(backup_dir, target, force=True)
    assert not Path(f"{target}.wal").exists()
    assert all_checksums(target) == all_checksums(source)


def test_restore_refuses_an_existing_target_without_force(source, backup_dir):
    before = snapshot(source)
    with pytest.raises(BackupError, match="already exists; pass --force"):
        restore_database(backup_dir, source)
    assert snapshot(source) == before
    assert leftovers(source.parent) == []


def test_restore_refuses_a_target_another_process_holds(source, backup_dir, locked):
    locked(source)
    before = snapshot(source)
    with pytest.raises(BackupError, match="another process holds the database"):
        restore_database(backup_dir, source, force=True)
    assert snapshot(source) == before


def _rewrite_manifest(backup_dir, change):
    path = backup_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_tampered_manifest_checksum_fails_and_leaves_the_target(source, backup_dir):
    expected = "0" * 31 + "1"

    def change(data):
        data["tables"]["legacy_scars"]["checksum"] = expected

    _rewrite_manifest(backup_dir, change)
    before = snapshot(source)
    with pytest.raises(BackupError) as info:
        restore_database(backup_dir, source, force=True)
    message = str(info.value)
    actual = table_checksum(duckdb.connect(str(source), read_only=True), "legacy_scars").hex
    assert "legacy_scars" in message and expected in message and actual in message
    assert "\n" not in message
    assert snapshot(source) == before
    assert leftovers(source.parent) == []


def test_a_tampered_parquet_file_is_detected_before_import(source, backup_dir):
    parquet = backup_dir / "legacy_geoids.parquet"
    data = bytearray(parquet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    parquet.write_bytes(bytes(data))
    before = snapshot(source)
    with pytest.raises(BackupError, match="legacy_geoids.parquet does not match the manifest"):
        restore_database(backup_dir, source, force=True)
    assert snapshot(source) == before
    assert leftovers(source.parent) == []


def test_changed_data_with_a_consistent_file_digest_fails_the_table_check(source, backup_dir):
    """Someone rewrote a Parquet file and its file digest: the table checksum still catches it."""
    parquet = backup_dir / "legacy_geoids.parquet"
    rewritten = backup_dir / "rewritten.parquet"
    with duckdb.connect() as con:
        con.execute(
            "COPY (SELECT * REPLACE (weight + 1 AS weight) FROM read_parquet(?)) TO "
            f"'{rewritten}' (FORMAT PARQUET)",
            [str(parquet)],
        )
    rewritten.replace(parquet)

    def change(data):
        data["files"]["legacy_geoids.parquet"] = {
            "bytes": parquet.stat().st_size,
            "sha256": hashlib.sha256(parquet.read_bytes()).hexdigest(),
        }

    _rewrite_manifest(backup_dir, change)
    before = snapshot(source)
    with pytest.raises(BackupError, match="table legacy_geoids does not match the manifest"):
        restore_database(backup_dir, source, force=True)
    assert snapshot(source) == before
    assert leftovers(source.parent) == []


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: (d / MANIFEST_NAME).unlink(), "no manifest.json"),
        (lambda d: (d / MANIFEST_NAME).write_text("{not json"), "cannot be read as JSON"),
        (lambda d: (d / MANIFEST_NAME).write_text("[]"), "not a kimera backup manifest"),
        (
            lambda d: _rewrite_manifest(d, lambda m: m.update(version=99)),
            "manifest version 99 is not supported",
        ),
        (
            lambda d: _rewrite_manifest(d, lambda m: m.pop("tables")),
            "malformed manifest",
        ),
        (
            lambda d: _rewrite_manifest(
                d, lambda m: m["tables"]["echoforms"].update(checksum="xyz")
            ),
            "malformed manifest",
        ),
        (
            lambda d: _rewrite_manifest(
                d, lambda m: m["files"].update({"../x": {"bytes": 1, "sha256": "0"}})
            ),
            "leaves the backup",
        ),
        (lambda d: (d / "echoforms.parquet").unlink(), "echoforms.parquet is missing"),
        (lambda d: shutil.rmtree(d), "no such backup directory"),
    ],
    ids=[
        "missing",
        "not-json",
        "not-object",
        "version",
        "no-tables",
        "bad-hex",
        "escape",
        "missing-file",
        "no-dir",
    ],
)
def test_a_broken_backup_is_refused_with_a_clear_message(source, backup_dir, mutate, needle):
    mutate(backup_dir)
    before = snapshot(source)
    with pytest.raises(BackupError, match=needle):
        restore_database(backup_dir, source, force=True)
    assert snapshot(source) == before
    with pytest.raises(KimeraError, match=needle):
        verify_backup(backup_dir)


def test_the_log_sequence_continues_after_restore(source, tmp_path):
    with duckdb.connect(str(source)) as con:
        # a row written with an explicit key above the sequence must not collide later
        con.execute(
            "INSERT INTO dual_write_log VALUES (100000, 1.0, 'x', 'store', 'success', NULL)"
        )
        before_max = con.execute("SELECT max(log_id) FROM dual_write_log").fetchone()[0]
    backup_database(source, tmp_path / "b")
    report = restore_database(tmp_path / "b", tmp_path / "r.duckdb")
    assert report.sequences["dual_write_log_seq"] > before_max
    with duckdb.connect(str(tmp_path / "r.duckdb")) as con:
        for _ in range(3):
            con.execute(
                "INSERT INTO dual_write_log (timestamp, identity_id, operation, status) "
                "VALUES (2.0, 'y', 'store', 'success')"
            )
        new_ids = [
            r[0]
            for r in con.execute(
                "SELECT log_id FROM dual_write_log WHERE identity_id = 'y' ORDER BY log_id"
            ).fetchall()
        ]
    assert new_ids == [report.sequences["dual_write_log_seq"] + i for i in range(3)]


def test_the_sequence_is_not_reissued_in_the_normal_case(source, tmp_path):
    with duckdb.connect(str(source), read_only=True) as con:
        top = con.execute("SELECT max(log_id) FROM dual_write_log").fetchone()[0]
    backup_database(source, tmp_path / "b")
    restore_database(tmp_path / "b", tmp_path / "r.duckdb")
    with duckdb.connect(str(tmp_path / "r.duckdb")) as con:
        con.execute(
            "INSERT INTO dual_write_log (timestamp, identity_id, operation, status) "
            "VALUES (2.0, 'y', 'store', 'success')"
        )
        (new_id,) = con.execute(
            "SELECT log_id FROM dual_write_log WHERE identity_id = 'y'"
        ).fetchone()
    assert new_id > top


def test_a_restored_file_is_a_normal_kimera_database(backup_dir, tmp_path):
    target = tmp_path / "r.duckdb"
    restore_database(backup_dir, target)
    assert read_header(target).library_version == f"v{duckdb.__version__}"
    with connect(target, read_only=True) as con:
        assert missing_tables(con) == []
        (some_id,) = con.execute("SELECT min(id) FROM identities").fetchone()
        assert read_identity_p1(con, some_id) is not None


# --- command line -------------------------------------------------------------------------


def kimera(*args):
    return subprocess.run(
        [str(KIMERA), *map(str, args)], capture_output=True, text=True, timeout=180
    )


def test_cli_backup_and_restore_round_trip(source, tmp_path):
    result = kimera("db", "backup", "--db", source, "--to", tmp_path / "b", "--json")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["tables"]["legacy_geoids"]["rows"] == 2000
    result = kimera("db", "restore", "--from", tmp_path / "b", "--db", tmp_path / "r.duckdb")
    assert result.returncode == 0, result.stderr
    assert "restore verified" in result.stdout
    assert "legacy_geoids" in result.stdout and "match" in result.stdout
    result = kimera(
        "db",
        "restore",
        "--from",
        tmp_path / "b",
        "--db",
        tmp_path / "r.duckdb",
        "--force",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verified"] and report["replaced"]
    assert {name: t["checksum"] for name, t in report["tables"].items()} == {
        name: t["checksum"] for name, t in manifest["tables"].items()
    }


def test_cli_human_backup_output(source, tmp_path):
    result = kimera("db", "backup", "--db", source, "--to", tmp_path / "b")
    assert result.returncode == 0, result.stderr
    assert "backup complete" in result.stdout
    assert "kimera_fidelity" in result.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["db", "restore", "--from", "{b}", "--db", "{src}"], "already exists; pass --force"),
        (["db", "backup", "--db", "{src}", "--to", "{full}"], "directory is not empty"),
        (["db", "backup", "--db", "{tmp}/missing.duckdb", "--to", "{tmp}/x"], "no such file"),
        (["db", "restore", "--from", "{tmp}/nowhere", "--db", "{tmp}/r"], "no such backup"),
        (["db", "restore", "--from", "{full}", "--db", "{tmp}/r"], "not a kimera backup"),
    ],
    ids=["exists", "non-empty", "missing-db", "missing-backup", "not-a-backup"],
)
def test_cli_errors_are_one_line(source, backup_dir, tmp_path, args, needle):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    values = {"b": backup_dir, "src": source, "full": full, "tmp": tmp_path}
    result = kimera(*(a.format(**values) for a in args))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kimera: error: ")
    assert needle in lines[0]


def test_cli_db_help_lists_backup_and_restore():
    result = kimera("db", "--help")
    assert result.returncode == 0
    assert "backup" in result.stdout and "restore" in result.stdout
    result = kimera("db", "restore", "--help")
    for option in ("--from", "--db", "--force", "--json"):
        assert option in result.stdout


def test_backup_through_a_database_server_matches_the_file(source, tmp_path, monkeypatch):
    """An advance through an address backs up via the server: same tables, same checksums."""
    token = "t" * 32
    monkeypatch.setenv("KIMERA_DB_TOKEN", token)
    with kimera_db_server(source, token, tmp_path / "server.log") as (address, _pid):
        manifest = backup_database(address, tmp_path / "via-server")
        with pytest.raises(BackupError, match="stop `kimera db serve`"):
            restore_database(tmp_path / "via-server", address, force=True)
    assert manifest.source["address"] == address
    assert manifest.source["server"]["healthy"] is True
    direct = backup_database(source, tmp_path / "direct")
    assert {n: (t.rows, t.checksum) for n, t in manifest.tables.items()} == {
        n: (t.rows, t.checksum) for n, t in direct.tables.items()
    }
    restored = tmp_path / "restored.duckdb"
    restore_database(tmp_path / "via-server", restored)
    assert all_checksums(restored) == all_checksums(source)
