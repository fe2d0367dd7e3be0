"""db.transaction: commits on success, rolls back on an exception or when asked to."""

import duckdb
import pytest

from kimera_core.db import connect, transaction


@pytest.fixture
def con(tmp_path):
    with connect(tmp_path / "t.duckdb", create=True) as con:
        con.execute("CREATE TABLE t (a INTEGER PRIMARY KEY)")
        yield con


def rows(con):
    return [r[0] for r in con.execute("SELECT a FROM t ORDER BY a").fetchall()]


def test_a_transaction_commits_what_it_wrote(con):
    with transaction(con):
        con.execute("INSERT INTO t VALUES (1), (2)")
    assert rows(con) == [1, 2]


def test_an_exception_rolls_everything_back_and_is_raised_unchanged(con):
    with pytest.raises(ZeroDivisionError), transaction(con):
        con.execute("INSERT INTO t VALUES (1)")
        _ = 1 / 0
    assert rows(con) == []


def test_a_failing_statement_rolls_back_the_statements_before_it(con):
    con.execute("INSERT INTO t VALUES (5)")
    with pytest.raises(duckdb.ConstraintException), transaction(con):
        con.execute("INSERT INTO t VALUES (6)")
        con.execute("INSERT INTO t VALUES (5)")
    assert rows(con) == [5]
    with transaction(con):  # the connection is usable again
        con.execute("INSERT INTO t VALUES (7)")
    assert rows(con) == [5, 7]


def test_commit_false_keeps_nothing_but_lets_the_work_read_its_own_writes(con):
    with transaction(con, commit=False):
        con.execute("INSERT INTO t VALUES (3)")
        assert rows(con) == [3]
    assert rows(con) == []
