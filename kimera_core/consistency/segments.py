"""Segment digests and their cache, and bisection down to the rows that differ (≈ reladiff's hashdiff).

Every row of both stores has a digest: a 64-bit hash of its key and normalised mapped fields
(``sources``). The digests are summed per fine segment of the key-hash space (the top
``FINE_BITS`` bits of ``hash(key)``), one pass over every row. The fine sums are rolled up
into key segments of about ``TOP_SEGMENT_ROWS`` rows; segments whose (rows, sum) agree on
both sides are done; segments that differ are split ``2**SPLIT_BITS`` ways by rolling the fine
sums up again (no source row is read again), as reladiff's hashdiff bisects, until they hold
about ``LEAF_ROWS`` rows each. ``leaf_keys`` then names the keys of the leaf segments, which
``rows`` compares row by row.

Computing a digest means parsing JSON (the P1 document, the legacy JSON columns), which is
the cost of a verification. The digest cache ``kimera_verify_digests`` keeps, per source
table and fine segment, the row count, the sum of the rows' fingerprints (``hash()`` of the
key and the stored columns, verbatim, no parsing) and the sum of their digests, sealed with
the ``RECIPE`` they were computed under. Every verification fingerprints every row afresh and
reuses a cached digest sum only for a segment whose rows have the count and fingerprint sum it
was computed from, so the rows of a segment changed by any writer since (the legacy
application included) are digested again; nothing trusts a writer to maintain the cache.
An entry is written only with the fingerprint and digest sums of the same rows, from one
statement, and a table's entries are replaced in one transaction. docs/consistency.md gives
the argument.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

import duckdb

from kimera_core.checksum import Checksum
from kimera_core.compare import COMPARE_MACROS
from kimera_core.consistency.report import VerificationReport
from kimera_core.consistency.sources import (
    IDENTITY_DIGEST,
    LEGACY_DIGESTS,
    MACROS,
    SOURCES,
    Source,
    fingerprint_sql,
    rows_sql,
    sides,
)
from kimera_core.db import transaction
from kimera_core.sql import vetted_identifier

TOP_SEGMENT_ROWS = 65_536  # rows per segment of the first checksum pass, on average
LEAF_ROWS = 1024  # a segment this small is compared row by row rather than split again
SPLIT_BITS = 4  # each bisection step splits a differing segment into 16
FINE_BITS = 16  # the digest cache keeps one entry per 2**16th of the key-hash space per table

DIGESTS_DDL = """CREATE TABLE IF NOT EXISTS kimera_verify_digests (
    store TEXT NOT NULL,            -- the source table: legacy_geoids, legacy_scars, identities
    segment UBIGINT NOT NULL,       -- hash(key) >> (64 - FINE_BITS)
    rows BIGINT NOT NULL,           -- rows in the segment
    fingerprint_sum HUGEINT NOT NULL,  -- sum of the rows' fingerprints (stored columns, verbatim)
    digest_sum HUGEINT NOT NULL,    -- sum of the rows' digests (normalised mapped fields)
    seal UBIGINT NOT NULL,          -- hash(recipe, store, segment, rows, fingerprint_sum,
                                    --      digest_sum, column_mismatches)
    column_mismatches BIGINT        -- identities rows whose columns disagree with the document
)"""
# A cache written before column_mismatches existed gains the column; its entries fail the seal.
DIGESTS_UPGRADE_SQL = (
    "ALTER TABLE kimera_verify_digests ADD COLUMN IF NOT EXISTS column_mismatches BIGINT"
)
DIGESTS_COLUMNS_SQL = """
SELECT count(*) FROM information_schema.columns
WHERE table_catalog = current_database() AND table_schema = 'main'
  AND table_name = 'kimera_verify_digests' AND column_name = 'column_mismatches'
"""

# What a cached digest sum was computed with: the digest SQL, the macros it calls, the segment
# width and the DuckDB version (hash() and json() may change between versions). An entry
# sealed under another recipe is ignored, so changing any of them invalidates the cache.
RECIPE = hashlib.sha256(
    json.dumps(
        {
            "duckdb": duckdb.__version__,
            "fine_bits": FINE_BITS,
            "macros": MACROS,
            "compare": COMPARE_MACROS,
            "sources": [[s.table, s.key, s.stored] for s in SOURCES],
            "digests": [LEGACY_DIGESTS, IDENTITY_DIGEST],
            "identity_rows": rows_sql(SOURCES[-1], columns=True),
        }
    ).encode()
).hexdigest()

# Per fine segment of one source: rows, the sum of the rows' fingerprints (a mixed hash of the
# key and every stored column the digest reads, as stored: no parsing) and, in the second
# form, the sum of their digests and the rows whose columns disagree with their document.
FINGERPRINTS_SQL = """
SELECT hash({key}) >> {shift} AS seg, count(*) AS n, sum(hash({fingerprint})::HUGEINT) AS fsum
FROM {table} GROUP BY seg
"""
SEGMENT_DIGESTS_SQL = """
SELECT kh >> {shift} AS seg, count(*) AS n, sum(fp::HUGEINT) AS fsum, sum(rh::HUGEINT) AS dsum,
       sum(bad) AS bad
FROM ({rows})
GROUP BY seg
"""
# The cached digest sum of each segment whose rows and fingerprint sum are unchanged. An entry
# counts only if its seal holds: a hand-edited entry is not used, nor one from another recipe.
CACHE_LOOKUP_SQL = """
SELECT f.seg, f.n, f.fsum, c.digest_sum AS dsum, c.column_mismatches AS bad
FROM kimera_verify_fp f LEFT JOIN (
    SELECT segment, rows, fingerprint_sum, digest_sum, column_mismatches
    FROM kimera_verify_digests
    WHERE store = $store AND seal = hash($recipe, store, segment, rows, fingerprint_sum,
                                         digest_sum, column_mismatches)) c
ON f.seg = c.segment AND f.n = c.rows AND f.fsum = c.fingerprint_sum
"""
CACHE_STATS_SQL = """
SELECT store, count(*) AS entries,
       count(*) FILTER (WHERE seal = hash($recipe, store, segment, rows, fingerprint_sum,
                                          digest_sum, column_mismatches)) AS sealed
FROM kimera_verify_digests GROUP BY store
"""
# Keep the entries reused in this run (a digest sum in the fine table {keep}) whose seal holds.
CACHE_PRUNE_SQL = """
DELETE FROM kimera_verify_digests WHERE store = $store AND (
    segment NOT IN (SELECT seg FROM {keep} WHERE dsum IS NOT NULL)
    OR seal IS DISTINCT FROM hash($recipe, store, segment, rows, fingerprint_sum, digest_sum,
                                  column_mismatches))
"""
CACHE_WRITE_SQL = """
INSERT INTO kimera_verify_digests
    (store, segment, rows, fingerprint_sum, digest_sum, seal, column_mismatches)
SELECT $store, seg, n, fsum, dsum, hash($recipe, $store, seg, n, fsum, dsum, bad), bad
FROM kimera_verify_redo
"""
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
# Per fine segment, minus the legacy rows of the keys excluded up front (explained exceptions,
# in kimera_verify_excluded): so a segment holding one agrees when the rest agrees.
EXCLUDED_SQL = """
SELECT seg, -sum(n) AS n, NULL::HUGEINT AS fsum, -sum(dsum) AS dsum, 0 AS bad FROM ({parts})
GROUP BY seg
"""

TEMP_TABLES: tuple[str, ...] = (
    "kimera_verify_segs",
    "kimera_verify_fp",
    "kimera_verify_redo",
    "kimera_verify_leaf_keys",
    "kimera_verify_fine_excluded",
    "kimera_verify_excluded_rows",
    *(f"kimera_verify_fine_{s.table}" for s in SOURCES),
)


def fine_table(source: Source) -> str:
    """The temp table of one source's fine segments (seg, n, fsum, dsum) during a run."""
    return vetted_identifier(f"kimera_verify_fine_{source.table}")


def segment_digests_sql(source: Source, where: str = "true", fingerprint: bool = True) -> str:
    """SQL for (seg, n, fsum, dsum, bad) per fine segment of the ``source`` rows matching
    ``where`` (bad: identities rows whose columns disagree with their document)."""
    return SEGMENT_DIGESTS_SQL.format(
        shift=64 - FINE_BITS, rows=rows_sql(source, where, fingerprint, columns=True)
    )


def fingerprints_sql(source: Source) -> str:
    """SQL for (seg, n, fsum) per fine segment of every ``source`` row (nothing parsed)."""
    return FINGERPRINTS_SQL.format(
        key=vetted_identifier(source.key),
        table=vetted_identifier(source.table),
        shift=64 - FINE_BITS,
        fingerprint=fingerprint_sql(source),
    )


def _side_sql(side: str) -> str:
    """Every fine segment (seg, n, dsum) of one side, one row per source table; the legacy
    side net of the rows excluded up front (``exclude_keys``)."""
    tables = [fine_table(s) for s in sides(side)]
    if side == "legacy":
        tables.append("kimera_verify_fine_excluded")
    return " UNION ALL ".join(f"SELECT seg, n, dsum FROM {t}" for t in tables)


def _writable(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute(
        "SELECT readonly FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()
    return row is not None and not row[0]


def digest_segments(
    con: duckdb.DuckDBPyConnection, report: VerificationReport, use_cache: bool
) -> None:
    """Every row of both stores summed into fine segments: (seg, n, fsum, dsum) per source.

    With the cache, every row is fingerprinted (its stored columns hashed, nothing parsed)
    and a segment whose row count and fingerprint sum equal a sealed cache entry's takes the
    entry's digest sum; only the other segments' rows are digested. On a writable connection
    the cache is then made to hold exactly the entries used and the sums computed.
    """
    t0 = time.perf_counter()
    entries: dict[str, tuple[int, int]] = {}
    cached = use_cache
    writable = use_cache and _writable(con)
    if use_cache:
        cached = _cache_ready(con, writable)
        rows = con.execute(CACHE_STATS_SQL, {"recipe": RECIPE}).fetchall() if cached else []
        entries = {store: (int(n), int(sealed)) for store, n, sealed in rows}
    stats = {"segments": 0, "reused": 0, "recomputed": 0, "rows_digested": 0, "written": 0}
    ignored = []
    for source in SOURCES:
        table = fine_table(source)
        redo, hits = "true", 0
        stored, sealed = entries.get(source.table, (0, 0))
        if cached and sealed:
            con.execute(
                "CREATE OR REPLACE TEMP TABLE kimera_verify_fp AS " + fingerprints_sql(source)
            )
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE {table} AS {CACHE_LOOKUP_SQL}",
                {"store": source.table, "recipe": RECIPE},
            )
            segments, hits = con.execute(f"SELECT count(*), count(dsum) FROM {table}").fetchone()
            if segments != con.execute("SELECT count(*) FROM kimera_verify_fp").fetchone()[0]:
                # duplicate cache entries fanned the lookup out: ignore them all
                ignored.append(source.table)
                hits = 0
            elif hits == segments:
                redo = None
            elif hits:
                redo = (
                    f"hash({{key}}) >> {64 - FINE_BITS} "
                    f"IN (SELECT seg FROM {table} WHERE dsum IS NULL)"
                )
        if redo is None:
            con.execute(f"CREATE OR REPLACE TEMP TABLE kimera_verify_redo AS FROM {table} LIMIT 0")
        else:
            con.execute(
                "CREATE OR REPLACE TEMP TABLE kimera_verify_redo AS "
                + segment_digests_sql(source, redo, fingerprint=use_cache)
            )
        if writable and (redo is not None or stored != hits):
            stats["written"] += _persist(con, source, keep=table if hits else None)
        if redo == "true":
            con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS FROM kimera_verify_redo")
        elif redo is not None:
            con.execute(f"DELETE FROM {table} WHERE dsum IS NULL")
            con.execute(f"INSERT INTO {table} FROM kimera_verify_redo")
        redone, digested = con.execute(
            "SELECT count(*), coalesce(sum(n), 0) FROM kimera_verify_redo"
        ).fetchone()
        stats["recomputed"] += redone
        stats["rows_digested"] += int(digested)
        stats["segments"] += con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    stats["reused"] = stats["segments"] - stats["recomputed"]
    report.checksums["digest_cache"] = {
        "enabled": use_cache,
        "persisted": writable,
        **stats,
        "rejected": sum(n - sealed for n, sealed in entries.values()),
        "ignored": ignored,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def _cache_ready(con: duckdb.DuckDBPyConnection, writable: bool) -> bool:
    """Whether the digest cache exists in the current layout (an older one is upgraded when
    the connection is writable, else not used)."""
    if not con.execute(DIGESTS_COLUMNS_SQL).fetchone()[0]:
        exists = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_catalog = "
            "current_database() AND table_schema = 'main' AND table_name = 'kimera_verify_digests'"
        ).fetchone()[0]
        if not (exists and writable):
            return False
        con.execute(DIGESTS_UPGRADE_SQL)
    return True


def exclude_keys(con: duckdb.DuckDBPyConnection) -> int:
    """Take the legacy rows of the keys in kimera_verify_excluded (id) out of the segment sums
    (the temp table kimera_verify_fine_excluded, negative); returns those rows.

    The rows are found by their key column alone, then digested by rowid: a semi-join on the
    key would read and decompress every column of every legacy row.
    """
    legacy = sides("legacy")
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_excluded_rows AS "
        + " UNION ALL ".join(
            f"SELECT '{s.table}' AS src, rowid AS rid FROM {vetted_identifier(s.table)} "
            f"WHERE {vetted_identifier(s.key)} IN (SELECT id FROM kimera_verify_excluded)"
            for s in legacy
        )
    )
    parts = " UNION ALL ".join(
        f"SELECT kh >> {64 - FINE_BITS} AS seg, 1 AS n, rh::HUGEINT AS dsum FROM ("
        + rows_sql(
            s,
            f"rowid IN (SELECT rid FROM kimera_verify_excluded_rows WHERE src = '{s.table}')",
            fingerprint=False,
        )
        + ")"
        for s in legacy
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_fine_excluded AS "
        + EXCLUDED_SQL.format(parts=parts)
    )
    return -int(
        con.execute("SELECT coalesce(sum(n), 0) FROM kimera_verify_fine_excluded").fetchone()[0]
    )


def column_mismatch_segments(con: duckdb.DuckDBPyConnection) -> list[int]:
    """The fine segments of identities holding a row whose columns disagree with its document."""
    table = fine_table(SOURCES[-1])
    return [r[0] for r in con.execute(f"SELECT seg FROM {table} WHERE bad > 0").fetchall()]


def _persist(con: duckdb.DuckDBPyConnection, source: Source, keep: str | None) -> int:
    """Make the cache hold the entries reused (the segments with a digest sum in the fine
    table ``keep``; none if None) and the sums computed now; returns the entries written.

    Each entry's fingerprint sum and digest sum come from one statement over the same rows, so
    the cache never pairs a digest sum with rows it was not computed from. Changed, emptied,
    rejected and duplicated entries are dropped; the table's entries change in one transaction.
    """
    con.execute(DIGESTS_DDL)
    con.execute(DIGESTS_UPGRADE_SQL)
    params = {"store": source.table, "recipe": RECIPE}
    with transaction(con):
        if keep is not None:
            con.execute(CACHE_PRUNE_SQL.format(keep=keep), params)  # keep: a fine_table()
        else:
            con.execute("DELETE FROM kimera_verify_digests WHERE store = ?", [source.table])
        return con.execute(CACHE_WRITE_SQL, params).fetchone()[0]


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
