"""db.transaction: commits on success, rolls back on an exception or when asked to;
db.retry_conflicts: a unit of work DuckDB aborted for a concurrent write runs again."""

import duckdb
import pytest

from kimera_core.db import connect, is_conflict, retry_conflicts, transaction


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


def _conflicting_work(con, *, conflicts: int):
    """Work that raises the concurrent update itself on its first ``conflicts`` attempts:
    another connection of the same database updates the row after this transaction began."""
    calls = []
    other = con.cursor()

    def work(c):
        calls.append(1)
        c.execute("SELECT a FROM t").fetchall()  # the transaction's snapshot is taken
        if len(calls) <= conflicts:
            other.execute("UPDATE t SET a = a + 100 WHERE a < 1000")  # commits meanwhile
        c.execute("UPDATE t SET a = a + 1")
        return len(calls)

    return work, calls


def test_a_conflicted_unit_of_work_runs_again_on_a_fresh_snapshot(con):
    con.execute("INSERT INTO t VALUES (1)")
    work, calls = _conflicting_work(con, conflicts=2)
    waits = []
    assert retry_conflicts(con, work, sleep=waits.append) == 3
    assert rows(con) == [1 + 100 + 100 + 1]  # both concurrent updates kept, ours once
    assert len(calls) == 3 and waits == [0.01, 0.02]


def test_the_last_conflict_and_any_other_error_are_raised_as_they_came(con):
    con.execute("INSERT INTO t VALUES (1)")
    work, calls = _conflicting_work(con, conflicts=9)
    with pytest.raises(duckdb.TransactionException, match="onflict") as raised:
        retry_conflicts(con, work, attempts=3, sleep=lambda s: None)
    assert is_conflict(raised.value) and len(calls) == 3
    assert rows(con) == [301]  # the three concurrent updates only

    def failing(c):
        calls.append(1)
        c.execute("INSERT INTO t VALUES (301)")  # a plain key violation: not a conflict

    calls.clear()
    with pytest.raises(duckdb.ConstraintException):
        retry_conflicts(con, failing, sleep=lambda s: None)
    assert len(calls) == 1 and not is_conflict(duckdb.ConstraintException("Conflict"))


def test_a_duplicate_key_counts_as_a_conflict_only_when_asked(con):
    other = con.cursor()
    calls = []

    def insert_if_absent(c):
        calls.append(1)
        absent = c.execute("SELECT count(*) = 0 FROM t WHERE a = 7").fetchone()[0]
        if len(calls) == 1:
            other.execute("INSERT INTO t VALUES (7)")  # a concurrent writer commits it first
        if absent:
            c.execute("INSERT INTO t VALUES (7)")
        return "inserted" if absent else "found"

    with pytest.raises(duckdb.ConstraintException, match="Duplicate key"):
        retry_conflicts(con, insert_if_absent, sleep=lambda s: None)
    assert len(calls) == 1
    other.execute("DELETE FROM t")
    calls.clear()
    assert retry_conflicts(con, insert_if_absent, duplicate_keys=True, sleep=lambda s: None) == (
        "found"
    )
    assert len(calls) == 2 and rows(con) == [7]
