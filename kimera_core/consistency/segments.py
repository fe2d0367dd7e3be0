"""Bisection down to the rows that differ (≈ reladiff's hashdiff), over the fine segment sums.

``digests`` sums every row of both stores per fine segment of the key-hash space (the top
``FINE_BITS`` bits of ``hash(key)``) into ``fine_table(source)`` (seg, n, fsum, dsum, bad).
Here those fine sums are rolled up into key segments of about ``TOP_SEGMENT_ROWS`` rows;
segments whose (rows, sum) agree on both sides are done; segments that differ are split
``2**SPLIT_BITS`` ways by rolling the fine sums up again (no source row is read again), as
reladiff's hashdiff bisects, until they hold about ``LEAF_ROWS`` rows each. ``leaf_keys``
then names the keys of the leaf segments, which ``rows`` compares row by row.
"""

from __future__ import annotations

import math
import time

import duckdb

from kimera_core.checksum import Checksum
from kimera_core.consistency.report import VerificationReport
from kimera_core.consistency.sources import SOURCES, Source, sides
from kimera_core.sql import vetted_identifier

TOP_SEGMENT_ROWS = 65_536  # rows per segment of the first checksum pass, on average
LEAF_ROWS = 1024  # a segment this small is compared row by row rather than split again
SPLIT_BITS = 4  # each bisection step splits a differing segment into 16
FINE_BITS = 12  # the digest cache keeps one entry per 2**12th of the key-hash space per table

SEGMENT_SQL = """
SELECT seg >> {shift} AS part, sum(n) AS n, sum(dsum) AS s
FROM ({side}) WHERE {where} GROUP BY part HAVING sum(n) <> 0 OR sum(dsum) <> 0
"""
# The keys of the sources' rows in the leaf segments in kimera_verify_segs (key columns only),
# the keys excluded as explained exceptions left out.
LEAF_KEYS_SQL = """
SELECT {key} AS id FROM {table} WHERE hash({key}) >> {shift} IN (SELECT seg FROM kimera_verify_segs)
AND {key} NOT IN (SELECT id FROM kimera_verify_excluded)
"""
TEMP_TABLES: tuple[str, ...] = (
    "kimera_verify_segs",
    "kimera_verify_leaf_keys",
    "kimera_verify_fine_excluded",
    *(f"kimera_verify_fine_{s.table}" for s in SOURCES),
)


def fine_table(source: Source) -> str:
    """The temp table of one source's fine segments (seg, n, fsum, dsum, bad) during a run."""
    return vetted_identifier(f"kimera_verify_fine_{source.table}")


def _side_sql(side: str) -> str:
    """Every fine segment (seg, n, dsum) of one side, one row per source table; the legacy
    side net of the rows excluded up front (``exclude_keys``)."""
    tables = [fine_table(s) for s in sides(side)]
    if side == "legacy":
        tables.append("kimera_verify_fine_excluded")
    return " UNION ALL ".join(f"SELECT seg, n, dsum FROM {t}" for t in tables)


def column_mismatch_segments(con: duckdb.DuckDBPyConnection) -> list[int]:
    """The fine segments of identities holding a row whose columns disagree with its document."""
    table = fine_table(SOURCES[-1])
    return [r[0] for r in con.execute(f"SELECT seg FROM {table} WHERE bad > 0").fetchall()]


def _segments(
    con: duckdb.DuckDBPyConnection, bits: int, parents: list[int] | None, parent_bits: int
) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
    """(legacy, new) checksum per segment of ``bits`` key-hash bits, inside ``parents``.

    Rolls the fine segments up: no source row is read again.
    """
    if parents is None:
        where = "true"
    else:
        _segment_list(con, parents)
        # parent_bits is an int computed here, never input
        where = f"seg >> {FINE_BITS - int(parent_bits)} IN (SELECT seg FROM kimera_verify_segs)"
    out = []
    for side in ("legacy", "new"):
        sql = SEGMENT_SQL.format(shift=FINE_BITS - int(bits), side=_side_sql(side), where=where)
        out.append({int(seg): (int(n), int(s)) for seg, n, s in con.execute(sql).fetchall()})
    return out[0], out[1]


def _initial_bits(rows: int) -> int:
    if rows <= TOP_SEGMENT_ROWS:
        return 0
    return min(FINE_BITS, math.ceil(math.log2(rows / TOP_SEGMENT_ROWS)))


def bisect(con: duckdb.DuckDBPyConnection, report: VerificationReport) -> tuple[int, list[int]]:
    """Descend into differing segments; returns (bits, leaf segments to compare row by row)."""
    total = max(report.counts["legacy"]["total"], report.counts["new"]["total"])
    bits = _initial_bits(total)
    parents: list[int] | None = None
    parent_bits = 0
    levels = []
    while True:
        t0 = time.perf_counter()
        legacy, new = _segments(con, bits, parents, parent_bits)
        if parents is None:
            for side, sums in (("legacy", legacy), ("new", new)):
                report.checksums[side] = Checksum(
                    sum(n for n, _ in sums.values()), sum(s for _, s in sums.values())
                ).to_dict()
        keys = legacy.keys() | new.keys()
        differing = sorted(k for k in keys if legacy.get(k) != new.get(k))
        diff_rows = sum(max(legacy.get(k, (0, 0))[0], new.get(k, (0, 0))[0]) for k in differing)
        levels.append(
            {
                "bits": bits,
                "segments_compared": len(keys),
                "segments_differing": len(differing),
                "rows_in_differing": diff_rows,
                "seconds": round(time.perf_counter() - t0, 4),
            }
        )
        report.checksums["levels"] = levels
        if (
            not differing
            or bits >= FINE_BITS
            or diff_rows <= LEAF_ROWS * len(differing)
            or diff_rows > total // 2
        ):
            return bits, differing
        parents, parent_bits = differing, bits
        bits = min(FINE_BITS, bits + SPLIT_BITS)


def _segment_list(con: duckdb.DuckDBPyConnection, segments: list[int]) -> None:
    """The temp table kimera_verify_segs (seg) holding ``segments``."""
    con.execute("CREATE OR REPLACE TEMP TABLE kimera_verify_segs (seg UBIGINT)")
    con.executemany("INSERT INTO kimera_verify_segs VALUES (?)", [[s] for s in segments])


def leaf_keys(con: duckdb.DuckDBPyConnection, bits: int, leaves: list[int]) -> str:
    """Fill the temp table ``kimera_verify_leaf_keys`` (id) with the keys of every source row in
    the segments ``leaves`` of ``bits`` key-hash bits; returns its name.

    Only key columns are read: the rows themselves are fetched by ``rows.materialise_sides``.
    """
    _segment_list(con, leaves)
    # bits is an int computed by bisect, never input
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_leaf_keys AS "
        + " UNION ".join(
            LEAF_KEYS_SQL.format(
                key=vetted_identifier(s.key),
                table=vetted_identifier(s.table),
                shift=64 - int(bits),
            )
            for s in SOURCES
        )
    )
    return "kimera_verify_leaf_keys"
