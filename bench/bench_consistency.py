"""Consistency benchmarks, side by side in one run over 1 M legacy geoids and 1 M identities:

* full verification without the digest cache (every row digested: the pre-cache cost),
* cold (empty cache) and warm full verification, and the checksum pass rate of the warm one,
  against the floor: one bare read of every stored byte the fingerprints cover,
* one changed row found by bisection (warm),
* full (warm) and incremental verification after 1 k rows changed on both sides.

Usage: .venv/bin/python bench/bench_consistency.py [--rows 1000000] [--changes 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kimera_core.consistency import SOURCES, verify
from kimera_core.db import open_database
from kimera_core.identity import epoch_to_iso
from kimera_core.legacy import create_legacy_schema
from kimera_core.sql import (
    epoch_iso_fixes,
    epoch_iso_sql,
    install_epoch_iso_macros,
    vetted_identifier,
)

LEGACY_SQL = """
INSERT INTO legacy_geoids
SELECT substr(sha256(i::VARCHAR), 1, 16), 'The river remembers · ' || i,
       'The river remembers · ' || i, ['en', 'fr', 'ar'][1 + i % 3], '["memory", "art"]',
       round(0.1 + (i % 1000) / 1000.0, 4),
       '{"terms": [{"symbol": "echo", "intensity": ' || (1 + i % 7) || '}], "source": "ingest"}',
       1790000000.0 + i / 1000.0, 1790000000.0 + i / 1000.0
FROM range(?) t(i)
"""
# Every legacy geoid as its P1 document, the ISO timestamps by kimera_core.sql's formula.
MIGRATE_SQL = """
INSERT INTO identities
SELECT gid, 'geoid',
       json_object('id', gid, 'identity_type', 'geoid', 'raw', raw, 'echo', echo,
                   'lang_axis', lang_axis, 'tags', tags, 'weight', weight, 'related_ids', NULL,
                   'meta', meta, 'created_at', {created}, 'updated_at', {updated}),
       created_at, updated_at, lang_axis, 0
FROM legacy_geoids
"""
NUMERIC = {"weight", "created_at", "updated_at"}


def floor_sql() -> str:
    """The floor of any verification that reads every row: one pass over every stored column
    the fingerprints cover, doing nothing but touch each value (text lengths, numbers summed)."""
    passes = []
    for source in SOURCES:
        touch = " + ".join(
            f"coalesce({vetted_identifier(c)}, 0)"
            if c in NUMERIC
            else f"coalesce(strlen({vetted_identifier(c)}::VARCHAR), 0)"
            for c in source.stored
        )
        passes.append(f"SELECT count(*), sum({touch}) FROM {vetted_identifier(source.table)}")
    return " UNION ALL ".join(passes)


def migrate(con) -> None:
    install_epoch_iso_macros(con)
    epochs = "SELECT created_at FROM legacy_geoids UNION ALL SELECT updated_at FROM legacy_geoids"
    with epoch_iso_fixes(con, epochs) as fixes:
        con.execute(
            MIGRATE_SQL.format(
                created=epoch_iso_sql("created_at", fixes=fixes),
                updated=epoch_iso_sql("updated_at", fixes=fixes),
            )
        )


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def best(repeat, fn):
    return min((timed(fn) for _ in range(repeat)), key=lambda x: x[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = args.rows

    with tempfile.TemporaryDirectory() as tmp:
        con = open_database(Path(tmp) / "c.duckdb", create=True)
        create_legacy_schema(con)
        build, _ = timed(lambda: (con.execute(LEGACY_SQL, [n]), migrate(con)))
        con.execute("CHECKPOINT")
        print(f"setup: {n:,} legacy geoids + {n:,} identities in {build:.1f} s")

        plain, report = best(args.repeat, lambda: verify(con, record=False, cache=False))
        print(
            f"full verification without the cache (every row digested): {plain:.2f} s "
            f"(best of {args.repeat}), verdict {report.to_dict()['verdict']}"
        )
        con.execute("DROP TABLE IF EXISTS kimera_verify_digests")
        cold, report = timed(lambda: verify(con, record=False))
        print(
            f"full verification, cold cache: {cold:.2f} s ({cold / plain:.2f}x without cache), "
            f"{report.checksums['digest_cache']['written']:,} segment digests cached"
        )
        warm, report = best(args.repeat, lambda: verify(con, record=False))
        cache = report.checksums["digest_cache"]
        print(
            f"full verification, warm cache: {warm:.2f} s (best of {args.repeat}; target <= 1 s; "
            f"{warm / plain:.2f}x without cache), {cache['reused']:,} of {cache['segments']:,} "
            f"segments reused, {cache['rows_digested']:,} rows digested, "
            f"verdict {report.to_dict()['verdict']}"
        )
        rows = report.checksums["legacy"]["rows"] + report.checksums["new"]["rows"]
        checksum = report.checksums["pass_seconds"]
        floor, _ = best(args.repeat, lambda: con.execute(floor_sql()).fetchall())
        print(
            f"checksum pass of the warm run (fingerprint every row, reuse cached digests, "
            f"segment sums; both sides): {checksum:.2f} s = {rows / checksum / 1e6:.1f} M rows/s "
            f"(target >= 20 M rows/s); floor, one bare read of the same columns: {floor:.2f} s "
            f"= {rows / floor / 1e6:.1f} M rows/s ({checksum / floor:.1f}x the floor)"
        )

        one = "WHERE gid = (SELECT gid FROM legacy_geoids ORDER BY gid LIMIT 1 OFFSET 4242)"
        con.execute(f"UPDATE legacy_geoids SET weight = weight + 0.5 {one}")
        t, report = timed(lambda: verify(con, record=False))
        levels = [lv["segments_differing"] for lv in report.checksums["levels"]]
        print(
            f"full verification (warm), one changed row: {t:.2f} s; found "
            f"{report.field_mismatches.sample}; differing segments per level {levels}; "
            f"rows compared row by row {report.checksums['rows_compared_row_level']:,}"
        )
        con.execute(f"UPDATE legacy_geoids SET weight = weight - 0.5 {one}")

        verify(con)  # the recorded base of the incremental run
        time.sleep(0.01)
        con.execute(
            # md5 order: keys spread over the whole key-hash space, not bunched in a few segments
            "CREATE TEMP TABLE changed AS SELECT gid FROM legacy_geoids ORDER BY md5(gid) LIMIT ?",
            [args.changes],
        )
        stamp = round(time.time() + 1, 6)
        con.execute(
            "UPDATE legacy_geoids SET raw = raw || ' (edited)', updated_at = $t "
            "WHERE gid IN (SELECT gid FROM changed)",
            {"t": stamp},
        )
        con.execute(
            "UPDATE identities SET data = json_merge_patch(data, json_object("
            "'raw', (data->>'$.raw') || ' (edited)', 'updated_at', $iso)), updated_at = $t "
            "WHERE id IN (SELECT gid FROM changed)",
            {"t": stamp, "iso": epoch_to_iso(stamp)},
        )
        t, report = timed(lambda: verify(con, incremental=True, record=False))
        print(
            f"incremental verification after {args.changes:,} changes: {t:.3f} s, "
            f"{report.keys_checked:,} keys checked, verdict {report.to_dict()['verdict']}"
        )
        t, report = timed(lambda: verify(con, record=False))
        cache = report.checksums["digest_cache"]
        print(
            f"full verification (warm) after {args.changes:,} changes: {t:.2f} s "
            f"({t / plain:.2f}x without cache), {cache['recomputed']:,} segments "
            f"({cache['rows_digested']:,} rows) digested again, "
            f"verdict {report.to_dict()['verdict']}"
        )
        con.close()


if __name__ == "__main__":
    main()
