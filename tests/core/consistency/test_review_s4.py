"""Adversarial review (s4) of the verifier's and the migration's changed shortcuts.

Session s4 made the full verification group duplicate keys only in the fine segments the
digest pass finds suspect (when identities' key is its primary key), probe the quarantined
keys once and compute ISO texts once per row; and made the migration's merge rule compare
document texts before parsing them. These tests plant what those shortcuts could miss, on real
DuckDB files: duplicate keys in old legacy files without a primary key (two and three
identical copies, a copy with other content, after a cached verification, under an
incremental run), duplicates in an identities table without a primary key, a key whose case
changed, edits that keep the text's length; and, for the merge rule, documents equal as JSON
but not as text, and equal documents beside a drifted identities column.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.clean_migration import migrate_documents

from kimera_core.consistency import verify
from kimera_core.db import open_database
from kimera_core.legacy import LEGACY_IDENTITIES_ENTROPY_SQL, create_legacy_schema
from kimera_core.migration import migrate

KIMERA = Path(sys.executable).parent / "kimera"


def kimera(*args):
    return subprocess.run(
        [str(KIMERA), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def drop_primary_key(con, table):
    """Rebuild ``table`` with the same columns and rows but no constraint (an old file)."""
    con.execute(f"CREATE TABLE kimera_review_copy AS SELECT * FROM {table}")
    con.execute(f"DROP TABLE {table}")
    con.execute(f"ALTER TABLE kimera_review_copy RENAME TO {table}")


@pytest.fixture
def path(demo_db, tmp_path):
    """A cleanly migrated copy of the demo database (colliding scar ids removed)."""
    target = tmp_path / "review.duckdb"
    shutil.copy(demo_db[0], target)
    with open_database(target) as c:
        c.execute("DELETE FROM identities")
        c.execute("DELETE FROM legacy_scars WHERE id IN (SELECT gid FROM legacy_geoids)")
        migrate_documents(c)
        c.execute(
            "UPDATE identities SET entropy_score = l.entropy "
            f"FROM ({LEGACY_IDENTITIES_ENTROPY_SQL}) l WHERE l.id = identities.id"
        )
        assert verify(c, record=False, cache=False).consistent
    return target


@pytest.fixture
def old_file(path):
    """The same database with legacy tables that have no primary key (identities keeps its)."""
    with open_database(path) as c:
        drop_primary_key(c, "legacy_geoids")
        drop_primary_key(c, "legacy_scars")
    return path


def nth(con, table, key, n):
    return con.execute(
        f"SELECT {key} FROM {table} ORDER BY {key} LIMIT 1 OFFSET ?", [n]
    ).fetchone()[0]


def duplicate_legacy_row(con, table, key_column, key, copies=1):
    for _ in range(copies):
        con.execute(
            f"INSERT INTO {table} SELECT * FROM {table} WHERE {key_column} = ? LIMIT 1", [key]
        )


def assert_names_duplicate(report, key, rows):
    assert not report.consistent, report.reasons
    assert {"store": "legacy", "id": key, "rows": rows} in report.duplicate_keys.sample


# --- duplicate keys in old legacy files ------------------------------------------------------
@pytest.mark.parametrize("copies", [1, 2])
@pytest.mark.parametrize("fast_path", [True, False])
def test_identical_legacy_geoid_copies_are_duplicates(old_file, copies, fast_path):
    with open_database(old_file) as con:
        key = nth(con, "legacy_geoids", "gid", 21)
        duplicate_legacy_row(con, "legacy_geoids", "gid", key, copies)
        report = verify(con, record=False, cache=False, fast_path=fast_path)
    assert_names_duplicate(report, key, copies + 1)


def test_identical_legacy_scar_copies_are_duplicates(old_file):
    with open_database(old_file) as con:
        key = nth(con, "legacy_scars", "id", 8)
        duplicate_legacy_row(con, "legacy_scars", "id", key, 2)
        report = verify(con, record=False)
    assert_names_duplicate(report, key, 3)


def test_legacy_copy_with_other_content_is_a_duplicate_not_a_field_mismatch(old_file):
    with open_database(old_file) as con:
        key = nth(con, "legacy_geoids", "gid", 33)
        duplicate_legacy_row(con, "legacy_geoids", "gid", key)
        con.execute(
            "UPDATE legacy_geoids SET raw = raw || '!' WHERE rowid = "
            "(SELECT max(rowid) FROM legacy_geoids WHERE gid = ?)",
            [key],
        )
        report = verify(con, record=False)
    assert_names_duplicate(report, key, 2)


def test_a_cached_consistent_verification_does_not_hide_a_later_duplicate(old_file):
    with open_database(old_file) as con:
        first = verify(con)  # records the verdict and fills the digest cache
        assert first.consistent, first.reasons
        key = nth(con, "legacy_geoids", "gid", 40)
        duplicate_legacy_row(con, "legacy_geoids", "gid", key, 2)  # three identical rows
        report = verify(con)
    assert_names_duplicate(report, key, 3)


def test_incremental_run_sees_an_old_duplicate_through_the_counts(old_file):
    with open_database(old_file) as con:
        assert verify(con).consistent
        key = nth(con, "legacy_geoids", "gid", 41)
        duplicate_legacy_row(con, "legacy_geoids", "gid", key)  # its updated_at is old
        report = verify(con, incremental=True)
    assert not report.consistent
    assert report.counts["difference"]["geoid"] == -1


def test_cli_names_a_legacy_duplicate_and_exits_one(old_file):
    with open_database(old_file) as con:
        key = nth(con, "legacy_geoids", "gid", 55)
        duplicate_legacy_row(con, "legacy_geoids", "gid", key)
    result = kimera("verify", "--db", old_file, "--json", "--no-record")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "inconsistent"
    assert {"store": "legacy", "id": key, "rows": 2} in report["duplicate_keys"]["sample"]


def test_duplicate_identity_without_a_primary_key_is_found(path):
    with open_database(path) as con:
        drop_primary_key(con, "identities")
        key = nth(con, "identities", "id", 12)
        con.execute("INSERT INTO identities SELECT * FROM identities WHERE id = ?", [key])
        report = verify(con, record=False)
    assert not report.consistent
    assert {"store": "new", "id": key, "rows": 2} in report.duplicate_keys.sample


# --- keys and edits that keep sizes ---------------------------------------------------------
def test_a_key_whose_case_changed_is_missing_on_both_sides(path):
    with open_database(path) as con:
        key = nth(con, "legacy_geoids", "gid", 60)
        assert key.upper() != key
        con.execute("UPDATE identities SET id = upper(id) WHERE id = ?", [key])
        report = verify(con, record=False)
    assert not report.consistent
    assert key in {s["id"] for s in report.missing_in_new.sample}
    assert key.upper() in {s["id"] for s in report.missing_in_legacy.sample}


def test_same_length_edits_are_found_by_field(path):
    with open_database(path) as con:
        geoid = nth(con, "legacy_geoids", "gid", 70)
        raw = con.execute("SELECT raw FROM legacy_geoids WHERE gid = ?", [geoid]).fetchone()[0]
        edited = raw[:-1] + ("x" if raw[-1] != "x" else "y")
        con.execute("UPDATE legacy_geoids SET raw = ? WHERE gid = ?", [edited, geoid])
        scar = nth(con, "legacy_scars", "id", 9)
        weight = con.execute("SELECT weight FROM legacy_scars WHERE id = ?", [scar]).fetchone()[0]
        con.execute(
            "UPDATE identities SET data = json_merge_patch(data, ?) WHERE id = ?",
            [json.dumps({"weight": -weight if weight else 1.0}), scar],
        )
        report = verify(con, record=False)
    found = {s["id"]: s["fields"] for s in report.field_mismatches.sample}
    assert found == {geoid: ["raw"], scar: ["weight"]}


# --- the merge rule: texts first, values second ---------------------------------------------
def migrated(path):
    con = open_database(path)
    con.execute("DELETE FROM identities")
    first = migrate(con)
    assert first.counts.inserted > 0
    return con


def test_documents_equal_as_json_but_not_as_text_are_unchanged(path):
    con = migrated(path)
    try:
        keys = [nth(con, "identities", "id", n) for n in (3, 4, 5)]
        for key in keys:  # the same value, spaced and indented
            data = con.execute(
                "SELECT data::VARCHAR FROM identities WHERE id = ?", [key]
            ).fetchone()
            con.execute(
                "UPDATE identities SET data = ? WHERE id = ?",
                [json.dumps(json.loads(data[0]), indent=2, ensure_ascii=False), key],
            )
        total = con.execute("SELECT count(*) FROM identities").fetchone()[0]
        rerun = migrate(con, skip_unchanged=False)
        assert rerun.counts.unchanged == total
        assert rerun.counts.updated == rerun.counts.kept == rerun.counts.inserted == 0
    finally:
        con.close()


@pytest.mark.parametrize(
    ("column", "value"),
    [("lang_axis", "'zz'"), ("entropy_score", "entropy_score + 1"), ("identity_type", "'scar'")],
)
def test_equal_document_texts_do_not_hide_a_drifted_column(path, column, value):
    con = migrated(path)
    try:
        key = nth(con, "legacy_geoids", "gid", 80)
        con.execute(f"UPDATE identities SET {column} = {value} WHERE id = ?", [key])
        migrate(con, skip_unchanged=False)
        report = verify(con, record=False, cache=False)
    finally:
        con.close()
    assert not report.consistent, (column, report.reasons)
    text = json.dumps(report.to_dict())
    assert key in text


@pytest.mark.xfail(
    strict=True,
    reason="the merge rule compares documents as minified JSON, where key order counts "
    "(docs/migration.md); the verifier ignores key order: a reordered identity document is "
    "counted 'kept', not 'unchanged' (left as it is either way)",
)
def test_documents_equal_as_json_with_keys_reordered_are_unchanged(path):
    con = migrated(path)
    try:
        key = nth(con, "identities", "id", 6)
        data = con.execute("SELECT data::VARCHAR FROM identities WHERE id = ?", [key]).fetchone()
        reordered = dict(reversed(list(json.loads(data[0]).items())))
        con.execute("UPDATE identities SET data = ? WHERE id = ?", [json.dumps(reordered), key])
        assert verify(con, record=False, cache=False).consistent  # the verifier: same document
        rerun = migrate(con, skip_unchanged=False)
        assert rerun.counts.kept == 0
    finally:
        con.close()


# --- expected rows: ISO texts once per row, awkward timestamps and metas ----------------------
AWKWARD_TIMES = [
    (0.0, 0.0),
    (0.0000005, 0.0000015),  # half a microsecond: rounding
    (-1.5, -0.0000005),  # before 1970
    (1_790_000_000.999_999_5, 1_790_000_001.0),
    (-62_135_596_800.0, 253_402_300_799.0),  # year 1 .. the last second of 9999
]
AWKWARD_METAS = [
    '{ "terms" : [ { "intensity" : 1 } , { "intensity" : 3 } ] }',
    '{"terms": {"intensity": 5}}',
    '{"terms": [{"intensity": true}, {"intensity": "2"}, {"intensity": 1E2}]}',
    '{"terms": [[{"intensity": 1}], {"intensity": 1.0e-320}, {"intensity": 1}]}',
    "null",
    None,
]


def migrated_legacy(tmp_path, times):
    """Legacy geoids with the given timestamps and awkward metas, migrated by the migration."""
    target = tmp_path / "awkward.duckdb"
    with open_database(target, create=True) as con:
        create_legacy_schema(con)
        rows = [
            (f"g{i:02d}{j}", f"text {i} {j}", created, updated, meta)
            for i, (created, updated) in enumerate(times)
            for j, meta in enumerate(AWKWARD_METAS)
        ]
        con.executemany(
            'INSERT INTO legacy_geoids VALUES (?, ?, NULL, \'en\', \'["a", "b", "c"]\', 1.0, '
            "?, ?, ?)",
            [[gid, raw, meta, c, u] for gid, raw, c, u, meta in rows],
        )
        report = migrate(con)
        assert report.counts.inserted == len(rows), report.counts
    return target


@pytest.fixture
def awkward(tmp_path):
    return migrated_legacy(tmp_path, AWKWARD_TIMES)


@pytest.mark.parametrize("fast_path", [True, False])
def test_awkward_rows_the_migration_wrote_verify_consistent(awkward, fast_path):
    with open_database(awkward) as con:
        report = verify(con, record=False, cache=False, fast_path=fast_path)
    assert report.consistent, report.reasons


@pytest.mark.parametrize("column", ["created_at", "updated_at"])
def test_a_microsecond_beyond_tolerance_on_an_awkward_row_is_found(awkward, column):
    with open_database(awkward) as con:
        key = "g021"  # before 1970
        con.execute(f"UPDATE legacy_geoids SET {column} = {column} + 0.001 WHERE gid = ?", [key])
        report = verify(con, record=False)
    assert not report.consistent
    assert report.field_mismatches.sample == [{"id": key, "fields": [column]}]


# The migration writes a row with one NULL timestamp with the other for both (docs/migration.md
# warnings null_created_at / null_updated_at); the verifier compares legacy as migrated (it
# reported a created_at/updated_at mismatch on the migration's own output before 2026-11-30).
@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("times", [(None, 1_790_000_000.25), (1_790_000_000.25, None)])
def test_a_row_migrated_with_one_null_timestamp_verifies_consistent(tmp_path, times, fast_path):
    with open_database(migrated_legacy(tmp_path, [times])) as con:
        report = verify(con, record=False, cache=False, fast_path=fast_path)
    assert report.consistent, report.reasons


@pytest.mark.parametrize("times", [(None, 1_790_000_000.25), (1_790_000_000.25, None)])
def test_a_null_timestamp_row_edited_beyond_tolerance_is_found(tmp_path, times):
    with open_database(migrated_legacy(tmp_path, [times])) as con:
        column = "created_at" if times[0] is not None else "updated_at"
        con.execute(f"UPDATE legacy_geoids SET {column} = {column} + 0.001")
        report = verify(con, record=False, cache=False)
    assert not report.consistent


# any meta the migration accepts (an object or a false value), spelled awkwardly
intensity = st.one_of(
    st.booleans(),
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["1", "x"]),
    st.lists(st.integers(0, 3), max_size=2),
)
term = st.one_of(
    st.builds(lambda v: {"intensity": v, "symbol": "s"}, intensity),
    st.builds(lambda v: {"Intensity": v}, intensity),
    st.sampled_from([1, "x", None, [], [{"intensity": 2}]]),
)
terms = st.one_of(
    st.lists(term, max_size=5),
    st.builds(lambda v: {"intensity": v}, intensity),
    st.sampled_from([None, "[]", 5, {}]),
)
meta = st.one_of(
    st.builds(lambda ts: {"terms": ts, "source": "x"}, terms),
    st.sampled_from([None, {}, {"a": [1, {"b": None}]}]),
)
tags = st.one_of(
    st.lists(st.sampled_from(["t", "u", "é"]), max_size=4), st.sampled_from([[], None])
)
spelling = st.sampled_from([{}, {"indent": 1}, {"separators": (" , ", " : ")}])


@given(
    rows=st.lists(st.tuples(meta, spelling, tags, spelling), min_size=1, max_size=8),
)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_accepted_meta_the_migration_wrote_verifies_consistent(tmp_path_factory, rows):
    target = tmp_path_factory.mktemp("any") / "any.duckdb"
    with open_database(target, create=True) as con:
        create_legacy_schema(con)
        con.executemany(
            "INSERT INTO legacy_geoids VALUES (?, ?, NULL, 'en', ?, 1.0, ?, 1.0e9, 1.5e9)",
            [
                [f"g{i}", f"text {i}", json.dumps(t, **ft), json.dumps(m, **fm)]
                for i, (m, fm, t, ft) in enumerate(rows)
            ],
        )
        migrated_rows = migrate(con)
        assert migrated_rows.counts.quarantined == 0, migrated_rows.counts
        for fast_path in (True, False):
            report = verify(con, record=False, cache=False, fast_path=fast_path)
            assert report.consistent, (fast_path, report.reasons)
