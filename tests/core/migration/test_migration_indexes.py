"""The migration drops identities' secondary indexes for its load and always rebuilds them:
at its end, on resume after a crash, and on rollback."""

from __future__ import annotations

import json

import pytest

from kimera_core.checksum import table_checksum
from kimera_core.db import connect
from kimera_core.demo import generate_demo_data
from kimera_core.legacy import (
    LEGACY_INDEXES,
    create_legacy_schema,
    restore_index,
    secondary_indexes,
)
from kimera_core.migration import IDENTITY_COLUMNS, indexes, migrate, rollback

P1_IDENTITY_INDEXES = {name for name, table, _c, _d in LEGACY_INDEXES if table == "identities"}


class Crash(Exception):
    pass


def crash_after(n):
    def hook(done, total, kind, bucket, counts):
        if done == n:
            raise Crash

    return hook


@pytest.fixture
def small_demo(tmp_path):
    path = tmp_path / "demo.duckdb"
    generate_demo_data(path, geoids=3_000, scars=1_000, seed=11)
    return path


def recorded_drops(con):
    return con.execute(
        "SELECT dropped_indexes FROM kimera_migration_runs ORDER BY started_at DESC LIMIT 1"
    ).fetchone()[0]


def test_a_finished_run_leaves_the_p1_indexes_and_no_record(small_demo):
    with connect(small_demo) as con:
        before = secondary_indexes(con, "identities")
        assert set(before) == P1_IDENTITY_INDEXES
        report = migrate(con, partitions=3)
        assert report.balanced
        assert secondary_indexes(con, "identities") == before
        assert recorded_drops(con) is None


def test_a_crashed_run_has_its_indexes_recorded_and_the_resume_rebuilds_them(small_demo):
    with connect(small_demo) as con:
        before = secondary_indexes(con, "identities")
        with pytest.raises(Crash):
            migrate(con, partitions=4, on_partition=crash_after(3))
        # dropped for the load, and the DDL to rebuild them is in the run record
        assert secondary_indexes(con, "identities") == {}
        assert json.loads(recorded_drops(con)) == before
    with connect(small_demo) as con:
        report = migrate(con)
        assert report.resumed and report.balanced
        assert secondary_indexes(con, "identities") == before
        assert recorded_drops(con) is None


def test_a_crash_between_two_index_rebuilds_resumes_to_all_indexes(small_demo, monkeypatch):
    built = []

    def restore_one_then_crash(con, table, name, ddl):
        if built:
            raise Crash
        built.append(name)
        return restore_index(con, table, name, ddl)

    with connect(small_demo) as con:
        before = secondary_indexes(con, "identities")
        monkeypatch.setattr(indexes, "restore_index", restore_one_then_crash)
        with pytest.raises(Crash):
            migrate(con, partitions=2)
        # the first index is rebuilt and committed; the run still records all three
        assert set(secondary_indexes(con, "identities")) == set(built)
        assert json.loads(recorded_drops(con)) == before
        monkeypatch.undo()
    with connect(small_demo) as con:
        report = migrate(con)
        assert report.resumed and report.balanced and report.partitions_skipped == 4
        assert secondary_indexes(con, "identities") == before
        assert recorded_drops(con) is None


def test_an_application_open_between_crash_and_resume_does_not_duplicate_indexes(small_demo):
    with connect(small_demo) as con:
        before = secondary_indexes(con, "identities")
        with pytest.raises(Crash):
            migrate(con, partitions=4, on_partition=crash_after(2))
        create_legacy_schema(con)  # what the storage API does when it opens the file
        assert secondary_indexes(con, "identities") == before
        report = migrate(con)
        assert report.resumed and report.balanced
        assert secondary_indexes(con, "identities") == before


def test_rolling_back_a_crashed_run_restores_rows_and_indexes(small_demo):
    with connect(small_demo) as con:
        before = secondary_indexes(con, "identities")
        pristine = table_checksum(con, "identities", IDENTITY_COLUMNS)
        with pytest.raises(Crash):
            migrate(con, partitions=4, on_partition=crash_after(5))
        assert secondary_indexes(con, "identities") == {}
        rollback(con)
        assert table_checksum(con, "identities", IDENTITY_COLUMNS) == pristine
        assert secondary_indexes(con, "identities") == before
        assert recorded_drops(con) is None


def test_restore_index_runs_only_a_create_index_of_the_recorded_name(small_demo):
    with connect(small_demo) as con:
        for bad in (
            "DROP TABLE identities",
            "CREATE INDEX idx_x ON identities(id); DROP TABLE identities;",
            "CREATE INDEX idx_x ON legacy_geoids(gid);",
            "CREATE INDEX other ON identities(id);",
        ):
            with pytest.raises(ValueError, match="not a CREATE INDEX"):
                restore_index(con, "identities", "idx_x", bad)
        assert restore_index(con, "identities", "idx_x", "CREATE INDEX idx_x ON identities(id);")
        assert not restore_index(
            con, "identities", "idx_x", "CREATE INDEX idx_x ON identities(id);"
        )
        assert con.execute("SELECT count(*) FROM legacy_geoids").fetchone()[0] == 3_000
