"""The consistency verifier: do the legacy tables and ``identities`` hold the same identities?

Both stores are mapped to the ADR-001 fields (id, identity_type, raw, echo, lang_axis, tags,
weight, related_ids, meta, created_at, updated_at) and compared set-based in DuckDB:

1. row counts per store and identity type; duplicate and NULL keys;
2. one pass over every row of both stores: each row's digest, a 64-bit hash of its key and
   normalised mapped fields, is summed per fine segment of the key-hash space (the top
   FINE_BITS bits of ``hash(id)``); the fine sums are rolled up into key segments; segments
   that agree are done; segments that differ are split further (bisection, as data-diff
   does) by rolling the fine sums up again until they are small, and only their rows are
   read again and compared;
3. row level: keys on one side only, and rows whose fields differ (NULL-safe, weight and
   timestamps at a stated tolerance, JSON compared as values);
4. a verdict with reasons, capped samples of offending keys, and a row in
   ``kimera_verifications`` that incremental mode starts from.

Computing a digest means parsing JSON (the P1 document, the legacy JSON columns), which is
the cost of a verification. The digest cache ``kimera_verify_digests`` keeps, per source
table and fine segment, the row count, the sum of the rows' fingerprints (``hash()`` of the
key and the stored columns, verbatim, no parsing) and the sum of their digests. Every
verification fingerprints every row afresh and reuses a cached digest sum only for a segment
whose rows have the count and fingerprint sum it was computed from, so the rows of a segment
changed by any writer since (the legacy application included) are digested again; nothing
trusts a writer to maintain the cache. docs/consistency.md gives the argument.

Checksums are a fast filter, never the judge: normalised values hash exactly (JSON
minified, timestamps in microseconds), so equal rows hash equal; a row whose hash differs is
compared field by field with the tolerances, and may still turn out equal (e.g. JSON keys in
another order). docs/consistency.md explains each finding and what to do about it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import duckdb

from kimera_core.checksum import row_hash_sql
from kimera_core.compare import DEFAULT_TOLERANCE, Tolerance
from kimera_core.identity import DOCUMENT_KEYS
from kimera_core.sql import vetted_identifier

FIELDS: tuple[str, ...] = DOCUMENT_KEYS[1:]  # every mapped field but the key
DEFAULT_SAMPLE = 20
TOP_SEGMENT_ROWS = 65_536  # rows per segment of the first checksum pass, on average
LEAF_ROWS = 1024  # a segment this small is compared row by row rather than split again
SPLIT_BITS = 4  # each bisection step splits a differing segment into 16
KEY_LIST_MAX = 4096  # rows compared row by row are fetched by a list of keys up to this many
FINE_BITS = 16  # the digest cache keeps one entry per 2**16th of the key-hash space per table

VERIFICATIONS_DDL = """CREATE TABLE IF NOT EXISTS kimera_verifications (
    verified_at DOUBLE NOT NULL,
    mode TEXT NOT NULL,
    verdict TEXT NOT NULL,
    findings JSON
)"""
DIGESTS_DDL = """CREATE TABLE IF NOT EXISTS kimera_verify_digests (
    store TEXT NOT NULL,            -- the source table: legacy_geoids, legacy_scars, identities
    segment UBIGINT NOT NULL,       -- hash(key) >> (64 - FINE_BITS)
    rows BIGINT NOT NULL,           -- rows in the segment
    fingerprint_sum HUGEINT NOT NULL,  -- sum of the rows' fingerprints (stored columns, verbatim)
    digest_sum HUGEINT NOT NULL,    -- sum of the rows' digests (normalised mapped fields)
    seal UBIGINT NOT NULL           -- hash(recipe, store, segment, rows, fingerprint_sum, digest_sum)
)"""

# Helpers as temp macros (per connection; they work on read-only files too).
MACROS: tuple[str, ...] = (
    # JSON text, minified, with JSON null as SQL NULL; text that is not JSON stays as it is
    """CREATE OR REPLACE TEMP MACRO kimera_jnorm(x) AS
       nullif(coalesce(TRY(json(x))::VARCHAR, x::VARCHAR), 'null')""",
    # the text inside a JSON string literal that needs no unescaping (ISO timestamps)
    """CREATE OR REPLACE TEMP MACRO kimera_unquote(x) AS
       CASE WHEN starts_with(x, '"') THEN substr(x, 2, length(x) - 2) ELSE x END""",
    # ISO-8601 (any offset) or a JSON number -> epoch seconds, exact to the fraction digits
    """CREATE OR REPLACE TEMP MACRO kimera_iso_epoch(x) AS
       coalesce(TRY_CAST(x AS DOUBLE),
                epoch(TRY_CAST(substr(x, 1, 19) AS TIMESTAMP))
                + coalesce(TRY_CAST('0' || nullif(regexp_extract(x, '^[^.]*(\\.\\d+)', 1), '')
                                    AS DOUBLE), 0)
                - CASE WHEN regexp_matches(x, '[+-]\\d\\d:?\\d\\d$') THEN
                       (CASE WHEN regexp_extract(x, '([+-])\\d\\d:?\\d\\d$', 1) = '-'
                             THEN -1 ELSE 1 END)
                       * (TRY_CAST(regexp_extract(x, '[+-](\\d\\d):?\\d\\d$', 1) AS INTEGER) * 3600
                          + TRY_CAST(regexp_extract(x, '[+-]\\d\\d:?(\\d\\d)$', 1) AS INTEGER) * 60)
                  ELSE 0 END)""",
    # the same in whole microseconds, with a fast path for the UTC text P1 writes
    """CREATE OR REPLACE TEMP MACRO kimera_iso_us(x) AS
       CASE WHEN suffix(x, '+00:00') THEN epoch_us(TRY_CAST(x AS TIMESTAMP))
            ELSE TRY_CAST(round(kimera_iso_epoch(x) * 1000000) AS BIGINT) END""",
    # an order-independent fingerprint of a JSON value: object key order does not count,
    # array order does, numbers compare by value (1 = 1.0), types otherwise strict
    """CREATE OR REPLACE TEMP MACRO kimera_json_canon(j) AS (
       SELECT hash(list(hash(t.fullkey,
                  CASE WHEN t.type IN ('BIGINT', 'UBIGINT', 'DOUBLE', 'HUGEINT', 'UHUGEINT')
                       THEN 'N' || TRY_CAST(t.atom AS DOUBLE)::VARCHAR
                       ELSE t.type || ':' || coalesce(t.atom::VARCHAR, t.value::VARCHAR) END)
                  ORDER BY t.fullkey))
       FROM json_tree(j) t
       WHERE t.type NOT IN ('OBJECT', 'ARRAY') OR t.value::VARCHAR IN ('{}', '[]'))""",
    # JSON equality as values, NULL-safe
    """CREATE OR REPLACE TEMP MACRO kimera_json_eq(a, b) AS
       (a IS NULL AND b IS NULL)
       OR (a IS NOT NULL AND b IS NOT NULL AND (a = b OR (json_valid(a) AND json_valid(b)
           AND kimera_json_canon(a) = kimera_json_canon(b))))""",
    """CREATE OR REPLACE TEMP MACRO kimera_float_eq(a, b, tol, rel) AS
       (a IS NULL AND b IS NULL)
       OR (a IS NOT NULL AND b IS NOT NULL AND (a = b OR (isnan(a) AND isnan(b))
           OR abs(a - b) <= tol * CASE WHEN rel THEN greatest(1, abs(a)) ELSE 1 END))""",
)


@dataclass(frozen=True)
class Source:
    """One source table: its key, the columns its digest reads, and the digest's SQL."""

    table: str
    side: str  # 'legacy' or 'new'
    key: str
    stored: tuple[str, ...]  # every column the digest reads: the fingerprint covers them
    digest: str  # the normalised digest over ``stored`` (and ``parsed`` as ``f``)
    parsed: str | None = None  # a document parsed once per row, only when a digest is computed


# A row's digest: the mixed hash of (key, identity_type, raw, echo, lang_axis, tags, weight,
# related_ids, meta, created_us, updated_us), every text as minified JSON text (strings
# quoted, as to_json quotes the legacy text columns), JSON null as SQL NULL, timestamps in
# whole microseconds. A geoid's related_ids: legacy_geoids has no column for it, so an empty
# list in identities is normalised to NULL like legacy's. The key is in the digest so that
# two rows trading contents change their segment's sum; the outer hash() mixes the row hash
# (DuckDB combines column hashes with XOR, so a plain sum could cancel out a swap of one
# column's values between two rows).
_US = "TRY_CAST(round({c} * 1000000) AS BIGINT)"
SOURCES: tuple[Source, ...] = (
    Source(
        "legacy_geoids",
        "legacy",
        "gid",
        ("gid", "raw", "echo", "lang_axis", "tags", "weight", "meta", "created_at", "updated_at"),
        "hash(hash(gid, 'geoid', to_json(raw)::VARCHAR, to_json(echo)::VARCHAR, "
        "to_json(lang_axis)::VARCHAR, kimera_jnorm(tags), weight, NULL::VARCHAR, "
        f"kimera_jnorm(meta), {_US.format(c='created_at')}, {_US.format(c='updated_at')}))",
    ),
    Source(
        "legacy_scars",
        "legacy",
        "id",
        ("id", "weight", "related_ids", "meta", "created_at", "updated_at"),
        "hash(hash(id, 'scar', NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, "
        "weight, kimera_jnorm(related_ids), kimera_jnorm(meta), "
        f"{_US.format(c='created_at')}, {_US.format(c='updated_at')}))",
    ),
    Source(
        "identities",
        "new",
        "id",
        ("id", "identity_type", "data"),
        "hash(hash(id, identity_type, nullif(f[1], 'null'), nullif(f[2], 'null'), "
        "nullif(f[3], 'null'), nullif(f[4], 'null'), TRY_CAST(f[5] AS DOUBLE), "
        "CASE WHEN identity_type = 'geoid' AND f[6] IN ('[]', 'null') THEN NULL "
        "ELSE nullif(f[6], 'null') END, nullif(f[7], 'null'), "
        "kimera_iso_us(kimera_unquote(f[8])), kimera_iso_us(kimera_unquote(f[9]))))",
        # one parse of each document: every field comes out as minified JSON text
        "json_extract(data, ['$.raw', '$.echo', '$.lang_axis', '$.tags', '$.weight', "
        "'$.related_ids', '$.meta', '$.created_at', '$.updated_at'])::VARCHAR[]",
    ),
)

# What a cached digest sum was computed with: the digest SQL, the macros it calls, the segment
# width and the DuckDB version (hash() and json() may change between versions). An entry
# sealed under another recipe is ignored, so changing any of them invalidates the cache.
RECIPE = hashlib.sha256(
    json.dumps(
        {
            "duckdb": duckdb.__version__,
            "fine_bits": FINE_BITS,
            "macros": MACROS,
            "sources": [[s.table, s.key, s.stored, s.digest, s.parsed] for s in SOURCES],
        }
    ).encode()
).hexdigest()

# Per row of one source: id, kh = hash(key), rh = the digest. {where} filters on the key.
ROWS_SQL = """
SELECT {key} AS id, hash({key}) AS kh, {digest} AS rh
FROM (SELECT {stored}{parsed} FROM {table} WHERE {where})
"""
# Per fine segment of one source: rows, the sum of the rows' fingerprints (a mixed hash of the
# key and every stored column the digest reads, as stored: no parsing) and, in the second
# form, the sum of their digests.
FINGERPRINTS_SQL = """
SELECT hash({key}) >> {shift} AS seg, count(*) AS n, sum(hash({fingerprint})::HUGEINT) AS fsum
FROM {table} GROUP BY seg
"""
SEGMENT_DIGESTS_SQL = """
SELECT kh >> {shift} AS seg, count(*) AS n, sum(fp::HUGEINT) AS fsum, sum(rh::HUGEINT) AS dsum
FROM (SELECT hash({key}) AS kh, {fp} AS fp, {digest} AS rh
      FROM (SELECT {stored}{parsed} FROM {table} WHERE {where}))
GROUP BY seg
"""
# The cached digest sum of each segment whose rows and fingerprint sum are unchanged. An entry
# counts only if its seal holds: a hand-edited entry is not used, nor one from another recipe.
CACHE_LOOKUP_SQL = """
SELECT f.seg, f.n, f.fsum, c.digest_sum AS dsum
FROM kimera_verify_fp f LEFT JOIN (
    SELECT segment, rows, fingerprint_sum, digest_sum FROM kimera_verify_digests
    WHERE store = $store
      AND seal = hash($recipe, store, segment, rows, fingerprint_sum, digest_sum)) c
ON f.seg = c.segment AND f.n = c.rows AND f.fsum = c.fingerprint_sum
"""
CACHE_STATS_SQL = """
SELECT store, count(*) AS entries,
       count(*) FILTER (WHERE seal = hash($recipe, store, segment, rows, fingerprint_sum,
                                          digest_sum)) AS sealed
FROM kimera_verify_digests GROUP BY store
"""
SEGMENT_SQL = """
SELECT seg >> {shift} AS part, sum(n) AS n, sum(dsum) AS s
FROM ({side}) WHERE {where} GROUP BY part
"""


# Field by field over the keys in kimera_verify_changed, both sides present.
FIELD_DIFF_SQL = """
WITH l AS (
    SELECT gid AS id, 'geoid' AS identity_type, raw, echo, lang_axis, kimera_jnorm(tags) AS tags,
           weight, '[]' AS related_ids, kimera_jnorm(meta) AS meta, created_at, updated_at
    FROM legacy_geoids WHERE gid IN (SELECT id FROM kimera_verify_changed)
    UNION ALL
    SELECT id, 'scar', NULL, NULL, NULL, NULL, weight, kimera_jnorm(related_ids),
           kimera_jnorm(meta), created_at, updated_at
    FROM legacy_scars WHERE id IN (SELECT id FROM kimera_verify_changed)
), n AS (
    SELECT id, identity_type, data->>'$.raw' AS raw, data->>'$.echo' AS echo,
           data->>'$.lang_axis' AS lang_axis, kimera_jnorm(data->'$.tags') AS tags,
           TRY_CAST(data->>'$.weight' AS DOUBLE) AS weight,
           CASE WHEN identity_type = 'geoid'
                THEN coalesce(kimera_jnorm(data->'$.related_ids'), '[]')
                ELSE kimera_jnorm(data->'$.related_ids') END AS related_ids,
           kimera_jnorm(data->'$.meta') AS meta,
           kimera_iso_epoch(data->>'$.created_at') AS created_at,
           kimera_iso_epoch(data->>'$.updated_at') AS updated_at
    FROM identities WHERE id IN (SELECT id FROM kimera_verify_changed)
)
SELECT id, list_filter([
    CASE WHEN l.identity_type IS DISTINCT FROM n.identity_type THEN 'identity_type' END,
    CASE WHEN l.raw IS DISTINCT FROM n.raw THEN 'raw' END,
    CASE WHEN l.echo IS DISTINCT FROM n.echo THEN 'echo' END,
    CASE WHEN l.lang_axis IS DISTINCT FROM n.lang_axis THEN 'lang_axis' END,
    CASE WHEN NOT kimera_json_eq(l.tags, n.tags) THEN 'tags' END,
    CASE WHEN NOT kimera_float_eq(l.weight, n.weight, $wtol, true) THEN 'weight' END,
    CASE WHEN NOT kimera_json_eq(l.related_ids, n.related_ids) THEN 'related_ids' END,
    CASE WHEN NOT kimera_json_eq(l.meta, n.meta) THEN 'meta' END,
    CASE WHEN NOT kimera_float_eq(l.created_at, n.created_at, $ttol, false) THEN 'created_at' END,
    CASE WHEN NOT kimera_float_eq(l.updated_at, n.updated_at, $ttol, false) THEN 'updated_at' END
], x -> x IS NOT NULL) AS fields
FROM l JOIN n USING (id)
"""

COUNTS_SQL = """
SELECT 'legacy', 'geoid', count(*), count(*) - count(gid) FROM legacy_geoids
UNION ALL SELECT 'legacy', 'scar', count(*), count(*) - count(id) FROM legacy_scars
UNION ALL SELECT 'new', identity_type, count(*), count(*) - count(id) FROM identities
          GROUP BY identity_type
"""
DUPLICATES_SQL = """
SELECT 'legacy' AS store, id, count(*) AS n FROM (
    SELECT gid AS id FROM legacy_geoids {where_gid} UNION ALL SELECT id FROM legacy_scars {where_id}
) WHERE id IS NOT NULL GROUP BY id HAVING count(*) > 1
UNION ALL
SELECT 'new', id, count(*) FROM identities WHERE id IS NOT NULL {and_id}
GROUP BY id HAVING count(*) > 1
"""


@dataclass
class Finding:
    """One kind of problem: its total and a capped sample of offending keys."""

    total: int = 0
    sample: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class VerificationReport:
    """What a verification found, and its verdict."""

    mode: str
    started_at: float
    seconds: float = 0.0
    since: float | None = None
    keys_checked: int | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    null_keys: dict[str, int] = field(default_factory=dict)
    duplicate_keys: Finding = field(default_factory=Finding)
    missing_in_new: Finding = field(default_factory=Finding)
    missing_in_legacy: Finding = field(default_factory=Finding)
    field_mismatches: Finding = field(default_factory=Finding)
    mismatches_by_field: dict[str, int] = field(default_factory=dict)
    checksums: dict[str, Any] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        def finding(f: Finding) -> dict[str, Any]:
            return {"total": f.total, "sample": f.sample}

        return {
            "verdict": "consistent" if self.consistent else "inconsistent",
            "consistent": self.consistent,
            "reasons": self.reasons,
            "mode": self.mode,
            "started_at": self.started_at,
            "since": self.since,
            "seconds": round(self.seconds, 4),
            "keys_checked": self.keys_checked,
            "counts": self.counts,
            "null_keys": self.null_keys,
            "duplicate_keys": finding(self.duplicate_keys),
            "missing_in_new": finding(self.missing_in_new),
            "missing_in_legacy": finding(self.missing_in_legacy),
            "field_mismatches": finding(self.field_mismatches),
            "mismatches_by_field": self.mismatches_by_field,
            "checksums": self.checksums,
            "tolerance": self.tolerance,
        }


def n_rows(n: int) -> str:
    """'1 row', '2 rows': counts in verdicts an operator reads."""
    return f"{n:,} row" if n == 1 else f"{n:,} rows"


def _install(con: duckdb.DuckDBPyConnection) -> None:
    for macro in MACROS:
        con.execute(macro)


def _hex(digest: int) -> str:
    return f"{int(digest) & ((1 << 128) - 1):032x}"


def fine_table(source: Source) -> str:
    """The temp table of one source's fine segments (seg, n, fsum, dsum) during a run."""
    return vetted_identifier(f"kimera_verify_fine_{source.table}")


def _parts(source: Source) -> dict[str, str]:
    """The pieces of SQL a template needs for ``source`` (vetted identifiers, our own SQL)."""
    return {
        "key": vetted_identifier(source.key),
        "table": vetted_identifier(source.table),
        "digest": source.digest,
        "stored": ", ".join(vetted_identifier(c) for c in source.stored),
        "parsed": f", {source.parsed} AS f" if source.parsed else "",
        "fingerprint": row_hash_sql(list(source.stored)),
    }


def rows_sql(source: Source, where: str) -> str:
    """SQL for (id, kh, rh) of the ``source`` rows matching ``where`` ({key}: the key)."""
    parts = _parts(source)
    return ROWS_SQL.format(**{**parts, "where": where.format(key=parts["key"])})


def segment_digests_sql(source: Source, where: str = "true", fingerprint: bool = True) -> str:
    """SQL for (seg, n, fsum, dsum) per fine segment of the ``source`` rows matching ``where``."""
    parts = _parts(source)
    return SEGMENT_DIGESTS_SQL.format(
        **{
            **parts,
            "shift": 64 - FINE_BITS,
            "fp": f"hash({parts['fingerprint']})" if fingerprint else "NULL::UBIGINT",
            "where": where.format(key=parts["key"]),
        }
    )


def _side_sql(side: str) -> str:
    """Every fine segment (seg, n, dsum) of one side, one row per source table."""
    return " UNION ALL ".join(
        f"SELECT seg, n, dsum FROM {fine_table(s)}" for s in SOURCES if s.side == side
    )


def _counts(con: duckdb.DuckDBPyConnection, report: VerificationReport) -> None:
    counts: dict[str, dict[str, int]] = {"legacy": {}, "new": {}, "difference": {}}
    nulls = {"legacy": 0, "new": 0}
    for store, kind, n, null_keys in con.execute(COUNTS_SQL).fetchall():
        counts[store][kind] = counts[store].get(kind, 0) + n
        nulls[store] += null_keys
    for kind in sorted(set(counts["legacy"]) | set(counts["new"])):
        counts["difference"][kind] = counts["new"].get(kind, 0) - counts["legacy"].get(kind, 0)
    counts["legacy"]["total"] = sum(counts["legacy"].values())
    counts["new"]["total"] = sum(counts["new"].values())
    counts["difference"]["total"] = counts["new"]["total"] - counts["legacy"]["total"]
    report.counts, report.null_keys = counts, nulls


def _unique_key(con: duckdb.DuckDBPyConnection, source: Source) -> bool:
    """Whether DuckDB enforces the source's key as unique and not NULL (a primary key)."""
    return bool(
        con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND table_name = ? AND constraint_type = 'PRIMARY KEY' "
            "AND constraint_column_names = [?]",
            [source.table, source.key],
        ).fetchone()[0]
    )


def _duplicates(
    con: duckdb.DuckDBPyConnection, report: VerificationReport, sample: int, keys: str | None
) -> None:
    """Duplicate keys among ``keys`` (a temp table of ids), or among every key.

    Over every key, a table whose key is its primary key cannot repeat it, so only the keys
    it shares with the other legacy table are grouped (the scan of all keys is skipped).
    """
    if keys is not None:
        restrict = "{key} IN (SELECT id FROM " + vetted_identifier(keys) + ")"
        where_gid, where_id, and_id = (restrict.format(key=k) for k in ("gid", "id", "id"))
    else:
        geoids, scars, identities = (_unique_key(con, s) for s in SOURCES)
        both = geoids and scars
        where_gid = "gid IN (SELECT id FROM legacy_scars)" if both else "true"
        where_id = "id IN (SELECT gid FROM legacy_geoids)" if both else "true"
        and_id = "false" if identities else "true"
    sql = DUPLICATES_SQL.format(
        where_gid=f"WHERE {where_gid}", where_id=f"WHERE {where_id}", and_id=f"AND {and_id}"
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE kimera_verify_dups AS {sql}")
    total = con.execute("SELECT count(*) FROM kimera_verify_dups").fetchone()[0]
    rows = con.execute(
        "SELECT store, id, n FROM kimera_verify_dups ORDER BY store, id LIMIT ?", [sample]
    ).fetchall()
    report.duplicate_keys = Finding(total, [{"store": s, "id": i, "rows": n} for s, i, n in rows])


def _writable(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute(
        "SELECT readonly FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()
    return row is not None and not row[0]


def _digest_segments(
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
    if use_cache:
        try:
            rows = con.execute(CACHE_STATS_SQL, {"recipe": RECIPE}).fetchall()
        except duckdb.CatalogException:  # no cache yet
            rows, cached = [], False
        entries = {store: (int(n), int(sealed)) for store, n, sealed in rows}
    writable = use_cache and _writable(con)
    stats = {"segments": 0, "reused": 0, "recomputed": 0, "rows_digested": 0, "written": 0}
    ignored = []
    for source in SOURCES:
        table = fine_table(source)
        redo, hits = "true", 0
        stored, sealed = entries.get(source.table, (0, 0))
        if cached and sealed:
            con.execute(
                "CREATE OR REPLACE TEMP TABLE kimera_verify_fp AS "
                + FINGERPRINTS_SQL.format(**_parts(source), shift=64 - FINE_BITS)
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


def _persist(con: duckdb.DuckDBPyConnection, source: Source, keep: str | None) -> int:
    """Make the cache hold the entries reused (the segments with a digest sum in the fine
    table ``keep``; none if None) and the sums computed now; returns the entries written.

    Each entry's fingerprint sum and digest sum come from one statement over the same rows, so
    the cache never pairs a digest sum with rows it was not computed from. Changed, emptied,
    rejected and duplicated entries are dropped.
    """
    con.execute(DIGESTS_DDL)
    params = {"store": source.table, "recipe": RECIPE}
    if keep is not None:
        con.execute(
            "DELETE FROM kimera_verify_digests WHERE store = $store AND ("
            f"segment NOT IN (SELECT seg FROM {keep} WHERE dsum IS NOT NULL) "
            "OR seal IS DISTINCT FROM "
            "hash($recipe, store, segment, rows, fingerprint_sum, digest_sum))",
            params,
        )
    else:
        con.execute("DELETE FROM kimera_verify_digests WHERE store = ?", [source.table])
    return con.execute(
        "INSERT INTO kimera_verify_digests SELECT $store, seg, n, fsum, dsum, "
        "hash($recipe, $store, seg, n, fsum, dsum) FROM kimera_verify_redo",
        params,
    ).fetchone()[0]


def _segments(
    con: duckdb.DuckDBPyConnection, bits: int, parents: list[int] | None, parent_bits: int
) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
    """(legacy, new) checksum per segment of ``bits`` key-hash bits, inside ``parents``.

    Rolls the fine segments up: no source row is read again.
    """
    if parents is None:
        where = "true"
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE kimera_verify_segs (seg UBIGINT)")
        con.executemany("INSERT INTO kimera_verify_segs VALUES (?)", [[p] for p in parents])
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


def _bisect(con: duckdb.DuckDBPyConnection, report: VerificationReport) -> tuple[int, list[int]]:
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
            report.checksums["legacy"] = {
                "rows": sum(n for n, _ in legacy.values()),
                "checksum": _hex(sum(s for _, s in legacy.values())),
            }
            report.checksums["new"] = {
                "rows": sum(n for n, _ in new.values()),
                "checksum": _hex(sum(s for _, s in new.values())),
            }
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


def _materialise_sides(con: duckdb.DuckDBPyConnection, keys: str) -> None:
    """(id, kh, rh) per side of the rows whose key is in the temp table ``keys`` (column id).

    Up to KEY_LIST_MAX keys are bound as a list of constants, which DuckDB checks in the scan
    of the key column before it reads the other columns; a semi-join would decompress every
    stored document to find a few hundred rows.
    """
    keys = vetted_identifier(keys)
    n = con.execute(f"SELECT count(*) FROM {keys}").fetchone()[0]
    params: list[Any] = []
    if n == 0:
        where = "false"
    elif n <= KEY_LIST_MAX:
        params = [r[0] for r in con.execute(f"SELECT id FROM {keys}").fetchall()]
        where = "{key} IN (" + ", ".join("?" * len(params)) + ")"
    else:
        where = "{key} IN (SELECT id FROM " + keys + ")"
    for side, table in (("legacy", "kimera_verify_l"), ("new", "kimera_verify_n")):
        parts = [rows_sql(s, where) for s in SOURCES if s.side == side]
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS " + " UNION ALL ".join(parts),
            params * len(parts) if "?" in where else [],
        )


def _row_level(
    con: duckdb.DuckDBPyConnection, report: VerificationReport, sample: int, tol: Tolerance
) -> None:
    """Compare the rows in kimera_verify_l / kimera_verify_n (duplicate keys left out)."""
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_missing AS "
        "SELECT 'new' AS missing_in, l.id FROM kimera_verify_l l ANTI JOIN kimera_verify_n n "
        "USING (id) UNION ALL "
        "SELECT 'legacy', n.id FROM kimera_verify_n n ANTI JOIN kimera_verify_l l USING (id)"
    )
    for side, attr in (("new", "missing_in_new"), ("legacy", "missing_in_legacy")):
        total = con.execute(
            "SELECT count(*) FROM kimera_verify_missing WHERE missing_in = ?", [side]
        ).fetchone()[0]
        ids = con.execute(
            "SELECT id FROM kimera_verify_missing WHERE missing_in = ? ORDER BY id LIMIT ?",
            [side, sample],
        ).fetchall()
        setattr(report, attr, Finding(total, [{"id": r[0]} for r in ids]))
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_changed AS "
        "SELECT DISTINCT l.id FROM kimera_verify_l l JOIN kimera_verify_n n USING (id) "
        "WHERE l.rh IS DISTINCT FROM n.rh "
        "AND l.id NOT IN (SELECT id FROM kimera_verify_dups)"
    )
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_diff AS SELECT * FROM ("
        + FIELD_DIFF_SQL
        + ") WHERE len(fields) > 0",
        {"wtol": tol.weight_relative, "ttol": tol.seconds},
    )
    total = con.execute("SELECT count(*) FROM kimera_verify_diff").fetchone()[0]
    rows = con.execute(
        "SELECT id, fields FROM kimera_verify_diff ORDER BY id LIMIT ?", [sample]
    ).fetchall()
    report.field_mismatches = Finding(total, [{"id": i, "fields": f} for i, f in rows])
    report.mismatches_by_field = dict(
        con.execute(
            "SELECT f, count(*) FROM (SELECT unnest(fields) AS f FROM kimera_verify_diff) "
            "GROUP BY f ORDER BY f"
        ).fetchall()
    )


def _verdict(report: VerificationReport) -> None:
    reasons = []
    for kind, diff in report.counts["difference"].items():
        if diff and kind != "total":
            reasons.append(
                f"row counts differ for {kind}: legacy {report.counts['legacy'].get(kind, 0):,}, "
                f"new {report.counts['new'].get(kind, 0):,}"
            )
    for store, n in report.null_keys.items():
        if n:
            reasons.append(f"{n_rows(n)} with a NULL key in the {store} store")
    checks = (
        (report.duplicate_keys, "duplicate keys"),
        (report.missing_in_new, "keys in legacy but not in identities"),
        (report.missing_in_legacy, "keys in identities but not in legacy"),
    )
    for finding_, what in checks:
        if finding_.total:
            reasons.append(f"{finding_.total:,} {what}")
    if report.field_mismatches.total:
        reasons.append(f"{n_rows(report.field_mismatches.total)} whose mapped fields differ")
    if report.mismatches_by_field:
        fields = ", ".join(f"{k} {v:,}" for k, v in report.mismatches_by_field.items())
        reasons.append(f"differing fields: {fields}")
    report.reasons = reasons


def last_verification(con: duckdb.DuckDBPyConnection) -> dict[str, Any] | None:
    """The most recent recorded verification (time, mode, verdict), or None."""
    try:
        row = con.execute(
            "SELECT verified_at, mode, verdict FROM kimera_verifications "
            "ORDER BY verified_at DESC LIMIT 1"
        ).fetchone()
    except duckdb.CatalogException:
        return None
    return None if row is None else {"verified_at": row[0], "mode": row[1], "verdict": row[2]}


def verify(
    con: duckdb.DuckDBPyConnection,
    *,
    incremental: bool = False,
    sample: int = DEFAULT_SAMPLE,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    record: bool = True,
    cache: bool = True,
    clock: Any = time.time,
) -> VerificationReport:
    """Verify that the legacy tables and identities agree; full, or incremental since the last run.

    ``record`` appends the verdict to ``kimera_verifications`` (the base of the next
    incremental run); pass False on a read-only connection. ``cache`` reuses the digests of
    rows unchanged since they were cached (kimera_verify_digests) and, when the connection is
    writable, caches the digests it computes; False computes every digest and writes nothing.
    """
    if sample < 0:
        raise ValueError("sample must not be negative")
    started = clock()
    t0 = time.perf_counter()
    _install(con)
    base = last_verification(con) if incremental else None
    mode = "incremental" if base is not None else "full"
    report = VerificationReport(mode=mode, started_at=started)
    report.tolerance = {
        "weight_relative": tolerance.weight_relative,
        "seconds": tolerance.seconds,
    }
    _counts(con, report)
    if base is None:
        _digest_segments(con, report, cache)
        _duplicates(con, report, sample, keys=None)
        bits, leaves = _bisect(con, report)
        report.checksums["pass_seconds"] = round(
            report.checksums["digest_cache"]["seconds"] + report.checksums["levels"][0]["seconds"],
            4,
        )
        if leaves:
            con.execute("CREATE OR REPLACE TEMP TABLE kimera_verify_segs (seg UBIGINT)")
            con.executemany("INSERT INTO kimera_verify_segs VALUES (?)", [[s] for s in leaves])
            # bits is an int computed here, never input; only key columns are read here
            con.execute(
                "CREATE OR REPLACE TEMP TABLE kimera_verify_leaf_keys AS "
                + " UNION ".join(
                    f"SELECT {vetted_identifier(s.key)} AS id FROM {vetted_identifier(s.table)} "
                    f"WHERE hash({vetted_identifier(s.key)}) >> {64 - int(bits)} "
                    "IN (SELECT seg FROM kimera_verify_segs)"
                    for s in SOURCES
                )
            )
            _materialise_sides(con, "kimera_verify_leaf_keys")
            _row_level(con, report, sample, tolerance)
        report.checksums["rows_compared_row_level"] = (
            con.execute("SELECT count(*) FROM kimera_verify_l").fetchone()[0]
            + con.execute("SELECT count(*) FROM kimera_verify_n").fetchone()[0]
            if leaves
            else 0
        )
    else:
        report.since = base["verified_at"]
        _changed_keys(con, report.since)
        report.keys_checked = con.execute("SELECT count(*) FROM kimera_verify_keys").fetchone()[0]
        _duplicates(con, report, sample, keys="kimera_verify_keys")
        _materialise_sides(con, "kimera_verify_keys")
        _row_level(con, report, sample, tolerance)
    _verdict(report)
    if base is not None and base["verdict"] != "consistent":
        report.reasons.append(
            f"the base verification ({base['mode']}) was {base['verdict']}: "
            "incremental checks only what changed since; run a full verification"
        )
    report.seconds = time.perf_counter() - t0
    _cleanup(con)
    if record:
        con.execute(VERIFICATIONS_DDL)
        con.execute(
            "INSERT INTO kimera_verifications VALUES (?, ?, ?, ?)",
            [
                started,
                report.mode,
                "consistent" if report.consistent else "inconsistent",
                json.dumps(report.to_dict(), default=str),
            ],
        )
    return report


def _changed_keys(con: duckdb.DuckDBPyConnection, since: float) -> None:
    """Keys written since ``since``: by updated_at on either side, or by the dual-write log.

    The log also names deleted keys, which no longer have an updated_at anywhere.
    """
    con.execute(
        "CREATE OR REPLACE TEMP TABLE kimera_verify_keys AS "
        "SELECT gid AS id FROM legacy_geoids WHERE updated_at > $since "
        "UNION SELECT id FROM legacy_scars WHERE updated_at > $since "
        "UNION SELECT id FROM identities WHERE updated_at > $since "
        "UNION SELECT identity_id FROM dual_write_log WHERE timestamp > $since",
        {"since": since},
    )


def _cleanup(con: duckdb.DuckDBPyConnection) -> None:
    for name in (
        "kimera_verify_segs",
        "kimera_verify_l",
        "kimera_verify_n",
        "kimera_verify_missing",
        "kimera_verify_changed",
        "kimera_verify_diff",
        "kimera_verify_dups",
        "kimera_verify_fp",
        "kimera_verify_redo",
        "kimera_verify_keys",
        "kimera_verify_leaf_keys",
    ):
        con.execute(f"DROP TABLE IF EXISTS {name}")
    for source in SOURCES:
        con.execute(f"DROP TABLE IF EXISTS {fine_table(source)}")
