"""Segment digests and their cache, and bisection down to the rows that differ (≈ reladiff's hashdiff).

Every row of both stores is summed per fine segment of the key-hash space (the top
``FINE_BITS`` bits of ``hash(key)``), one pass over every row, in two digests:

* the **fast** digest (``expected``): a legacy row hashed as the ``identities`` row the
  migration writes for it, an ``identities`` row as it is stored (its fingerprint). No JSON is
  parsed but the terms the entropy reads. A fine segment whose legacy rows (net of the rows
  excluded up front as explained exceptions) sum to the ``identities`` rows' sum holds
  exactly the rows the migration would write: consistent, no column disagreement;
* the **normalised** digest (``sources``): the mapped fields in normal forms, equal for equal
  values however they are spelled, which means parsing every document. Only the fine
  segments the fast sums call *suspect* are digested this way.

Each segment's sum is then its fast sum where the fast sums agree and its normalised sum where
they do not (the same on both sides, so agreeing segments cancel in every roll-up). The fine
sums are rolled up into key segments of about ``TOP_SEGMENT_ROWS`` rows; segments whose
(rows, sum) agree on both sides are done; segments that differ are split ``2**SPLIT_BITS``
ways by rolling the fine sums up again (no source row is read again), as reladiff's hashdiff
bisects, until they hold about ``LEAF_ROWS`` rows each. ``leaf_keys`` then names the keys of
the leaf segments, which ``rows`` compares row by row.

The digest cache (``cache``) keeps both sums per source table and fine segment beside the
rows' fingerprint sum; every verification fingerprints every row afresh and reuses an entry
only for a segment whose rows have the count and fingerprint sum it was computed from.
docs/consistency.md gives the argument.
"""

from __future__ import annotations

import math
import time

import duckdb

from kimera_core.checksum import Checksum
from kimera_core.compare import COMPARE_MACROS
from kimera_core.consistency import cache
from kimera_core.consistency.cache import base_recipe
from kimera_core.consistency.expected import expected_rows_sql, json_typed
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
from kimera_core.sql import vetted_identifier

TOP_SEGMENT_ROWS = 65_536  # rows per segment of the first checksum pass, on average
LEAF_ROWS = 1024  # a segment this small is compared row by row rather than split again
SPLIT_BITS = 4  # each bisection step splits a differing segment into 16
FINE_BITS = 16  # the digest cache keeps one entry per 2**16th of the key-hash space per table

# What a cached sum was computed with: the digest SQL, the macros it calls, the segment width
# and the DuckDB version (hash() and json() may change between versions); each run adds which
# legacy columns are typed JSON (cache.recipe). An entry sealed under another recipe is
# ignored, so changing any of them invalidates the cache.
RECIPE = base_recipe(
    {
        "fine_bits": FINE_BITS,
        "macros": MACROS,
        "compare": COMPARE_MACROS,
        "sources": [[s.table, s.key, s.stored] for s in SOURCES],
        "digests": [LEGACY_DIGESTS, IDENTITY_DIGEST],
        "identity_rows": rows_sql(SOURCES[-1], columns=True),
        "expected": [expected_rows_sql(s, frozenset()) for s in SOURCES[:2]],
    }
)

# Per fine segment of one source: rows and the sum of the rows' fingerprints (a mixed hash of
# the key and every stored column the digests read, as stored: nothing parsed).
FINGERPRINTS_SQL = """
SELECT hash({key}) >> {shift} AS seg, count(*) AS n, sum(hash({fingerprint})::HUGEINT) AS fsum
FROM {table} GROUP BY seg
"""
# The same with the fast digests' sum of a legacy table, from {rows} (expected.expected_rows_sql).
EXPECTED_SUMS_SQL = """
SELECT kh >> {shift} AS seg, count(*) AS n, sum(fp::HUGEINT) AS fsum, sum(xh::HUGEINT) AS xsum
FROM ({rows}) GROUP BY seg
"""
# The normalised digests' sum and the column disagreements, from {rows} (sources.rows_sql).
SEGMENT_DIGESTS_SQL = """
SELECT kh >> {shift} AS seg, count(*) AS n, sum(fp::HUGEINT) AS fsum, sum(rh::HUGEINT) AS nsum,
       sum(bad) AS bad
FROM ({rows})
GROUP BY seg
"""
# The fine segments whose fast sums disagree: legacy rows, net of those excluded up front,
# against identities rows, in count or sum. {fast}: one SELECT seg, n, xsum per source.
SUSPECT_SQL = """
SELECT seg FROM ({fast}) GROUP BY seg HAVING sum(n) <> 0 OR sum(x) <> 0
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
# Per fine segment, minus the legacy rows of the keys excluded up front (explained exceptions),
# each by the digest its segment is compared by: so a segment holding one agrees when the rest
# agrees.
EXCLUDED_SQL = """
SELECT e.seg, -e.n AS n, NULL::HUGEINT AS fsum,
       -CASE WHEN s.seg IS NULL THEN e.xsum ELSE e.nsum END AS dsum, 0 AS bad
FROM kimera_verify_excluded_sums e LEFT JOIN kimera_verify_suspect s USING (seg)
"""

TEMP_TABLES: tuple[str, ...] = (
    "kimera_verify_segs",
    "kimera_verify_fp",
    "kimera_verify_redo",
    "kimera_verify_need",
    "kimera_verify_need_rows",
    "kimera_verify_suspect",
    "kimera_verify_leaf_keys",
    "kimera_verify_fine_excluded",
    "kimera_verify_excluded_rows",
    "kimera_verify_excluded_sums",
    *(f"kimera_verify_fine_{s.table}" for s in SOURCES),
    *(f"kimera_verify_fast_{s.table}" for s in SOURCES),
)
_SHIFT = 64 - FINE_BITS


def fine_table(source: Source) -> str:
    """The temp table of one source's fine segments (seg, n, fsum, dsum, bad) during a run."""
    return vetted_identifier(f"kimera_verify_fine_{source.table}")


def _fast_table(source: Source) -> str:
    """The temp table of one source's fine segments with both sums during a run: (seg, n,
    fsum, xsum, nsum, bad, hit, dirty), as the cache keeps them (``cache.persist``)."""
    return vetted_identifier(f"kimera_verify_fast_{source.table}")


def segment_digests_sql(source: Source, where: str = "true", fingerprint: bool = True) -> str:
    """SQL for (seg, n, fsum, nsum, bad) per fine segment of the ``source`` rows matching
    ``where``: the normalised digests (bad: identities rows whose columns disagree with their
    document)."""
    return SEGMENT_DIGESTS_SQL.format(
        shift=_SHIFT, rows=rows_sql(source, where, fingerprint, columns=True)
    )


def fingerprints_sql(source: Source) -> str:
    """SQL for (seg, n, fsum) per fine segment of every ``source`` row (nothing parsed)."""
    return FINGERPRINTS_SQL.format(
        key=vetted_identifier(source.key),
        table=vetted_identifier(source.table),
        shift=_SHIFT,
        fingerprint=fingerprint_sql(source),
    )


def _side_sql(side: str) -> str:
    """Every fine segment (seg, n, dsum) of one side, one row per source table; the legacy
    side net of the rows excluded up front (``exclude_keys``)."""
    tables = [fine_table(s) for s in sides(side)]
    if side == "legacy":
        tables.append("kimera_verify_fine_excluded")
    return " UNION ALL ".join(f"SELECT seg, n, dsum FROM {t}" for t in tables)


def _in_segments(which: str) -> str:
    """A ``where`` (``{key}``: the key column) for the rows whose fine segment is in ``which``
    (our own SELECT seg)."""
    return f"hash({{key}}) >> {_SHIFT} IN ({which})"


def _fast_sums(
    con: duckdb.DuckDBPyConnection,
    source: Source,
    typed: frozenset[str],
    lookup: bool,
    run_recipe: str,
) -> tuple[int, int, bool]:
    """Fill the source's fast table; returns (segments, segments from the cache, ignored).

    With ``lookup``, every row is fingerprinted and a segment whose rows and fingerprint sum
    match a sealed entry takes its sums; the others (all, without ``lookup``) have their fast
    digests computed: for identities the fingerprint itself, for a legacy table the expected
    row (``expected``), in the statement that fingerprints it.
    """
    table = _fast_table(source)
    legacy = source.side == "legacy"
    ignored = False
    if lookup:
        con.execute("CREATE OR REPLACE TEMP TABLE kimera_verify_fp AS " + fingerprints_sql(source))
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT *, NOT hit AS dirty FROM ("
            + cache.lookup_sql("kimera_verify_fp")
            + ")",
            cache.params(source.table, run_recipe),
        )
        segments, hits = con.execute(
            f"SELECT count(*), count(*) FILTER (hit) FROM {table}"
        ).fetchone()
        if segments != con.execute("SELECT count(*) FROM kimera_verify_fp").fetchone()[0]:
            # duplicate cache entries fanned the lookup out: ignore them all
            ignored, lookup = True, False
    if not lookup and not legacy:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT seg, n, fsum, fsum AS xsum, "
            "NULL::HUGEINT AS nsum, NULL::BIGINT AS bad, false AS hit, true AS dirty FROM ("
            + fingerprints_sql(source)
            + ")"
        )
    elif not lookup:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT seg, n, fsum, xsum, "
            "NULL::HUGEINT AS nsum, 0::BIGINT AS bad, false AS hit, true AS dirty FROM ("
            + EXPECTED_SUMS_SQL.format(shift=_SHIFT, rows=expected_rows_sql(source, typed))
            + ")"
        )
    elif not legacy:
        con.execute(f"UPDATE {table} SET xsum = fsum WHERE NOT hit")
    elif hits < segments:
        con.execute(
            "CREATE OR REPLACE TEMP TABLE kimera_verify_redo AS "
            + EXPECTED_SUMS_SQL.format(
                shift=_SHIFT,
                rows=expected_rows_sql(
                    source, typed, _in_segments(f"SELECT seg FROM {table} WHERE NOT hit")
                ),
            )
        )
        # cached only when the rows are those the fingerprint pass saw
        con.execute(
            f"UPDATE {table} t SET xsum = r.xsum, bad = 0, dirty = (t.n = r.n AND t.fsum = r.fsum) "
            "FROM kimera_verify_redo r WHERE t.seg = r.seg"
        )
    segments, hits = con.execute(f"SELECT count(*), count(*) FILTER (hit) FROM {table}").fetchone()
    return segments, hits, ignored


def _normalise(con: duckdb.DuckDBPyConnection, source: Source) -> tuple[int, int]:
    """Fill nsum (and bad) of the source's suspect segments that lack them; returns (segments,
    rows) digested. The rows are found by their key column alone, then digested by rowid: a
    filter on the key hash would decompress every document before it drops the row."""
    table = _fast_table(source)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE kimera_verify_need AS SELECT seg FROM {table} "
        "WHERE seg IN (SELECT seg FROM kimera_verify_suspect) AND (nsum IS NULL OR bad IS NULL)"
    )
    if not con.execute("SELECT count(*) FROM kimera_verify_need").fetchone()[0]:
        return 0, 0
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_need_rows AS SELECT rowid AS rid "
        f"FROM {vetted_identifier(source.table)} WHERE "
        + _in_segments("SELECT seg FROM kimera_verify_need").format(
            key=vetted_identifier(source.key)
        )
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_redo AS "
        + segment_digests_sql(source, "rowid IN (SELECT rid FROM kimera_verify_need_rows)")
    )
    con.execute(
        f"UPDATE {table} t SET nsum = r.nsum, bad = r.bad, "
        "dirty = t.dirty OR (t.n = r.n AND t.fsum = r.fsum) "
        "FROM kimera_verify_redo r WHERE t.seg = r.seg"
    )
    segments, rows = con.execute("SELECT count(*), sum(n) FROM kimera_verify_redo").fetchone()
    return int(segments), int(rows or 0)


def digest_segments(
    con: duckdb.DuckDBPyConnection,
    report: VerificationReport,
    use_cache: bool,
    fast_path: bool = True,
) -> None:
    """Every row of both stores summed into fine segments: (seg, n, fsum, dsum, bad) per
    source in ``fine_table``, and the excluded rows' in ``kimera_verify_fine_excluded``.

    Needs ``exclude_keys`` first. The fast sums decide which segments are suspect; only
    those are digested by the normalised forms. ``fast_path=False`` treats every segment as
    suspect and neither reads nor writes the cache (the full comparison the fast path is
    proven against). With the cache, on a writable connection, the cache is then made to
    hold exactly the live segments' sums.
    """
    t0 = time.perf_counter()
    typed = json_typed(con)
    run_recipe = cache.recipe(RECIPE, sorted(typed))
    use_cache = use_cache and fast_path
    can_write = use_cache and cache.writable(con)
    cached = use_cache and cache.ready(con, can_write)
    entries = cache.stats(con, run_recipe) if cached else {}
    stats = {"segments": 0, "reused": 0, "recomputed": 0, "rows_digested": 0, "written": 0}
    ignored = []
    fresh = {}
    for source in SOURCES:
        stored, sealed = entries.get(source.table, (0, 0))
        segments, hits, dropped = _fast_sums(con, source, typed, cached and sealed > 0, run_recipe)
        if dropped:
            ignored.append(source.table)
        fresh[source.table] = hits == 0 or dropped
        stats["segments"] += segments
        stats["reused"] += hits
        stats["rows_digested"] += con.execute(
            f"SELECT coalesce(sum(n), 0) FROM {_fast_table(source)} WHERE NOT hit"
        ).fetchone()[0]
    stats["recomputed"] = stats["segments"] - stats["reused"]
    if fast_path:
        fast = " UNION ALL ".join(
            f"SELECT seg, {'' if s.side == 'legacy' else '-'}n AS n, "
            f"{'' if s.side == 'legacy' else '-'}xsum AS x FROM {_fast_table(s)}"
            for s in SOURCES
        )
        fast += " UNION ALL SELECT seg, -n, -xsum FROM kimera_verify_excluded_sums"
    else:
        fast = " UNION ALL ".join(
            f"SELECT seg, 1 AS n, 1 AS x FROM {_fast_table(s)}" for s in SOURCES
        )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_suspect AS " + SUSPECT_SQL.format(fast=fast)
    )
    normalised = [0, 0]
    for source in SOURCES:
        table = _fast_table(source)
        done = _normalise(con, source)
        normalised = [normalised[0] + done[0], normalised[1] + done[1]]
        # a segment the fast sums agree on holds the rows the migration writes: columns agree
        con.execute(
            f"UPDATE {table} SET bad = 0, dirty = true WHERE bad IS NULL "
            "AND seg NOT IN (SELECT seg FROM kimera_verify_suspect)"
        )
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {fine_table(source)} AS SELECT seg, n, fsum, "
            "CASE WHEN seg IN (SELECT seg FROM kimera_verify_suspect) THEN nsum ELSE xsum END "
            f"AS dsum, coalesce(bad, 0) AS bad FROM {table}"
        )
        if can_write:
            stored = entries.get(source.table, (0, 0))[0]
            dirty = con.execute(f"SELECT count(*) FILTER (dirty) FROM {table}").fetchone()[0]
            if dirty or stored != con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                stats["written"] += cache.persist(
                    con, source.table, table, run_recipe, fresh[source.table]
                )
    con.execute("CREATE OR REPLACE TEMP TABLE kimera_verify_fine_excluded AS " + EXCLUDED_SQL)
    report.checksums["digest_cache"] = {
        "enabled": use_cache,
        "persisted": can_write,
        **stats,
        "segments_suspect": con.execute("SELECT count(*) FROM kimera_verify_suspect").fetchone()[0],
        "segments_normalised": normalised[0],
        "rows_normalised": normalised[1],
        "rejected": sum(n - sealed for n, sealed in entries.values()),
        "ignored": ignored,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def exclude_keys(con: duckdb.DuckDBPyConnection) -> int:
    """Sum, per fine segment, the legacy rows of the keys in kimera_verify_excluded (id) by both
    digests (the temp table kimera_verify_excluded_sums: seg, n, xsum, nsum), which
    ``digest_segments`` takes out of the legacy side; returns those rows.

    The rows are found by their key column alone, then digested by rowid: a semi-join on the
    key would read and decompress every column of every legacy row.
    """
    legacy = sides("legacy")
    typed = json_typed(con)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_excluded_rows AS "
        + " UNION ALL ".join(
            f"SELECT '{s.table}' AS src, rowid AS rid FROM {vetted_identifier(s.table)} "
            f"WHERE {vetted_identifier(s.key)} IN (SELECT id FROM kimera_verify_excluded)"
            for s in legacy
        )
    )
    parts = []
    for s in legacy:
        where = f"rowid IN (SELECT rid FROM kimera_verify_excluded_rows WHERE src = '{s.table}')"
        parts.append(
            f"SELECT kh >> {_SHIFT} AS seg, 1 AS n, xh::HUGEINT AS x, NULL::HUGEINT AS r FROM ("
            + expected_rows_sql(s, typed, where, fingerprint=False)
            + f") UNION ALL SELECT kh >> {_SHIFT}, 0, NULL, rh::HUGEINT FROM ("
            + rows_sql(s, where, fingerprint=False)
            + ")"
        )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_excluded_sums AS SELECT seg, sum(n) AS n, "
        "sum(x) AS xsum, sum(r) AS nsum FROM (" + " UNION ALL ".join(parts) + ") GROUP BY seg"
    )
    return int(
        con.execute("SELECT coalesce(sum(n), 0) FROM kimera_verify_excluded_sums").fetchone()[0]
    )


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
