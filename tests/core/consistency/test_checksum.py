"""Table and partition checksums: order-independent, NULL-safe, sensitive to every value."""

from __future__ import annotations

import math

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimera_core.checksum import (
    Checksum,
    bucket_sql,
    partition_checksums,
    table_checksum,
    table_columns,
)

ROW = st.tuples(
    st.one_of(st.none(), st.text(max_size=8)),
    st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
    st.one_of(st.none(), st.floats(allow_nan=False)),
)


def _table(rows, name="t"):
    con = duckdb.connect()
    con.execute(f"CREATE TABLE {name} (a TEXT, b INTEGER, c DOUBLE)")
    if rows:
        con.executemany(f"INSERT INTO {name} VALUES (?, ?, ?)", rows)
    return con


def _checksum(rows):
    con = _table(rows)
    try:
        return table_checksum(con, "t")
    finally:
        con.close()


@pytest.fixture(scope="module")
def demo_con(demo_db):
    path, _ = demo_db
    con = duckdb.connect(str(path), read_only=True)
    yield con
    con.close()


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(ROW, max_size=20), data=st.data())
def test_checksum_does_not_depend_on_row_order(rows, data):
    shuffled = data.draw(st.permutations(rows))
    assert _checksum(rows) == _checksum(shuffled)


def test_null_empty_string_and_the_text_null_differ():
    sums = {_checksum([(value, 1, 1.0)]) for value in (None, "", "NULL", "null")}
    assert len(sums) == 4


def test_null_in_different_columns_differs():
    con = duckdb.connect()
    con.execute("CREATE TABLE p (x TEXT, y TEXT)")
    con.execute("CREATE TABLE q (x TEXT, y TEXT)")
    con.execute("INSERT INTO p VALUES (NULL, 'v')")
    con.execute("INSERT INTO q VALUES ('v', NULL)")
    assert table_checksum(con, "p") != table_checksum(con, "q")


def test_values_moved_between_columns_differ():
    assert _checksum([("1", 2, None)]) != _checksum([("2", 1, None)])


def test_duplicate_rows_count():
    one = _checksum([("a", 1, 1.0)])
    two = _checksum([("a", 1, 1.0), ("a", 1, 1.0)])
    assert two.rows == 2
    assert two != one


def test_empty_table_has_the_empty_checksum():
    con = _table([])
    assert table_checksum(con, "t") == Checksum.empty()
    assert Checksum.empty().hex == "0" * 32
    assert set(partition_checksums(con, "t", "a", 4).values()) == {Checksum.empty()}


@pytest.mark.parametrize(
    "table,key",
    [("legacy_geoids", "gid"), ("legacy_scars", "id"), ("identities", "id")],
)
def test_any_single_changed_value_changes_the_checksum(demo_con, table, key):
    con = duckdb.connect()  # an in-memory copy of the demo table, with its DDL
    rows = demo_con.execute(f"SELECT * FROM {table} ORDER BY {key}").fetchall()
    ddl = demo_con.execute(
        "SELECT sql FROM duckdb_tables() WHERE table_name = ?", [table]
    ).fetchone()[0]
    con.execute(ddl)
    placeholders = ", ".join("?" * len(rows[0]))
    con.executemany(f"INSERT INTO {table} VALUES ({placeholders})", rows)
    original = table_checksum(con, table)
    assert original == table_checksum(demo_con, table)
    victim = rows[len(rows) // 2][0]
    for column in table_columns(con, table):
        if column == key:
            continue
        con.execute("BEGIN")
        # another row's value, distinct from this row's (NULL-safe comparison)
        con.execute(
            f"UPDATE {table} SET {column} = (SELECT o.{column} FROM {table} o "
            f"WHERE o.{column} IS DISTINCT FROM (SELECT {column} FROM {table} WHERE {key} = $k) "
            f"ORDER BY o.{key} LIMIT 1) WHERE {key} = $k",
            {"k": victim},
        )
        assert table_checksum(con, table) != original, column
        con.execute("ROLLBACK")
    assert table_checksum(con, table) == original


def test_changed_double_by_one_ulp_changes_the_checksum():
    assert _checksum([("a", 1, 0.1)]) != _checksum([("a", 1, math.nextafter(0.1, 1))])


def test_added_and_removed_rows_change_the_checksum():
    con = duckdb.connect()
    con.execute("CREATE TABLE g AS SELECT * FROM range(1000) t(i)")
    base = table_checksum(con, "g")
    con.execute("DELETE FROM g WHERE i = 500")
    removed = table_checksum(con, "g")
    con.execute("INSERT INTO g VALUES (500)")
    assert table_checksum(con, "g") == base
    con.execute("INSERT INTO g VALUES (1000)")
    added = table_checksum(con, "g")
    assert len({base, removed, added}) == 3
    assert (removed.rows, added.rows) == (999, 1001)


@pytest.mark.parametrize("buckets", [1, 7, 64])
def test_partition_checksums_add_up_to_the_table_checksum(demo_con, buckets):
    parts = partition_checksums(demo_con, "legacy_geoids", "gid", buckets)
    assert sorted(parts) == list(range(buckets))
    total = Checksum.empty()
    for part in parts.values():
        total = total + part
    assert total == table_checksum(demo_con, "legacy_geoids")


def test_bucket_assignment_is_stable(demo_con):
    sql = f"SELECT gid, {bucket_sql('gid', 16)} FROM legacy_geoids ORDER BY gid"
    first = demo_con.execute(sql).fetchall()
    assert demo_con.execute(sql).fetchall() == first
    # the same keys in a different table, inserted in another order, land in the same buckets
    con = duckdb.connect()
    con.execute("CREATE TABLE other (gid TEXT)")
    con.executemany("INSERT INTO other VALUES (?)", [(gid,) for gid, _ in reversed(first)])
    again = con.execute(f"SELECT gid, {bucket_sql('gid', 16)} FROM other ORDER BY gid").fetchall()
    assert again == first
    assert {b for _, b in first} == set(range(16))


def test_partition_checksum_isolates_a_change_to_one_bucket():
    con = duckdb.connect()
    con.execute("CREATE TABLE g AS SELECT i::TEXT AS k, i AS v FROM range(500) t(i)")
    before = partition_checksums(con, "g", "k", 8)
    con.execute("UPDATE g SET v = -1 WHERE k = '42'")
    after = partition_checksums(con, "g", "k", 8)
    (bucket,) = con.execute(f"SELECT {bucket_sql('k', 8)} FROM g WHERE k = '42'").fetchone()
    changed = [b for b in before if before[b] != after[b]]
    assert changed == [bucket]


def test_column_subset_ignores_other_columns():
    a = _table([("x", 1, 1.0)])
    b = _table([("x", 1, 2.0)])
    assert table_checksum(a, "t", ["a", "b"]) == table_checksum(b, "t", ["a", "b"])
    assert table_checksum(a, "t") != table_checksum(b, "t")


def test_checksum_round_trips_through_a_dict_and_adds_mod_2_128():
    value = Checksum(3, (1 << 128) - 5)
    assert Checksum.from_dict(value.to_dict()) == value
    assert len(value.hex) == 32
    assert (value + Checksum(1, 10)) == Checksum(4, 5)


def test_unsafe_identifiers_are_refused():
    con = _table([])
    with pytest.raises(ValueError):
        table_checksum(con, 't"; DROP TABLE t; --')
    with pytest.raises(ValueError):
        table_checksum(con, "t", ["a; DROP TABLE t"])
    with pytest.raises(ValueError):
        bucket_sql("a", 0)
    with pytest.raises(ValueError, match="no such table"):
        table_checksum(con, "missing")
