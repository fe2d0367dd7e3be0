"""The verifier's digest cache never hides a difference: rows changed behind its back, by plain
SQL and keeping their length, are found; stale, hand-edited, duplicated or foreign cache
entries are not used; a warm verification reports exactly what a cold one does."""

from __future__ import annotations

import pytest
from test_verify import migrated_copy

from kimera_core.checksum import row_hash_sql
from kimera_core.consistency import FINE_BITS, SOURCES, cache, digests, verify
from kimera_core.db import open_database

SHIFT = 64 - FINE_BITS


@pytest.fixture
def path(demo_db, tmp_path):
    return migrated_copy(demo_db[0], tmp_path)


@pytest.fixture
def con(path):
    c = open_database(path)
    yield c
    c.close()


def cache_stats(report):
    return report.checksums["digest_cache"]


def findings(report):
    """Everything a verification reports but its timings and cache bookkeeping."""
    d = report.to_dict()
    checksums = {k: v for k, v in d["checksums"].items() if k in ("legacy", "new")}
    levels = [
        {k: v for k, v in level.items() if k != "seconds"} for level in d["checksums"]["levels"]
    ]
    drop = ("seconds", "started_at", "checksums")
    return {k: v for k, v in d.items() if k not in drop} | {"sums": checksums, "levels": levels}


def some_geoid(con, n=0):
    return con.execute(
        "SELECT gid FROM legacy_geoids ORDER BY gid LIMIT 1 OFFSET ?", [n]
    ).fetchone()[0]


def segment_of(con, key):
    return con.execute(f"SELECT hash(?) >> {SHIFT}", [key]).fetchone()[0]


def test_cold_verification_fills_the_cache_and_warm_reuses_all_of_it(con):
    cold = verify(con, record=False)
    assert cache_stats(cold)["reused"] == 0
    assert cache_stats(cold)["written"] == cache_stats(cold)["segments"] > 0
    assert (
        cache_stats(cold)["rows_digested"]
        == 2 * con.execute("SELECT count(*) FROM identities").fetchone()[0]
    )
    warm = verify(con, record=False)
    assert cache_stats(warm)["recomputed"] == 0 and cache_stats(warm)["rows_digested"] == 0
    assert cache_stats(warm)["reused"] == cache_stats(warm)["segments"]
    assert warm.consistent
    assert findings(warm) == findings(cold) == findings(verify(con, record=False, cache=False))


def test_legacy_change_keeping_length_behind_the_cache_is_found(con):
    verify(con, record=False)
    key = some_geoid(con, 7)
    before = con.execute("SELECT raw FROM legacy_geoids WHERE gid = ?", [key]).fetchone()[0]
    after = before[:-1] + ("x" if before[-1] != "x" else "y")
    assert len(after) == len(before)
    con.execute("UPDATE legacy_geoids SET raw = ? WHERE gid = ?", [after, key])
    report = verify(con, record=False)
    assert report.field_mismatches.sample == [{"id": key, "fields": ["raw"]}]
    # only the changed row's segment was digested again
    assert cache_stats(report)["recomputed"] == 1
    assert cache_stats(report)["rows_digested"] < 10


def test_document_change_keeping_length_behind_the_cache_is_found(con):
    verify(con, record=False)
    key = some_geoid(con, 8)
    data = con.execute("SELECT data::VARCHAR FROM identities WHERE id = ?", [key]).fetchone()[0]
    i = data.index('"raw"') + len('"raw":"')
    edited = data[:i] + ("Q" if data[i] != "Q" else "R") + data[i + 1 :]
    assert len(edited) == len(data)
    con.execute("UPDATE identities SET data = ? WHERE id = ?", [edited, key])
    report = verify(con, record=False)
    assert report.field_mismatches.sample == [{"id": key, "fields": ["raw"]}]


def test_rows_deleted_and_inserted_behind_the_cache_are_found(con):
    verify(con, record=False)
    gone = some_geoid(con, 3)
    con.execute("DELETE FROM identities WHERE id = ?", [gone])
    con.execute(
        "INSERT INTO legacy_geoids VALUES ('brand-new', 'r', 'r', 'en', '[]', 1, '{}', 1, 1)"
    )
    report = verify(con, record=False)
    assert sorted(s["id"] for s in report.missing_in_new.sample) == sorted([gone, "brand-new"])


def test_json_reformatted_behind_the_cache_stays_consistent(con):
    verify(con, record=False)
    key = some_geoid(con, 9)
    con.execute("UPDATE legacy_geoids SET meta = ' ' || meta::VARCHAR || ' ' WHERE gid = ?", [key])
    report = verify(con, record=False)
    assert cache_stats(report)["recomputed"] == 1
    assert report.consistent, report.reasons


def test_a_hand_edited_digest_is_rejected_and_repaired(con):
    verify(con, record=False)
    con.execute("UPDATE kimera_verify_digests SET digest_sum = digest_sum + 1")
    report = verify(con, record=False)
    entries = cache_stats(report)["segments"]
    assert cache_stats(report)["rejected"] == entries
    assert cache_stats(report)["reused"] == 0
    assert report.consistent and report.checksums["levels"][0]["segments_differing"] == 0
    again = verify(con, record=False)
    assert cache_stats(again)["rejected"] == 0 and cache_stats(again)["recomputed"] == 0


def test_a_stale_digest_with_a_forged_fingerprint_does_not_hide_a_change(con):
    """Someone updates the cached fingerprint sum to match a changed row but not the digest."""
    verify(con, record=False)
    key = some_geoid(con, 11)
    con.execute("UPDATE legacy_geoids SET weight = weight + 1 WHERE gid = ?", [key])
    geoids = SOURCES[0]
    fresh = digests.FINGERPRINTS_SQL.format(
        key="gid",
        table="legacy_geoids",
        shift=SHIFT,
        fingerprint=row_hash_sql(list(geoids.stored)),
    )
    con.execute(
        "UPDATE kimera_verify_digests d SET rows = f.n, fingerprint_sum = f.fsum "
        f"FROM ({fresh}) f WHERE d.store = 'legacy_geoids' AND d.segment = f.seg AND f.seg = ?",
        [segment_of(con, key)],
    )
    report = verify(con, record=False)
    assert cache_stats(report)["rejected"] == 1
    assert report.field_mismatches.sample == [{"id": key, "fields": ["weight"]}]


def test_the_cache_keeps_exactly_the_live_segments(con):
    verify(con, record=False)
    con.execute(
        "INSERT INTO kimera_verify_digests (store, segment, rows, fingerprint_sum, digest_sum, "
        "seal) VALUES ('identities', 99999999, 1, 1, 1, 1), ('legacy_geoids', 99999999, 1, 1, 1, 1)"
    )
    con.execute("DELETE FROM legacy_geoids WHERE gid = ?", [some_geoid(con, 2)])
    report = verify(con, record=False)
    assert cache_stats(report)["rejected"] == 2
    entries = con.execute("SELECT count(*) FROM kimera_verify_digests").fetchone()[0]
    assert entries == cache_stats(report)["segments"]
    assert cache_stats(verify(con, record=False))["rejected"] == 0


def test_duplicated_cache_entries_are_ignored(con):
    cold = verify(con, record=False)
    con.execute(
        "INSERT INTO kimera_verify_digests "
        "SELECT * FROM kimera_verify_digests WHERE store = 'legacy_geoids' LIMIT 5"
    )
    report = verify(con, record=False)
    assert cache_stats(report)["ignored"] == ["legacy_geoids"]
    assert findings(report) == findings(cold)
    assert cache_stats(verify(con, record=False))["ignored"] == []


def test_entries_from_another_recipe_are_not_used(con, monkeypatch):
    verify(con, record=False)
    monkeypatch.setattr(digests, "RECIPE", "another normalisation")
    report = verify(con, record=False)
    assert cache_stats(report)["reused"] == 0
    assert cache_stats(report)["rejected"] == cache_stats(report)["segments"]
    assert report.consistent


def test_read_only_uses_the_cache_and_writes_nothing(path):
    with open_database(path) as c:
        verify(c, record=False)
        key = some_geoid(c, 5)
        c.execute("UPDATE legacy_geoids SET raw = 'changed' WHERE gid = ?", [key])
        c.execute("CHECKPOINT")
    before = path.read_bytes()
    with open_database(path, read_only=True) as c:
        report = verify(c, record=False)
        assert report.field_mismatches.sample == [{"id": key, "fields": ["raw"]}]
        stats = cache_stats(report)
        assert stats["persisted"] is False and stats["written"] == 0
        assert stats["recomputed"] == 1 and stats["reused"] == stats["segments"] - 1
    assert path.read_bytes() == before


def test_without_the_cache_nothing_is_read_or_written(con):
    report = verify(con, record=False, cache=False)
    assert report.consistent
    assert cache_stats(report)["rows_digested"] > 0 and cache_stats(report)["written"] == 0
    assert not con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'kimera_verify_digests'"
    ).fetchone()[0]


def _limit(con):
    return con.execute("SELECT current_setting('memory_limit')").fetchone()[0]


def test_a_warm_verification_leaves_the_memory_limit_as_it_found_it(con):
    """The warm fingerprint passes run under a small memory_limit (cache.recycled_buffers):
    DuckDB's default is set again afterwards, and a limit the caller chose is never touched."""
    default = _limit(con)
    verify(con, record=False)  # cold: fills the cache
    warm = verify(con, record=False)
    assert cache_stats(warm)["reused"] == cache_stats(warm)["segments"]
    assert _limit(con) == default
    con.execute("SET memory_limit = '300MB'")
    chosen = _limit(con)
    assert chosen != default
    again = verify(con, record=False)
    assert _limit(con) == chosen
    assert findings(again) == findings(warm)


def test_the_small_limit_holds_only_inside_the_block_and_never_below_what_is_held(con):
    con.execute("SELECT sum(strlen(data)) FROM identities").fetchall()  # blocks held
    held = con.execute(cache.MEMORY_USED_SQL).fetchone()[0]
    default = _limit(con)
    with cache.recycled_buffers(con):
        inside = _limit(con)
        assert inside != default
    assert _limit(con) == default
    with pytest.raises(ZeroDivisionError), cache.recycled_buffers(con):
        1 / 0  # noqa: B018
    assert _limit(con) == default
    # DuckDB prints one decimal of the unit: 'inside' is at least what was held
    number, unit = inside.split()
    scale = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    assert (float(number) + 0.1) * scale >= max(held, cache.SCAN_MEMORY_LIMIT)
