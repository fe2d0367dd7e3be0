"""The consistency verifier: do the legacy tables and ``identities`` hold the same identities?

Both stores are mapped to the ADR-001 fields (id, identity_type, raw, echo, lang_axis, tags,
weight, related_ids, meta, created_at, updated_at) and compared set-based in DuckDB:

1. row counts per store and identity type; duplicate and NULL keys;
2. one pass over every row of both stores: each row gets a digest, a 64-bit hash of its
   normalised mapped fields, kept with ``hash(id)`` in a per-row temp table; the digests are
   summed per key segment (the top bits of ``hash(id)``); segments that agree are done;
   segments that differ are split further (bisection, as data-diff does) over that temp
   table until they are small, and only their rows are compared;
3. row level: keys on one side only, and rows whose fields differ (NULL-safe, weight and
   timestamps at a stated tolerance, JSON compared as values);
4. a verdict with reasons, capped samples of offending keys, and a row in
   ``kimera_verifications`` that incremental mode starts from.

Computing a digest means parsing JSON (the P1 document, the legacy JSON columns), which is
the cost of a verification. The digest cache ``kimera_verify_digests`` keeps, per row of each
source table, a fingerprint (``hash()`` of the row's stored columns, verbatim, no parsing)
and the row's digest. Every verification fingerprints every row afresh and reuses a cached
digest only when the row's fingerprint is the one the digest was computed with, so a row
changed by any writer since (the legacy application included) is digested again; nothing
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
from kimera_core.identity import DOCUMENT_KEYS
from kimera_core.shadow import DEFAULT_TOLERANCE, Tolerance
from kimera_core.sql import vetted_identifier

FIELDS: tuple[str, ...] = DOCUMENT_KEYS[1:]  # every mapped field but the key
DEFAULT_SAMPLE = 20
TOP_SEGMENT_ROWS = 65_536  # rows per segment of the first checksum pass, on average
LEAF_ROWS = 1024  # a segment this small is compared row by row rather than split again
SPLIT_BITS = 4  # each bisection step splits a differing segment into 16
# Rewrite a store's cache entries in full (rather than patch them) when more than this share
# of them is new, changed, stale or rejected.
CACHE_REWRITE_SHARE = 0.25

VERIFICATIONS_DDL = """CREATE TABLE IF NOT EXISTS kimera_verifications (
    verified_at DOUBLE NOT NULL,
    mode TEXT NOT NULL,
    verdict TEXT NOT NULL,
    findings JSON
)"""
DIGESTS_TABLE = "kimera_verify_digests"
DIGESTS_DDL = """CREATE TABLE IF NOT EXISTS kimera_verify_digests (
    store TEXT NOT NULL,           -- the source table: legacy_geoids, legacy_scars, identities
    kh UBIGINT NOT NULL,           -- hash(key)
    fingerprint UBIGINT NOT NULL,  -- hash of the row's stored columns, verbatim
    digest UBIGINT NOT NULL,       -- hash of the row's normalised mapped fields
    seal UBIGINT NOT NULL          -- hash(recipe, store, kh, fingerprint, digest)
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


# A row's digest: hash(identity_type, raw, echo, lang_axis, tags, weight, related_ids, meta,
# created_us, updated_us), every text as minified JSON text (strings quoted, as to_json quotes
# the legacy text columns), JSON null as SQL NULL, timestamps in whole microseconds. A geoid's
# related_ids: legacy_geoids has no column for it, so an empty list in identities is
# normalised to NULL like legacy's.
_US = "TRY_CAST(round({c} * 1000000) AS BIGINT)"
SOURCES: tuple[Source, ...] = (
    Source(
        "legacy_geoids",
        "legacy",
        "gid",
        ("gid", "raw", "echo", "lang_axis", "tags", "weight", "meta", "created_at", "updated_at"),
        "hash('geoid', to_json(raw)::VARCHAR, to_json(echo)::VARCHAR, "
        "to_json(lang_axis)::VARCHAR, kimera_jnorm(tags), weight, NULL::VARCHAR, "
        f"kimera_jnorm(meta), {_US.format(c='created_at')}, {_US.format(c='updated_at')})",
    ),
    Source(
        "legacy_scars",
        "legacy",
        "id",
        ("id", "weight", "related_ids", "meta", "created_at", "updated_at"),
        "hash('scar', NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR, weight, "
        "kimera_jnorm(related_ids), kimera_jnorm(meta), "
        f"{_US.format(c='created_at')}, {_US.format(c='updated_at')})",
    ),
    Source(
        "identities",
        "new",
        "id",
        ("id", "identity_type", "data"),
        "hash(identity_type, nullif(f[1], 'null'), nullif(f[2], 'null'), nullif(f[3], 'null'), "
        "nullif(f[4], 'null'), TRY_CAST(f[5] AS DOUBLE), "
        "CASE WHEN identity_type = 'geoid' AND f[6] IN ('[]', 'null') THEN NULL "
        "ELSE nullif(f[6], 'null') END, nullif(f[7], 'null'), "
        "kimera_iso_us(kimera_unquote(f[8])), kimera_iso_us(kimera_unquote(f[9])))",
        # one parse of each document: every field comes out as minified JSON text
        "json_extract(data, ['$.raw', '$.echo', '$.lang_axis', '$.tags', '$.weight', "
        "'$.related_ids', '$.meta', '$.created_at', '$.updated_at'])::VARCHAR[]",
    ),
)
LEGACY_SOURCES = tuple(s for s in SOURCES if s.side == "legacy")
NEW_SOURCES = tuple(s for s in SOURCES if s.side == "new")

# What a cached digest was computed with: the digest SQL, the macros it calls and the DuckDB
# version (hash() and json() may change between versions). A cache entry sealed under another
# recipe is ignored, so changing any of them invalidates the cache as a whole.
RECIPE = hashlib.sha256(
    json.dumps(
        {
            "duckdb": duckdb.__version__,
            "macros": MACROS,
            "sources": [[s.table, s.key, s.stored, s.digest, s.parsed] for s in SOURCES],
        }
    ).encode()
).hexdigest()

# Per row of one source: (id,) kh = hash(key), fp = the fingerprint, rh = the digest (cached or
# computed; the CASE computes it, and parses the document, only for rows the cache lacks),
# miss = whether it was computed. {where} filters on the key (segments or incremental).
ROWS_SQL = """
SELECT {select_id}kh, fp, CASE WHEN cached IS NULL THEN {digest} ELSE cached END AS rh,
       cached IS NULL AS miss
FROM (
    SELECT p.*, c.cached{parsed}
    FROM (SELECT {key} AS id, hash({key}) AS kh, {fingerprint} AS fp, {columns}
          FROM {table} WHERE {where}) p
    {join}
)
"""
# A cache entry counts only if its seal holds: a hand-edited entry (digest or fingerprint
# changed alone) is not used, and neither is one computed under another recipe.
CACHE_JOIN = """LEFT JOIN (
        SELECT kh, fingerprint, digest AS cached FROM kimera_verify_digests
        WHERE store = $store AND seal = hash($recipe, store, kh, fingerprint, digest)) c
    ON p.kh = c.kh AND p.fp = c.fingerprint"""
NO_CACHE_JOIN = "CROSS JOIN (SELECT NULL::UBIGINT AS cached) c"
CACHE_STATS_SQL = """
SELECT store, count(*) AS entries,
       count(*) FILTER (WHERE seal = hash($recipe, store, kh, fingerprint, digest)) AS sealed
FROM kimera_verify_digests GROUP BY store
"""

SEGMENT_SQL = """
SELECT kh >> {shift} AS seg, count(*) AS n, sum(rh::HUGEINT) AS s
FROM ({side}) WHERE {where} GROUP BY seg
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


def _install(con: duckdb.DuckDBPyConnection) -> None:
    for macro in MACROS:
        con.execute(macro)


def _hex(digest: int) -> str:
    return f"{int(digest) & ((1 << 128) - 1):032x}"


def rows_table(source: Source) -> str:
    """The temp table holding one source's per-row key hashes and digests during a run."""
    return vetted_identifier(f"kimera_verify_rows_{source.table}")


def rows_sql(
    source: Source,
    *,
    where: str = "true",
    fingerprint: bool = False,
    cache: bool = False,
    with_id: bool = False,
) -> tuple[str, dict[str, str]]:
    """SQL and parameters for (id,) kh, fp, rh, miss over ``source`` rows matching ``where``.

    ``where`` is SQL built here from vetted identifiers, with ``{key}`` for the key column.
    ``fingerprint`` computes fp (else NULL); ``cache`` reuses digests from the cache table.
    """
    key = vetted_identifier(source.key)
    sql = ROWS_SQL.format(
        select_id="id, " if with_id else "",
        digest=source.digest,
        parsed=(
            f", CASE WHEN c.cached IS NULL THEN {source.parsed} END AS f" if source.parsed else ""
        ),
        key=key,
        fingerprint=row_hash_sql(list(source.stored)) if fingerprint or cache else "NULL::UBIGINT",
        columns=", ".join(vetted_identifier(c) for c in source.stored if c != source.key),
        table=vetted_identifier(source.table),
        where=where.format(key=key),
        join=CACHE_JOIN if cache else NO_CACHE_JOIN,
    )
    return sql, ({"store": source.table, "recipe": RECIPE} if cache else {})


def _side_sql(side: str) -> str:
    """Every (kh, rh) of one side's per-row temp tables."""
    return " UNION ALL ".join(
        f"SELECT kh, rh FROM {rows_table(s)}" for s in SOURCES if s.side == side
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


def _duplicates(
    con: duckdb.DuckDBPyConnection, report: VerificationReport, sample: int, keys: str | None
) -> None:
    """Duplicate keys among ``keys`` (a temp table of ids), or among candidate key hashes.

    With ``keys`` None, the candidates are the key hashes seen twice in the per-row temp
    tables (every duplicate key is among them); only their rows are grouped by id.
    """
    if keys is None:
        con.execute(
            "CREATE OR REPLACE TEMP TABLE kimera_verify_dupkh AS "
            f"SELECT kh FROM ({_side_sql('legacy')}) GROUP BY kh HAVING count(*) > 1 UNION "
            f"SELECT kh FROM ({_side_sql('new')}) GROUP BY kh HAVING count(*) > 1"
        )
        if con.execute("SELECT count(*) FROM kimera_verify_dupkh").fetchone()[0] == 0:
            restrict = "false"
        else:
            restrict = "hash({key}) IN (SELECT kh FROM kimera_verify_dupkh)"
    else:
        restrict = "{key} IN (SELECT id FROM " + vetted_identifier(keys) + ")"
    sql = DUPLICATES_SQL.format(
        where_gid="WHERE " + restrict.format(key="gid"),
        where_id="WHERE " + restrict.format(key="id"),
        and_id="AND " + restrict.format(key="id"),
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE kimera_verify_dups AS {sql}")
    total = con.execute("SELECT count(*) FROM kimera_verify_dups").fetchone()[0]
    rows = con.execute(
        "SELECT store, id, n FROM kimera_verify_dups ORDER BY store, id LIMIT ?", [sample]
    ).fetchall()
    report.duplicate_keys = Finding(total, [{"store": s, "id": i, "rows": n} for s, i, n in rows])


def _table_exists(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND table_name = ?",
            [table],
        ).fetchone()[0]
    )


def _writable(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute(
        "SELECT readonly FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()
    return row is not None and not row[0]


def _digest_rows(
    con: duckdb.DuckDBPyConnection, report: VerificationReport, use_cache: bool
) -> None:
    """Every row of both stores into the per-row temp tables: (kh, fp, rh, miss).

    With the cache, a row's digest is reused when the cache holds a sealed entry for its key
    hash and current fingerprint, and computed otherwise; on a writable connection the
    computed digests are written back (see _persist).
    """
    t0 = time.perf_counter()
    cached = use_cache and _table_exists(con, DIGESTS_TABLE)
    entries: dict[str, tuple[int, int]] = {}
    if cached:
        for store, n, sealed in con.execute(CACHE_STATS_SQL, {"recipe": RECIPE}).fetchall():
            entries[store] = (int(n), int(sealed))
    expected = {
        "legacy_geoids": report.counts["legacy"].get("geoid", 0),
        "legacy_scars": report.counts["legacy"].get("scar", 0),
        "identities": report.counts["new"]["total"],
    }
    stats: dict[str, dict[str, int]] = {}
    ignored = []
    for source in SOURCES:
        use = cached and source.table in entries
        for attempt in (use, False) if use else (False,):
            sql, params = rows_sql(source, fingerprint=use_cache, cache=attempt)
            con.execute(f"CREATE OR REPLACE TEMP TABLE {rows_table(source)} AS {sql}", params)
            rows, misses = con.execute(
                f"SELECT count(*), count(*) FILTER (WHERE miss) FROM {rows_table(source)}"
            ).fetchone()
            if not attempt or rows == expected[source.table]:
                break
            # more rows than the table holds: duplicate cache entries fanned the join out
            ignored.append(source.table)
        n, sealed = entries.get(source.table, (0, 0))
        stats[source.table] = {"rows": rows, "misses": misses, "entries": n, "sealed": sealed}
    written = _persist(con, stats) if use_cache and _writable(con) else None
    report.checksums["digest_cache"] = {
        "enabled": use_cache,
        "reused": sum(s["rows"] - s["misses"] for s in stats.values()),
        "recomputed": sum(s["misses"] for s in stats.values()),
        "rejected": sum(s["entries"] - s["sealed"] for s in stats.values()),
        "ignored": ignored,
        "written": written,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def _persist(con: duckdb.DuckDBPyConnection, stats: dict[str, dict[str, int]]) -> int:
    """Write the digests computed in this run to the cache; returns the entries written.

    An entry is written only with the fingerprint of the row version its digest was computed
    from (both come from one statement), so the cache never holds a digest for content it
    was not computed from. A store whose entries are mostly new, stale or rejected is
    rewritten; otherwise only its changed keys are replaced.
    """
    con.execute(DIGESTS_DDL)
    written = 0
    for source in SOURCES:
        s = stats[source.table]
        unused = s["entries"] - (s["rows"] - s["misses"])  # stale (deleted keys) or rejected
        if s["misses"] == 0 and unused <= 0:
            continue
        table = rows_table(source)
        params = {"store": source.table, "recipe": RECIPE}
        if s["misses"] + max(unused, 0) > CACHE_REWRITE_SHARE * max(s["rows"], 1):
            con.execute("DELETE FROM kimera_verify_digests WHERE store = ?", [source.table])
            which = "true"
        else:
            con.execute(
                "DELETE FROM kimera_verify_digests WHERE store = $store AND ("
                f"kh IN (SELECT kh FROM {table} WHERE miss) "
                "OR seal IS DISTINCT FROM hash($recipe, store, kh, fingerprint, digest))",
                params,
            )
            which = "miss"
        written += con.execute(
            "INSERT INTO kimera_verify_digests SELECT DISTINCT $store, kh, fp, rh, "
            f"hash($recipe, $store, kh, fp, rh) FROM {table} WHERE {which}",
            params,
        ).fetchone()[0]
    return written


def _segments(
    con: duckdb.DuckDBPyConnection, shift: int, parents: list[int] | None, parent_shift: int
) -> tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]:
    """(legacy, new) checksum per segment of ``64 - shift`` key-hash bits, inside ``parents``.

    Reads the per-row temp tables only: no source row is read again.
    """
    if parents is None:
        where = "true"
    else:
        con.execute("CREATE OR REPLACE TEMP TABLE kimera_verify_segs (seg UBIGINT)")
        con.executemany("INSERT INTO kimera_verify_segs VALUES (?)", [[p] for p in parents])
        # parent_shift is an int computed here, never input
        where = f"kh >> {int(parent_shift)} IN (SELECT seg FROM kimera_verify_segs)"
    out = []
    for side in ("legacy", "new"):
        sql = SEGMENT_SQL.format(shift=int(shift), side=_side_sql(side), where=where)
        out.append({int(seg): (int(n), int(s)) for seg, n, s in con.execute(sql).fetchall()})
    return out[0], out[1]


def _initial_bits(rows: int) -> int:
    if rows <= TOP_SEGMENT_ROWS:
        return 0
    return min(16, math.ceil(math.log2(rows / TOP_SEGMENT_ROWS)))


def _bisect(con: duckdb.DuckDBPyConnection, report: VerificationReport) -> tuple[int, list[int]]:
    """Descend into differing segments; returns (shift, leaf segments to compare row by row)."""
    total = max(report.counts["legacy"]["total"], report.counts["new"]["total"])
    bits = _initial_bits(total)
    parents: list[int] | None = None
    parent_shift = 64
    levels = []
    while True:
        shift = 64 - bits
        t0 = time.perf_counter()
        legacy, new = _segments(con, shift, parents, parent_shift)
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
            or bits + SPLIT_BITS > 64
            or diff_rows <= LEAF_ROWS * len(differing)
            or diff_rows > total // 2
        ):
            return shift, differing
        parents, parent_shift = differing, shift
        bits += SPLIT_BITS


def _materialise_sides(con: duckdb.DuckDBPyConnection, where: str) -> None:
    """(id, kh, rh) of the rows matching ``where`` ({key}: the key column), per side."""
    for side, table in (("legacy", "kimera_verify_l"), ("new", "kimera_verify_n")):
        parts = [rows_sql(s, where=where, with_id=True)[0] for s in SOURCES if s.side == side]
        con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS " + " UNION ALL ".join(parts))


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
            reasons.append(f"{n:,} rows with a NULL key in the {store} store")
    checks = (
        (report.duplicate_keys, "duplicate keys"),
        (report.missing_in_new, "keys in legacy but not in identities"),
        (report.missing_in_legacy, "keys in identities but not in legacy"),
        (report.field_mismatches, "rows whose mapped fields differ"),
    )
    for finding_, what in checks:
        if finding_.total:
            reasons.append(f"{finding_.total:,} {what}")
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
        _digest_rows(con, report, cache)
        _duplicates(con, report, sample, keys=None)
        shift, leaves = _bisect(con, report)
        report.checksums["pass_seconds"] = round(
            report.checksums["digest_cache"]["seconds"] + report.checksums["levels"][0]["seconds"],
            4,
        )
        if leaves:
            con.execute("CREATE OR REPLACE TEMP TABLE kimera_verify_segs (seg UBIGINT)")
            con.executemany("INSERT INTO kimera_verify_segs VALUES (?)", [[s] for s in leaves])
            # shift is an int computed here, never input
            _materialise_sides(
                con, f"hash({{key}}) >> {int(shift)} IN (SELECT seg FROM kimera_verify_segs)"
            )
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
        _materialise_sides(con, "{key} IN (SELECT id FROM kimera_verify_keys)")
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
        "kimera_verify_dupkh",
        "kimera_verify_keys",
    ):
        con.execute(f"DROP TABLE IF EXISTS {name}")
    for source in SOURCES:
        con.execute(f"DROP TABLE IF EXISTS {rows_table(source)}")
