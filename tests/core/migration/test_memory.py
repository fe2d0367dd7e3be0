"""A run's fingerprint pass runs under a lower DuckDB memory limit, and the run's limit comes back."""

from __future__ import annotations

import contextlib

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimera_core.db import connect
from kimera_core.demo import generate_demo_data
from kimera_core.migration import engine, fingerprints, indexes, memory, migrate

UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def limit_text(con):
    return con.execute("SELECT current_setting('memory_limit')").fetchone()[0]


def reference_bytes(text):
    """DuckDB's printed size read back independently: '<number> <unit>'."""
    number, unit = text.split()
    return float(number) * UNITS[unit]


@pytest.fixture
def con(tmp_path):
    with connect(tmp_path / "m.duckdb", create=True) as c:
        c.execute("SET memory_limit = '1GB'")
        yield c


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1 << 20, max_value=1 << 42))
def test_the_limit_read_back_is_the_one_set_to_duckdbs_printed_precision(n):
    c = duckdb.connect()
    c.execute(f"SET memory_limit = '{n}B'")
    got = memory.memory_limit_bytes(c)
    text = limit_text(c)
    assert got == round(reference_bytes(text))
    # DuckDB prints one decimal of its unit, rounded down: within ~0.1 unit of the one set
    assert abs(got - n) <= UNITS[text.split()[1]] * 0.11


def test_no_limit_reads_as_none_and_is_left_alone():
    c = duckdb.connect()
    c.execute("SET memory_limit = '-1'")
    before = limit_text(c)
    assert memory.memory_limit_bytes(c) is None
    with memory.lowered_memory_limit(c, 0.5):
        assert limit_text(c) == before
    assert limit_text(c) == before


def test_the_block_runs_under_the_share_and_the_limit_comes_back(con):
    before = memory.memory_limit_bytes(con)
    with memory.lowered_memory_limit(con, 0.25):
        inside = memory.memory_limit_bytes(con)
        assert abs(inside - before * 0.25) <= 0.1 * (1 << 20) + 1
    assert limit_text(con).startswith("953.")
    assert abs(memory.memory_limit_bytes(con) - before) <= 0.1 * (1 << 20) + 1


def test_inside_a_transaction_and_after_an_error_the_limit_comes_back(con):
    before = limit_text(con)
    con.execute("BEGIN TRANSACTION")
    with memory.lowered_memory_limit(con, 0.5):
        assert memory.memory_limit_bytes(con) < 600 * (1 << 20)
    con.execute("COMMIT")
    with pytest.raises(RuntimeError), memory.lowered_memory_limit(con, 0.5):
        raise RuntimeError("boom")
    assert limit_text(con) in (before, "953.5 MiB")


@pytest.mark.parametrize("share", [0, -0.5, 1.5])
def test_a_share_outside_zero_to_one_is_refused(con, share):
    with pytest.raises(ValueError), memory.lowered_memory_limit(con, share):
        pass


def test_a_migration_records_its_fingerprints_under_the_lower_limit_and_builds_indexes_at_its_own(
    tmp_path, monkeypatch
):
    path = tmp_path / "demo.duckdb"
    generate_demo_data(path, geoids=2_000, scars=500, seed=5)
    seen: dict[str, int] = {}

    def spy(module, name):
        original = getattr(module, name)

        def wrapper(con, *args, **kwargs):
            seen[name] = memory.memory_limit_bytes(con)
            return original(con, *args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(indexes, "restore_index")
    spy(fingerprints, "collect_outcomes")  # a partition: the run's own limit
    lowered = fingerprints.lowered_memory_limit

    @contextlib.contextmanager
    def watched(con, *args, **kwargs):
        with lowered(con, *args, **kwargs):
            seen["record"] = memory.memory_limit_bytes(con)
            yield

    monkeypatch.setattr(fingerprints, "lowered_memory_limit", watched)
    with connect(path) as con:
        report = migrate(con, partitions=2)
        run_limit = memory.memory_limit_bytes(con)
        assert report.balanced
    tolerance = 0.1 * (1 << 20) + 1
    assert abs(seen["collect_outcomes"] - run_limit) <= tolerance
    assert abs(seen["restore_index"] - run_limit) <= tolerance
    assert abs(seen["record"] - run_limit * memory.AFTER_LOAD_SHARE) <= tolerance
    # after the run, the engine's limit (the default) is back, to DuckDB's printed precision
    default = {"GB": 10**9, "MB": 10**6}[engine.DEFAULT_MEMORY_LIMIT[-2:]]
    assert abs(run_limit - int(engine.DEFAULT_MEMORY_LIMIT[:-2]) * default) <= 0.2 * (1 << 20)


def threshold(con):
    return con.execute("SELECT current_setting('checkpoint_threshold')").fetchone()[0]


def test_an_index_build_commits_by_a_checkpoint_and_the_run_threshold_comes_back(con):
    con.execute("SET checkpoint_threshold = '16GB'")
    before = threshold(con)
    with memory.checkpoint_at_commit(con):
        assert threshold(con) == "15.2 MiB"  # DuckDB's default, 16MB, as it prints it
        con.execute("CREATE TABLE t AS SELECT range AS v FROM range(300000)")
        con.execute("BEGIN TRANSACTION")
        con.execute("CREATE INDEX t_v ON t(v)")
        con.execute("COMMIT")
    assert threshold(con) == before
    with pytest.raises(RuntimeError), memory.checkpoint_at_commit(con):
        raise RuntimeError("boom")
    assert threshold(con) == before
    assert (
        con.execute("SELECT count(*) FROM duckdb_indexes() WHERE index_name = 't_v'").fetchone()[0]
        == 1
    )
