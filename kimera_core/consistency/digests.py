"""The checksum pass: every row of both stores summed per fine segment, in two digests.

* the **fast** digest (``expected``): a legacy row hashed as the ``identities`` row the
  migration writes for it, an ``identities`` row as it is stored (its fingerprint). No JSON
  is parsed but the terms the entropy reads. A fine segment whose legacy rows, net of the rows
  excluded up front as explained exceptions, sum to its ``identities`` rows' sum holds exactly
  the rows the migration would write: consistent, no column disagreement;
* the **normalised** digest (``sources``): the mapped fields in normal forms, equal for equal
  values however they are spelled, which means parsing every document. Only the fine
  segments the fast sums call *suspect* are digested this way.

Each segment's sum (``segments.fine_table``) is then its fast sum where the fast sums agree
and its normalised sum where they do not, the same on both sides, so agreeing segments
cancel in every roll-up of ``segments.bisect``. The legacy rows of the excluded keys are
subtracted by the digest their segment is compared by (``kimera_verify_fine_excluded``).

The digest cache (``cache``) keeps both sums per source table and fine segment beside the
rows' fingerprint sum, and the excluded rows' sums under the store ``<table>:excluded``
keyed by their keys; every verification fingerprints every row afresh and reuses an entry
only for a segment whose rows have the count and fingerprint sum it was computed from.
docs/consistency.md gives the argument.
"""

from __future__ import annotations

import time

import duckdb

from kimera_core.compare import COMPARE_MACROS
from kimera_core.consistency import cache
from kimera_core.consistency.cache import base_recipe
from kimera_core.consistency.expected import expected_rows_sql, json_typed
from kimera_core.consistency.report import VerificationReport
from kimera_core.consistency.segments import FINE_BITS, fine_table
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

TEMP_TABLES: tuple[str, ...] = (
    "kimera_verify_redo",
    "kimera_verify_need",
    "kimera_verify_need_rows",
    "kimera_verify_suspect",
    "kimera_verify_excluded_rows",
    *(f"kimera_verify_ex_{s.table}" for s in SOURCES if s.side == "legacy"),
    *(f"kimera_verify_fast_{s.table}" for s in SOURCES),
)
_SHIFT = 64 - FINE_BITS

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
# The same with the fast digests' sum of a legacy table, from {rows} (expected.expected_rows_sql),
# and the part of it that the rows excluded up front (kimera_verify_excluded) contribute.
EXPECTED_SUMS_SQL = """
SELECT kh >> {shift} AS seg, count(*) AS n, sum(fp::HUGEINT) AS fsum, sum(xh::HUGEINT) AS xsum,
       sum(CASE WHEN ex THEN xh::HUGEINT END) AS ex_xsum
FROM (SELECT *, id IN (SELECT id FROM kimera_verify_excluded) AS ex FROM ({rows})) GROUP BY seg
"""
# The excluded rows of one legacy table per fine segment (n, ksum: their keys' mixed hashes,
# which the cache keys an entry of the store '<table>:excluded' by) with the fast digests'
# sum where this run computed it ({fast}: the table's fast table) or a sealed entry holds it
# for the same keys in a segment whose rows are unchanged (hit).
EXCLUDED_LOOKUP_SQL = """
SELECT e.seg, e.n, e.ksum AS fsum,
       CASE WHEN f.hit THEN c.digest_sum ELSE f.ex_xsum END AS xsum,
       CASE WHEN f.hit THEN c.normal_sum END AS nsum, 0::BIGINT AS bad,
       coalesce(f.hit AND c.segment IS NOT NULL, false) AS hit,
       NOT coalesce(f.hit AND c.segment IS NOT NULL, false) AS dirty
FROM (SELECT seg, count(*) AS n, sum(kh::HUGEINT) AS ksum FROM kimera_verify_excluded_rows
      WHERE src = $table GROUP BY seg) e
LEFT JOIN {fast} f USING (seg)
LEFT JOIN ({entries}) c ON c.segment = e.seg AND c.rows = e.n AND c.fingerprint_sum = e.ksum
"""
_SEALED_ENTRIES = f"""SELECT segment, rows, fingerprint_sum, digest_sum, normal_sum
    FROM kimera_verify_digests WHERE store = $store AND seal = {cache.SEAL}"""
# Without a cache to read: the same columns, no entry ($store and $recipe still bound).
_NO_ENTRIES = """SELECT NULL::UBIGINT AS segment, NULL::BIGINT AS rows,
    NULL::HUGEINT AS fingerprint_sum, NULL::HUGEINT AS digest_sum, NULL::HUGEINT AS normal_sum
    WHERE $store IS NULL AND $recipe IS NULL"""
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

# Per fine segment, minus the legacy rows of the keys excluded up front (explained exceptions),
# each by the digest its segment is compared by: so a segment holding one agrees when the rest
# agrees. {excluded}: the legacy tables' excluded tables, UNION ALL.
EXCLUDED_SQL = """
SELECT e.seg, -e.n AS n, NULL::HUGEINT AS fsum,
       -CASE WHEN s.seg IS NULL THEN e.xsum ELSE e.nsum END AS dsum, 0 AS bad
FROM ({excluded}) e LEFT JOIN kimera_verify_suspect s USING (seg)
"""


def _fast_table(source: Source) -> str:
    """The temp table of one source's fine segments with both sums during a run: (seg, n,
    fsum, xsum, nsum, bad, hit, dirty), as the cache keeps them (``cache.persist``)."""
    return vetted_identifier(f"kimera_verify_fast_{source.table}")


def _ex_table(source: Source) -> str:
    """The temp table of one legacy source's excluded rows per fine segment during a run:
    (seg, n, fsum: their keys' hash sum, xsum, nsum, bad, hit, dirty), as the cache keeps
    them under the store ``excluded_store(source)``."""
    return vetted_identifier(f"kimera_verify_ex_{source.table}")


def excluded_store(source: Source) -> str:
    """The cache's store name for the excluded rows of a legacy source."""
    return f"{source.table}:excluded"


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
) -> tuple[int, int, int, bool]:
    """Fill the source's fast table; returns (segments, segments from the cache, rows digested,
    ignored).

    With ``lookup``, every row is fingerprinted and a segment whose rows and fingerprint sum
    match a sealed entry takes its sums; the others (all, without ``lookup``) have their fast
    digests computed: for identities the fingerprint itself, for a legacy table the expected
    row (``expected``) in a second statement over those segments' rows, whose sums are cached
    only where its rows are those the fingerprint pass counted.
    """
    table = _fast_table(source)
    legacy = source.side == "legacy"
    ignored = False
    stats = (
        f"SELECT count(*), count(*) FILTER (hit), coalesce(sum(n) FILTER (NOT hit), 0), "
        f"count(DISTINCT seg) FROM {table}"
    )
    # an identities segment's fast digest is its fingerprint sum
    xsum = "xsum" if legacy else "CASE WHEN hit THEN xsum ELSE fsum END AS xsum"
    if lookup:
        # one statement: the fingerprint pass joined with the cache as it streams, the memory
        # of its blocks recycled (a changed segment's rows are read again afterwards)
        with cache.recycled_buffers(con):
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT seg, n, fsum, {xsum}, nsum, "
                "bad, hit, NOT hit AS dirty, NULL::HUGEINT AS ex_xsum FROM ("
                + cache.lookup_sql(f"({fingerprints_sql(source)})")
                + ")",
                cache.params(source.table, run_recipe),
            )
        segments, hits, digested, distinct = con.execute(stats).fetchone()
        if segments != distinct:
            # duplicate cache entries fanned the lookup out: ignore them all
            ignored, lookup = True, False
    if not lookup:
        # the fingerprint pass alone first, also for a legacy table: its plain scan loads the
        # table's blocks, after which a fresh process computes the expected rows faster than
        # when their statement loads them (800 k geoids: 0.14 + 0.82 s against 1.16 s)
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT seg, n, fsum, {xsum}, nsum, bad, "
            "hit, true AS dirty, NULL::HUGEINT AS ex_xsum FROM (SELECT *, "
            "NULL::HUGEINT AS xsum, NULL::HUGEINT AS nsum, NULL::BIGINT AS bad, false AS hit "
            f"FROM ({fingerprints_sql(source)}))"
        )
        segments, hits, digested, _ = con.execute(stats).fetchone()
    if legacy and hits < segments:
        where = "true" if hits == 0 else _in_segments(f"SELECT seg FROM {table} WHERE NOT hit")
        con.execute(
            "CREATE OR REPLACE TEMP TABLE kimera_verify_redo AS "
            + EXPECTED_SUMS_SQL.format(shift=_SHIFT, rows=expected_rows_sql(source, typed, where))
        )
        # cached only when the rows are those the fingerprint pass saw (hit and n unchanged)
        con.execute(
            f"UPDATE {table} t SET xsum = r.xsum, ex_xsum = r.ex_xsum, bad = 0, "
            "dirty = (t.n = r.n AND t.fsum = r.fsum) "
            "FROM kimera_verify_redo r WHERE t.seg = r.seg"
        )
    return int(segments), int(hits), int(digested), ignored


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


def _excluded_sums(
    con: duckdb.DuckDBPyConnection,
    source: Source,
    typed: frozenset[str],
    lookup: bool,
    run_recipe: str,
) -> tuple[int, int]:
    """Fill the legacy source's excluded table; returns (segments, segments from the cache).

    A segment whose rows were digested in this run has its excluded rows' part from the same
    pass; a segment whose rows are unchanged takes it from a sealed entry for the same
    excluded keys; only the rest (the quarantine changed, the rows did not) digests its
    excluded rows again.
    """
    table = _ex_table(source)
    store = excluded_store(source)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {table} AS "
        + EXCLUDED_LOOKUP_SQL.format(
            fast=_fast_table(source), entries=_SEALED_ENTRIES if lookup else _NO_ENTRIES
        ),
        {"table": source.table, "store": store, "recipe": run_recipe},
    )
    stats = (
        f"SELECT count(DISTINCT seg), count(*), count(*) FILTER (xsum IS NULL), "
        f"count(*) FILTER (hit) FROM {table}"
    )
    segments, entries, missing_n, hits = con.execute(stats).fetchone()
    if segments != entries:
        # duplicate cache entries fanned the lookup out: none of them is used
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT DISTINCT seg, n, fsum, NULL::HUGEINT "
            "AS xsum, NULL::HUGEINT AS nsum, bad, false AS hit, true AS dirty FROM " + table
        )
        segments, _, missing_n, hits = con.execute(stats).fetchone()
    missing = f"SELECT seg FROM {table} WHERE xsum IS NULL"
    if missing_n:
        rids = (
            "rowid IN (SELECT rid FROM kimera_verify_excluded_rows "
            f"WHERE src = '{source.table}' AND seg IN ({missing}))"
        )
        con.execute(
            "CREATE OR REPLACE TEMP TABLE kimera_verify_redo AS "
            f"SELECT kh >> {_SHIFT} AS seg, sum(xh::HUGEINT) AS xsum FROM ("
            + expected_rows_sql(source, typed, rids, fingerprint=False)
            + ") GROUP BY seg"
        )
        con.execute(
            f"UPDATE {table} t SET xsum = r.xsum FROM kimera_verify_redo r WHERE t.seg = r.seg"
        )
    return int(segments), int(hits)


def _normalise_excluded(con: duckdb.DuckDBPyConnection, source: Source) -> int:
    """Fill nsum of the legacy source's excluded rows in suspect segments; returns the rows."""
    table = _ex_table(source)
    need = (
        f"SELECT seg FROM {table} WHERE nsum IS NULL "
        "AND seg IN (SELECT seg FROM kimera_verify_suspect)"
    )
    if not con.execute(f"SELECT count(*) FROM ({need})").fetchone()[0]:
        return 0
    rids = (
        "rowid IN (SELECT rid FROM kimera_verify_excluded_rows "
        f"WHERE src = '{source.table}' AND seg IN ({need}))"
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_redo AS "
        f"SELECT kh >> {_SHIFT} AS seg, count(*) AS n, sum(rh::HUGEINT) AS nsum FROM ("
        + rows_sql(source, rids, fingerprint=False)
        + ") GROUP BY seg"
    )
    con.execute(
        f"UPDATE {table} t SET nsum = r.nsum, dirty = true FROM kimera_verify_redo r "
        "WHERE t.seg = r.seg"
    )
    return int(con.execute("SELECT coalesce(sum(n), 0) FROM kimera_verify_redo").fetchone()[0])


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
    tables = []  # (store, its temp table) in the order they are persisted
    for source in SOURCES:
        sealed = entries.get(source.table, (0, 0))[1]
        segments, hits, digested, dropped = _fast_sums(con, source, typed, sealed > 0, run_recipe)
        if dropped:
            ignored.append(source.table)
        fresh[source.table] = hits == 0 or dropped
        tables.append((source.table, _fast_table(source)))
        stats["segments"] += segments
        stats["reused"] += hits
        stats["rows_digested"] += digested
    legacy = sides("legacy")
    for source in legacy:
        sealed = entries.get(excluded_store(source), (0, 0))[1]
        segments, hits = _excluded_sums(con, source, typed, sealed > 0, run_recipe)
        fresh[excluded_store(source)] = hits == 0
        tables.append((excluded_store(source), _ex_table(source)))
        stats["segments"] += segments
        stats["reused"] += hits
    stats["recomputed"] = stats["segments"] - stats["reused"]
    if fast_path:
        fast = " UNION ALL ".join(
            [f"SELECT seg, n, xsum AS x FROM {_fast_table(s)}" for s in legacy]
            + [f"SELECT seg, -n, -xsum FROM {_ex_table(s)}" for s in legacy]
            + [f"SELECT seg, -n, -xsum FROM {_fast_table(s)}" for s in sides("new")]
        )
    else:
        fast = " UNION ALL ".join(
            f"SELECT seg, 1 AS n, 1 AS x FROM {_fast_table(s)}" for s in SOURCES
        )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_suspect AS " + SUSPECT_SQL.format(fast=fast)
    )
    suspect = con.execute("SELECT count(*) FROM kimera_verify_suspect").fetchone()[0]
    normalised = [0, 0]
    for source in SOURCES:
        table = _fast_table(source)
        done = _normalise(con, source) if suspect else (0, 0)
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
    for source in legacy if suspect else ():
        normalised[1] += _normalise_excluded(con, source)
    if can_write:
        # the stores' live and dirty segments in one statement (tables: our own temp tables)
        counted = con.execute(
            " UNION ALL ".join(
                f"SELECT {i}, count(*) FILTER (dirty), count(*) FROM {table}"
                for i, (_, table) in enumerate(tables)
            )
        ).fetchall()
        created = False
        for i, dirty, live in sorted(counted):
            store, table = tables[i]
            if dirty or entries.get(store, (0, 0))[0] != live:
                if not created:
                    cache.create(con)
                    created = True
                # never a segment whose digests were computed over other rows than the
                # fingerprint pass counted (not hit, not dirty): its entry goes, none is written
                written = cache.persist(
                    con,
                    store,
                    f"(SELECT seg, n, fsum, xsum, nsum, bad, dirty FROM {table} WHERE hit OR dirty)",
                    run_recipe,
                    fresh[store],
                    created=True,
                )
                stats["written"] += written
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_fine_excluded AS "
        + EXCLUDED_SQL.format(
            excluded=" UNION ALL ".join(
                f"SELECT seg, n, xsum, nsum FROM {_ex_table(s)}" for s in legacy
            )
        )
    )
    report.checksums["digest_cache"] = {
        "enabled": use_cache,
        "persisted": can_write,
        **stats,
        "segments_suspect": suspect,
        "segments_normalised": normalised[0],
        "rows_normalised": normalised[1],
        "rejected": sum(n - sealed for n, sealed in entries.values()),
        "ignored": ignored,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def exclude_keys(con: duckdb.DuckDBPyConnection) -> int:
    """Find the legacy rows of the keys in kimera_verify_excluded (id): the temp table
    kimera_verify_excluded_rows (src, rid, seg, kh: the key's mixed hash), which
    ``digest_segments`` takes out of the legacy side; returns those rows.

    Read from ``exceptions.classify``'s kimera_verify_held (the quarantined keys' legacy rows,
    found by their key column alone): the rows' digests come from the pass over every row, or
    from the cache, or (when only the quarantine changed) by rowid.
    """
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_excluded_rows AS "
        f"SELECT src, rid, hash(id) >> {_SHIFT} AS seg, hash(hash(id)) AS kh "
        "FROM kimera_verify_held WHERE id IN (SELECT id FROM kimera_verify_excluded)"
    )
    return int(con.execute("SELECT count(*) FROM kimera_verify_excluded_rows").fetchone()[0])
