"""The rollback rule, in the core: no migration rollback while reads come from identities.

``migration.rollback`` refuses (RollbackRefused, one line) at every stage whose routing
reads from identities unless forced; the CLI (``kimera migrate rollback``) gets the same
refusal, exits non-zero with that one line and changes nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from support.legacy_rows import insert_geoids

from kimera_core.checksum import table_checksum
from kimera_core.db import connect
from kimera_core.identity import Geoid
from kimera_core.legacy import create_legacy_schema
from kimera_core.migration import IDENTITY_COLUMNS, RollbackRefused, migrate, rollback
from kimera_core.rollout import STAGES, get_stage, routing, set_stage

KIMERA = str(Path(sys.executable).parent / "kimera")
T0 = 1_790_000_000.0


def migrated_in_memory() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    create_legacy_schema(con)
    insert_geoids(con, [Geoid.new(f"text {i}", "en", created_at=T0) for i in range(3)])
    migrate(con)
    return con


def all_table_checksums(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[int, int]]:
    tables = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = 'main' ORDER BY 1"
    ).fetchall()
    return {t: tuple(vars(table_checksum(con, t)).values()) for (t,) in tables}


@pytest.mark.parametrize("stage", STAGES)
def test_rollback_is_refused_exactly_where_reads_come_from_identities(stage):
    con = migrated_in_memory()
    set_stage(con, stage, actor="test")
    before = all_table_checksums(con)
    if routing(stage).read == "new":
        with pytest.raises(RollbackRefused, match=f"stage {stage} reads from identities"):
            rollback(con)
        assert all_table_checksums(con) == before
    else:
        assert rollback(con).deleted == 3


def test_force_rolls_back_while_reads_come_from_identities():
    con = migrated_in_memory()
    set_stage(con, "read-new", actor="test")
    report = rollback(con, force=True)
    assert report.deleted == 3
    assert table_checksum(con, "identities", IDENTITY_COLUMNS).rows == 0
    assert get_stage(con) == "read-new"  # the rule refuses; it never moves the stage


@pytest.fixture
def read_new_db(tmp_path, demo_db):
    path = tmp_path / "kimera.duckdb"
    shutil.copy(demo_db[0], path)
    with connect(path) as con:
        migrate(con, partitions=2)
        set_stage(con, "read-new", actor="test")
    return path


def test_cli_rollback_at_read_new_exits_non_zero_with_one_line_and_changes_nothing(read_new_db):
    with connect(read_new_db, read_only=True) as con:
        before = all_table_checksums(con)
    result = subprocess.run(
        [KIMERA, "migrate", "rollback", "--db", str(read_new_db)], capture_output=True, text=True
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kimera: error:")
    assert "stage read-new reads from identities" in lines[0]
    with connect(read_new_db, read_only=True) as con:
        assert all_table_checksums(con) == before


def test_cli_rollback_with_force_undoes_the_migration(read_new_db):
    result = subprocess.run(
        [KIMERA, "migrate", "rollback", "--db", str(read_new_db), "--force", "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    with connect(read_new_db, read_only=True) as con:
        statuses = {
            r[0] for r in con.execute("SELECT status FROM kimera_migration_runs").fetchall()
        }
    assert statuses == {"rolled_back"}
