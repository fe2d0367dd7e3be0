"""A migration's index builds commit by a checkpoint, and the run's checkpoint threshold comes back."""

from __future__ import annotations

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimera_core.db import connect
from kimera_core.demo import generate_demo_data
from kimera_core.migration import indexes, memory, migrate

UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def threshold(con):
    return con.execute("SELECT current_setting('checkpoint_threshold')").fetchone()[0]


def as_bytes(text):
    """DuckDB's printed size read back independently: '<number> <unit>'."""
    number, unit = text.split()
    return float(number) * UNITS[unit]


@pytest.fixture
def con(tmp_path):
    with connect(tmp_path / "m.duckdb", create=True) as c:
        c.execute("SET checkpoint_threshold = '16GB'")
        yield c


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1 << 10, max_value=1 << 44))
def test_the_threshold_comes_back_as_duckdb_prints_it_every_time(n):
    c = duckdb.connect()
    c.execute(f"SET checkpoint_threshold = '{n}B'")
    before = threshold(c)
    for _ in range(3):
        with memory.checkpoint_at_commit(c):
            assert threshold(c) == "15.2 MiB"  # DuckDB's default, 16MB, as it prints it
        assert threshold(c) == before
    # what comes back is within one printed decimal of the value first set
    unit = UNITS[before.split()[1]]
    assert abs(as_bytes(threshold(c)) - n) <= 0.11 * unit


def test_an_index_build_commits_and_the_threshold_comes_back_after_an_error(con):
    before = threshold(con)
    con.execute("CREATE TABLE t AS SELECT range AS v FROM range(300000)")
    with memory.checkpoint_at_commit(con):
        con.execute("BEGIN TRANSACTION")
        con.execute("CREATE INDEX t_v ON t(v)")
        con.execute("COMMIT")
    assert threshold(con) == before
    with pytest.raises(RuntimeError), memory.checkpoint_at_commit(con):
        raise RuntimeError("boom")
    assert threshold(con) == before
    names = con.execute("SELECT index_name FROM duckdb_indexes() WHERE table_name = 't'").fetchall()
    assert names == [("t_v",)]


def test_a_migration_builds_its_indexes_under_the_default_threshold_and_restores_its_own(
    tmp_path, monkeypatch
):
    path = tmp_path / "demo.duckdb"
    generate_demo_data(path, geoids=2_000, scars=500, seed=5)
    seen: list[str] = []
    original = indexes.restore_index

    def spy(con, *args, **kwargs):
        seen.append(threshold(con))
        return original(con, *args, **kwargs)

    monkeypatch.setattr(indexes, "restore_index", spy)
    with connect(path) as con:
        report = migrate(con, partitions=2)
        after = threshold(con)
    assert report.balanced
    assert seen == ["15.2 MiB"] * 3  # P1's three secondary indexes
    assert after == "14.9 GiB"  # the run's own 16GB
