"""Consistency benchmarks: full verification of 1 M legacy vs 1 M identities, the checksum pass,
bisection to one changed row, and incremental verification after 1 k changes.

Usage: .venv/bin/python bench/bench_consistency.py [--rows 1000000] [--changes 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from kimera_core import consistency
from kimera_core.consistency import verify
from kimera_core.db import open_database
from kimera_core.legacy import create_legacy_schema

_ISO = (
    "strftime(make_timestamp(CAST(round({c} * 1000000) AS BIGINT)), "
    "'%Y-%m-%dT%H:%M:%S.%f') || '+00:00'"
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
MIGRATE_SQL = f"""
INSERT INTO identities
SELECT gid, 'geoid',
       json_object('id', gid, 'identity_type', 'geoid', 'raw', raw, 'echo', echo,
                   'lang_axis', lang_axis, 'tags', tags, 'weight', weight, 'related_ids', NULL,
                   'meta', meta, 'created_at', {_ISO.format(c="created_at")},
                   'updated_at', {_ISO.format(c="updated_at")}),
       created_at, updated_at, lang_axis, 0
FROM legacy_geoids
"""


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


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
        build, _ = timed(lambda: (con.execute(LEGACY_SQL, [n]), con.execute(MIGRATE_SQL)))
        con.execute("CHECKPOINT")
        print(f"setup: {n:,} legacy geoids + {n:,} identities in {build:.1f} s")

        full = [timed(lambda: verify(con, record=False)) for _ in range(args.repeat)]
        best, report = min(full, key=lambda x: x[0])
        print(
            f"full verification, clean: {best:.2f} s (best of {args.repeat}; target <= 1 s), "
            f"verdict {report.to_dict()['verdict']}"
        )

        consistency._install(con)
        passes = []
        for _ in range(args.repeat):
            t, _ = timed(lambda: consistency._segments(con, 60, None, 64))
            passes.append(t)
        checksum = min(passes)
        print(
            f"checksum pass (both sides, 16 segments): {checksum:.2f} s = "
            f"{2 * n / checksum / 1e6:.1f} M rows/s (target >= 20 M rows/s)"
        )

        con.execute(
            "UPDATE legacy_geoids SET weight = weight + 0.5 "
            "WHERE gid = (SELECT gid FROM legacy_geoids ORDER BY gid LIMIT 1 OFFSET 4242)"
        )
        t, report = timed(lambda: verify(con, record=False))
        print(
            f"full verification, one changed row: {t:.2f} s; found "
            f"{report.field_mismatches.sample}; levels {[lv['segments_differing'] for lv in report.checksums['levels']]}; "
            f"rows compared row by row {report.checksums['rows_compared_row_level']:,}"
        )
        con.execute(
            "UPDATE legacy_geoids SET weight = weight - 0.5 "
            "WHERE gid = (SELECT gid FROM legacy_geoids ORDER BY gid LIMIT 1 OFFSET 4242)"
        )

        verify(con)  # the recorded base
        time.sleep(0.01)
        con.execute(
            "CREATE TEMP TABLE changed AS SELECT gid FROM legacy_geoids ORDER BY hash(gid) LIMIT ?",
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
            "'raw', (data->>'$.raw') || ' (edited)', 'updated_at', "
            f"{_ISO.format(c='$t')})), updated_at = $t "
            "WHERE id IN (SELECT gid FROM changed)",
            {"t": stamp},
        )
        t, report = timed(lambda: verify(con, incremental=True, record=False))
        print(
            f"incremental verification after {args.changes:,} changes: {t:.3f} s, "
            f"{report.keys_checked:,} keys checked, verdict {report.to_dict()['verdict']}"
        )
        con.close()


if __name__ == "__main__":
    main()
