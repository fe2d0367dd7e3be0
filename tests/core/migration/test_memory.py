"""A run's closing phases run under a lower DuckDB memory limit, and the run's limit comes back."""

from __future__ import annotations

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
    # DuckDB prints one decimal of its unit: the value read is within 0.1 unit of the one set
    assert abs(got - n) <= UNITS[text.split()[1]] * 0.1 + 2


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


def test_a_migration_rebuilds_indexes_and_records_fingerprints_under_the_lower_limit(
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
    with connect(path) as con:
        report = migrate(con, partitions=2)
        run_limit = memory.memory_limit_bytes(con)
        assert report.balanced
    assert abs(seen["collect_outcomes"] - run_limit) <= 0.1 * (1 << 20) + 1
    assert abs(seen["restore_index"] - run_limit * memory.AFTER_LOAD_SHARE) <= 0.1 * (1 << 20) + 1
    # after the run, the engine's limit (the default) is back, to DuckDB's printed precision
    # (each restore can lose up to 0.1 MiB of it: two closing phases)
    default = {"GB": 10**9, "MB": 10**6}[engine.DEFAULT_MEMORY_LIMIT[-2:]]
    assert abs(run_limit - int(engine.DEFAULT_MEMORY_LIMIT[:-2]) * default) <= 0.2 * (1 << 20)
